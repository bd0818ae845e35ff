// Non-linear block types (NL*): reference quantiser (importance-weighted) and dequantiser. See ggml-nl.h.
//
// The quantiser is written float operation for float operation like qgguf's vectorised one
// (qgguf/formats/nl.py): sums run in index order from 0, the scale search visits the candidates in the same order
// and keeps a candidate only when strictly better, so both give the same bytes.

#include "ggml-nl.h"
#include "ggml-impl.h"

#include <assert.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

#define NL_GROUP_MAX_EPS 1e-15f

static_assert(sizeof(block_nl2_xs) == 2 + 2 + 4 + 64,  "wrong nl2_xs block size");
static_assert(sizeof(block_nl3_xs) == 2 + 2 + 4 + 96,  "wrong nl3_xs block size");
static_assert(sizeof(block_nl5_xs) == 2 + 2 + 4 + 160, "wrong nl5_xs block size");
static_assert(sizeof(block_nl6_xs) == 2 + 2 + 4 + 192, "wrong nl6_xs block size");
static_assert(sizeof(block_nl2_32) == 2 + 8,  "wrong nl2_32 block size");
static_assert(sizeof(block_nl3_32) == 2 + 12, "wrong nl3_32 block size");
static_assert(sizeof(block_nl5_32) == 2 + 20, "wrong nl5_32 block size");
static_assert(sizeof(block_nl6_32) == 2 + 24, "wrong nl6_32 block size");

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
// tensors; docs/design.md, "Gain-unbiased NL scales")
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
    return sumxx / best_qx;
}

static inline int nl_nearest_int(float v) {
    return (int) lrintf(v);  // round half to even, as torch.round
}

static void nl_quantize_xs(const nl_spec * s, const nl_table * t, const float * x, const float * qw, uint16_t * dh,
                           uint8_t * scales_h, uint8_t * scales_l, uint8_t * qs) {
    float scales[QK_NL_XS / QK_NL];
    float max_scale = 0, amax_scale = 0;
    for (int ib = 0; ib < QK_NL_XS / QK_NL; ++ib) {
        scales[ib] = nl_block_scale(s, t, x + QK_NL * ib, qw ? qw + QK_NL * ib : NULL);
        if (fabsf(scales[ib]) > amax_scale) { amax_scale = fabsf(scales[ib]); max_scale = scales[ib]; }
    }
    const ggml_fp16_t dfp = GGML_FP32_TO_FP16(-max_scale / 32);
    const float d  = GGML_FP16_TO_FP32(dfp);
    const float id = d != 0 ? 1 / d : 0.f;
    *dh = dfp;
    memset(scales_h, 0, 2);
    memset(scales_l, 0, 4);
    uint8_t L[QK_NL_XS];
    for (int ib = 0; ib < QK_NL_XS / QK_NL; ++ib) {
        int l = nl_nearest_int(id * scales[ib]);
        l = l < -32 ? -32 : l > 31 ? 31 : l;
        const float dl  = d * l;
        const float idl = dl != 0 ? 1 / dl : 0.f;
        for (int j = 0; j < QK_NL; ++j) {
            L[QK_NL * ib + j] = (uint8_t) nl_best_index(s, t, idl * x[QK_NL * ib + j]);
        }
        const int u = l + 32;
        scales_l[ib / 2] |= (uint8_t) ((u & 0xf) << (4 * (ib % 2)));
        scales_h[ib / 4] |= (uint8_t) ((u >> 4) << (2 * (ib % 4)));
    }
    nl_pack(s, L, QK_NL_XS, qs);
}

static void nl_quantize_32(const nl_spec * s, const nl_table * t, const float * x, const float * qw, uint16_t * dh,
                           uint8_t * qs) {
    const ggml_fp16_t dfp = GGML_FP32_TO_FP16(nl_block_scale(s, t, x, qw));
    const float d  = GGML_FP16_TO_FP32(dfp);
    const float id = d != 0 ? 1 / d : 0.f;
    *dh = dfp;
    uint8_t L[QK_NL];
    for (int j = 0; j < QK_NL; ++j) {
        L[j] = (uint8_t) nl_best_index(s, t, id * x[j]);
    }
    nl_pack(s, L, QK_NL, qs);
}

// ------------------------------------------------------------------------------------------------ decoder
static void nl_dequantize_xs(const nl_spec * s, const uint16_t * dh, const uint8_t * scales_h,
                             const uint8_t * scales_l, const uint8_t * qs, float * y) {
    uint8_t L[QK_NL_XS];
    nl_unpack(s, qs, QK_NL_XS, L);
    const float d = GGML_FP16_TO_FP32(*dh);
    for (int ib = 0; ib < QK_NL_XS / QK_NL; ++ib) {
        const int ls = ((scales_l[ib / 2] >> (4 * (ib % 2))) & 0xf) | (((scales_h[ib / 4] >> (2 * (ib % 4))) & 3) << 4);
        const float dl = d * (ls - 32);
        for (int j = 0; j < QK_NL; ++j) {
            y[QK_NL * ib + j] = dl * s->values[L[QK_NL * ib + j]];
        }
    }
}

