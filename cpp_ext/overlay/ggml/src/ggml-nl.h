#pragma once

// Non-linear block types (NL*): 2^b int8 codebook levels, scaled per 32 weights.
//
//   NLb_XS  256-weight super-block: fp16 d, signed 6-bit scales per 32 (stored +32, as IQ4_XS), b-bit indices
//   NLb_32  32-weight block: fp16 d, b-bit indices
//
// A weight decodes as scale * values[index]. Indices are stored in bit planes, low plane first (widths in
// ggml_nl_specs): in a group of G weights, byte j of a k-bit plane holds weight j + m*G*k/8 at bit m*k, with
// G = 256/k in the _XS layouts (one 32-byte load and one shift give 32 consecutive indices) and G = 32 in the
// _32 layouts.
//
// The codebooks, plane widths and the encoder's candidate scales come from qgguf's design study and are defined in
// qgguf/formats/nl.py; the block below is written from there (the Python encoder and this one give the same bytes).

#include "ggml.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define QK_NL    32   // weights per scale
#define QK_NL_XS 256  // weights per super-block of the _XS layouts

#define GGML_NL_XS_BLOCK(B) \
    typedef struct { uint16_t d; uint8_t scales_h[2]; uint8_t scales_l[4]; uint8_t qs[QK_NL_XS*(B)/8]; } block_nl##B##_xs;
#define GGML_NL_32_BLOCK(B) \
    typedef struct { uint16_t d; uint8_t qs[QK_NL*(B)/8]; } block_nl##B##_32;

GGML_NL_XS_BLOCK(2) GGML_NL_XS_BLOCK(3) GGML_NL_XS_BLOCK(5) GGML_NL_XS_BLOCK(6)
GGML_NL_32_BLOCK(2) GGML_NL_32_BLOCK(3) GGML_NL_32_BLOCK(5) GGML_NL_32_BLOCK(6)

// byte offsets of the fields, the same for every b of a layout (code that serves all bit-widths reads blocks as
// bytes)
#define GGML_NL_XS_SCALES_H 2
#define GGML_NL_XS_SCALES_L 4
#define GGML_NL_XS_QS       8
#define GGML_NL_32_QS       2

// One bit-width's constants, indexed by bits: index bits, the low and high plane widths (0: no high plane), the
// codebook (2^bits sorted int8 levels, -127 first: the encoder maps each block's signed maximum there) and the
// encoder's candidate inverse scales num/max, num = -127 - lo, ..., -127 + hi in steps of step.
typedef struct { int lo, hi, step; } ggml_nl_candidates;
typedef struct {
    int bits, klo, khi;
    const int8_t * values;
    ggml_nl_candidates cand;
} ggml_nl_spec;

// BEGIN nl tables: written from qgguf/formats/nl.py by `python -m qgguf.formats.nl_tables --write`
static const int8_t ggml_nl_values_2[4] = {
    -127, -45, 14, 84,
};
static const int8_t ggml_nl_values_3[8] = {
    -127, -78, -46, -19, 5, 30, 59, 99,
};
static const int8_t ggml_nl_values_5[32] = {
    -127, -117, -101, -90, -81, -72, -64, -57, -50, -43, -36, -30, -24, -18, -12, -6,
    0, 6, 12, 17, 24, 30, 36, 43, 50, 58, 66, 74, 83, 93, 104, 117,
};
static const int8_t ggml_nl_values_6[64] = {
    -127, -123, -114, -107, -101, -96, -91, -86, -81, -77, -72, -68, -64, -60, -56, -53,
    -49, -46, -42, -39, -36, -32, -29, -26, -23, -20, -17, -14, -11, -9, -6, -3,
    0, 3, 6, 9, 11, 14, 17, 20, 23, 26, 29, 32, 36, 39, 42, 46,
    49, 53, 57, 60, 64, 68, 73, 77, 82, 87, 92, 97, 103, 109, 115, 122,
};
static const ggml_nl_spec ggml_nl_specs[7] = {
    { 0, 0, 0, NULL, { 0, 0, 0 } },  // no 0-bit type
    { 0, 0, 0, NULL, { 0, 0, 0 } },  // no 1-bit type
    { 2, 2, 0, ggml_nl_values_2, { 96, 16, 4 } },
    { 3, 2, 1, ggml_nl_values_3, { 48, 8, 2 } },
    { 0, 0, 0, NULL, { 0, 0, 0 } },  // no 4-bit type
    { 5, 4, 1, ggml_nl_values_5, { 16, 8, 1 } },
    { 6, 4, 2, ggml_nl_values_6, { 8, 4, 1 } },
};
// END nl tables

