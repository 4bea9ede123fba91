// gptqkit CPU kernels: fused dequantize-GEMV/GEMM for 2/4/8-bit GPTQ weights, and a tiled
// dequantizer for the BLAS path. Three codegen paths over one layout: AVX-512 (64-byte GCC
// vectors), AVX2+FMA (intrinsics on 8-column vectors, below the generic code) and portable. Built at first use by gptqkit/kernels/cpu.py with
// `g++ -O3 -march=native -fopenmp -shared` and loaded with ctypes (no torch headers, no ninja).
//
// Repacked layout (built once by cpu.py at prepare time; the checkpoint itself is untouched):
//   W  : uint8 [nblk, K, 8*bits]  blocks of 64 output columns; for each input row k (in the
//        act-order permuted order, so groups are contiguous runs) the 64 codes of the block
//        are stored in 8*bits contiguous bytes: byte 16*h + lane holds, at bits [bits*i, +bits),
//        the code of column 16*(per*h + i) + lane, per = 8/bits. A thread walking one block
//        streams contiguous bytes and one 16-byte load + zero-extend gives 16 lanes.
//   S  : float [nblk, G, 64]   scales
//   SZ : float [nblk, G, 64]   scales * zeros         (w = S*q - SZ)
//   seg: int32 [G+1]           rows of group g are [seg[g], seg[g+1]) in permuted order
//   gk : int32 [K]             group of each permuted row (dequantizer only)
//
// GEMV:  y[n] = sum_g ( S[g,n] * sum_{k in g} x[k] q[k,n]  -  SZ[g,n] * sum_{k in g} x[k] )
// so the inner loop is only "zero-extend codes, convert to fp32, FMA", with fp32 accumulation.
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>
#include <utility>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

