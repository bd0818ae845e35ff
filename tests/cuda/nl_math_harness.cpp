// Host harness for the CUDA kernels of the non-linear types: compiles ggml-cuda/nl-math.cuh (the per-thread maths
// of the MMVQ dot products and of the dequantisation) with the host compiler and plays every thread index a CUDA
// launch runs for a row, against the C reference dequantiser of ggml-nl.c (linked in). tests/test_nl_cuda.py builds
// and runs it; it prints one line per type with its counts and "ALL OK" last, and exits non-zero on any mismatch.

#include "ggml-nl.h"
#include "nl-math.cuh"

#include <cmath>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

// ggml-nl.c's references into the rest of ggml-base (only reached on a failed assertion / by validation)
extern "C" void ggml_abort(const char * file, int line, const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "ggml_abort at %s:%d: ", file, line);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    abort();
}
extern "C" size_t ggml_type_size(enum ggml_type) { abort(); }
extern "C" const char * ggml_type_name(enum ggml_type) { abort(); }

static int g_failures = 0;

#define CHECK(cond, ...) do { \
    if (!(cond) && g_failures++ < 20) { fprintf(stderr, "FAIL: " __VA_ARGS__); fputc('\n', stderr); } \
} while (0)

typedef void (*dequant_fn)(const void *, float *, int64_t);
typedef size_t (*quant_fn)(const float *, void *, int64_t, int64_t, const float *);

struct nl_type {
    const char * name;
    int b;
    bool xs;
    dequant_fn dequant;
    quant_fn quant;
    const int8_t * values;
};

static const nl_type TYPES[] = {
    {"nl2_xs", 2, true,  dequantize_row_nl2_xs, quantize_nl2_xs, ggml_nl_values_2},
    {"nl3_xs", 3, true,  dequantize_row_nl3_xs, quantize_nl3_xs, ggml_nl_values_3},
    {"nl5_xs", 5, true,  dequantize_row_nl5_xs, quantize_nl5_xs, ggml_nl_values_5},
    {"nl6_xs", 6, true,  dequantize_row_nl6_xs, quantize_nl6_xs, ggml_nl_values_6},
    {"nl2_32", 2, false, dequantize_row_nl2_32, quantize_nl2_32, ggml_nl_values_2},
    {"nl3_32", 3, false, dequantize_row_nl3_32, quantize_nl3_32, ggml_nl_values_3},
    {"nl5_32", 5, false, dequantize_row_nl5_32, quantize_nl5_32, ggml_nl_values_5},
    {"nl6_32", 6, false, dequantize_row_nl6_32, quantize_nl6_32, ggml_nl_values_6},
};

static std::mt19937_64 rng(20261203);

static uint16_t random_finite_half() {
    for (;;) {
        const uint16_t h = (uint16_t) rng();
        if (((h >> 10) & 0x1f) != 0x1f) return h;
    }
}

// The index layout as ggml-nl.h describes it, written out independently of nl-math.cuh: in a group of G weights of
// a k-bit plane, weight e of the group sits in byte e % gb at bit k*(e / gb), gb = G*k/8.
static void pack_indices(const nl_type & t, const std::vector<int> & idx, uint8_t * qs) {
    const int n = t.xs ? 256 : 32;
    const int klo = t.b <= 3 ? 2 : 4, khi = t.b - klo;
    memset(qs, 0, n * t.b / 8);
    for (int p = 0; p < (khi ? 2 : 1); ++p) {
        const int k = p ? khi : klo, shift = p ? klo : 0;
        uint8_t * q = qs + (p ? n * klo / 8 : 0);
        const int G = t.xs ? 256 / k : 32, gb = G * k / 8;
        for (int e = 0; e < n; ++e) {
            const int g = e / G, r = e % G;
            q[g * gb + r % gb] |= (uint8_t) (((idx[e] >> shift) & ((1 << k) - 1)) << (k * (r / gb)));
        }
    }
}

enum row_mode { RANDOM, ZERO, MAX_SCALE, MIN_SCALE, EVERY_INDEX, UNIT, ENCODED, N_MODES };
static const char * MODE_NAMES[] = {"random", "zero", "max-scale", "min-scale", "every-index", "unit", "encoded"};