// signed scale of sub-block ib of the _XS block b: 4 low bits from scales_l, 2 high from scales_h, minus 32
static inline int ggml_nl_sub_scale(const uint8_t * b, int ib) {
    const uint8_t * scales_h = b + GGML_NL_XS_SCALES_H;
    const uint8_t * scales_l = b + GGML_NL_XS_SCALES_L;
    return (((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) | (((scales_h[ib / 4] >> (2 * (ib % 4))) & 3) << 4)) - 32;
}

#define GGML_NL_DECL(B, L) \
    GGML_API void   dequantize_row_nl##B##_##L(const void * GGML_RESTRICT x, float * GGML_RESTRICT y, int64_t k); \
    GGML_API void   quantize_row_nl##B##_##L##_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k); \
    GGML_API size_t quantize_nl##B##_##L(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, \
                                         int64_t n_per_row, const float * imatrix);

GGML_NL_DECL(2, xs) GGML_NL_DECL(3, xs) GGML_NL_DECL(5, xs) GGML_NL_DECL(6, xs)
GGML_NL_DECL(2, 32) GGML_NL_DECL(3, 32) GGML_NL_DECL(5, 32) GGML_NL_DECL(6, 32)

// every block's fp16 scale is finite
GGML_API bool ggml_nl_validate_row_data(enum ggml_type type, const void * data, size_t nbytes);

// the NL types, for the type switches of the backends (ops that treat every quantised type alike)
#define GGML_NL_TYPE_CASES \
    case GGML_TYPE_NL2_XS: case GGML_TYPE_NL3_XS: case GGML_TYPE_NL5_XS: case GGML_TYPE_NL6_XS: \
    case GGML_TYPE_NL2_32: case GGML_TYPE_NL3_32: case GGML_TYPE_NL5_32: case GGML_TYPE_NL6_32:

// ggml type_traits entries (ggml.c)
#define GGML_NL_TRAITS(B, L, U, QK) \
    [GGML_TYPE_NL##B##_##U] = { \
        .type_name      = "nl" #B "_" #L, \
        .blck_size      = QK, \
        .type_size      = sizeof(block_nl##B##_##L), \
        .is_quantized   = true, \
        .to_float       = (ggml_to_float_t) dequantize_row_nl##B##_##L, \
        .from_float_ref = (ggml_from_float_t) quantize_row_nl##B##_##L##_ref, \
    },
#define GGML_NL_TYPE_TRAITS \
    GGML_NL_TRAITS(2, xs, XS, QK_NL_XS) GGML_NL_TRAITS(3, xs, XS, QK_NL_XS) \
    GGML_NL_TRAITS(5, xs, XS, QK_NL_XS) GGML_NL_TRAITS(6, xs, XS, QK_NL_XS) \
    GGML_NL_TRAITS(2, 32, 32, QK_NL) GGML_NL_TRAITS(3, 32, 32, QK_NL) \
    GGML_NL_TRAITS(5, 32, 32, QK_NL) GGML_NL_TRAITS(6, 32, 32, QK_NL)

// ggml_quantize_chunk cases (ggml.c)
#define GGML_NL_QUANT(B, L, U) \
    case GGML_TYPE_NL##B##_##U: result = quantize_nl##B##_##L(src + start, (char *) dst + start_row * row_size, \
                                                             nrows, n_per_row, imatrix); break;
#define GGML_NL_QUANTIZE_CHUNK_CASES \
    GGML_NL_QUANT(2, xs, XS) GGML_NL_QUANT(3, xs, XS) GGML_NL_QUANT(5, xs, XS) GGML_NL_QUANT(6, xs, XS) \
    GGML_NL_QUANT(2, 32, 32) GGML_NL_QUANT(3, 32, 32) GGML_NL_QUANT(5, 32, 32) GGML_NL_QUANT(6, 32, 32)

#ifdef __cplusplus
}
#endif
