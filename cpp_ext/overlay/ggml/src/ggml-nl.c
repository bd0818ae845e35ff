// Non-linear block types (NL*): reference quantiser (importance-weighted) and dequantiser. See ggml-nl.h.
//
// The quantiser is written float operation for float operation like qgguf's vectorised one
// (qgguf/formats/nl.py): sums run in index order from 0, the scale search visits the candidates in the same order
// and keeps a candidate only when strictly better, so both give the same bytes.

#include "ggml-nl.h"
#include "ggml-impl.h"

#include <assert.h>
#include <math.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define NL_GROUP_MAX_EPS 1e-15f
#define NL_SCALE_MAX     65504.0f  // the largest finite fp16: a block's scale is clamped to it

static_assert(sizeof(block_nl2_xs) == 2 + 2 + 4 + 64,  "wrong nl2_xs block size");
static_assert(sizeof(block_nl3_xs) == 2 + 2 + 4 + 96,  "wrong nl3_xs block size");
static_assert(sizeof(block_nl5_xs) == 2 + 2 + 4 + 160, "wrong nl5_xs block size");
static_assert(sizeof(block_nl6_xs) == 2 + 2 + 4 + 192, "wrong nl6_xs block size");
static_assert(sizeof(block_nl2_32) == 2 + 8,  "wrong nl2_32 block size");
static_assert(sizeof(block_nl3_32) == 2 + 12, "wrong nl3_32 block size");
static_assert(sizeof(block_nl5_32) == 2 + 20, "wrong nl5_32 block size");
static_assert(sizeof(block_nl6_32) == 2 + 24, "wrong nl6_32 block size");
// the code reads the fields through the structs; these pin the layout that gguf-py's and qgguf's decoders and the
// CUDA kernels (nl-math.cuh) read as bytes
static_assert(offsetof(block_nl2_xs, scales_h) == 2 && offsetof(block_nl6_xs, scales_l) == 4 &&
              offsetof(block_nl5_xs, qs) == 8, "wrong _XS field offsets");
static_assert(offsetof(block_nl3_32, qs) == 2, "wrong _32 field offsets");

typedef ggml_nl_spec nl_spec;  // one bit-width's codebook, plane widths and candidate scales (ggml-nl.h)

// #(levels <= k) for each integer k in [NL_TABLE_LO, NL_TABLE_HI]. The levels are integers, so
// #(levels <= x) = #(levels <= floor(x)): one load replaces the binary search for the bracket of x (as
// qgguf.formats.nl.index_table; every int8 level and every scaled weight the search tries lies inside the range).
#define NL_TABLE_LO (-256)
#define NL_TABLE_HI 255

typedef struct {
    uint8_t mu[NL_TABLE_HI - NL_TABLE_LO + 1];
} nl_table;

static void nl_table_init(const nl_spec * s, nl_table * t) {
    const int n = 1 << s->bits;
    int mu = 0;
    for (int k = NL_TABLE_LO; k <= NL_TABLE_HI; ++k) {
        while (mu < n && s->values[mu] <= k) ++mu;
        t->mu[k - NL_TABLE_LO] = (uint8_t) mu;
    }
}

// index of the nearest level; ties go to the upper level unless x is strictly nearer the lower one (ggml's
// best_index_int8 on the bracket found above)
static inline int nl_best_index(const nl_spec * s, const nl_table * t, float x) {
    const int n = 1 << s->bits;
    const float c = !(x >= NL_TABLE_LO) ? NL_TABLE_LO : x > NL_TABLE_HI ? NL_TABLE_HI : x;
    int k = (int) c;
    k -= (float) k > c;  // floor, without libm
    int mu = t->mu[k - NL_TABLE_LO];
    mu = mu < 1 ? 1 : mu > n - 1 ? n - 1 : mu;
    return x - s->values[mu - 1] < s->values[mu] - x ? mu - 1 : mu;
}

