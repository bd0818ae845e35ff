// Dequantisation kernels of the non-linear block types (see nl.cuh, nl-math.cuh).

#include "nl.cuh"
#include "nl-math.cuh"

#define NL_DEQUANT_BLOCK_SIZE 256

// weights 4i .. 4i+3 of the row at vx to y[4i .. 4i+3]
template <int B, bool XS, typename dst_t>
static __device__ __forceinline__ void nl_dequant_store4(const void * __restrict__ vx, const int64_t i,
                                                         dst_t * __restrict__ y) {
    float v[4];
    nl_dequant4<B, XS>(vx, i, v);
#pragma unroll
    for (int t = 0; t < 4; ++t) {
        y[4 * i + t] = ggml_cuda_cast<dst_t>(v[t]);
    }
}

// a whole tensor, contiguous: thread i writes weights 4i .. 4i+3
template <int B, bool XS, typename dst_t>
static __global__ void k_nl_dequantize(const void * __restrict__ vx, dst_t * __restrict__ y, const int64_t n4) {
    const int64_t i = (int64_t) blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n4) {
        nl_dequant_store4<B, XS>(vx, i, y);
    }
}

template <int B, bool XS, typename dst_t>
static void nl_dequantize_cuda(const void * vx, dst_t * y, const int64_t k, cudaStream_t stream) {
    GGML_ASSERT(k % nl_qk(XS) == 0);
    const int64_t n4 = k / 4;
    const int64_t nblocks = (n4 + NL_DEQUANT_BLOCK_SIZE - 1) / NL_DEQUANT_BLOCK_SIZE;
    k_nl_dequantize<B, XS><<<nblocks, NL_DEQUANT_BLOCK_SIZE, 0, stream>>>(vx, y, n4);
}

template <typename dst_t>
static to_t_cuda_t<dst_t> nl_dequantize_for(ggml_type type) {
    switch (type) {
        case GGML_TYPE_NL2_XS: return nl_dequantize_cuda<2, true,  dst_t>;
        case GGML_TYPE_NL3_XS: return nl_dequantize_cuda<3, true,  dst_t>;
        case GGML_TYPE_NL5_XS: return nl_dequantize_cuda<5, true,  dst_t>;
        case GGML_TYPE_NL6_XS: return nl_dequantize_cuda<6, true,  dst_t>;
        case GGML_TYPE_NL2_32: return nl_dequantize_cuda<2, false, dst_t>;
        case GGML_TYPE_NL3_32: return nl_dequantize_cuda<3, false, dst_t>;
        case GGML_TYPE_NL5_32: return nl_dequantize_cuda<5, false, dst_t>;
        case GGML_TYPE_NL6_32: return nl_dequantize_cuda<6, false, dst_t>;
        default:               return nullptr;
    }
}

to_fp32_cuda_t ggml_cuda_nl_to_fp32(ggml_type type) { return nl_dequantize_for<float>(type); }
to_fp16_cuda_t ggml_cuda_nl_to_fp16(ggml_type type) { return nl_dequantize_for<half>(type); }
to_bf16_cuda_t ggml_cuda_nl_to_bf16(ggml_type type) { return nl_dequantize_for<nv_bfloat16>(type); }

// GET_ROWS: blockIdx.x = row of src1 (i10), y strides over the row's groups of four weights, z over (i11, i12)
template <int B, bool XS, typename dst_t>
static __global__ void k_nl_get_rows(
        const void * __restrict__ src0, const int32_t * __restrict__ src1, dst_t * __restrict__ dst,
        const int64_t ne00, const int64_t ne11, const int64_t ne12,
        const size_t s1, const size_t s2, const size_t s3, const size_t nb01, const size_t nb02, const size_t nb03,
        const size_t s10, const size_t s11, const size_t s12) {
    const int64_t n4 = ne00 / 4;
    for (int64_t z = blockIdx.z; z < ne11 * ne12; z += gridDim.z) {
        const int64_t i10 = blockIdx.x;
        const int64_t i11 = z / ne12;
        const int64_t i12 = z % ne12;
        const int64_t i01 = src1[i10 * s10 + i11 * s11 + i12 * s12];
        const char * src0_row = (const char *) src0 + i01 * nb01 + i11 * nb02 + i12 * nb03;
        dst_t * dst_row = dst + i10 * s1 + i11 * s2 + i12 * s3;
        const int64_t stride = (int64_t) gridDim.y * blockDim.x;
        for (int64_t i = (int64_t) blockIdx.y * blockDim.x + threadIdx.x; i < n4; i += stride) {
            nl_dequant_store4<B, XS>(src0_row, i, dst_row);
        }
    }
}

template <int B, bool XS, typename dst_t>
static void nl_get_rows_cuda(
        const void * src0_d, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03, int64_t ne10, int64_t ne11, int64_t ne12,
        size_t nb10, size_t nb11, size_t nb12, size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
    GGML_ASSERT(ne00 % nl_qk(XS) == 0);
    const int64_t n4 = ne00 / 4;
    const dim3 block_dims(NL_DEQUANT_BLOCK_SIZE, 1, 1);
    const int64_t ny = (n4 + NL_DEQUANT_BLOCK_SIZE - 1) / NL_DEQUANT_BLOCK_SIZE;
    const dim3 block_nums(ne10, MIN(ny, UINT16_MAX), MIN(ne11 * ne12, UINT16_MAX));
    k_nl_get_rows<B, XS><<<block_nums, block_dims, 0, stream>>>(
        src0_d, src1_d, dst_d, ne00, ne11, ne12,
        nb1 / sizeof(dst_t), nb2 / sizeof(dst_t), nb3 / sizeof(dst_t), nb01, nb02, nb03,
        nb10 / sizeof(int32_t), nb11 / sizeof(int32_t), nb12 / sizeof(int32_t));
}

template <typename dst_t>
void ggml_cuda_nl_get_rows(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream) {
#define NL_GET_ROWS(B, XS) nl_get_rows_cuda<B, XS>(src0_d, src1_d, dst_d, ne00, nb01, nb02, nb03, ne10, ne11, ne12, \
                                                   nb10, nb11, nb12, nb1, nb2, nb3, stream)
    switch (src0_type) {
        case GGML_TYPE_NL2_XS: NL_GET_ROWS(2, true);  break;
        case GGML_TYPE_NL3_XS: NL_GET_ROWS(3, true);  break;
        case GGML_TYPE_NL5_XS: NL_GET_ROWS(5, true);  break;
        case GGML_TYPE_NL6_XS: NL_GET_ROWS(6, true);  break;
        case GGML_TYPE_NL2_32: NL_GET_ROWS(2, false); break;
        case GGML_TYPE_NL3_32: NL_GET_ROWS(3, false); break;
        case GGML_TYPE_NL5_32: NL_GET_ROWS(5, false); break;
        case GGML_TYPE_NL6_32: NL_GET_ROWS(6, false); break;
        default: GGML_ABORT("%s: not an NL type: %s", __func__, ggml_type_name(src0_type));
    }
#undef NL_GET_ROWS
}

#define NL_GET_ROWS_INSTANCE(T) \
    template void ggml_cuda_nl_get_rows<T>( \
        const void *, ggml_type, const int32_t *, T *, int64_t, size_t, size_t, size_t, int64_t, int64_t, int64_t, \
        size_t, size_t, size_t, size_t, size_t, size_t, cudaStream_t);
NL_GET_ROWS_INSTANCE(float)
NL_GET_ROWS_INSTANCE(half)
NL_GET_ROWS_INSTANCE(nv_bfloat16)
NL_GET_ROWS_INSTANCE(int32_t)
