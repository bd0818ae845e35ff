// CPU dot products of the non-linear block types against Q8_K / Q8_0 activations: AVX2 where available (with
// AVX512-VBMI, where compiled for, doing the 5/6-bit codebook lookup), a scalar path everywhere. A block's indices
// are looked up in its int8 codebook and multiplied with the int8 activations exactly (int32 sums; the _XS
// kernels weight them by the 6-bit sub-block scales in int32 too), then scaled in float, as the IQ4_NL / IQ4_XS
// kernels do.

#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include "ggml-impl.h"
#include "ggml-cpu-impl.h"
#include "simd-mappings.h"
#include "nl-cpu.h"

#include <assert.h>
#include <string.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

static_assert(QK_NL == QK8_0, "NL block-32 types pair with Q8_0");
static_assert(QK_NL_XS == QK_K, "NL super-block types pair with Q8_K");

static inline const int8_t * nl_values(int bits) { return ggml_nl_specs[bits].values; }
static inline int nl_klo(int bits) { return ggml_nl_specs[bits].klo; }
static inline int nl_khi(int bits) { return ggml_nl_specs[bits].khi; }

static inline float nl_fp16(const uint16_t * d) {
    return GGML_CPU_FP16_TO_FP32(*d);
}

// Activation block i, for weight blocks of qk: Q8_K (float d, 256 values) for the _XS types, Q8_0 (fp16 d, 32
// values) for the _32 types. Returns its values, its scale in *d.
static inline const int8_t * nl_q8(const void * vy, int qk, int i, float * d) {
    if (qk == QK_K) {
        const block_q8_K * y = (const block_q8_K *) vy + i;
        *d = y->d;
        return y->qs;
    }
    const block_q8_0 * y = (const block_q8_0 *) vy + i;
    *d = GGML_CPU_FP16_TO_FP32(y->d);
    return y->qs;
}

// ------------------------------------------------------------------------------------------------ scalar
// the 32 indices of sub-block ib of a block of n weights (n = 256: _XS planes, n = 32: _32 planes)
static inline void nl_indices(int bits, const uint8_t * qs, int n, int ib, uint8_t * L) {
    const int klo = nl_klo(bits), khi = nl_khi(bits);
    for (int p = 0; p < (khi ? 2 : 1); ++p) {
        const int k = p ? khi : klo;
        const uint8_t * q = p ? qs + n * klo / 8 : qs;
        const int gb = n == QK_NL ? QK_NL * k / 8 : 32;      // bytes per group
        const uint8_t mask = (uint8_t) ((1 << k) - 1);
        for (int j = 0; j < QK_NL; ++j) {
            const int e = QK_NL * ib + j;                      // weight within the block
            const int group_len = gb * 8 / k;
            const int g = e / group_len, r = e % group_len;
            const uint8_t v = (uint8_t) ((q[g * gb + r % gb] >> (k * (r / gb))) & mask);
            L[j] = p ? (uint8_t) (L[j] | (v << klo)) : v;
        }
    }
}

static inline int nl_dot32(const int8_t * values, const uint8_t * L, const int8_t * q8) {
    int sumi = 0;
    for (int j = 0; j < QK_NL; ++j) {
        sumi += values[L[j]] * q8[j];
    }
    return sumi;
}

// ------------------------------------------------------------------------------------------------ AVX2
#if defined(__AVX2__)
// k-bit plane → 32 indices: _XS: the 32 bytes of the plane's group, shifted; _32: the block's 4k bytes spread
static inline __m256i nl_plane_xs(const uint8_t * q, int k, int ib) {
    const int per = 8 / k;
    const __m256i v = _mm256_loadu_si256((const __m256i *) (q + 32 * (ib / per)));
    return _mm256_and_si256(_mm256_srli_epi16(v, k * (ib % per)), _mm256_set1_epi8((char) ((1 << k) - 1)));
}

