#pragma once

// MMVQ registration of the non-linear block types (ggml-nl.h): CUDA type traits and vec_dot_nl*_q8_1, the thin
// device wrappers of nl-math.cuh's per-thread dot product. mmvq.cu includes this after vecdotq.cuh and expands the
// case macros below in its three type switches (patch 0009), so matrix-vector products (batch-1 decode, batches up
// to MMVQ_MAX_BATCH_SIZE) and MUL_MAT_ID with few tokens run on these kernels; larger batches take the
// dequantise + cuBLAS path (nl.cu).

#include "common.cuh"
#include "ggml-nl.h"
#include "nl-math.cuh"

static_assert(sizeof(block_q8_1) == NL_Q8_1_BYTES, "nl-math.cuh assumes a 36-byte block_q8_1");
static_assert(QK8_1 == NL_QK_32 && QK_NL == NL_QK_32 && QK_NL_XS == NL_QK_XS, "NL block sizes");

#define GGML_CUDA_NL_TRAITS(B, L, U, XS) \
    static_assert(sizeof(block_nl##B##_##L) == nl_block_bytes(B, XS), "nl-math.cuh block size of nl" #B "_" #L); \
    template <> struct ggml_cuda_type_traits<GGML_TYPE_NL##B##_##U> { \
        static constexpr int qk = nl_qk(XS); \
        static constexpr int qr = 1; \
        static constexpr int qi = XS ? NL_QI_XS : NL_QI_32; \
        static constexpr int bs = sizeof(block_nl##B##_##L); \
    }; \
    static __device__ __forceinline__ float vec_dot_nl##B##_##L##_q8_1( \
            const void * __restrict__ vbq, const block_q8_1 * __restrict__ bq8_1, const int & kbx, const int & iqs) { \
        return nl_vec_dot_q8_1<B, XS>(vbq, bq8_1, kbx, iqs); \
    }

GGML_CUDA_NL_TRAITS(2, xs, XS, true)  GGML_CUDA_NL_TRAITS(3, xs, XS, true)
GGML_CUDA_NL_TRAITS(5, xs, XS, true)  GGML_CUDA_NL_TRAITS(6, xs, XS, true)
GGML_CUDA_NL_TRAITS(2, 32, 32, false) GGML_CUDA_NL_TRAITS(3, 32, 32, false)
GGML_CUDA_NL_TRAITS(5, 32, 32, false) GGML_CUDA_NL_TRAITS(6, 32, 32, false)

// get_vec_dot_q_cuda(type)
#define GGML_CUDA_NL_VEC_DOT_CASES \
    case GGML_TYPE_NL2_XS: return vec_dot_nl2_xs_q8_1; case GGML_TYPE_NL3_XS: return vec_dot_nl3_xs_q8_1; \
    case GGML_TYPE_NL5_XS: return vec_dot_nl5_xs_q8_1; case GGML_TYPE_NL6_XS: return vec_dot_nl6_xs_q8_1; \
    case GGML_TYPE_NL2_32: return vec_dot_nl2_32_q8_1; case GGML_TYPE_NL3_32: return vec_dot_nl3_32_q8_1; \
    case GGML_TYPE_NL5_32: return vec_dot_nl5_32_q8_1; case GGML_TYPE_NL6_32: return vec_dot_nl6_32_q8_1;

// get_vdr_mmvq(type)
#define GGML_CUDA_NL_VDR_CASES GGML_NL_TYPE_CASES return NL_VDR;

// mul_mat_vec_q_switch_type: the same call as every other type's case, with that function's argument names
#define GGML_CUDA_NL_MMVQ_CASE(T) \
    case T: \
        mul_mat_vec_q_switch_ncols_dst<T> \
            (vx, vy, ids, fusion, dst, ncols_x, nrows_x, ncols_dst, stride_row_x, stride_col_y, stride_col_dst, \
             nchannels_x, nchannels_y, nchannels_dst, stride_channel_x, stride_channel_y, stride_channel_dst, \
             nsamples_x, nsamples_dst, stride_sample_x, stride_sample_y, stride_sample_dst, ids_stride, stream); \
        break;
#define GGML_CUDA_NL_MMVQ_CASES \
    GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL2_XS) GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL3_XS) \
    GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL5_XS) GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL6_XS) \
    GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL2_32) GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL3_32) \
    GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL5_32) GGML_CUDA_NL_MMVQ_CASE(GGML_TYPE_NL6_32)