// ------------------------------------------------------------------------------------------------ bit planes
// group size of a k-bit plane: 256/k in a super-block, 32 in a block-32 layout
static inline int nl_group(int k, int n) { return n == QK_NL ? QK_NL : QK_NL_XS / k; }

static void nl_pack_plane(const uint8_t * L, int shift, int k, int n, uint8_t * q) {
    const int group = nl_group(k, n);
    const int per   = 8 / k;
    const int gb    = group / per;  // bytes per group
    const uint8_t mask = (uint8_t) ((1 << k) - 1);
    memset(q, 0, n * k / 8);
    for (int i = 0; i < n; ++i) {
        const int g = i / group, e = i % group;
        q[g * gb + e % gb] |= (uint8_t) (((L[i] >> shift) & mask) << (k * (e / gb)));
    }
}

static void nl_unpack_plane(const uint8_t * q, int shift, int k, int n, uint8_t * L) {
    const int group = nl_group(k, n);
    const int per   = 8 / k;
    const int gb    = group / per;
    const uint8_t mask = (uint8_t) ((1 << k) - 1);
    for (int i = 0; i < n; ++i) {
        const int g = i / group, e = i % group;
        L[i] |= (uint8_t) (((q[g * gb + e % gb] >> (k * (e / gb))) & mask) << shift);
    }
}

// the indices of one block (n = 256 or 32), planes starting at q
static void nl_unpack(const nl_spec * s, const uint8_t * q, int n, uint8_t * L) {
    memset(L, 0, n);
    nl_unpack_plane(q, 0, s->klo, n, L);
    if (s->khi) {
        nl_unpack_plane(q + n * s->klo / 8, s->klo, s->khi, n, L);
    }
}

static void nl_pack(const nl_spec * s, const uint8_t * L, int n, uint8_t * q) {
    nl_pack_plane(L, 0, s->klo, n, q);
    if (s->khi) {
        nl_pack_plane(L, s->klo, s->khi, n, q + n * s->klo / 8);
    }
}

// ------------------------------------------------------------------------------------------------ encoder
// scale of one 32-weight block: the candidate inverse scale num/max with the lowest weighted error under its
// least-squares scale, returned as the gain-unbiased scale sum(w*x*x) / sum(w*q*x) of that candidate (a
// least-squares scale shrinks every block's reconstruction by its relative error, and the shrinkage adds up across
// tensors; docs/design.md, "Gain-unbiased NL scales"). The gain-unbiased scale is used only when it is finite and has
// the least-squares scale's sign (a sum that underflowed to 0 or overflowed, or negative importance, breaks it); the
// result is clamped to the fp16 range, where a larger scale would be stored as Inf.
static float nl_block_scale(const nl_spec * s, const nl_table * t, const float * x, const float * qw) {
    float amax = 0, max = 0;
    for (int j = 0; j < QK_NL; ++j) {
        const float ax = fabsf(x[j]);
        if (ax > amax) { amax = ax; max = x[j]; }
    }
    if (amax < NL_GROUP_MAX_EPS) {
        return 0.f;
    }
    float d = 0, best = 0, best_qx = 0;
    for (int num = -127 - s->cand.lo; num <= -127 + s->cand.hi; num += s->cand.step) {
        const float id = (float) num / max;
        float sumqx = 0, sumq2 = 0;
        for (int j = 0; j < QK_NL; ++j) {
            const float q  = s->values[nl_best_index(s, t, id * x[j])];
            const float wq = (qw ? qw[j] : 1.0f) * q;
            sumqx += wq * x[j];
            sumq2 += wq * q;
        }
        if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
            d = sumqx / sumq2;
            best = d * sumqx;
            best_qx = sumqx;
        }
    }
    if (d == 0) {
        return 0.f;
    }
    float sumxx = 0;
    for (int j = 0; j < QK_NL; ++j) {
        const float wx = (qw ? qw[j] : 1.0f) * x[j];
        sumxx += wx * x[j];
    }
    const float u = sumxx / best_qx;
    const float scale = isfinite(u) && u != 0 && (u > 0) == (d > 0) ? u : d;
    return scale < -NL_SCALE_MAX ? -NL_SCALE_MAX : scale > NL_SCALE_MAX ? NL_SCALE_MAX : scale;
}