// the 32 indices of sub-block ib of an _XS super-block whose planes start at qs
static inline __m256i nl_indices_xs(const uint8_t * qs, int klo, int khi, int ib) {
    const __m256i idx = nl_plane_xs(qs, klo, ib);
    return khi ? _mm256_or_si256(idx, _mm256_slli_epi16(nl_plane_xs(qs + 32 * klo, khi, ib), klo)) : idx;
}

static inline __m256i nl_plane_32(const uint8_t * q, int k) {
    if (k == 4) {  // 16 bytes: weights j (low nibble) and j + 16 (high nibble)
        const __m128i v = _mm_loadu_si128((const __m128i *) q);
        const __m128i m = _mm_set1_epi8(0x0f);
        return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
    }
    if (k == 2) {  // 8 bytes: weight j + 8m at bits 2m of byte j
        int64_t w; memcpy(&w, q, 8);
        const __m256i v = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_set_epi64x(6, 4, 2, 0));
        return _mm256_and_si256(v, _mm256_set1_epi8(3));
    }
    // k == 1, 4 bytes: weight j + 4m at bit m of byte j
    int32_t w; memcpy(&w, q, 4);
    const __m256i v = _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0));
    return _mm256_and_si256(v, _mm256_set1_epi8(1));
}

// the 32 indices of a _32 block whose planes start at qs
static inline __m256i nl_indices_32(const uint8_t * qs, int klo, int khi) {
    const __m256i idx = nl_plane_32(qs, klo);
    return khi ? _mm256_or_si256(idx, _mm256_slli_epi16(nl_plane_32(qs + 4 * klo, khi), klo)) : idx;
}

// codebook lookup of indices < 2^bits. With AVX512-VBMI (and VL) one byte permute reads 32 levels (vpermb) or
// 64 (vpermi2b); with AVX2 alone a pshufb reads 16, and 5/6-bit indices blend two/four of them on bits 4 and 5.
#if defined(__AVX512VBMI__) && defined(__AVX512VL__)
static inline __m256i nl_lookup(int bits, __m256i idx, const __m256i * tbl) {
    if (bits <= 4) {
        return _mm256_shuffle_epi8(tbl[0], idx);
    }
    if (bits == 5) {
        return _mm256_permutexvar_epi8(idx, tbl[0]);
    }
    return _mm256_permutex2var_epi8(tbl[0], idx, tbl[1]);
}

static inline void nl_tables(int bits, __m256i * tbl) {
    const int8_t * v = nl_values(bits);
    const int n = 1 << bits;
    if (n <= 16) {
        int8_t b[16] = {0};
        memcpy(b, v, (size_t) n);
        const __m128i x = _mm_loadu_si128((const __m128i *) b);
        tbl[0] = _mm256_set_m128i(x, x);
        return;
    }
    for (int t = 0; t < n / 32; ++t) {  // 32 levels per register: idx selects across both lanes
        tbl[t] = _mm256_loadu_si256((const __m256i *) (v + 32 * t));
    }
}
#else
static inline __m256i nl_lookup(int bits, __m256i idx, const __m256i * tbl) {
    const __m256i lo = _mm256_shuffle_epi8(tbl[0], idx);
    if (bits <= 4) {
        return lo;
    }
    const __m256i s16 = _mm256_cmpeq_epi8(_mm256_and_si256(idx, _mm256_set1_epi8(16)), _mm256_set1_epi8(16));
    const __m256i a = _mm256_blendv_epi8(lo, _mm256_shuffle_epi8(tbl[1], idx), s16);
    if (bits == 5) {
        return a;
    }
    const __m256i b = _mm256_blendv_epi8(_mm256_shuffle_epi8(tbl[2], idx), _mm256_shuffle_epi8(tbl[3], idx), s16);
    const __m256i s32 = _mm256_cmpeq_epi8(_mm256_and_si256(idx, _mm256_set1_epi8(32)), _mm256_set1_epi8(32));
    return _mm256_blendv_epi8(a, b, s32);
}

