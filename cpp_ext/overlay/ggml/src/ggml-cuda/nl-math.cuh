#pragma once

// Per-thread maths of the CUDA kernels for the non-linear block types (ggml-nl.h): the MMVQ dot product of one
// (block, iqs) against Q8_1 activations and the dequantisation of one thread's four weights. Everything here is
// __host__ __device__ and depends on nothing CUDA-specific except the three intrinsics below, which have portable
// host versions written from their documented semantics: tests/test_nl_cuda.py compiles this header with the
// host compiler and plays every thread index of a row against the C reference (dequantize_row_nl*).
//
// Layout recap (ggml-nl.h): a b-bit index is a low plane of klo bits (2 for b = 2, 3; 4 for b = 5, 6) and a high
// plane of khi bits (0, 1, 1, 2). In a group of G weights of a k-bit plane, weight e of the group sits in byte
// e % gb at bit k*(e / gb), gb = G*k/8 bytes per group; G = 256/k (gb = 32) in the _XS layouts, G = 32 (gb = 4k)
// in the _32 layouts. Four consecutive weights starting at a multiple of 4 are
// therefore four consecutive bytes of one int at one shift: one load, one shift and one mask give four indices.
//
// Codebook lookup: the indices of four weights, one per byte, select bytes of the codebook held as 32-bit words
// with __byte_perm (PRMT), which picks bytes of a 64-bit pair by 3-bit selectors. 2- and 3-bit codebooks fit one
// pair (one PRMT per four weights); 5- and 6-bit codebooks (32 and 64 bytes) take one PRMT per pair of words on the
// low 3 bits, then a tree of PRMTs choosing by each higher bit (4 + 2 + 1 = 7 PRMTs for 5 bits, 8 + 4 + 2 + 1 = 15
// for 6 bits), all in registers. The alternative, to be measured on a GPU, is a byte load per weight from a 32/64
// byte table in shared memory (or through L1); see docs/design.md, "CUDA kernels".

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#include <cuda_fp16.h>
#endif

#if defined(__CUDACC__)
#define NL_HD static __host__ __device__ __forceinline__
#define NL_HD_CONSTEXPR static constexpr __host__ __device__ __forceinline__
#define NL_UNROLL _Pragma("unroll")
#else
#define NL_HD static inline
#define NL_HD_CONSTEXPR static constexpr inline
#define NL_UNROLL
#endif

// ------------------------------------------------------------------------------------------------ the constants
#define NL_QK_XS       256  // weights per super-block (QK_NL_XS)
#define NL_QK_32        32  // weights per block (QK_NL), = QK8_1
#define NL_Q8_1_BYTES   36  // sizeof(block_q8_1): half2 ds (d, s), then 32 int8
#define NL_Q8_1_QS       4  // offset of the int8 values in block_q8_1

// MMVQ work split: a thread takes iqs = vdr * (tid % (qi / vdr)) of a block. _XS: qi = 8, one thread per 32-weight
// sub-block (iqs = sub-block, as IQ4_XS's 8 threads per super-block); _32: qi = 2, two threads per block, 16
// weights each (as IQ4_NL).
#define NL_QI_XS   8
#define NL_QI_32   2
#define NL_VDR     1

NL_HD_CONSTEXPR int nl_klo(int b) { return b <= 3 ? 2 : 4; }
NL_HD_CONSTEXPR int nl_khi(int b) { return b == 2 ? 0 : b == 6 ? 2 : 1; }
NL_HD_CONSTEXPR int nl_block_bytes(int b, bool xs) { return xs ? 8 + 32 * b : 2 + 4 * b; }
NL_HD_CONSTEXPR int nl_qk(bool xs) { return xs ? NL_QK_XS : NL_QK_32; }
NL_HD_CONSTEXPR uint32_t nl_byte_mask(int k) { return 0x01010101u * ((1u << k) - 1u); }

// The codebooks (ggml-nl.h's ggml_nl_values_<b>) as little-endian words: byte i of word w is level 4w + i. Device
// code cannot read ggml-nl.h's host arrays; the test checks every level against them.
NL_HD_CONSTEXPR uint32_t nl_codebook_word(int b, int w) {
    switch (b) {
        case 2: return 0x540ed381u;
        case 3: return w == 0 ? 0xedd2b281u : 0x633b1e05u;
        case 5: {
            const uint32_t t[8] = {
                0xa69b8b81u, 0xc7c0b8afu, 0xe2dcd5ceu, 0xfaf4eee8u, 0x110c0600u, 0x2b241e18u, 0x4a423a32u, 0x75685d53u,
            };
            return t[w];
        }
        default: {
            const uint32_t t[16] = {
                0x958e8581u, 0xaaa5a09bu, 0xbcb8b3afu, 0xcbc8c4c0u, 0xd9d6d2cfu, 0xe6e3e0dcu, 0xf2efece9u, 0xfdfaf7f5u,
                0x09060300u, 0x14110e0bu, 0x201d1a17u, 0x2e2a2724u, 0x3c393531u, 0x4d494440u, 0x615c5752u, 0x7a736d67u,
            };
            return t[w];
        }
    }
}

