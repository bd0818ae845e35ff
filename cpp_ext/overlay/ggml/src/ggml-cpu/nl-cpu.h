#pragma once

// CPU kernels of the non-linear block types (see ggml-nl.h): activation-side quantisation and dot products.
// _XS types take Q8_K activations (as IQ4_XS), _32 types Q8_0 (as IQ4_NL).

#include "ggml-nl.h"

#ifdef __cplusplus
extern "C" {
#endif

#define GGML_NL_CPU_DECL(B, L, A) \
    void quantize_row_nl##B##_##L(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k); \
    void ggml_vec_dot_nl##B##_##L##_##A(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, \
                                         size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc); \
    void ggml_vec_dot_nl##B##_##L##_##A##_generic(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, \
                                                   const void * GGML_RESTRICT vy);

GGML_NL_CPU_DECL(2, xs, q8_K) GGML_NL_CPU_DECL(3, xs, q8_K) GGML_NL_CPU_DECL(5, xs, q8_K) GGML_NL_CPU_DECL(6, xs, q8_K)
GGML_NL_CPU_DECL(2, 32, q8_0) GGML_NL_CPU_DECL(3, 32, q8_0) GGML_NL_CPU_DECL(5, 32, q8_0) GGML_NL_CPU_DECL(6, 32, q8_0)

// An _XS super-block (its fields, ggml_nl_block_nl<bits>_xs) as the tiled matmul (tiled/nl-tiled.inc) takes it: the
// 256 codes as value + 128 in weight order, the fp16 scale d as float, the 8 sub-block scales as ls - 32.
void ggml_nl_unpack_xs(int bits, ggml_nl_block b, uint8_t * GGML_RESTRICT q, float * GGML_RESTRICT d,
                       int32_t * GGML_RESTRICT scales);

// type_traits_cpu entries (ggml-cpu.c)
#define GGML_NL_CPU_TRAIT(B, L, U, A, AT) \
    [GGML_TYPE_NL##B##_##U] = { \
        .from_float   = quantize_row_nl##B##_##L, \
        .vec_dot      = ggml_vec_dot_nl##B##_##L##_##A, \
        .vec_dot_type = AT, \
        .nrows        = 1, \
    },
#define GGML_NL_CPU_TYPE_TRAITS \
    GGML_NL_CPU_TRAIT(2, xs, XS, q8_K, GGML_TYPE_Q8_K) GGML_NL_CPU_TRAIT(3, xs, XS, q8_K, GGML_TYPE_Q8_K) \
    GGML_NL_CPU_TRAIT(5, xs, XS, q8_K, GGML_TYPE_Q8_K) GGML_NL_CPU_TRAIT(6, xs, XS, q8_K, GGML_TYPE_Q8_K) \
    GGML_NL_CPU_TRAIT(2, 32, 32, q8_0, GGML_TYPE_Q8_0) GGML_NL_CPU_TRAIT(3, 32, 32, q8_0, GGML_TYPE_Q8_0) \
    GGML_NL_CPU_TRAIT(5, 32, 32, q8_0, GGML_TYPE_Q8_0) GGML_NL_CPU_TRAIT(6, 32, 32, q8_0, GGML_TYPE_Q8_0)

#ifdef __cplusplus
}
#endif