typedef uint8_t v16u8 __attribute__((vector_size(16)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

static inline v16f loadf(const float* p) { v16f v; memcpy(&v, p, 64); return v; }
static inline void storef(float* p, v16f v) { memcpy(p, &v, 64); }
// 16 bytes -> 16 zero-extended int32 lanes (GCC's generic convertvector is scalarized here)
static inline v16i load_u8(const uint8_t* p) {
#if defined(__AVX512F__)
    __m512i t = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    v16i r; memcpy(&r, &t, 64); return r;
#elif defined(__AVX2__)
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    __m256i lo = _mm256_cvtepu8_epi32(b), hi = _mm256_cvtepu8_epi32(_mm_srli_si128(b, 8));
    v16i r; memcpy(&r, &lo, 32); memcpy((char*)&r + 32, &hi, 32); return r;
#else
    v16i r;
    for (int i = 0; i < 16; ++i) r[i] = p[i];
    return r;
#endif
}

template <int BITS>
static inline void decode(const uint8_t* __restrict p, v16f w[4]) {
    if constexpr (BITS == 8) {
        for (int v = 0; v < 4; ++v) w[v] = __builtin_convertvector(load_u8(p + 16 * v), v16f);
    } else if constexpr (BITS == 4) {
        v16i t0 = load_u8(p), t1 = load_u8(p + 16);
        w[0] = __builtin_convertvector(t0 & 15, v16f);
        w[1] = __builtin_convertvector(t0 >> 4, v16f);
        w[2] = __builtin_convertvector(t1 & 15, v16f);
        w[3] = __builtin_convertvector(t1 >> 4, v16f);
    } else {  // 2 bits
        v16i t = load_u8(p);
        w[0] = __builtin_convertvector(t & 3, v16f);
        w[1] = __builtin_convertvector((t >> 2) & 3, v16f);
        w[2] = __builtin_convertvector((t >> 4) & 3, v16f);
        w[3] = __builtin_convertvector(t >> 6, v16f);
    }
}

// MR rows of x against one 64-column block.
template <int BITS, int MR>
static void block_rows(const uint8_t* __restrict Wb, const float* __restrict Sb,
                       const float* __restrict SZb, const int32_t* __restrict seg, int G,
                       const float* __restrict X, int ldx, const float* __restrict XS,
                       float* __restrict Y, int ldy, int ncols) {
    constexpr int B = 8 * BITS;
    v16f y[MR][4];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 4; ++v) y[r][v] = (v16f){};
    for (int g = 0; g < G; ++g) {
        const int k0 = seg[g], k1 = seg[g + 1];
        if (k0 == k1) continue;
        v16f acc[MR][4];
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < 4; ++v) acc[r][v] = (v16f){};
        const uint8_t* p = Wb + (size_t)k0 * B;
        int k = k0;
        if constexpr (MR == 1) {
            // one row has only 4 accumulator chains: FMA latency, not bandwidth, would bound
            // the loop, so unroll K by 2 into a second set of accumulators
            v16f acc2[4] = {};
            for (; k + 2 <= k1; k += 2, p += 2 * B) {
#if defined(GK_PF_FMA)
                for (int c = 0; c < 2 * B; c += 64) __builtin_prefetch(p + GK_PF_FMA + c, 0, 3);
#endif
                v16f w[4], u[4];
                decode<BITS>(p, w);
                decode<BITS>(p + B, u);
                const float x0 = X[k], x1 = X[k + 1];
                for (int v = 0; v < 4; ++v) {
                    acc[0][v] += w[v] * x0;
                    acc2[v] += u[v] * x1;
                }
            }
            for (int v = 0; v < 4; ++v) acc[0][v] += acc2[v];
        }
        for (; k < k1; ++k, p += B) {
            v16f w[4];
            decode<BITS>(p, w);
            for (int r = 0; r < MR; ++r) {
                const float xv = X[(size_t)r * ldx + k];
                for (int v = 0; v < 4; ++v) acc[r][v] += w[v] * xv;
            }
        }
        const float* s = Sb + (size_t)g * 64;
        const float* sz = SZb + (size_t)g * 64;
        for (int v = 0; v < 4; ++v) {
            const v16f sv = loadf(s + 16 * v), szv = loadf(sz + 16 * v);
            for (int r = 0; r < MR; ++r) y[r][v] += sv * acc[r][v] - szv * XS[(size_t)r * G + g];
        }
    }
    for (int r = 0; r < MR; ++r) {
        float tmp[64];
        for (int v = 0; v < 4; ++v) storef(tmp + 16 * v, y[r][v]);
        memcpy(Y + (size_t)r * ldy, tmp, sizeof(float) * ncols);
    }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA (no AVX-512): the generic code above is written with 64-byte GCC vectors, which GCC
// splits into pairs of 256-bit halves through the stack on AVX2, and the 6-row tile of 4 such
// vectors needs 48 ymm registers of 16: the AVX2 build ran 4-6x slower than the AVX-512 one and
// slower than dense fp32 at M = 1. So AVX2 gets its own loop on 8-column vectors, with the same
// layout and the same arithmetic (codes zero-extended and converted in registers, fp32
// accumulation per group, w = s*q - s*z applied once per group and column).
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define GK_AVX2 1
// Columns 8V..8V+7 of a 64-column block, for one row: the layout puts column 16*(per*h+i)+lane at
// byte 16*h+lane, bits [BITS*i, +BITS), so they are 8 consecutive bytes (chunk c = 2h + V%2),
// one field each. Chunks shared by two vectors are loaded and zero-extended once (CSE).
template <int BITS, int V>
static inline __m256 dec8(const uint8_t* p) {
    constexpr int per = 8 / BITS, pair = V / 2, h = pair / per, i = pair % per, c = 2 * h + (V & 1);
    __m256i t = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)(p + 8 * c)));
    if constexpr (BITS * i > 0) t = _mm256_srli_epi32(t, BITS * i);
    if constexpr (BITS * (i + 1) < 8) t = _mm256_and_si256(t, _mm256_set1_epi32((1 << BITS) - 1));
    return _mm256_cvtepi32_ps(t);
}

// One row of codes times MR rows of x into acc[r][I] (I-th of the vectors V...). Up to 4 rows:
// the broadcasts of x are held and each vector is decoded right before its FMAs, in source
// order (GCC does not schedule before register allocation on x86), so one decoded vector is
// live at a time: decoding all 8 first spilled two accumulators of the M = 1 loop to the
// stack, and the store/reload bounded the loop.
template <int BITS, int MR, int NV, int... V, int... I>
static inline void fma_row(const uint8_t* p, const float* x, int ldx, __m256 (*acc)[NV],
                           std::integer_sequence<int, V...>, std::integer_sequence<int, I...>) {
    if constexpr (MR > 4) {
        // many rows, few vectors: decode the NV vectors, then one broadcast of x per row used by
        // NV FMAs at once, so only one broadcast is live (6 x 2 accumulators fit)
        __m256 w[NV];
        ((w[I] = dec8<BITS, V>(p)), ...);
        for (int r = 0; r < MR; ++r) {
            const __m256 xv = _mm256_set1_ps(x[(size_t)r * ldx]);
            ((acc[r][I] = _mm256_fmadd_ps(w[I], xv, acc[r][I])), ...);
        }
    } else {
        __m256 xv[MR];
        for (int r = 0; r < MR; ++r) xv[r] = _mm256_set1_ps(x[(size_t)r * ldx]);
        ([&] {
            const __m256 w = dec8<BITS, V>(p);
            for (int r = 0; r < MR; ++r) acc[r][I] = _mm256_fmadd_ps(w, xv[r], acc[r][I]);
        }(), ...);
    }
}

