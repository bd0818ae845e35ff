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

// The fields of one block, taken through its type's struct. One body of code serves every bit-width of a layout
// (their structs differ only in the length of qs), so that code works on the fields that block_nl<b>_<layout>'s
// accessor below gives it, never on byte offsets. scales_h / scales_l are NULL in the _32 layouts.
typedef struct {
    const uint16_t * d;         // fp16 scale (_XS: of the super-block)
    const uint8_t  * scales_h;  // _XS: top 2 bits of the 8 sub-block scales
    const uint8_t  * scales_l;  // _XS: low 4 bits
    const uint8_t  * qs;        // index planes
} ggml_nl_block;
typedef struct {  // the same, to write (the encoder)
    uint16_t * d;
    uint8_t  * scales_h;
    uint8_t  * scales_l;
    uint8_t  * qs;
} ggml_nl_block_out;
typedef ggml_nl_block     (*ggml_nl_block_fn)(const void * blocks, int64_t i);
typedef ggml_nl_block_out (*ggml_nl_block_out_fn)(void * blocks, int64_t i);

// ggml_nl_block_nl<b>_<layout>(row, i) / ggml_nl_block_out_nl<b>_<layout>(row, i): the fields of block i of a row
#define GGML_NL_XS_ACCESS(B) \
    static inline ggml_nl_block ggml_nl_block_nl##B##_xs(const void * blocks, int64_t i) { \
        const block_nl##B##_xs * x = (const block_nl##B##_xs *) blocks + i; \
        ggml_nl_block b; b.d = &x->d; b.scales_h = x->scales_h; b.scales_l = x->scales_l; b.qs = x->qs; \
        return b; \
    } \
    static inline ggml_nl_block_out ggml_nl_block_out_nl##B##_xs(void * blocks, int64_t i) { \
        block_nl##B##_xs * x = (block_nl##B##_xs *) blocks + i; \
        ggml_nl_block_out b; b.d = &x->d; b.scales_h = x->scales_h; b.scales_l = x->scales_l; b.qs = x->qs; \
        return b; \
    }
#define GGML_NL_32_ACCESS(B) \
    static inline ggml_nl_block ggml_nl_block_nl##B##_32(const void * blocks, int64_t i) { \
        const block_nl##B##_32 * x = (const block_nl##B##_32 *) blocks + i; \
        ggml_nl_block b; b.d = &x->d; b.scales_h = NULL; b.scales_l = NULL; b.qs = x->qs; \
        return b; \
    } \
    static inline ggml_nl_block_out ggml_nl_block_out_nl##B##_32(void * blocks, int64_t i) { \
        block_nl##B##_32 * x = (block_nl##B##_32 *) blocks + i; \
        ggml_nl_block_out b; b.d = &x->d; b.scales_h = NULL; b.scales_l = NULL; b.qs = x->qs; \
        return b; \
    }

GGML_NL_XS_ACCESS(2) GGML_NL_XS_ACCESS(3) GGML_NL_XS_ACCESS(5) GGML_NL_XS_ACCESS(6)
GGML_NL_32_ACCESS(2) GGML_NL_32_ACCESS(3) GGML_NL_32_ACCESS(5) GGML_NL_32_ACCESS(6)

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

// signed scale of sub-block ib of an _XS block: 4 low bits from scales_l, 2 high from scales_h, minus 32
static inline int ggml_nl_sub_scale(const ggml_nl_block * b, int ib) {
    const int lo = (b->scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf;
    const int hi = (b->scales_h[ib / 4] >> (2 * (ib % 4))) & 3;
    return (lo | (hi << 4)) - 32;
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

// Names for the type ids no type has: upstream's end (43) up to the NL ids, and the gaps between those. ggml sizes
// its type tables by GGML_TYPE_COUNT and prints type_name with %s (gguf.cpp's errors among others), so every id
// below the count has a name (blck_size stays 0: such an id is refused when a file names it, patch 0010). The
// table holds these first, so a type that upstream adds at one of these ids overrides its placeholder.
#define GGML_NL_UNUSED_TYPE(ID) [ID] = { .type_name = "unused_" #ID },
#define GGML_NL_UNUSED_TYPES_10(T) \
    GGML_NL_UNUSED_TYPE(T##0) GGML_NL_UNUSED_TYPE(T##1) GGML_NL_UNUSED_TYPE(T##2) GGML_NL_UNUSED_TYPE(T##3) \
    GGML_NL_UNUSED_TYPE(T##4) GGML_NL_UNUSED_TYPE(T##5) GGML_NL_UNUSED_TYPE(T##6) GGML_NL_UNUSED_TYPE(T##7) \
    GGML_NL_UNUSED_TYPE(T##8) GGML_NL_UNUSED_TYPE(T##9)
#define GGML_NL_UNUSED_TYPE_TRAITS \
    GGML_NL_UNUSED_TYPE(43) GGML_NL_UNUSED_TYPE(44) GGML_NL_UNUSED_TYPE(45) GGML_NL_UNUSED_TYPE(46) \
    GGML_NL_UNUSED_TYPE(47) GGML_NL_UNUSED_TYPE(48) GGML_NL_UNUSED_TYPE(49) \
    GGML_NL_UNUSED_TYPES_10(5) GGML_NL_UNUSED_TYPES_10(6) GGML_NL_UNUSED_TYPES_10(7) GGML_NL_UNUSED_TYPES_10(8) \
    GGML_NL_UNUSED_TYPES_10(9) \
    GGML_NL_UNUSED_TYPE(100) GGML_NL_UNUSED_TYPE(101) GGML_NL_UNUSED_TYPE(104) \
    GGML_NL_UNUSED_TYPE(107) GGML_NL_UNUSED_TYPE(108) GGML_NL_UNUSED_TYPE(109) GGML_NL_UNUSED_TYPE(110) \
    GGML_NL_UNUSED_TYPE(111) GGML_NL_UNUSED_TYPE(114)

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
