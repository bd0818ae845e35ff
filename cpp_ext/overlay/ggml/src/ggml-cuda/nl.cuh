#pragma once

// Dequantisation of the non-linear block types on CUDA (nl.cu): the contiguous to-F32/F16/BF16 converters that the
// cuBLAS matmul path and MUL_MAT_ID's per-expert fallback call through ggml_get_to_*_cuda, and GET_ROWS. Each thread
// decodes four weights with nl-math.cuh's nl_dequant4 (the values the C reference gives, bit for bit, before the
// cast to half or bf16). convert.cu and getrows.cu expand the case macros below (patch 0009).

#include "common.cuh"
#include "convert.cuh"
#include "ggml-nl.h"

to_fp32_cuda_t ggml_cuda_nl_to_fp32(ggml_type type);
to_fp16_cuda_t ggml_cuda_nl_to_fp16(ggml_type type);
to_bf16_cuda_t ggml_cuda_nl_to_bf16(ggml_type type);

// GET_ROWS of an NL src0 (arguments as getrows.cu's get_rows_cuda_q); dst_t: float, half, nv_bfloat16, int32_t
template <typename dst_t>
void ggml_cuda_nl_get_rows(
        const void * src0_d, ggml_type src0_type, const int32_t * src1_d, dst_t * dst_d,
        int64_t ne00, size_t nb01, size_t nb02, size_t nb03,
        int64_t ne10, int64_t ne11, int64_t ne12, size_t nb10, size_t nb11, size_t nb12,
        size_t nb1, size_t nb2, size_t nb3, cudaStream_t stream);

// ggml_get_to_{fp32,fp16,bf16}_cuda (convert.cu)
#define GGML_CUDA_NL_TO_FP32_CASES GGML_NL_TYPE_CASES return ggml_cuda_nl_to_fp32(type);
#define GGML_CUDA_NL_TO_FP16_CASES GGML_NL_TYPE_CASES return ggml_cuda_nl_to_fp16(type);
#define GGML_CUDA_NL_TO_BF16_CASES GGML_NL_TYPE_CASES return ggml_cuda_nl_to_bf16(type);

// ggml_cuda_get_rows_switch_src0_type (getrows.cu)
#define GGML_CUDA_NL_GET_ROWS_CASES \
    GGML_NL_TYPE_CASES \
        ggml_cuda_nl_get_rows(src0_d, src0_type, src1_d, dst_d, ne00, nb01, nb02, nb03, ne10, ne11, ne12, \
                              nb10, nb11, nb12, nb1, nb2, nb3, stream); \
        break;