// MR rows of x against the 8-column vectors V... of one 64-column block. The accumulators, the
// live broadcasts of x and the decoded vectors must fit 16 ymm registers: (1 row, all 8
// vectors) for decode, where 8 independent FMA chains cover the FMA latency; (6 rows, 2
// vectors) for batches, the 2 vectors being the two fields of one 8-byte chunk for 4-bit codes
// (V, V+2), so that one zero-extend serves 12 FMAs (~10% faster than 4 x 2 and 1.5x faster
// per row than 2 x 4 at M >= 12, 1 thread; 3 x 4 spilled).
template <int BITS, int MR, int... V>
static void block_rows_avx2(const uint8_t* __restrict Wb, const float* __restrict Sb,
                            const float* __restrict SZb, const int32_t* __restrict seg, int G,
                            const float* __restrict X, int ldx, const float* __restrict XS,
                            float* __restrict Y, int ldy, int ncols) {
    constexpr int B = 8 * BITS, NV = sizeof...(V);
    constexpr int VV[NV] = {V...};
    __m256 y[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) y[r][v] = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
        const int k0 = seg[g], k1 = seg[g + 1];
        if (k0 == k1) continue;
        __m256 acc[MR][NV];
        for (int r = 0; r < MR; ++r)
            for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
        const uint8_t* p = Wb + (size_t)k0 * B;
        for (int k = k0; k < k1; ++k, p += B) {
            fma_row<BITS, MR, NV>(p, X + k, ldx, acc, std::integer_sequence<int, V...>{},
                                  std::make_integer_sequence<int, NV>{});
        }
        const float* s = Sb + (size_t)g * 64;
        const float* sz = SZb + (size_t)g * 64;
        for (int v = 0; v < NV; ++v) {
            const __m256 sv = _mm256_loadu_ps(s + 8 * VV[v]), szv = _mm256_loadu_ps(sz + 8 * VV[v]);
            for (int r = 0; r < MR; ++r)
                y[r][v] = _mm256_fnmadd_ps(szv, _mm256_set1_ps(XS[(size_t)r * G + g]),
                                           _mm256_fmadd_ps(sv, acc[r][v], y[r][v]));
        }
    }
    for (int v = 0; v < NV; ++v) {
        const int nc = ncols - 8 * VV[v];  // columns of this vector that exist (ragged last block)
        if (nc <= 0) continue;
        for (int r = 0; r < MR; ++r) {
            float* o = Y + (size_t)r * ldy + 8 * VV[v];
            if (nc >= 8) {
                _mm256_storeu_ps(o, y[r][v]);
            } else {
                float tmp[8];
                _mm256_storeu_ps(tmp, y[r][v]);
                memcpy(o, tmp, sizeof(float) * nc);
            }
        }
    }
}

#ifndef GK_MR_AVX2
#define GK_MR_AVX2 6
#endif
// rows [0, M) of x against block j. Full tiles of 6 rows, then of 4, go over each pair of vectors
// (a pair's codes stay in L1 across the row tiles of a block); the 1-3 rows left take the tile
// with the most accumulators that fits: 1 row x 8 vectors, 2 x 4, 3 x 2 (at M = 2, 2 x 4 was
// 1.45x faster than 2 x 2 over pairs, which has too few FMA chains to hide their latency).
template <int BITS>
static void block_avx2(const uint8_t* Wb, const float* Sb, const float* SZb, const int32_t* seg,
                       int G, const float* X, int K, const float* XS, float* Yb, int N, int M,
                       int ncols) {
#define GK_ROWS(R, ...)                                                                            \
    block_rows_avx2<BITS, R, __VA_ARGS__>(Wb, Sb, SZb, seg, G, X + (size_t)m * K, K, XS + (size_t)m * G, \
                                          Yb + (size_t)m * N, N, ncols)
    const int m6 = M - M % GK_MR_AVX2, m4 = M - M % GK_MR_AVX2 % 4;
#define GK_PAIR(V0)                                                                                \
    if (8 * (V0) < ncols) {                                                                        \
        int m = 0;                                                                                 \
        for (; m < m6; m += GK_MR_AVX2) GK_ROWS(GK_MR_AVX2, V0, V0 + 2);                           \
        for (; m < m4; m += 4) GK_ROWS(4, V0, V0 + 2);                                             \
    }
    GK_PAIR(0) GK_PAIR(1) GK_PAIR(4) GK_PAIR(5)
#undef GK_PAIR
    const int m = m4;
    switch (M - m4) {
        case 3:
            GK_ROWS(3, 0, 2); GK_ROWS(3, 1, 3);
            if (ncols > 32) { GK_ROWS(3, 4, 6); GK_ROWS(3, 5, 7); }
            break;
        case 2:
            GK_ROWS(2, 0, 1, 2, 3);
            if (ncols > 32) GK_ROWS(2, 4, 5, 6, 7);
            break;
        case 1: GK_ROWS(1, 0, 1, 2, 3, 4, 5, 6, 7); break;
    }
#undef GK_ROWS
}
#endif