static inline void nl_tables(int bits, __m256i * tbl) {
    const int8_t * v = nl_values(bits);
    const int n = 1 << bits;
    for (int t = 0; t < (n + 15) / 16; ++t) {
        int8_t b[16] = {0};
        for (int i = 0; i < 16 && 16 * t + i < n; ++i) b[i] = v[16 * t + i];
        const __m128i x = _mm_loadu_si128((const __m128i *) b);
        tbl[t] = _mm256_set_m128i(x, x);
    }
}
#endif

// Σ over 32 int8 pairs, as 8 int32 lanes, each pair sum times the int16 `scale` (|w| <= 127 keeps maddubs from
// saturating: 2·127·128 < 2^15)
static inline __m256i nl_dot_i8(__m256i w, __m256i q8, __m256i scale) {
    const __m256i p16 = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(q8, w));
    return _mm256_madd_epi16(p16, scale);
}

// sub-block ib of the weight block b (an _XS block when xs, else a _32 one) times its 32 activations q8[32 ib ...],
// weighted by the sub-block's scale: 8 int32 lanes
static inline __m256i nl_sub_dot(int bits, bool xs, const ggml_nl_block * b, const int8_t * q8, int ib, int klo,
                                 int khi, const __m256i * tbl) {
    const __m256i idx = xs ? nl_indices_xs(b->qs, klo, khi, ib) : nl_indices_32(b->qs, klo, khi);
    return nl_dot_i8(nl_lookup(bits, idx, tbl), _mm256_loadu_si256((const __m256i *) (q8 + QK_NL * ib)),
                     _mm256_set1_epi16((int16_t) (xs ? ggml_nl_sub_scale(b, ib) : 1)));
}

static inline float nl_hsum(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}
#endif

// ------------------------------------------------------------------------------------------------ the kernels
// One kernel for both layouts: weight blocks of qk (QK_K: _XS, one Q8_K block each; QK_NL: _32, one Q8_0 block
// each), read through the type's accessor (ggml-nl.h; inlined with the kernel). Each block is 32-weight sub-blocks
// with an int scale (the _XS 6-bit scales, 1 in _32), and one float scale d = (weight d) * (activation d).

// scalar kernel, compiled on every target (exported as *_generic so tests can check it on SIMD machines too)
static inline void nl_vec_dot_generic(int bits, int qk, ggml_nl_block_fn block, int n, float * GGML_RESTRICT s,
                                      const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
    assert(n % qk == 0);
    const bool xs = qk == QK_K;
    const int8_t * values = nl_values(bits);
    float sumf = 0;
    uint8_t L[QK_NL];
    for (int i = 0; i < n / qk; ++i) {
        const ggml_nl_block b = block(vx, i);
        float dy;
        const int8_t * q8 = nl_q8(vy, qk, i, &dy);
        const float d = nl_fp16(b.d) * dy;
        for (int ib = 0; ib < qk / QK_NL; ++ib) {
            nl_indices(bits, b.qs, qk, ib, L);
            sumf += d * (xs ? ggml_nl_sub_scale(&b, ib) : 1) * nl_dot32(values, L, q8 + QK_NL * ib);
        }
    }
    *s = sumf;
}