static inline int nl_nearest_int(float v) {
    return (int) lrintf(v);  // round half to even, as torch.round
}

// the fp16 scale as stored, and the float it decodes to (what the indices are chosen against)
static inline float nl_store_scale(float v, uint16_t * d) {
    *d = GGML_FP32_TO_FP16(v);
    return GGML_FP16_TO_FP32(*d);
}

// the indices of 32 weights under their stored scale dl
static void nl_assign(const nl_spec * s, const nl_table * t, const float * x, float dl, uint8_t * L) {
    const float idl = dl != 0 ? 1 / dl : 0.f;
    for (int j = 0; j < QK_NL; ++j) {
        L[j] = (uint8_t) nl_best_index(s, t, idl * x[j]);
    }
}

// An _XS block b (fp16 d, scales_h[2], scales_l[4], planes): the 8 block scales quantised to 6 bits against the
// largest one (as IQ4_XS), then every index chosen with its stored scale.
static void nl_quantize_xs(const nl_spec * s, const nl_table * t, const float * x, const float * qw,
                           ggml_nl_block_out b) {
    float scales[QK_NL_XS / QK_NL];
    float max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < QK_NL_XS / QK_NL; ++ib) {
        scales[ib] = nl_block_scale(s, t, x + QK_NL * ib, qw ? qw + QK_NL * ib : NULL);
        if (fabsf(scales[ib]) > amax_scale) { amax_scale = fabsf(scales[ib]); max_scale = scales[ib]; }
    }
    const float d  = nl_store_scale(-max_scale / 32, b.d);
    const float id = d != 0 ? 1 / d : 0.f;
    memset(b.scales_h, 0, QK_NL_XS / QK_NL / 4);
    memset(b.scales_l, 0, QK_NL_XS / QK_NL / 2);
    uint8_t L[QK_NL_XS];
    for (int ib = 0; ib < QK_NL_XS / QK_NL; ++ib) {
        int l = nl_nearest_int(id * scales[ib]);
        l = l < -32 ? -32 : l > 31 ? 31 : l;
        nl_assign(s, t, x + QK_NL * ib, d * l, L + QK_NL * ib);
        const int u = l + 32;
        b.scales_l[ib / 2] |= (uint8_t) ((u & 0xf) << (4 * (ib % 2)));
        b.scales_h[ib / 4] |= (uint8_t) ((u >> 4) << (2 * (ib % 4)));
    }
    nl_pack(s, L, QK_NL_XS, b.qs);
}

// a _32 block b (fp16 d, planes)
static void nl_quantize_32(const nl_spec * s, const nl_table * t, const float * x, const float * qw,
                           ggml_nl_block_out b) {
    uint8_t L[QK_NL];
    nl_assign(s, t, x, nl_store_scale(nl_block_scale(s, t, x, qw), b.d), L);
    nl_pack(s, L, QK_NL, b.qs);
}

// ------------------------------------------------------------------------------------------------ decoder
// one block of qk weights (QK_NL_XS: an _XS block, QK_NL: a _32 one)
static void nl_dequantize_block(const nl_spec * s, int qk, ggml_nl_block b, float * y) {
    const bool xs = qk == QK_NL_XS;
    uint8_t L[QK_NL_XS];
    nl_unpack(s, b.qs, qk, L);
    const float d = GGML_FP16_TO_FP32(*b.d);
    for (int ib = 0; ib < qk / QK_NL; ++ib) {
        const float dl = xs ? d * ggml_nl_sub_scale(&b, ib) : d;
        for (int j = 0; j < QK_NL; ++j) {
            y[QK_NL * ib + j] = dl * s->values[L[QK_NL * ib + j]];
        }
    }
}