// rows of x per pass over a weight block (generic code: AVX-512 and the portable build; AVX2
// has its own tiles above): with 32 vector registers (AVX-512) 6 rows x 4 vectors amortize
// decoding; 4 rows otherwise
#if defined(__AVX512F__)
#define GK_MR 6
#else
#define GK_MR 4
#endif

template <int BITS>
static void gemv_impl(const uint8_t* W, const float* S, const float* SZ, const int32_t* seg,
                      int K, int G, int nblk, const float* X, int M, float* Y, int N, int nthreads) {
    // per-row, per-group sums of x (the zero-point term); on the stack for small M * G
    float xs_stack[512];
    float* XS = (size_t)M * G <= 512 ? xs_stack : (float*)malloc(sizeof(float) * (size_t)M * G + 64);
    for (int m = 0; m < M; ++m)
        for (int g = 0; g < G; ++g) {
            float a = 0.f;
            for (int k = seg[g]; k < seg[g + 1]; ++k) a += X[(size_t)m * K + k];
            XS[(size_t)m * G + g] = a;
        }
    constexpr int B = 8 * BITS;
    // Work items are (block, chunk of rows). Blocks alone left threads idle when a layer has
    // fewer 64-column blocks than threads (N = 576: 9 blocks) at prefill sizes, so with more
    // threads than about half the blocks the rows are cut too, in multiples of 12 (whole tiles
    // of 4 and of 6 rows). Each output element is computed the same way in any split.
    int nmc = 1;
    if (nthreads > 1 && 2 * nthreads > nblk) {
        nmc = (2 * nthreads + nblk - 1) / nblk;
        const int most = (M + 11) / 12;
        if (nmc > most) nmc = most;
    }
    const int rc = nmc > 1 ? ((M + nmc - 1) / nmc + 11) / 12 * 12 : M;
    nmc = (M + rc - 1) / rc;
    const int nitems = nblk * nmc;
    // if(): a single-threaded call (all of a small model's M = 1 layers) never enters the pool
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1)
    for (int it = 0; it < nitems; ++it) {
        const int j = it / nmc, m0 = (it % nmc) * rc, Mc = (M - m0) < rc ? (M - m0) : rc;
        const uint8_t* Wb = W + (size_t)j * K * B;
        const float* Sb = S + (size_t)j * G * 64;
        const float* SZb = SZ + (size_t)j * G * 64;
        const int ncols = (N - 64 * j) < 64 ? (N - 64 * j) : 64;
        float* Yb = Y + 64 * (size_t)j + (size_t)m0 * N;
        const float* Xc = X + (size_t)m0 * K;
        const float* XSc = XS + (size_t)m0 * G;
#if defined(GK_AVX2)
        block_avx2<BITS>(Wb, Sb, SZb, seg, G, Xc, K, XSc, Yb, N, Mc, ncols);
        continue;
#endif
        int m = 0;
        for (; m + GK_MR <= Mc; m += GK_MR)
            block_rows<BITS, GK_MR>(Wb, Sb, SZb, seg, G, Xc + (size_t)m * K, K, XSc + (size_t)m * G,
                                    Yb + (size_t)m * N, N, ncols);
#define GK_TAIL(R) case R: block_rows<BITS, R>(Wb, Sb, SZb, seg, G, Xc + (size_t)m * K, K, XSc + (size_t)m * G, Yb + (size_t)m * N, N, ncols); break;
        switch (Mc - m) {
#if GK_MR > 5
            GK_TAIL(5)
#endif
#if GK_MR > 4
            GK_TAIL(4)
#endif
            GK_TAIL(3)
            GK_TAIL(2)
            GK_TAIL(1)
            default: break;
        }
    }
    if (XS != xs_stack) free(XS);
}

