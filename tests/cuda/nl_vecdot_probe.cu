// Compile-only probe for tests/test_nl_cuda.py: instantiates the NL MMVQ dot products (nl-vecdotq.cuh, included by
// the patched mmvq.cu) through the same case macros mmvq.cu expands, for every NL type, so nvcc checks them for each
// target architecture without compiling all of mmvq.cu. Never linked or run.

#include "common.cuh"
#include "vecdotq.cuh"
#include "nl-vecdotq.cuh"

typedef float (*nl_probe_vec_dot_t)(const void * __restrict__, const block_q8_1 * __restrict__, const int &,
                                    const int &);

static constexpr __device__ nl_probe_vec_dot_t nl_probe_vec_dot(ggml_type type) {
    switch (type) {
        GGML_CUDA_NL_VEC_DOT_CASES
        default: return nullptr;
    }
}

static constexpr __host__ __device__ int nl_probe_vdr(ggml_type type) {
    switch (type) {
        GGML_CUDA_NL_VDR_CASES
        default: return 0;
    }
}

// one row, MMVQ's split: thread tid takes block tid / (qi/vdr), iqs = vdr * (tid % (qi/vdr))
template <ggml_type type>
static __global__ void nl_probe_row(const void * vx, const block_q8_1 * vy, float * dst, const int nblocks) {
    constexpr int qk  = ggml_cuda_type_traits<type>::qk;
    constexpr int qi  = ggml_cuda_type_traits<type>::qi;
    constexpr int vdr = nl_probe_vdr(type);
    static_assert(vdr == NL_VDR && qi % vdr == 0, "NL MMVQ split");
    constexpr nl_probe_vec_dot_t vec_dot = nl_probe_vec_dot(type);
    float sum = 0.f;
    for (int kbx = threadIdx.x / (qi / vdr); kbx < nblocks; kbx += blockDim.x / (qi / vdr)) {
        sum += vec_dot(vx, vy + kbx * (qk / QK8_1), kbx, vdr * (threadIdx.x % (qi / vdr)));
    }
    dst[threadIdx.x] = sum;
}

template __global__ void nl_probe_row<GGML_TYPE_NL2_XS>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL3_XS>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL5_XS>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL6_XS>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL2_32>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL3_32>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL5_32>(const void *, const block_q8_1 *, float *, int);
template __global__ void nl_probe_row<GGML_TYPE_NL6_32>(const void *, const block_q8_1 *, float *, int);