// a row of nb blocks of type t in the given mode
static std::vector<uint8_t> make_row(const nl_type & t, int nb, row_mode mode) {
    const int bs = nl_block_bytes(t.b, t.xs), qk = nl_qk(t.xs), hdr = t.xs ? 8 : 2;
    std::vector<uint8_t> row((size_t) nb * bs);
    if (mode == ENCODED) {
        std::normal_distribution<float> nd(0.f, 0.02f);
        std::vector<float> x((size_t) nb * qk);
        for (float & v : x) v = nd(rng);
        x[rng() % x.size()] *= 10;  // an outlier
        t.quant(x.data(), row.data(), 1, (int64_t) x.size(), nullptr);
        return row;
    }
    for (auto & c : row) c = (uint8_t) rng();
    for (int i = 0; i < nb; ++i) {
        uint8_t * blk = row.data() + (size_t) i * bs;
        uint16_t d = random_finite_half();
        switch (mode) {
            case ZERO:      memset(blk, 0, bs); continue;
            case MAX_SCALE:  // d = +-65504, ls = 63
                d = (i % 2) ? 0xfbff : 0x7bff; if (t.xs) memset(blk + 2, 0xff, 6); break;
            case MIN_SCALE:  // d = +-2^-24 (subnormal), ls = 0
                d = (i % 2) ? 0x8001 : 0x0001; if (t.xs) memset(blk + 2, 0x00, 6); break;
            case UNIT:      d = 0x3c00; break;                                                            // 1.0
            case EVERY_INDEX: {
                std::vector<int> idx(qk);
                const int off = (int) (rng() % (1u << t.b));
                for (int e = 0; e < qk; ++e) idx[e] = (e + off) % (1 << t.b);
                pack_indices(t, idx, blk + hdr);
                break;
            }
            default: break;
        }
        memcpy(blk, &d, 2);
    }
    return row;
}

// Q8_1 activations for a row of k weights: random int8 values, random fp16 d (1.0 in UNIT mode), s unused
static std::vector<uint8_t> make_q8_1(int64_t k, row_mode mode) {
    std::vector<uint8_t> y((size_t) k / 32 * NL_Q8_1_BYTES);
    for (int64_t i = 0; i < k / 32; ++i) {
        uint8_t * blk = y.data() + i * NL_Q8_1_BYTES;
        const uint16_t d = mode == UNIT ? 0x3c00 : (uint16_t) ((random_finite_half() & 0x83ff) | 0x2000);  // moderate
        memcpy(blk, &d, 2);
        memset(blk + 2, 0, 2);
        for (int j = 0; j < 32; ++j) blk[NL_Q8_1_QS + j] = (uint8_t) (int8_t) ((int) (rng() % 255) - 127);
    }
    return y;
}

static float q8_1_value(const std::vector<uint8_t> & y, int64_t i) {
    const uint8_t * blk = y.data() + (i / 32) * NL_Q8_1_BYTES;
    uint16_t d;
    memcpy(&d, blk, 2);
    return nl_half_to_float(d) * (float) (int8_t) blk[NL_Q8_1_QS + i % 32];
}

template <int B, bool XS>
static void check_type(const nl_type & t, long & n_rows, long & n_calls, long & n_values, long & n_exact) {
    const int qk = nl_qk(XS);
    const int qi = XS ? NL_QI_XS : NL_QI_32;
    const int sizes_xs[] = {1, 2, 7}, sizes_32[] = {1, 3, 18, 37};
    const int * sizes = XS ? sizes_xs : sizes_32;
    const int n_sizes = XS ? 3 : 4;
    for (int si = 0; si < n_sizes; ++si) {
        const int nb = sizes[si];
        const int64_t k = (int64_t) nb * qk;
        for (int mode = 0; mode < N_MODES; ++mode) {
            const int reps = mode == RANDOM ? 16 : mode == ENCODED || mode == EVERY_INDEX || mode == UNIT ? 4 : 1;
            for (int rep = 0; rep < reps; ++rep) {
                const std::vector<uint8_t> row = make_row(t, nb, (row_mode) mode);
                const std::vector<uint8_t> y = make_q8_1(k, (row_mode) mode);
                std::vector<float> ref(k), got(k);
                t.dequant(row.data(), ref.data(), k);

                // dequantisation: every thread of the launch (thread i: weights 4i .. 4i+3), bit for bit
                for (int64_t i = 0; i < k / 4; ++i) {
                    nl_dequant4<B, XS>(row.data(), i, got.data() + 4 * i);
                }
                for (int64_t i = 0; i < k; ++i) {
                    CHECK(memcmp(&ref[i], &got[i], 4) == 0, "%s %s nb=%d dequant weight %ld: %.9g, reference %.9g",
                          t.name, MODE_NAMES[mode], nb, (long) i, got[i], ref[i]);
                }
                n_values += k;

                // MMVQ: every (kbx, iqs) a row's threads take; the q8_1 blocks aligned with x block kbx
                float sum = 0.f;
                for (int kbx = 0; kbx < nb; ++kbx) {
                    for (int tid = 0; tid < qi / NL_VDR; ++tid) {
                        const int iqs = NL_VDR * tid;
                        sum += nl_vec_dot_q8_1<B, XS>(row.data(), y.data() + (size_t) kbx * (qk / 32) * NL_Q8_1_BYTES,
                                                       kbx, iqs);
                        ++n_calls;
                    }
                }
                // the exact dot product of the decoded operands (what the CPU kernels are checked against)
                double exact = 0, mag = 0;
                for (int64_t i = 0; i < k; ++i) {
                    const double p = (double) ref[i] * (double) q8_1_value(y, i);
                    exact += p;
                    mag += std::fabs(p);
                }
                if (mode == UNIT) {  // d = 1 on both sides: every partial sum is an integer below 2^24, so exact
                    CHECK((double) sum == exact, "%s unit nb=%d dot %.9g, exact %.9g", t.name, nb, sum, exact);
                    ++n_exact;
                } else {
                    CHECK(std::fabs((double) sum - exact) <= 1e-5 * mag + 1e-30,
                          "%s %s nb=%d dot %.9g, exact %.9g (sum |terms| %.3g)", t.name, MODE_NAMES[mode], nb, sum,
                          exact, mag);
                }
                ++n_rows;
            }
        }
    }
}