#if defined(GK_AVX2)
// one row of a block's codes -> 64 fp32 weights s*q - s*z (the BLAS path's dequantizer on AVX2)
template <int BITS, int... I>
static inline void dequant_row_avx2(const uint8_t* p, const float* s, const float* sz, float* o,
                                    std::integer_sequence<int, I...>) {
    ((_mm256_storeu_ps(o + 8 * I, _mm256_fmsub_ps(_mm256_loadu_ps(s + 8 * I), dec8<BITS, I>(p),
                                                  _mm256_loadu_ps(sz + 8 * I)))), ...);
}
#endif

template <int BITS>
static void dequant_impl(const uint8_t* W, const float* S, const float* SZ, const int32_t* gk,
                         int K, int G, int blk0, int nb, float* out, int nthreads) {
    constexpr int B = 8 * BITS;
    constexpr int KC = 256;
    const int nkc = (K + KC - 1) / KC;
    const int ldo = nb * 64;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int jb = 0; jb < nb; ++jb)
        for (int kc = 0; kc < nkc; ++kc) {
            const int j = blk0 + jb;
            const uint8_t* Wb = W + (size_t)j * K * B;
            const float* Sb = S + (size_t)j * G * 64;
            const float* SZb = SZ + (size_t)j * G * 64;
            const int k1 = (kc + 1) * KC < K ? (kc + 1) * KC : K;
            for (int k = kc * KC; k < k1; ++k) {
                const float* s = Sb + (size_t)gk[k] * 64;
                const float* sz = SZb + (size_t)gk[k] * 64;
                float* o = out + (size_t)k * ldo + 64 * jb;
#if defined(GK_AVX2)
                dequant_row_avx2<BITS>(Wb + (size_t)k * B, s, sz, o, std::make_integer_sequence<int, 8>{});
#else
                v16f w[4];
                decode<BITS>(Wb + (size_t)k * B, w);
                for (int v = 0; v < 4; ++v) storef(o + 16 * v, loadf(s + 16 * v) * w[v] - loadf(sz + 16 * v));
#endif
            }
        }
}

// ---------------------------------------------------------------------------------------------
// 4-bit "dot-product" kernel (AVX-512 BF16): two bf16 weights per 32-bit lane, one VDPBF16PS per
// 32 multiply-adds. About 3 vector ops per 32 weights instead of 7 for zero-extend/convert/FMA,
// so a core streams codes about twice as fast; used for 4-bit layers whose group runs are whole
// multiples of 8 rows (every standard group size), the generic kernel above for the rest.
//
// Layout WD: uint8 [nblk, K/8, 4, 64]. For block b, row octet r (rows 8r..8r+7) and column
// vector v (columns 64b+16v .. +15), 64 bytes = 16 lanes x 2 words x 4 nibbles: nibble j of
// 16-bit word h in 32-bit lane l holds the code of row 8r+2j+h, column 64b+16v+l. So one shift
// and one AND/OR (vpternlogd) turn nibble j of all 32 words into 32 bf16 numbers, each lane a
// (row 8r+2j, row 8r+2j+1) pair that multiplies the broadcast pair x[8r+2j], x[8r+2j+1].
//
// A code q is placed in the top 4 of bf16's 7 mantissa bits under the exponent of 1.0, which
// makes the exact bf16 number w' = 1 + q/16 (no conversion instruction). Products of bf16
// numbers are exact in fp32, so the only rounding is fp32 accumulation, as in the FMA kernel:
//   sum_k x_k (q_k - z) = 16 sum_k x_k w'_k - (16 + z) sum_k x_k
// with S16 = 16 s and SZ16 = s (16 + z) per group and column (fp32 tables, like S and SZ).
// fp32 activations are split into NS = 3 bf16 parts (hi + mid + lo == x exactly), fp16 into 2,
// bf16 is used as is (NS = 1): the result is as exact as the FMA kernel's.
#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#define GK_HAS_DP 1
#ifndef GK_PF
#define GK_PF 4096  // software prefetch distance in bytes
#endif

template <int J>
static inline __m512bh nib_bf16(__m512i t) {
    const __m512i mask = _mm512_set1_epi32(0x00780078), one = _mm512_set1_epi32(0x3F803F80);
    __m512i u;
    if constexpr (J == 0) u = _mm512_slli_epi32(t, 3);
    else u = _mm512_srli_epi32(t, 4 * J - 3);
    return (__m512bh)_mm512_ternarylogic_epi32(u, mask, one, 0xEA);  // (u & mask) | one
}