static inline void nl_vec_dot(int bits, int qk, ggml_nl_block_fn block, int n, float * GGML_RESTRICT s,
                              const void * GGML_RESTRICT vx, const void * GGML_RESTRICT vy) {
#if defined(__AVX2__)
    assert(n % qk == 0);
    const bool xs = qk == QK_K;
    const int klo = nl_klo(bits), khi = nl_khi(bits);
    __m256i tbl[4];
    nl_tables(bits, tbl);
    __m256 acc = _mm256_setzero_ps();
    for (int i = 0; i < n / qk; ++i) {
        const ggml_nl_block b = block(vx, i);
        float dy;
        const int8_t * q8 = nl_q8(vy, qk, i, &dy);
        // the sub-block scales weight int32 sums; one float multiply per block (|sum| < 2^31: 8 sub-blocks of
        // 32 · 127 · 128 · 32). Two sums, so that consecutive sub-blocks overlap (measured ~20% at 6 bits, AVX2).
        __m256i sum0 = _mm256_setzero_si256(), sum1 = _mm256_setzero_si256();
        for (int ib = 0; ib < qk / QK_NL; ib += 2) {
            sum0 = _mm256_add_epi32(sum0, nl_sub_dot(bits, xs, &b, q8, ib, klo, khi, tbl));
            if (ib + 1 < qk / QK_NL) {
                sum1 = _mm256_add_epi32(sum1, nl_sub_dot(bits, xs, &b, q8, ib + 1, klo, khi, tbl));
            }
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(nl_fp16(b.d) * dy), _mm256_cvtepi32_ps(_mm256_add_epi32(sum0, sum1)), acc);
    }
    *s = nl_hsum(acc);
#else
    nl_vec_dot_generic(bits, qk, block, n, s, vx, vy);
#endif
}

void ggml_nl_unpack_xs(int bits, ggml_nl_block b, uint8_t * GGML_RESTRICT q, float * GGML_RESTRICT d,
                       int32_t * GGML_RESTRICT scales) {
    *d = nl_fp16(b.d);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
        scales[ib] = ggml_nl_sub_scale(&b, ib);
    }
#if defined(__AVX2__)
    const int klo = nl_klo(bits), khi = nl_khi(bits);
    __m256i tbl[4];
    nl_tables(bits, tbl);
    for (int ib = 0; ib < QK_K / 32; ++ib) {
        // value + 128 as a byte is value ^ 0x80
        const __m256i w = nl_lookup(bits, nl_indices_xs(b.qs, klo, khi, ib), tbl);
        _mm256_storeu_si256((__m256i *) (q + 32 * ib), _mm256_xor_si256(w, _mm256_set1_epi8((char) 0x80)));
    }
#else
    const int8_t * values = nl_values(bits);
    uint8_t L[QK_NL];
    for (int ib = 0; ib < QK_K / 32; ++ib) {
        nl_indices(bits, b.qs, QK_K, ib, L);
        for (int j = 0; j < QK_NL; ++j) {
            q[32 * ib + j] = (uint8_t) (values[L[j]] + 128);
        }
    }
#endif
}

#define NL_CPU_IMPL(B, L, A, QK) \
void quantize_row_nl##B##_##L(const float * GGML_RESTRICT x, void * GGML_RESTRICT y, int64_t k) { \
    quantize_row_nl##B##_##L##_ref(x, y, k); \
} \
void ggml_vec_dot_nl##B##_##L##_##A(int n, float * GGML_RESTRICT s, size_t bs, const void * GGML_RESTRICT vx, \
                                     size_t bx, const void * GGML_RESTRICT vy, size_t by, int nrc) { \
    assert(nrc == 1); \
    GGML_UNUSED(nrc); GGML_UNUSED(bx); GGML_UNUSED(by); GGML_UNUSED(bs); \
    nl_vec_dot(B, QK, ggml_nl_block_nl##B##_##L, n, s, vx, vy); \
} \
void ggml_vec_dot_nl##B##_##L##_##A##_generic(int n, float * GGML_RESTRICT s, const void * GGML_RESTRICT vx, \
                                               const void * GGML_RESTRICT vy) { \
    nl_vec_dot_generic(B, QK, ggml_nl_block_nl##B##_##L, n, s, vx, vy); \
}

NL_CPU_IMPL(2, xs, q8_K, QK_K)  NL_CPU_IMPL(3, xs, q8_K, QK_K)
NL_CPU_IMPL(5, xs, q8_K, QK_K)  NL_CPU_IMPL(6, xs, q8_K, QK_K)
NL_CPU_IMPL(2, 32, q8_0, QK_NL) NL_CPU_IMPL(3, 32, q8_0, QK_NL)
NL_CPU_IMPL(5, 32, q8_0, QK_NL) NL_CPU_IMPL(6, 32, q8_0, QK_NL)