// ------------------------------------------------------------------------------------------------ the intrinsics
// __byte_perm(x, y, s): byte n of the result is byte ((s >> 4n) & 7) of the 8 bytes y:x (x = bytes 0-3)
NL_HD uint32_t nl_byte_perm(uint32_t x, uint32_t y, uint32_t s) {
#if defined(__CUDA_ARCH__)
    return __byte_perm(x, y, s);
#else
    const uint64_t xy = ((uint64_t) y << 32) | x;
    uint32_t r = 0;
    for (int n = 0; n < 4; ++n) {
        r |= (uint32_t) ((xy >> (8 * ((s >> (4 * n)) & 7))) & 0xff) << (8 * n);
    }
    return r;
#endif
}

// __dp4a(a, b, c): c + the sum of the four products of the signed bytes of a and b
NL_HD int nl_dp4a(int a, int b, int c) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 610
    return __dp4a(a, b, c);
#else
    for (int n = 0; n < 4; ++n) {
        c += (int) (int8_t) (a >> (8 * n)) * (int) (int8_t) (b >> (8 * n));
    }
    return c;
#endif
}

// fp16 bits -> float (exact)
NL_HD float nl_half_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(h));
#else
    const uint32_t sign = (uint32_t) (h & 0x8000) << 16;
    const uint32_t exp  = (h >> 10) & 0x1f;
    const uint32_t mant = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (mant << 13);
    } else {
        const float v = (float) mant * (1.0f / 16777216.0f);  // 2^-24, exact
        memcpy(&bits, &v, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// ------------------------------------------------------------------------------------------------ loads
// 4 bytes at p: 4-byte aligned (_XS index planes at offset 8 of blocks whose sizes are multiples of 4; Q8_1 values)
NL_HD uint32_t nl_load_b4(const uint8_t * p) {
#if defined(__CUDA_ARCH__)
    return *(const uint32_t *) p;
#else
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#endif
}

// 4 bytes at p, 2-byte aligned (_32 blocks are 10, 14, 22, 26 bytes)
NL_HD uint32_t nl_load_b2(const uint8_t * p) {
#if defined(__CUDA_ARCH__)
    const uint16_t * p16 = (const uint16_t *) p;
    return (uint32_t) p16[0] | ((uint32_t) p16[1] << 16);
#else
    return nl_load_b4(p);
#endif
}

NL_HD uint16_t nl_load_u16(const uint8_t * p) {
#if defined(__CUDA_ARCH__)
    return *(const uint16_t *) p;
#else
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
#endif
}

// ------------------------------------------------------------------------------------------------ indices
// four indices of a k-bit plane (one per byte): weights e .. e+3 of a block (e a multiple of 4)
template <bool XS>
NL_HD uint32_t nl_plane4(const uint8_t * q, int k, int e) {
    const int G  = XS ? NL_QK_XS / k : NL_QK_32;   // weights per group
    const int gb = G * k / 8;                      // bytes per group
    const int g = e / G, r = e % G;
    const uint8_t * p = q + g * gb + r % gb;
    const uint32_t v = XS ? nl_load_b4(p) : nl_load_b2(p);
    return (v >> (k * (r / gb))) & nl_byte_mask(k);
}

// the b-bit indices of weights e .. e+3 of the block whose index planes start at qs
template <int B, bool XS>
NL_HD uint32_t nl_index4(const uint8_t * qs, int e) {
    constexpr int klo = nl_klo(B), khi = nl_khi(B);
    uint32_t idx = nl_plane4<XS>(qs, klo, e);
    if constexpr (khi != 0) {
        idx |= nl_plane4<XS>(qs + nl_qk(XS) * klo / 8, khi, e) << klo;
    }
    return idx;
}

// four 4-bit values (one per byte, each < 16) -> four nibbles in the low 16 bits, a PRMT selector
NL_HD uint32_t nl_nibbles(uint32_t x) {
    const uint32_t t = x | (x >> 4);        // byte 0: x0 | x1 << 4, byte 2: x2 | x3 << 4
    return nl_byte_perm(t, 0, 0x4420);
}

// four b-bit indices (one per byte) -> the four int8 codebook levels, packed in the same byte order
template <int B>
NL_HD uint32_t nl_lookup4(uint32_t idx) {
    const uint32_t lo = nl_nibbles(idx & 0x07070707u);
    if constexpr (B == 2) {
        return nl_byte_perm(nl_codebook_word(2, 0), 0, lo);
    } else if constexpr (B == 3) {
        return nl_byte_perm(nl_codebook_word(3, 0), nl_codebook_word(3, 1), lo);
    } else {
        constexpr int n = 1 << (B - 3);         // 8-level pairs of words: 4 (b = 5) or 8 (b = 6)
        uint32_t r[n];
NL_UNROLL
        for (int i = 0; i < n; ++i) {
            r[i] = nl_byte_perm(nl_codebook_word(B, 2 * i), nl_codebook_word(B, 2 * i + 1), lo);
        }
        const uint32_t hi = nl_nibbles((idx >> 3) & nl_byte_mask(B - 3));  // index bits 3.. per nibble
NL_UNROLL
        for (int level = 0; level < B - 3; ++level) {
            // byte n from the even (bit clear) or the odd (bit set: selector + 4) candidate
            const uint32_t sel = 0x3210u | (((hi >> level) & 0x1111u) << 2);
NL_UNROLL
            for (int i = 0; i < (n >> (level + 1)); ++i) {
                r[i] = nl_byte_perm(r[2 * i], r[2 * i + 1], sel);
            }
        }
        return r[0];
    }
}

// ------------------------------------------------------------------------------------------------ scales
// signed 6-bit scale of sub-block ib of an _XS super-block (block bytes: d, scales_h[2], scales_l[4], planes)
NL_HD int nl_sub_scale(const uint8_t * blk, int ib) {
    const int ls = ((blk[4 + ib / 2] >> (4 * (ib % 2))) & 0xf) | (((blk[2 + ib / 4] >> (2 * (ib % 4))) & 3) << 4);
    return ls - 32;
}

// ------------------------------------------------------------------------------------------------ MMVQ
// One thread's share of an MMVQ row: the x block kbx of vx (a row's blocks are consecutive) against the Q8_1
// blocks aligned with it, at vy (MMVQ passes &y[kbx * qk / 32] of the row). Same contract as vecdotq.cuh's
// vec_dot_*_q8_1: the row's result is the sum over every kbx and iqs = NL_VDR * t, t < qi / NL_VDR.
template <int B, bool XS>
NL_HD float nl_vec_dot_q8_1(const void * vx, const void * vy, int kbx, int iqs) {
    const uint8_t * blk = (const uint8_t *) vx + (int64_t) kbx * nl_block_bytes(B, XS);
    const uint8_t * qs  = blk + (XS ? 8 : 2);
    // _XS: sub-block iqs (32 weights) against Q8_1 block iqs; _32: weights 16*iqs .. +15 against Q8_1 block 0
    const int e0 = XS ? 32 * iqs : 16 * iqs;
    const uint8_t * y8 = (const uint8_t *) vy + (XS ? iqs * NL_Q8_1_BYTES : 0);
    constexpr int n4 = XS ? 8 : 4;              // groups of four weights
    int sumi = 0;
NL_UNROLL
    for (int j = 0; j < n4; ++j) {
        const uint32_t v = nl_lookup4<B>(nl_index4<B, XS>(qs, e0 + 4 * j));
        const uint32_t u = nl_load_b4(y8 + NL_Q8_1_QS + (e0 % 32) + 4 * j);
        sumi = nl_dp4a((int) v, (int) u, sumi);
    }
    const float d8 = nl_half_to_float(nl_load_u16(y8));
    if constexpr (XS) {
        sumi *= nl_sub_scale(blk, iqs);
    }
    return nl_half_to_float(nl_load_u16(blk)) * d8 * (float) sumi;
}

// ------------------------------------------------------------------------------------------------ dequantise
// Thread i of a row's dequantisation: weights 4i .. 4i+3 of the row at vx, written to y[0..3] as the C reference
// computes them (float scale times int8 level; _XS: d * (ls - 32) first), so the values are equal bit for bit.
template <int B, bool XS>
NL_HD void nl_dequant4(const void * vx, int64_t i, float * y) {
    constexpr int per = nl_qk(XS) / 4;          // threads per block
    const uint8_t * blk = (const uint8_t *) vx + (i / per) * nl_block_bytes(B, XS);
    const int e = 4 * (int) (i % per);
    const uint32_t v = nl_lookup4<B>(nl_index4<B, XS>(blk + (XS ? 8 : 2), e));
    float dl = nl_half_to_float(nl_load_u16(blk));
    if constexpr (XS) {
        dl = dl * (float) nl_sub_scale(blk, e / 32);
    }
NL_UNROLL
    for (int t = 0; t < 4; ++t) {
        y[t] = dl * (float) (int8_t) (v >> (8 * t));
    }
}