// MR rows of x (each as NS bf16 parts: XB[(r * NS + s) * ldp + pair]) against one 64-column block
template <int MR, int NS>
static void block_rows_dp(const uint8_t* __restrict Wb, const float* __restrict Sb,
                          const float* __restrict SZb, const int32_t* __restrict seg, int G,
                          const uint32_t* __restrict XB, int ldp, const float* __restrict XS,
                          float* __restrict Y, int ldy, int ncols) {
    // one row has only 4 accumulator chains per set; rotate over 4 sets (one per nibble) so that
    // VDPBF16PS latency is hidden; more rows give enough chains with one set
    constexpr int SETS = (MR * NS >= 4) ? 1 : (MR * NS >= 2 ? 2 : 4);
    __m512 y[MR][4];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < 4; ++v) y[r][v] = _mm512_setzero_ps();
    for (int g = 0; g < G; ++g) {
        const int r0 = seg[g] >> 3, r1 = seg[g + 1] >> 3;
        if (r0 == r1) continue;
        __m512 acc[SETS][MR][4];
        for (int e = 0; e < SETS; ++e)
            for (int r = 0; r < MR; ++r)
                for (int v = 0; v < 4; ++v) acc[e][r][v] = _mm512_setzero_ps();
        const uint8_t* p = Wb + (size_t)r0 * 256;
        for (int o = r0; o < r1; ++o, p += 256) {
            __m512i t[4];
            for (int v = 0; v < 4; ++v) t[v] = _mm512_loadu_si512(p + 64 * v);
            // a block's codes are one contiguous stream, but M = 1 ran faster with a software
            // prefetch; 4 KiB ahead was best of 0/1/2/4 KiB in side-by-side builds (-DGK_PF=...)
            for (int v = 0; v < 4; ++v) _mm_prefetch((const char*)(p + GK_PF + 64 * v), _MM_HINT_T0);
#define GK_DP_NIBBLE(J)                                                                        \
            for (int v = 0; v < 4; ++v) {                                                      \
                const __m512bh w = nib_bf16<J>(t[v]);                                          \
                for (int r = 0; r < MR; ++r)                                                   \
                    for (int s = 0; s < NS; ++s)                                               \
                        acc[(J) % SETS][r][v] = _mm512_dpbf16_ps(acc[(J) % SETS][r][v], w,     \
                            (__m512bh)_mm512_set1_epi32((int)XB[(size_t)(r * NS + s) * ldp + 4 * o + (J)])); \
            }
            GK_DP_NIBBLE(0) GK_DP_NIBBLE(1) GK_DP_NIBBLE(2) GK_DP_NIBBLE(3)
#undef GK_DP_NIBBLE
        }
        for (int e = 1; e < SETS; ++e)
            for (int r = 0; r < MR; ++r)
                for (int v = 0; v < 4; ++v) acc[0][r][v] = _mm512_add_ps(acc[0][r][v], acc[e][r][v]);
        const float* s = Sb + (size_t)g * 64;
        const float* sz = SZb + (size_t)g * 64;
        for (int v = 0; v < 4; ++v) {
            const __m512 sv = _mm512_loadu_ps(s + 16 * v), szv = _mm512_loadu_ps(sz + 16 * v);
            for (int r = 0; r < MR; ++r)
                y[r][v] = _mm512_fnmadd_ps(szv, _mm512_set1_ps(XS[(size_t)r * G + g]),
                                           _mm512_fmadd_ps(sv, acc[0][r][v], y[r][v]));
        }
    }
    for (int r = 0; r < MR; ++r) {
        float tmp[64];
        for (int v = 0; v < 4; ++v) _mm512_storeu_ps(tmp + 16 * v, y[r][v]);
        memcpy(Y + (size_t)r * ldy, tmp, sizeof(float) * ncols);
    }
}

static inline float bf16_to_f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

// x [M, K] (fp32 or bf16) -> NS bf16 parts per row, XB [M][NS][K] (as K/2 pairs), and the
// per-group sums of the represented x (XS [M, G]), which the zero-point term needs.
template <int NS>
static void split_x(const void* X, int xbf16, int M, int K, int G, const int32_t* seg,
                    uint16_t* XB, float* XS) {
    for (int m = 0; m < M; ++m) {
        uint16_t* out = XB + (size_t)m * NS * K;
        if (xbf16) {
            memcpy(out, (const uint16_t*)X + (size_t)m * K, sizeof(uint16_t) * K);
        } else {
            const float* x = (const float*)X + (size_t)m * K;
            int k = 0;
            for (; k + 16 <= K; k += 16) {
                __m512 r = _mm512_loadu_ps(x + k);
                for (int s = 0; s < NS; ++s) {
                    const __m256bh h = _mm512_cvtneps_pbh(r);
                    _mm256_storeu_si256((__m256i*)(out + (size_t)s * K + k), (__m256i)h);
                    r = _mm512_sub_ps(r, _mm512_castsi512_ps(_mm512_slli_epi32(
                            _mm512_cvtepu16_epi32((__m256i)h), 16)));
                }
            }
            for (; k < K; ++k) {
                float r = x[k];
                for (int s = 0; s < NS; ++s) {
                    uint32_t u; memcpy(&u, &r, 4);
                    const uint16_t h = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
                    out[(size_t)s * K + k] = h;
                    r -= bf16_to_f(h);
                }
            }
        }
        for (int g = 0; g < G; ++g) {
            float a = 0.f;
            for (int s = 0; s < NS; ++s)
                for (int k = seg[g]; k < seg[g + 1]; ++k) a += bf16_to_f(out[(size_t)s * K + k]);
            XS[(size_t)m * G + g] = a;
        }
    }
}