static void nl_dequantize_32(const nl_spec * s, const uint16_t * dh, const uint8_t * qs, float * y) {
    uint8_t L[QK_NL];
    nl_unpack(s, qs, QK_NL, L);
    const float d = GGML_FP16_TO_FP32(*dh);
    for (int j = 0; j < QK_NL; ++j) {
        y[j] = d * s->values[L[j]];
    }
}

// ------------------------------------------------------------------------------------------------ the types
#define NL_IMPL_XS(B) \
void dequantize_row_nl##B##_xs(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t k) { \
    GGML_ASSERT(k % QK_NL_XS == 0); \
    const block_nl##B##_xs * x = (const block_nl##B##_xs *) vx; \
    for (int64_t i = 0; i < k / QK_NL_XS; ++i) { \
        nl_dequantize_xs(&ggml_nl_specs[B], &x[i].d, x[i].scales_h, x[i].scales_l, x[i].qs, y + QK_NL_XS * i); \
    } \
} \
size_t quantize_nl##B##_xs(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, \
                          int64_t n_per_row, const float * imatrix) { \
    GGML_ASSERT(n_per_row % QK_NL_XS == 0); \
    const int64_t nb = n_per_row / QK_NL_XS; \
    block_nl##B##_xs * y = (block_nl##B##_xs *) dst; \
    nl_table t; \
    nl_table_init(&ggml_nl_specs[B], &t); \
    for (int64_t row = 0; row < nrows; ++row) { \
        for (int64_t i = 0; i < nb; ++i) { \
            block_nl##B##_xs * b = y + row * nb + i; \
            nl_quantize_xs(&ggml_nl_specs[B], &t, src + row * n_per_row + QK_NL_XS * i, \
                           imatrix ? imatrix + QK_NL_XS * i : NULL, &b->d, b->scales_h, b->scales_l, b->qs); \
        } \
    } \
    return (size_t) nrows * nb * sizeof(block_nl##B##_xs); \
} \
void quantize_row_nl##B##_xs_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
    quantize_nl##B##_xs(x, y, 1, k, NULL); \
}

#define NL_IMPL_32(B) \
void dequantize_row_nl##B##_32(const void * GGML_RESTRICT vx, float * GGML_RESTRICT y, int64_t k) { \
    GGML_ASSERT(k % QK_NL == 0); \
    const block_nl##B##_32 * x = (const block_nl##B##_32 *) vx; \
    for (int64_t i = 0; i < k / QK_NL; ++i) { \
        nl_dequantize_32(&ggml_nl_specs[B], &x[i].d, x[i].qs, y + QK_NL * i); \
    } \
} \
size_t quantize_nl##B##_32(const float * GGML_RESTRICT src, void * GGML_RESTRICT dst, int64_t nrows, \
                          int64_t n_per_row, const float * imatrix) { \
    GGML_ASSERT(n_per_row % QK_NL == 0); \
    const int64_t nb = n_per_row / QK_NL; \
    block_nl##B##_32 * y = (block_nl##B##_32 *) dst; \
    nl_table t; \
    nl_table_init(&ggml_nl_specs[B], &t); \
    for (int64_t row = 0; row < nrows; ++row) { \
        for (int64_t i = 0; i < nb; ++i) { \
            block_nl##B##_32 * b = y + row * nb + i; \
            nl_quantize_32(&ggml_nl_specs[B], &t, src + row * n_per_row + QK_NL * i, \
                           imatrix ? imatrix + QK_NL * i : NULL, &b->d, b->qs); \
        } \
    } \
    return (size_t) nrows * nb * sizeof(block_nl##B##_32); \
} \
void quantize_row_nl##B##_32_ref(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
    quantize_nl##B##_32(x, y, 1, k, NULL); \
}

NL_IMPL_XS(2) NL_IMPL_XS(3) NL_IMPL_XS(5) NL_IMPL_XS(6)
NL_IMPL_32(2) NL_IMPL_32(3) NL_IMPL_32(5) NL_IMPL_32(6)

// ------------------------------------------------------------------------------------------------ validation
bool ggml_nl_validate_row_data(enum ggml_type type, const void * data, size_t nbytes) {
    const size_t bs = ggml_type_size(type);
    const uint8_t * p = (const uint8_t *) data;
    for (size_t i = 0; i < nbytes / bs; ++i) {
        uint16_t d;
        memcpy(&d, p + i * bs, sizeof(d));  // every NL block starts with its fp16 scale
        if ((d & 0x7c00) == 0x7c00) {
            fprintf(stderr, "ggml_validate_row_data: found %s scale at block %zu\n", (d & 0x3ff) ? "nan" : "inf", i);
            return false;
        }
    }
    return true;
}