// the codebook words against ggml-nl.h, and the PRMT lookup of every index value at every byte position
template <int B>
static long check_codebook(const nl_type & t) {
    long n = 0;
    for (int i = 0; i < (1 << B); ++i) {
        const int8_t w = (int8_t) (nl_codebook_word(B, i / 4) >> (8 * (i % 4)));
        CHECK(w == t.values[i], "%s codebook level %d: %d, ggml-nl.h %d", t.name, i, w, t.values[i]);
        for (int pos = 0; pos < 4; ++pos) {
            for (int r = 0; r < 8; ++r) {
                uint32_t idx = 0;
                int want[4];
                for (int p = 0; p < 4; ++p) {
                    const int v = p == pos ? i : (int) (rng() % (1u << B));
                    idx |= (uint32_t) v << (8 * p);
                    want[p] = t.values[v];
                }
                const uint32_t got = nl_lookup4<B>(idx);
                for (int p = 0; p < 4; ++p) {
                    CHECK((int8_t) (got >> (8 * p)) == want[p], "%s lookup of index %d at byte %d", t.name, i, p);
                }
                ++n;
            }
        }
    }
    return n;
}

// the host versions of the intrinsics against their definitions
static void check_intrinsics() {
    CHECK(nl_byte_perm(0x33221100u, 0x77665544u, 0x3210) == 0x33221100u, "byte_perm identity");
    CHECK(nl_byte_perm(0x33221100u, 0x77665544u, 0x7654) == 0x77665544u, "byte_perm y");
    CHECK(nl_byte_perm(0x33221100u, 0x77665544u, 0x0123) == 0x00112233u, "byte_perm reverse");
    CHECK(nl_byte_perm(0x33221100u, 0x77665544u, 0xf8b9) == 0x77003311u, "byte_perm ignores bit 3 of a selector");
    for (int r = 0; r < 1000; ++r) {
        const uint32_t a = (uint32_t) rng(), b = (uint32_t) rng();
        const int c = (int) (rng() % 100000) - 50000;
        int want = c;
        for (int n = 0; n < 4; ++n) want += (int8_t) (a >> (8 * n)) * (int8_t) (b >> (8 * n));
        CHECK(nl_dp4a((int) a, (int) b, c) == want, "dp4a");
    }
    CHECK(nl_half_to_float(0x3c00) == 1.0f && nl_half_to_float(0xc000) == -2.0f, "half 1, -2");
    CHECK(nl_half_to_float(0x7bff) == 65504.0f && nl_half_to_float(0x0001) == std::ldexp(1.0f, -24), "half max, min");
}

int main() {
    check_intrinsics();
    long total_rows = 0, total_calls = 0, total_values = 0, total_lookups = 0;
    for (const nl_type & t : TYPES) {
        long rows = 0, calls = 0, values = 0, exact = 0, lookups = 0;
#define NL_CASE(BB, XX) \
        if (t.b == BB && t.xs == XX) { check_type<BB, XX>(t, rows, calls, values, exact); lookups = check_codebook<BB>(t); }
        NL_CASE(2, true) NL_CASE(3, true) NL_CASE(5, true) NL_CASE(6, true)
        NL_CASE(2, false) NL_CASE(3, false) NL_CASE(5, false) NL_CASE(6, false)
#undef NL_CASE
        printf("%s rows=%ld vec_dot_calls=%ld exact_rows=%ld dequant_values=%ld lookups=%ld\n", t.name, rows, calls,
               exact, values, lookups);
        total_rows += rows; total_calls += calls; total_values += values; total_lookups += lookups;
    }
    printf("total rows=%ld vec_dot_calls=%ld dequant_values=%ld lookups=%ld failures=%d\n", total_rows, total_calls,
           total_values, total_lookups, g_failures);
    if (g_failures) {
        printf("FAILED\n");
        return 1;
    }
    printf("ALL OK\n");
    return 0;
}