template <int NS>
static void gemv_dp_impl(const uint8_t* W, const float* S16, const float* SZ16, const int32_t* seg,
                         int K, int G, int nblk, const void* X, int xbf16, int M, float* Y, int N,
                         int nthreads) {
    uint16_t xb_stack[3 * 4096];
    float xs_stack[512];
    const size_t nxb = (size_t)M * NS * K;
    uint16_t* XB = nxb <= 3 * 4096 ? xb_stack : (uint16_t*)malloc(sizeof(uint16_t) * nxb + 64);
    float* XS = (size_t)M * G <= 512 ? xs_stack : (float*)malloc(sizeof(float) * (size_t)M * G + 64);
    split_x<NS>(X, xbf16, M, K, G, seg, XB, XS);
    const uint32_t* XP = (const uint32_t*)XB;
    const int ldp = K / 2;
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1)
    for (int j = 0; j < nblk; ++j) {
        const uint8_t* Wb = W + (size_t)j * K * 32;
        const float* Sb = S16 + (size_t)j * G * 64;
        const float* SZb = SZ16 + (size_t)j * G * 64;
        const int ncols = (N - 64 * j) < 64 ? (N - 64 * j) : 64;
        float* Yb = Y + 64 * (size_t)j;
        constexpr int MR = NS == 1 ? 6 : (NS == 2 ? 3 : 2);
        int m = 0;
        for (; m + MR <= M; m += MR)
            block_rows_dp<MR, NS>(Wb, Sb, SZb, seg, G, XP + (size_t)m * NS * ldp, ldp, XS + (size_t)m * G,
                                  Yb + (size_t)m * N, N, ncols);
        for (; m < M; ++m)
            block_rows_dp<1, NS>(Wb, Sb, SZb, seg, G, XP + (size_t)m * NS * ldp, ldp, XS + (size_t)m * G,
                                 Yb + (size_t)m * N, N, ncols);
    }
    if (XB != xb_stack) free(XB);
    if (XS != xs_stack) free(XS);
}
#else
#define GK_HAS_DP 0
#endif

extern "C" {
int gk_abi_version(void) { return 3; }
int gk_has_dp(void) { return GK_HAS_DP; }

// The widest vector ISA this build was compiled for: the backend picks its large-M path from it
// (without AVX-512 the fused kernel loses to dequantize + BLAS at prefill sizes).
int gk_isa(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__)
    return 256;
#else
    return 0;
#endif
}


int gk_gemv(const uint8_t* W, const float* S, const float* SZ, const int32_t* seg, int bits,
            int K, int G, int nblk, const float* X, int M, float* Y, int N, int nthreads) {
    switch (bits) {
        case 2: gemv_impl<2>(W, S, SZ, seg, K, G, nblk, X, M, Y, N, nthreads); return 0;
        case 4: gemv_impl<4>(W, S, SZ, seg, K, G, nblk, X, M, Y, N, nthreads); return 0;
        case 8: gemv_impl<8>(W, S, SZ, seg, K, G, nblk, X, M, Y, N, nthreads); return 0;
    }
    return -1;
}

// The same GEMV with the layer's constant arguments in one struct built once at prepare time
// (fewer ctypes conversions per call on the decode path).
struct gk_layer {
    const uint8_t* W; const float* S; const float* SZ; const int32_t* seg;
    int32_t bits, K, G, nblk, N;
};

int gk_gemv_layer(const gk_layer* L, const float* X, int M, float* Y, int nthreads) {
    return gk_gemv(L->W, L->S, L->SZ, L->seg, L->bits, L->K, L->G, L->nblk, X, M, Y, L->N, nthreads);
}