// ------------------------------------------------------------------------------------------------ the types
// The row loops every type shares: blocks of qk weights, reached through the type's accessor (ggml-nl.h); the index
// table is built once per call, and the importance (one weight per column) follows the block along the row.
static void nl_dequantize_row(const nl_spec * s, int qk, ggml_nl_block_fn block, const void * vx, float * y,
                              int64_t k) {
    GGML_ASSERT(k % qk == 0);
    for (int64_t i = 0; i < k / qk; ++i) {
        nl_dequantize_block(s, qk, block(vx, i), y + qk * i);
    }
}

static void nl_quantize_rows(const nl_spec * s, int qk, ggml_nl_block_out_fn block, const float * src, void * dst,
                             int64_t nrows, int64_t n_per_row, const float * imatrix) {
    GGML_ASSERT(n_per_row % qk == 0);
    const int64_t nb = n_per_row / qk;
    nl_table t;
    nl_table_init(s, &t);
    for (int64_t row = 0; row < nrows; ++row) {
        for (int64_t i = 0; i < nb; ++i) {
            const float * x  = src + row * n_per_row + qk * i;
            const float * qw = imatrix ? imatrix + qk * i : NULL;
            if (qk == QK_NL_XS) {
                nl_quantize_xs(s, &t, x, qw, block(dst, row * nb + i));
            } else {
                nl_quantize_32(s, &t, x, qw, block(dst, row * nb + i));
            }
        }
    }
}

#define NL_IMPL(B, L, QK) \
void dequantize_row_nl##B##_##L(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t k) { \
    nl_dequantize_row(&ggml_nl_specs[B], QK, ggml_nl_block_nl##B##_##L, vx, y, k); \
} \
size_t quantize_nl##B##_##L(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, \
                          int64_t n_per_row, const float * imatrix) { \
    nl_quantize_rows(&ggml_nl_specs[B], QK, ggml_nl_block_out_nl##B##_##L, src, dst, nrows, n_per_row, imatrix); \
    return (size_t) nrows * (n_per_row / QK) * sizeof(block_nl##B##_##L); \
} \
void quantize_row_nl##B##_##L##_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
    quantize_nl##B##_##L(x, y, 1, k, NULL); \
}

NL_IMPL(2, xs, QK_NL_XS) NL_IMPL(3, xs, QK_NL_XS) NL_IMPL(5, xs, QK_NL_XS) NL_IMPL(6, xs, QK_NL_XS)
NL_IMPL(2, 32, QK_NL)    NL_IMPL(3, 32, QK_NL)    NL_IMPL(5, 32, QK_NL)    NL_IMPL(6, 32, QK_NL)

// ------------------------------------------------------------------------------------------------ validation
static ggml_nl_block_fn nl_block_fn(enum ggml_type type) {
    switch (type) {
        case GGML_TYPE_NL2_XS: return ggml_nl_block_nl2_xs;
        case GGML_TYPE_NL3_XS: return ggml_nl_block_nl3_xs;
        case GGML_TYPE_NL5_XS: return ggml_nl_block_nl5_xs;
        case GGML_TYPE_NL6_XS: return ggml_nl_block_nl6_xs;
        case GGML_TYPE_NL2_32: return ggml_nl_block_nl2_32;
        case GGML_TYPE_NL3_32: return ggml_nl_block_nl3_32;
        case GGML_TYPE_NL5_32: return ggml_nl_block_nl5_32;
        case GGML_TYPE_NL6_32: return ggml_nl_block_nl6_32;
        default: GGML_ABORT("%s is not an NL type", ggml_type_name(type));
    }
}

bool ggml_nl_validate_row_data(enum ggml_type type, const void * data, size_t nbytes) {
    const ggml_nl_block_fn block = nl_block_fn(type);
    for (size_t i = 0; i < nbytes / ggml_type_size(type); ++i) {
        const uint16_t d = *block(data, (int64_t) i).d;
        if ((d & 0x7c00) == 0x7c00) {
            fprintf(stderr, "ggml_validate_row_data: found %s scale at block %zu\n", (d & 0x3ff) ? "nan" : "inf", i);
            return false;
        }
    }
    return true;
}