int gk_dequant(const uint8_t* W, const float* S, const float* SZ, const int32_t* gk, int bits,
               int K, int G, int blk0, int nb, float* out, int nthreads) {
    switch (bits) {
        case 2: dequant_impl<2>(W, S, SZ, gk, K, G, blk0, nb, out, nthreads); return 0;
        case 4: dequant_impl<4>(W, S, SZ, gk, K, G, blk0, nb, out, nthreads); return 0;
        case 8: dequant_impl<8>(W, S, SZ, gk, K, G, blk0, nb, out, nthreads); return 0;
    }
    return -1;
}
// 4-bit dot-product kernel (see above): x is fp32 (xdtype 0) or bf16 (xdtype 1); nsplit = bf16
// parts per x element (1 for bf16 x, 2 enough for fp16-valued x, 3 for any fp32). -2 if absent.
int gk_gemv_dp(const uint8_t* W, const float* S16, const float* SZ16, const int32_t* seg, int K,
               int G, int nblk, const void* X, int xdtype, int nsplit, int M, float* Y, int N,
               int nthreads) {
#if GK_HAS_DP
    if (K % 8) return -1;
    switch (nsplit) {
        case 1: gemv_dp_impl<1>(W, S16, SZ16, seg, K, G, nblk, X, xdtype, M, Y, N, nthreads); return 0;
        case 2: gemv_dp_impl<2>(W, S16, SZ16, seg, K, G, nblk, X, xdtype, M, Y, N, nthreads); return 0;
        case 3: gemv_dp_impl<3>(W, S16, SZ16, seg, K, G, nblk, X, xdtype, M, Y, N, nthreads); return 0;
    }
    return -1;
#else
    (void)W; (void)S16; (void)SZ16; (void)seg; (void)K; (void)G; (void)nblk; (void)X; (void)xdtype;
    (void)nsplit; (void)M; (void)Y; (void)N; (void)nthreads;
    return -2;
#endif
}

int gk_gemv_dp_layer(const gk_layer* L, const void* X, int xdtype, int nsplit, int M, float* Y,
                     int nthreads) {
    return gk_gemv_dp(L->W, L->S, L->SZ, L->seg, L->K, L->G, L->nblk, X, xdtype, nsplit, M, Y, L->N,
                      nthreads);
}
// Dequantize output blocks [blk0, blk0 + nb) of the dot-product layout into out [K, nb*64] fp32
// (the optional BLAS path): w = S16 * (1 + q/16) - SZ16 = s (q - z).
int gk_dequant_dp(const uint8_t* W, const float* S16, const float* SZ16, const int32_t* gk, int K,
                  int G, int blk0, int nb, float* out, int nthreads) {
    if (K % 8) return -1;
    const int ldo = nb * 64;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (int jb = 0; jb < nb; ++jb)
        for (int k = 0; k < K; ++k) {
            const int j = blk0 + jb, o = k >> 3, jj = (k & 7) >> 1, h = k & 1;
            const float* s = S16 + ((size_t)j * G + gk[k]) * 64;
            const float* sz = SZ16 + ((size_t)j * G + gk[k]) * 64;
            float* dst = out + (size_t)k * ldo + 64 * jb;
#if GK_HAS_DP
            // the layout exists only where this kernel was built: 16 columns per 64-byte load,
            // row k's code at bits [16h + 4jj, +4) of each 32-bit lane (the scalar loop below
            // reads the same nibbles one byte at a time, ~10x slower)
            const uint8_t* b = W + (size_t)j * K * 32 + (size_t)o * 256;
            const __m128i cnt = _mm_cvtsi32_si128(16 * h + 4 * jj);
            for (int v = 0; v < 4; ++v) {
                const __m512i q = _mm512_and_si512(_mm512_srl_epi32(_mm512_loadu_si512(b + 64 * v), cnt),
                                                   _mm512_set1_epi32(15));
                const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(0.0625f),
                                                  _mm512_set1_ps(1.0f));  // 1 + q/16, exact
                _mm512_storeu_ps(dst + 16 * v, _mm512_fmsub_ps(_mm512_loadu_ps(s + 16 * v), w1,
                                                               _mm512_loadu_ps(sz + 16 * v)));
            }
            continue;
#endif
            const uint8_t* p = W + (size_t)j * K * 32 + (size_t)o * 256 + 2 * h + (jj >> 1);
            for (int c = 0; c < 64; ++c) {
                const uint8_t b = p[64 * (c >> 4) + 4 * (c & 15)];
                const int q = (jj & 1) ? (b >> 4) : (b & 15);
                dst[c] = s[c] * (1.0f + (float)q * 0.0625f) - sz[c];
            }
        }
    return 0;
}
}
