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
#include <cmath>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>
#include <omp.h>
#include <utility>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__AVX2__)
// the first nc (<= 8 stores all 8, < 8 a ragged last block's) of 8 fp32 results into o
static inline void store8(float* o, __m256 v, int nc) {
    if (nc >= 8) {
        _mm256_storeu_ps(o, v);
    } else {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        memcpy(o, tmp, sizeof(float) * nc);
    }
}
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
        for (int r = 0; r < MR; ++r) store8(Y + (size_t)r * ldy + 8 * VV[v], y[r][v], nc);
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

// Work items are (64-column block, chunk of rc rows), nmc chunks: blocks alone left threads idle
// when a layer has fewer blocks than threads (N = 576: 9 blocks) at prefill sizes, so with more
// threads than about half the blocks the rows are cut too, in multiples of 12 (whole tiles of 3,
// 4 and 6 rows). Each output element is computed the same way in any split.
static inline void row_chunks(int M, int nblk, int nthreads, int* rc_out, int* nmc_out) {
    int nmc = 1;
    if (nthreads > 1) {
        const int most = (M + 11) / 12;
        if (2 * nthreads > nblk) nmc = (2 * nthreads + nblk - 1) / nblk;
        // and an even share per thread: items a multiple of the threads unless there are many
        // (9 blocks on 2 threads were 5 + 4 items; cut in 2 row chunks, 9 + 9)
        while (nmc < most && (nblk * nmc) % nthreads && nblk * nmc < 8 * nthreads) ++nmc;
        if (nmc > most) nmc = most;
    }
    const int rc = nmc > 1 ? ((M + nmc - 1) / nmc + 11) / 12 * 12 : M;
    *rc_out = rc;
    *nmc_out = (M + rc - 1) / rc;
}

// XS [M, G]: per row, the sum of x over each group run, left to right (the order the kernel has
// always used, so outputs are unchanged). One chain of dependent adds waits on each add's latency:
// four groups' chains run interleaved, and at prefill sizes the rows are split over the threads
// (serial, this pass was ~10 % of a 512-row call on 2 threads).
static void group_sums(const float* X, int M, int K, int G, const int32_t* seg, float* XS, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1 && M >= 32)
    for (int m = 0; m < M; ++m) {
        const float* x = X + (size_t)m * K;
        float* xs = XS + (size_t)m * G;
        int g = 0;
        for (; g + 4 <= G; g += 4) {
            const int L = seg[g + 1] - seg[g];
            if (seg[g + 2] - seg[g + 1] != L || seg[g + 3] - seg[g + 2] != L || seg[g + 4] - seg[g + 3] != L) break;
            const float *x0 = x + seg[g], *x1 = x0 + L, *x2 = x1 + L, *x3 = x2 + L;
            float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
            for (int i = 0; i < L; ++i) {
                a0 += x0[i];
                a1 += x1[i];
                a2 += x2[i];
                a3 += x3[i];
            }
            xs[g] = a0;
            xs[g + 1] = a1;
            xs[g + 2] = a2;
            xs[g + 3] = a3;
        }
        for (; g < G; ++g) {
            float a = 0.f;
            for (int k = seg[g]; k < seg[g + 1]; ++k) a += x[k];
            xs[g] = a;
        }
    }
}

template <int BITS>
static void gemv_impl(const uint8_t* W, const float* S, const float* SZ, const int32_t* seg,
                      int K, int G, int nblk, const float* X, int M, float* Y, int N, int nthreads) {
    // per-row, per-group sums of x (the zero-point term); on the stack for small M * G
    float xs_stack[512];
    float* XS = (size_t)M * G <= 512 ? xs_stack : (float*)malloc(sizeof(float) * (size_t)M * G + 64);
    group_sums(X, M, K, G, seg, XS, nthreads);
    constexpr int B = 8 * BITS;
    // work items (block, chunk of rows): row_chunks
    int rc, nmc;
    row_chunks(M, nblk, nthreads, &rc, &nmc);
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

// ---------------------------------------------------------------------------------------------
// 4-bit GEMM with int8 activations (prefill sizes, AVX2 and up): the llama.cpp "Q4 x Q8" idea on
// gptqkit's layout. At M >= 64 the fp32 FMA kernel runs at the core's FMA rate, as fp32 BLAS
// does, so a 4-bit layer cannot prefill faster than the dense one in fp32 arithmetic. Integer
// dot products do 32 multiply-adds per 2 instructions (VPMADDUBSW u8 x s8 -> int16 pair sums,
// VPADDW; 4-bit codes leave room to sum 8 quads in int16 before one VPMADDWD + VPADDD widens
// them) against 8 per FMA.
//
// Numerics: each row of x is rounded to int8 per block b of rows (xb = 32 from cpu.py) inside a
// scale run r (a group run cut every 128 rows): x ~ a_r 2^-e_b xq, a_r = max_r|x|/127, e_b the
// largest e <= 7 with max_b|x| 2^e <= max_r|x| (a power-of-two refinement of the run's scale, within
// a factor 2 of the block's own max/127; see i8_quant_x), round half to even. Then
//   y[n] = sum_g ( S[g,n] sum_{r in g} a_r 2^-7 sum_{b in r} 2^(7-e_b) sum_{k in b} xq[k] q[k,n]
//                  - SZ[g,n] sum_{k in g} x̂[k] )
// i.e. W_deq · x̂ with x̂ = a_r 2^-e_b xq: the integer sums are exact, the only new error is x's
// rounding to 8 bits. That changes the model's numbers (SmolLM2 4-bit: perplexity +0.3-0.4 %,
// BENCHMARKS.md), so cpu.py runs it only when asked (int8_activations / GPTQKIT_CPU_I8_MIN_M). Only 4-bit codes
// (and 3-bit ones held as 4-bit) with every group run whole quads of rows (standard group sizes).
// The codes are read from the FMA layout above; each work item first rewrites its 64-column
// block into "quads" in a scratch buffer: Q [K/4][8][32], vector v of quad r holding columns
// 8v..8v+7, byte 4c+i = code(row 4r+i, column 8v+c) — the operand order of VPMADDUBSW/VPDPBUSD.
// That costs ~0.2 instructions per code, once per block and item, against M multiply-adds.
#if defined(__AVX2__)
#define GK_HAS_I8 1

// a 64-column block of the 4-bit FMA layout ([K][32 bytes]: byte 16h+lane holds column
// 32h+lane in its low nibble and 32h+16+lane in its high one) -> quads (above)
static void i8_relayout(const uint8_t* __restrict Wb, int K, uint8_t* __restrict Q) {
    const __m256i m15 = _mm256_set1_epi8(15);
    for (int r = 0; r < K / 4; ++r) {
        const uint8_t* p = Wb + (size_t)r * 128;
        uint8_t* o = Q + (size_t)r * 256;
        __m256i lo[4], hi[4];
        for (int i = 0; i < 4; ++i) {
            const __m256i a = _mm256_loadu_si256((const __m256i*)(p + 32 * i));
            lo[i] = _mm256_and_si256(a, m15);                         // vectors 0, 1 | 4, 5
            hi[i] = _mm256_and_si256(_mm256_srli_epi16(a, 4), m15);   // vectors 2, 3 | 6, 7
        }
        // t: the 4 rows; bytes 0-7 of each 128-bit lane are vector va (lane 0) / vc (lane 1),
        // bytes 8-15 vb / vd
        auto emit = [&](const __m256i* t, int va, int vb, int vc, int vd) {
            const __m256i l01 = _mm256_unpacklo_epi8(t[0], t[1]), l23 = _mm256_unpacklo_epi8(t[2], t[3]);
            const __m256i h01 = _mm256_unpackhi_epi8(t[0], t[1]), h23 = _mm256_unpackhi_epi8(t[2], t[3]);
            const __m256i a0 = _mm256_unpacklo_epi16(l01, l23), a1 = _mm256_unpackhi_epi16(l01, l23);
            const __m256i b0 = _mm256_unpacklo_epi16(h01, h23), b1 = _mm256_unpackhi_epi16(h01, h23);
            _mm256_storeu_si256((__m256i*)(o + 32 * va), _mm256_permute2x128_si256(a0, a1, 0x20));
            _mm256_storeu_si256((__m256i*)(o + 32 * vc), _mm256_permute2x128_si256(a0, a1, 0x31));
            _mm256_storeu_si256((__m256i*)(o + 32 * vb), _mm256_permute2x128_si256(b0, b1, 0x20));
            _mm256_storeu_si256((__m256i*)(o + 32 * vd), _mm256_permute2x128_si256(b0, b1, 0x31));
        };
        emit(lo, 0, 1, 4, 5);
        emit(hi, 2, 3, 6, 7);
    }
}

// Scales of x: each group run is cut into scale runs of <= 128 rows, each scale run into blocks
// of xb rows. A scale run r has a = max|x|/127 over it; a block b inside it is rounded at the
// finer scale a·2^-e, e <= I8_E the largest with max_b·2^e <= max_r (so |xq| <= 127 still): a
// block-wise scale within a factor 2 of max_b/127 (llama.cpp-style blocks of 32), whose products
// are summed in integers: the int16 pair sums are widened by VPMADDWD with 2^(E-e) instead of 1,
// so the fp32 epilogue (convert, scale, accumulate) runs once per scale run, not per block.
// Bounds: int16 pair sums <= 2·2·15·127 = 7620; per int32 lane <= 128·15·127·2^7 < 2^25.
#define I8_E 7
#define I8_RUN 128
// x [M, K] fp32 -> XQ [M, K] int8; per row: P [NB] = 2^(E-e_b) in both int16 halves, AR [NR] =
// (max_r/127)·2^-E, and per group AXS [G] = the zero-point term's sum of x̂ over the group
static void i8_quant_x(const float* X, int M, int K, int G, int NR, int NB, const int32_t* gr,
                       const int32_t* rb, const int32_t* sub, int8_t* XQ, int32_t* P, float* AR,
                       float* AXS, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (nthreads > 1)
    for (int m = 0; m < M; ++m) {
        const float* x = X + (size_t)m * K;
        int8_t* xq = XQ + (size_t)m * K;
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        auto amax_of = [&](int k0, int k1) {
            __m256 mx = _mm256_setzero_ps();
            int k = k0;
            for (; k + 8 <= k1; k += 8) mx = _mm256_max_ps(mx, _mm256_and_ps(_mm256_loadu_ps(x + k), absmask));
            float t[8], am = 0.f;
            _mm256_storeu_ps(t, mx);
            for (int i = 0; i < 8; ++i) am = t[i] > am ? t[i] : am;
            for (; k < k1; ++k) am = std::fabs(x[k]) > am ? std::fabs(x[k]) : am;
            return am;
        };
        for (int g = 0; g < G; ++g) {
            float xs = 0.f;
            for (int r = gr[g]; r < gr[g + 1]; ++r) {
                const float amr = amax_of(sub[rb[r]], sub[rb[r + 1]]);
                const float iar = amr > 0.f ? 127.f / amr : 0.f;
                AR[(size_t)m * NR + r] = amr / 127.f * (1.f / (1 << I8_E));
                int32_t sp = 0;  // sum over the run's blocks of 2^(E-e)·sum(xq)
                for (int bi = rb[r]; bi < rb[r + 1]; ++bi) {
                    const int k0 = sub[bi], k1 = sub[bi + 1];
                    const float amb = amax_of(k0, k1);
                    int e = 0;
                    while (e < I8_E && amb * (float)(2 << e) <= amr) ++e;  // exact: powers of two
                    const float ia = iar * (float)(1 << e);
                    const __m256 iav = _mm256_set1_ps(ia);
                    __m256i sv = _mm256_setzero_si256();
                    int k = k0;
                    for (; k + 8 <= k1; k += 8) {
                        // round half to even (MXCSR's default mode); |x·ia| <= 127 up to ia's rounding
                        __m256i q = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + k), iav));
                        q = _mm256_min_epi32(_mm256_max_epi32(q, _mm256_set1_epi32(-127)), _mm256_set1_epi32(127));
                        sv = _mm256_add_epi32(sv, q);
                        const __m256i p16 = _mm256_packs_epi32(q, q), p8 = _mm256_packs_epi16(p16, p16);
                        const int32_t lo4 = _mm256_extract_epi32(p8, 0), hi4 = _mm256_extract_epi32(p8, 4);
                        memcpy(xq + k, &lo4, 4);
                        memcpy(xq + k + 4, &hi4, 4);
                    }
                    int32_t sq = 0;
                    {
                        int32_t t[8];
                        _mm256_storeu_si256((__m256i*)t, sv);
                        for (int i = 0; i < 8; ++i) sq += t[i];
                    }
                    for (; k < k1; ++k) {
                        int q = (int)std::nearbyint(x[k] * ia);
                        q = q < -127 ? -127 : (q > 127 ? 127 : q);
                        xq[k] = (int8_t)q;
                        sq += q;
                    }
                    const int32_t pw = 1 << (I8_E - e);
                    P[(size_t)m * NB + bi] = pw | (pw << 16);
                    sp += pw * sq;
                }
                xs += AR[(size_t)m * NR + r] * (float)sp;
            }
            AXS[(size_t)m * G + g] = xs;
        }
    }
}

// MR rows of xq against the NV 8-column vectors v0.. of one block's quads
template <int MR, int NV>
static void i8_rows(const uint8_t* __restrict Q, const float* __restrict Sb, const float* __restrict SZb,
                    int G, int NR, int NB, const int32_t* __restrict gr, const int32_t* __restrict rb,
                    const int32_t* __restrict sub, const int8_t* __restrict XQ, int ldx,
                    const int32_t* __restrict P, const float* __restrict AR, const float* __restrict AXS,
                    float* __restrict Y, int ldy, int v0, int ncols) {
    __m256 f[MR][NV];
    for (int r = 0; r < MR; ++r)
        for (int v = 0; v < NV; ++v) f[r][v] = _mm256_setzero_ps();
    for (int g = 0; g < G; ++g) {
        if (gr[g] == gr[g + 1]) continue;
        __m256 sv[NV];
        for (int v = 0; v < NV; ++v) sv[v] = _mm256_loadu_ps(Sb + (size_t)g * 64 + 8 * (v0 + v));
        for (int ri = gr[g]; ri < gr[g + 1]; ++ri) {
            __m256i acc[MR][NV];
            for (int r = 0; r < MR; ++r)
                for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_si256();
            // the blocks of a run are one stream of quads. Within a block the VPMADDUBSW pair sums
            // (int16) of up to 8 quads are added in int16 (|sum| <= 8·2·15·127 = 30480 < 2^15:
            // exact), then one VPMADDWD by the block's 2^(E-e) widens them into the run's int32
            // sums: 2 instructions per 32 multiply-adds, one of them on the multiply ports,
            // against 5 per 64 (3 on the multiply ports) when every second quad was widened. Only
            // the multiplier changes between blocks, and no index is recomputed.
            const int8_t* xr = XQ + sub[rb[ri]];
            const uint8_t* q = Q + (size_t)(sub[rb[ri]] >> 2) * 256 + 32 * v0;
            for (int bi = rb[ri]; bi < rb[ri + 1]; ++bi) {
                const int nq = (sub[bi + 1] - sub[bi]) >> 2;
                for (int q0 = 0; q0 < nq; q0 += 8) {
                    const int n = (nq - q0) < 8 ? (nq - q0) : 8;
                    __m256i s[MR][NV];
                    for (int r = 0; r < MR; ++r)
                        for (int v = 0; v < NV; ++v) s[r][v] = _mm256_setzero_si256();
                    for (int i = 0; i < n; ++i, q += 256, xr += 4) {
                        __m256i w[NV];
                        for (int v = 0; v < NV; ++v) w[v] = _mm256_loadu_si256((const __m256i*)(q + 32 * v));
                        for (int r = 0; r < MR; ++r) {
                            int32_t x4;
                            memcpy(&x4, xr + (size_t)r * ldx, 4);
                            const __m256i xb = _mm256_set1_epi32(x4);
                            for (int v = 0; v < NV; ++v)
                                s[r][v] = _mm256_add_epi16(s[r][v], _mm256_maddubs_epi16(w[v], xb));
                        }
                    }
                    for (int r = 0; r < MR; ++r) {
                        const __m256i pw = _mm256_set1_epi32(P[(size_t)r * NB + bi]);
                        for (int v = 0; v < NV; ++v)
                            acc[r][v] = _mm256_add_epi32(acc[r][v], _mm256_madd_epi16(s[r][v], pw));
                    }
                }
            }
            for (int v = 0; v < NV; ++v)
                for (int r = 0; r < MR; ++r)
                    f[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][v]),
                                              _mm256_mul_ps(sv[v], _mm256_set1_ps(AR[(size_t)r * NR + ri])), f[r][v]);
        }
        for (int v = 0; v < NV; ++v) {
            const __m256 szv = _mm256_loadu_ps(SZb + (size_t)g * 64 + 8 * (v0 + v));
            for (int r = 0; r < MR; ++r)
                f[r][v] = _mm256_fnmadd_ps(szv, _mm256_set1_ps(AXS[(size_t)r * G + g]), f[r][v]);
        }
    }
    for (int v = 0; v < NV; ++v) {
        const int nc = ncols - 8 * (v0 + v);
        if (nc <= 0) continue;
        for (int r = 0; r < MR; ++r) store8(Y + (size_t)r * ldy + 8 * (v0 + v), f[r][v], nc);
    }
}

// Tiles of MR rows x NV 8-column vectors: 3 x 2 for AVX2 (6 int16 sums, a quad's 2 weight
// vectors, a broadcast and a product in 16 ymm registers; the int32 sums live on the stack, touched
// once per 8 quads), 4 x 2 with AVX-512's 32 registers. Measured on Zen 4, 1 and 2 threads
// (BENCHMARKS.md): AVX2 3 x 2 beat 4 x 2, 6 x 2, 2 x 4 and 3 x 4 by 5-30 %; AVX-512 4 x 2 beat 6 x 2,
// 3 x 2 and 8 x 2 by up to 15 %. The same instructions on both builds, so the same numbers.
// (A VPDPBUSD loop for AVX512-VNNI CPUs was tried and dropped: GCC copied its tied accumulators
// around every instruction and it ran no faster than this one at 6 x 2 on Zen 4; BENCHMARKS.md.)
#ifndef GK_I8_MR
#if defined(__AVX512F__)
#define GK_I8_MR 4
#else
#define GK_I8_MR 3
#endif
#endif
#ifndef GK_I8_NV
#define GK_I8_NV 2
#endif
// xb: rows of x per block (a multiple of 4; blocks never straddle a scale run), 0 for one block
// per scale run
static int gemm_i8_impl(const uint8_t* W, const float* S, const float* SZ, const int32_t* seg,
                        int K, int G, int nblk, const float* X, int M, float* Y, int N, int xb,
                        int nthreads) {
    if (K % 4 || xb < 0 || xb % 4) return -1;
    for (int g = 0; g <= G; ++g)
        if (seg[g] % 4) return -1;
    // scale runs (group runs cut every I8_RUN rows) and blocks (scale runs cut every xb rows)
    int NR = 0, NB = 0;
    for (int g = 0; g < G; ++g)
        for (int k = seg[g]; k < seg[g + 1]; k += I8_RUN) {
            const int len = (seg[g + 1] - k) < I8_RUN ? (seg[g + 1] - k) : I8_RUN;
            ++NR;
            NB += xb ? (len + xb - 1) / xb : 1;
        }
    int32_t* idx = (int32_t*)malloc(sizeof(int32_t) * ((size_t)NB + NR + G + 3));
    int8_t* XQ = (int8_t*)malloc((size_t)M * K + 64);
    float* AR = (float*)malloc(sizeof(float) * ((size_t)M * (NR + G) + 16));
    int32_t* P = (int32_t*)malloc(sizeof(int32_t) * ((size_t)M * NB + 16));
    if (!idx || !XQ || !AR || !P) { free(idx); free(XQ); free(AR); free(P); return -3; }
    int32_t *sub = idx, *rb = idx + NB + 1, *gr = idx + NB + NR + 2;
    float* AXS = AR + (size_t)M * NR;
    {
        int bi = 0, ri = 0;
        for (int g = 0; g < G; ++g) {
            gr[g] = ri;
            for (int k = seg[g]; k < seg[g + 1]; k += I8_RUN) {
                const int e = (seg[g + 1] - k) < I8_RUN ? seg[g + 1] : k + I8_RUN;
                rb[ri++] = bi;
                for (int kb = k; kb < e; kb += xb ? xb : (e - k)) sub[bi++] = kb;
            }
        }
        gr[G] = ri;
        rb[ri] = bi;
        sub[bi] = K;
    }
    i8_quant_x(X, M, K, G, NR, NB, gr, rb, sub, XQ, P, AR, AXS, nthreads);
    // work items (block, chunk of rows): row_chunks
    int rc, nmc;
    row_chunks(M, nblk, nthreads, &rc, &nmc);
    const int nitems = nblk * nmc;
    int err = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        uint8_t* Q = (uint8_t*)malloc((size_t)K * 64 + 64);
        if (!Q) {
#pragma omp atomic write
            err = -3;
        }
#pragma omp for schedule(dynamic, 1)
        for (int it = 0; it < nitems; ++it) {
            if (!Q) continue;
            const int j = it / nmc, m0 = (it % nmc) * rc, Mc = (M - m0) < rc ? (M - m0) : rc;
            i8_relayout(W + (size_t)j * K * 32, K, Q);
            const float* Sb = S + (size_t)j * G * 64;
            const float* SZb = SZ + (size_t)j * G * 64;
            const int ncols = (N - 64 * j) < 64 ? (N - 64 * j) : 64;
            float* Yb = Y + 64 * (size_t)j + (size_t)m0 * N;
            for (int v0 = 0; v0 < 8 && 8 * v0 < ncols; v0 += GK_I8_NV) {
                int m = 0;
#define GK_I8_ROWS(R) i8_rows<R, GK_I8_NV>(Q, Sb, SZb, G, NR, NB, gr, rb, sub, XQ + (size_t)(m0 + m) * K, K, \
                                           P + (size_t)(m0 + m) * NB, AR + (size_t)(m0 + m) * NR, \
                                           AXS + (size_t)(m0 + m) * G, Yb + (size_t)m * N, N, v0, ncols)
                for (; m + GK_I8_MR <= Mc; m += GK_I8_MR) GK_I8_ROWS(GK_I8_MR);
                switch (Mc - m) {
#if GK_I8_MR > 5
                    case 5: GK_I8_ROWS(5); break;
#endif
#if GK_I8_MR > 4
                    case 4: GK_I8_ROWS(4); break;
#endif
                    case 3: GK_I8_ROWS(3); break;
                    case 2: GK_I8_ROWS(2); break;
                    case 1: GK_I8_ROWS(1); break;
                    default: break;
                }
#undef GK_I8_ROWS
            }
        }
        free(Q);
    }
    free(idx);
    free(XQ);
    free(AR);
    free(P);
    return err;
}
#else
#define GK_HAS_I8 0
#endif

extern "C" {
int gk_abi_version(void) { return 9; }  // 4: gk_clip_search, 5: gk_sgemv_rows (end of file), 6: gk_gptq_columns, 7: gk_gemm_i8, 8: gk_q8_gemv_rows, 9: gk_bf16_gemv_rows
int gk_has_i8(void) { return GK_HAS_I8; }
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

// 4-bit GEMM with int8 activations (see above): -1 if a group run is not whole quads of rows,
// -2 where the build has no AVX2, -3 if out of memory
int gk_gemm_i8(const uint8_t* W, const float* S, const float* SZ, const int32_t* seg, int K, int G,
               int nblk, const float* X, int M, float* Y, int N, int xb, int nthreads) {
#if GK_HAS_I8
    return gemm_i8_impl(W, S, SZ, seg, K, G, nblk, X, M, Y, N, xb, nthreads);
#else
    (void)W; (void)S; (void)SZ; (void)seg; (void)K; (void)G; (void)nblk; (void)X; (void)M; (void)Y;
    (void)N; (void)xb; (void)nthreads;
    return -2;
#endif
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

// =============================================================================================
// The clip search of quant/grid.py::find_params (mse=True) for fp32 groups, one call per group
// (called from gptqkit/kernels/cpu.py::clip_search). For each row it tries the ranges
// p·[xmin, xmax], p = ps[i] (i < ncand), and keeps the one with least sum_k wt_k·(w - ŵ)²
// (wt given) or sum_k |w - ŵ|^norm (wt null); ties keep the earlier candidate.
//
// Exactness: every candidate repeats torch's fp32 arithmetic operation for operation (p·x in
// fp32, true IEEE division, scale clamped to 2^-14 and rounded to fp16 and back, round half to
// even, clamp), so each candidate's grid and each element's error term are bit-equal to the
// torch loop's. What differs: (1) the row sum is accumulated in double (sequentially over the
// columns) and rounded to fp32, where torch sums in fp32 in its own order; (2) |e|^norm for
// norm != 2 is computed here in double (exp/log polynomials, ~1e-13 relative, so the fp32
// result is nearly always the correctly rounded one), where torch uses SLEEF's powf (<= 1 ulp).
// Either can change the winner only between candidates whose errors are that close.
//
// Layout: 16 rows at a time, one per vector lane (the group is transposed into a [cols][16]
// buffer), so each candidate's scale and zero are computed for 16 rows at once and the per-row
// sums need no horizontal reduction. GCC vector extensions: AVX-512 / AVX2 / portable code from
// one source, with the rounding instruction where the build has one.
//
// No multiply-add may be fused on this path: g++ contracts a·b + c by default in C++
// (-ffp-contract=fast), and p·xmax − p·xmin (the range) must round twice, as in torch; hence
// the pragmas around this block (clang: the STDC one). (s·(q − z) − w could not change by it:
// an fp16 scale (11 significant bits) times a whole number below 2^8 is exact in fp32.)
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
#endif

typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));
typedef int64_t v8l __attribute__((vector_size(64)));

static inline v16f gk_splat(float a) { return (v16f){} + a; }
static inline v8d gk_splatd(double a) { return (v8d){} + a; }

// round half to even (torch.round) of every lane
static inline v16f gk_rne(v16f x) {
#if defined(__AVX512F__)
    __m512 t;
    memcpy(&t, &x, 64);
    t = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    memcpy(&x, &t, 64);
    return x;
#elif defined(__AVX2__)
    __m256 t[2];
    memcpy(t, &x, 64);
    t[0] = _mm256_round_ps(t[0], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    t[1] = _mm256_round_ps(t[1], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    memcpy(&x, t, 64);
    return x;
#else
    // |x| < 2^23: (|x| + 2^23) - 2^23 rounds to a whole number (default rounding mode); larger
    // floats already are whole
    const v16f big = gk_splat(8388608.0f);
    const v16i xi = (v16i)x;
    const v16f a = (v16f)(xi & 0x7fffffff);
    const v16f r = (v16f)((v16i)((a + big) - big) | (xi & (int32_t)0x80000000));
    return a < big ? r : x;
#endif
}

// x -> float16 (round to nearest even) -> float, for x >= 2^-14 (fp16's normal range and above,
// which the scale clamp guarantees) or +inf: torch's .half().float(); overflow gives +inf
static inline v16f gk_via_half(v16f x) {
    const v16i b = (v16i)x;
    const v16f r = (v16f)((b + (0xfff + ((b >> 13) & 1))) & ~0x1fff);
    return r > gk_splat(65504.0f) ? gk_splat(__builtin_inff()) : r;
}

// find_params' params(lo, hi) for 16 rows
static inline void gk_grid_params(v16f lo, v16f hi, float maxq, int sym, float zero_min, v16f* s_out,
                                  v16f* z_out) {
    const v16f zero = gk_splat(0.0f);
    if (sym) {
        const v16f a = (v16f)((v16i)lo & 0x7fffffff);
        hi = a > hi ? a : hi;
        lo = -hi;
    }
    const v16i dead = (lo == zero) & (hi == zero);
    lo = dead ? gk_splat(-1.0f) : lo;
    hi = dead ? gk_splat(1.0f) : hi;
    v16f s = (hi - lo) / maxq;
    const v16f smin = gk_splat(6.103515625e-05f);  // 2^-14
    s = gk_via_half(s < smin ? smin : s);
    v16f z;
    if (sym) {
        z = gk_splat((maxq + 1.0f) / 2.0f);
    } else {
        z = gk_rne(-lo / s);
        z = z < zero_min ? gk_splat(zero_min) : z;
        z = z > maxq ? gk_splat(maxq) : z;
    }
    *s_out = s;
    *z_out = z;
}

// a·b + c, fused where the build has FMA, whatever the compiler's contraction setting (only
// |e|^norm below uses it: that value is not torch's bit for bit anyway)
static inline v8d gk_fmad(v8d a, v8d b, v8d c) {
#if defined(__AVX512F__)
    __m512d x, y, z;
    memcpy(&x, &a, 64); memcpy(&y, &b, 64); memcpy(&z, &c, 64);
    x = _mm512_fmadd_pd(x, y, z);
    memcpy(&a, &x, 64);
    return a;
#elif defined(__AVX2__) && defined(__FMA__)
    __m256d x[2], y[2], z[2];
    memcpy(x, &a, 64); memcpy(y, &b, 64); memcpy(z, &c, 64);
    x[0] = _mm256_fmadd_pd(x[0], y[0], z[0]);
    x[1] = _mm256_fmadd_pd(x[1], y[1], z[1]);
    memcpy(&a, x, 64);
    return a;
#else
    return a * b + c;
#endif
}

// a^y for a >= 0 (fp32 lanes, y > 0) in double: exp(y·ln a) with ln and exp as polynomials
// accurate to ~1e-13 relative, so the fp32 result is the correctly rounded one but for ~1e-5
// of values; 0 -> 0, +inf -> +inf, NaN -> NaN (an overflowed scale makes e = inf·0), and fp32
// overflow -> +inf on the caller's conversion
static inline v8d gk_powd(v8d a, double y) {
    const v8d one = gk_splatd(1.0);
    v8l bits = (v8l)a;
    v8l k = ((bits >> 52) & 0x7ff) - 1023;
    v8d m = (v8d)((bits & 0x000fffffffffffffLL) | 0x3ff0000000000000LL);  // [1, 2)
    const v8l big = m > gk_splatd(1.4142135623730951);
    m = big ? m * 0.5 : m;                                                  // [0.707, 1.414]
    k = k - big;  // big is -1 where true
    // ln m = 2·atanh(s) = 2s·(1 + s²/3 + s⁴/5 + ...), s = (m − 1)/(m + 1), |s| <= 0.1716
    // (1/(m + 1) from an fp32 division, 6e-8, and two Newton steps: ~1e-16, cheaper than a
    // double division)
    const v8d d = m + one;
    v8d rd = __builtin_convertvector(1.0f / __builtin_convertvector(d, v8f), v8d);
    rd = gk_fmad(rd, gk_fmad(-d, rd, one), rd);
    rd = gk_fmad(rd, gk_fmad(-d, rd, one), rd);
    const v8d s = (m - one) * rd, s2 = s * s;
    v8d p = gk_splatd(1.0 / 17);
    for (const double c : {1.0 / 15, 1.0 / 13, 1.0 / 11, 1.0 / 9, 1.0 / 7, 1.0 / 5, 1.0 / 3, 1.0})
        p = gk_fmad(p, s2, gk_splatd(c));
    const v8d t = gk_fmad(__builtin_convertvector(k, v8d), gk_splatd(0.6931471805599453), 2.0 * s * p) * y;
    // exp(t) = 2^n · exp(r), n = round(t / ln 2), r = t − n·ln2 in [−0.35, 0.35] (ln 2 in two
    // parts, so r is exact enough); exp(r) to r^11 / 11!
    v8d n = t * 1.4426950408889634;
    n = __builtin_convertvector(__builtin_convertvector(
            n + (v8d)(((v8l)n & (int64_t)0x8000000000000000LL) | 0x3fe0000000000000LL), v8l), v8d);
    const v8d r = gk_fmad(n, gk_splatd(-1.9082149292705877e-10), gk_fmad(n, gk_splatd(-0.6931471803691238), t));
    v8d e = gk_splatd(1.0 / 39916800);
    for (const double c : {1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720, 1.0 / 120,
                           1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0})
        e = gk_fmad(e, r, gk_splatd(c));
    const v8d res = e * (v8d)((__builtin_convertvector(n, v8l) + 1023) << 52);
    const v8d inf = gk_splatd(__builtin_inf());
    return a == 0.0 ? gk_splatd(0.0) : (a == inf ? inf : (a != a ? a : res));  // NaN stays NaN
}

// halves of a vector and back (shuffles stay in registers; memcpy went through the stack)
#if defined(__has_builtin) && __has_builtin(__builtin_shufflevector)
static inline v8f gk_lo(v16f x) { return __builtin_shufflevector(x, x, 0, 1, 2, 3, 4, 5, 6, 7); }
static inline v8f gk_hi(v16f x) { return __builtin_shufflevector(x, x, 8, 9, 10, 11, 12, 13, 14, 15); }
static inline v16f gk_cat(v8f a, v8f b) {
    return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}
#else
static inline v8f gk_lo(v16f x) { v8f r; memcpy(&r, &x, 32); return r; }
static inline v8f gk_hi(v16f x) { v8f r; memcpy(&r, (const char*)&x + 32, 32); return r; }
static inline v16f gk_cat(v8f a, v8f b) { v16f r; memcpy(&r, &a, 32); memcpy((char*)&r + 32, &b, 32); return r; }
#endif

// fp32 -> double, 8 lanes (GCC's generic conversion goes 4 lanes at a time)
static inline v8d gk_widen(v8f x) {
#if defined(__AVX512F__)
    __m256 a;
    memcpy(&a, &x, 32);
    const __m512d r = _mm512_cvtps_pd(a);
    v8d d;
    memcpy(&d, &r, 64);
    return d;
#else
    return __builtin_convertvector(x, v8d);
#endif
}

// 16 rows (lanes of T [cols][16]); MODE 0: weighted, 1: |e|^2 (norm == 2), 2: |e|^norm
template <int MODE>
static void gk_clip_lanes(const float* __restrict T, int cols, const float* __restrict wt, float maxq, int sym,
                          float zero_min, double norm, const float* ps, int ncand, float* S, float* Z,
                          float* E, int nvalid) {
    v16f mn = gk_splat(0.0f), mx = gk_splat(0.0f);  // min/max of the row and 0
    for (int j = 0; j < cols; ++j) {
        const v16f x = loadf(T + 16 * j);
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
    }
    v16f scale, zero;
    gk_grid_params(mn, mx, maxq, sym, zero_min, &scale, &zero);
    v16f best = gk_splat(__builtin_inff());
    const v16f vzero = gk_splat(0.0f), vmaxq = gk_splat(maxq);
    for (int i = 0; i < ncand; ++i) {
        v16f s, z;
        gk_grid_params(ps[i] * mn, ps[i] * mx, maxq, sym, zero_min, &s, &z);
        v8d acc0 = gk_splatd(0.0), acc1 = gk_splatd(0.0);
        for (int j = 0; j < cols; ++j) {
            const v16f x = loadf(T + 16 * j);
            v16f q = gk_rne(x / s) + z;
            q = q < vzero ? vzero : q;
            q = q > vmaxq ? vmaxq : q;
            const v16f e = s * (q - z) - x;
            v16f t;
            if constexpr (MODE == 0) {
                t = (e * e) * wt[j];
            } else if constexpr (MODE == 1) {
                t = e * e;
            } else {
                const v16f a = (v16f)((v16i)e & 0x7fffffff);
                t = gk_cat(__builtin_convertvector(gk_powd(gk_widen(gk_lo(a)), norm), v8f),
                           __builtin_convertvector(gk_powd(gk_widen(gk_hi(a)), norm), v8f));
            }
            acc0 += gk_widen(gk_lo(t));
            acc1 += gk_widen(gk_hi(t));
        }
        const v16f err = gk_cat(__builtin_convertvector(acc0, v8f), __builtin_convertvector(acc1, v8f));
        if (E)
            for (int l = 0; l < nvalid; ++l) E[(size_t)l * ncand + i] = err[l];
        const v16i better = err < best;
        best = better ? err : best;
        scale = better ? s : scale;
        zero = better ? z : zero;
    }
    for (int l = 0; l < nvalid; ++l) {
        S[l] = scale[l];
        Z[l] = zero[l];
    }
}

extern "C" {
// The clip search for W [rows, cols] fp32 with row stride ldw; wt [cols] or null (then
// |e|^norm, norm > 0); ps [ncand] the shrink factors p in fp32. Writes S, Z [rows] and, if E is
// not null, every candidate's error E [rows, ncand]. Returns 0; -1 for bad arguments; 1 if W or
// wt holds a non-finite value (the caller then runs its reference loop: torch's NaN/inf
// semantics are not reproduced here).
int gk_clip_search(const float* W, int rows, int cols, long ldw, const float* wt, int bits, int sym,
                   int zero_min, float norm, const float* ps, int ncand, float* S, float* Z, float* E,
                   int nthreads) {
    if (rows < 0 || cols < 1 || (rows > 1 && ldw < cols) || ncand < 0 || bits < 1 || bits > 8 ||
        (!wt && !(norm > 0.0f)))
        return -1;
    if (wt)
        for (int j = 0; j < cols; ++j)
            if (!__builtin_isfinite(wt[j])) return 1;
    int bad = 0;
    const float maxq = (float)((1 << bits) - 1), zmin = (float)zero_min;
    const int mode = wt ? 0 : (norm == 2.0f ? 1 : 2);
    const int nchunk = (rows + 15) / 16;
    // 16 rows per task; every row costs the same, so a static split
#pragma omp parallel num_threads(nthreads) reduction(|: bad) if (nthreads > 1)
    {
        float* T = (float*)malloc(sizeof(float) * 16 * (size_t)cols);
#pragma omp for schedule(static)
        for (int c = 0; c < nchunk; ++c) {
            if (!T) { bad |= 2; continue; }
            const int r0 = c * 16, nv = rows - r0 < 16 ? rows - r0 : 16;
            int nonfinite = 0;
            for (int l = 0; l < 16; ++l)
                for (int j = 0; j < cols; ++j) {
                    const float x = l < nv ? W[(size_t)(r0 + l) * ldw + j] : 0.0f;  // pad: zero rows
                    nonfinite |= !__builtin_isfinite(x);
                    T[16 * j + l] = x;
                }
            if (nonfinite) { bad |= 1; continue; }
            float* e = E ? E + (size_t)r0 * ncand : nullptr;
            if (mode == 0)
                gk_clip_lanes<0>(T, cols, wt, maxq, sym, zmin, norm, ps, ncand, S + r0, Z + r0, e, nv);
            else if (mode == 1)
                gk_clip_lanes<1>(T, cols, wt, maxq, sym, zmin, norm, ps, ncand, S + r0, Z + r0, e, nv);
            else
                gk_clip_lanes<2>(T, cols, wt, maxq, sym, zmin, norm, ps, ncand, S + r0, Z + r0, e, nv);
        }
        free(T);
    }
    return bad & 2 ? -2 : (bad ? 1 : 0);
}
}

// One block of GPTQ's column loop (quant/gptq.py::gptq_solve), columns i0..i1-1 of a block of B
// columns. Each row of W is quantized on its own: column i's rounding error only ever updates
// the same row's later columns, so the loop runs row by row (a row of the block stays in L1)
// instead of torch's column by column (one Python-dispatched op per column, every row each).
//
// The arithmetic is torch's, operation for operation, so the codes and the errors are the
// same bits: q = clamp(round(x / s) + z, 0, maxq), err = (x − s·(q − z)) / Hinv[i, i], and the
// rank-1 updates of torch's addr_ (w + α·a·b), which ATen's vectorized loop fuses into one FMA
// for the first floor(L / fw)·fw elements of a row of length L and rounds twice in its scalar
// tail: fwh / fwp (the updates through Hinv1 / P1) are that prefix's granularity, which the
// caller measures on torch's own addr_ (kernels/cpu.py::addr_fused_width: 16 with torch 2.13's
// AVX-512 and AVX2 kernels where it reads the matrix's rows contiguously, 0 on its DEFAULT build
// and where it reads them strided, e.g. the Cholesky factor's column-major rows). Hence this sits
// in the no-contraction region.
//
// W1 [N, ldw]: the block's current weights (updated in place); Hinv1 [B, ldh]: the block of the
// inverse Hessian's Cholesky factor; S, Z [groups, ldg]: grids, column i uses group gcol[i − i0];
// Q, E [N, ldq / lde]: codes and scaled errors of the block's columns (column i at offset i).
// [GPTAQ] P1 (null: plain GPTQ) [B, ldp] and Wpre [N, ldpre]: before the error update, each
// column's value x is kept in Wpre and w[j] += x·P1[i, j] for j > i.
extern "C" int gk_gptq_columns(float* W1, long ldw, int N, int B, int i0, int i1, const float* Hinv1,
                               long ldh, const float* S, const float* Z, long ldg, const int32_t* gcol,
                               float maxq, float* Q, long ldq, float* E, long lde, const float* P1, long ldp,
                               float* Wpre, long ldpre, int fwh, int fwp, int nthreads) {
    if (N < 0 || B < 0 || i0 < 0 || i1 > B || i0 > i1 || ldw < B || ldh < B || fwh < 0 || fwp < 0 ||
        (P1 && !Wpre))
        return -1;
#if defined(_OPENMP)
    #pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (nthreads > 1)
#endif
    for (int n = 0; n < N; ++n) {
        float* w = W1 + (size_t)n * ldw;
        for (int i = i0; i < i1; ++i) {
            const size_t g = (size_t)gcol[i - i0] * ldg + n;
            const float s = S[g], z = Z[g], x = w[i];
            float q = std::nearbyint(x / s) + z;
            q = q < 0.0f ? 0.0f : (q > maxq ? maxq : q);
            Q[(size_t)n * ldq + i] = q;
            const float e = (x - s * (q - z)) / Hinv1[(size_t)i * ldh + i];
            E[(size_t)n * lde + i] = e;
            if (P1) {  // torch: W1[:, i + 1:].addr_(Wpre1[:, i], P1[i, i + 1:])
                Wpre[(size_t)n * ldpre + i] = x;
                const float* p = P1 + (size_t)i * ldp;
                const int vend = fwp ? i + 1 + (B - i - 1) / fwp * fwp : i + 1;
                for (int j = i + 1; j < vend; ++j) w[j] = __builtin_fmaf(x, p[j], w[j]);
                for (int j = vend; j < B; ++j) w[j] = w[j] + x * p[j];
            }
            // torch: W1[:, i:].addr_(err, Hinv1[i, i:], alpha=-1); column i itself is not read again
            const float* h = Hinv1 + (size_t)i * ldh;
            const int vend = fwh ? i + (B - i) / fwh * fwh : i;
            for (int j = i + 1; j < vend; ++j) w[j] = __builtin_fmaf(-e, h[j], w[j]);
            for (int j = vend > i + 1 ? vend : i + 1; j < B; ++j) w[j] = w[j] - e * h[j];
        }
    }
    return 0;
}

#if defined(__clang__)
#pragma STDC FP_CONTRACT ON
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

// y[n] = W[n, :] · x for a row-major fp32 W [N, K] (row stride ldw): the fp32 output head of a
// quantized model at decode (M = 1). torch's BLAS reads a 49152 x 576 head at ~15 GB/s with one
// or two threads (a GEMM with M = 1); this loop streams the rows at the memory's rate. 16
// independent partial sums per row (one AVX-512 or two AVX2 vectors, the compiler vectorizes
// the j loop), summed pairwise at the end; rows split across threads.
extern "C" int gk_sgemv_rows(const float* W, const float* x, float* y, int N, int K, long ldw, int nthreads) {
    if (N < 0 || K < 0 || ldw < K) return -1;
#if defined(_OPENMP)
    #pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
#endif
    for (int n = 0; n < N; ++n) {
        const float* w = W + (size_t)n * ldw;
        float acc[16] = {0};
        int k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < 16; ++j) acc[j] += w[k + j] * x[k + j];
        for (int j = 0; k + j < K; ++j) acc[j] += w[k + j] * x[k + j];
        for (int h = 8; h >= 1; h >>= 1)
            for (int j = 0; j < h; ++j) acc[j] += acc[j + h];
        y[n] = acc[0];
    }
    return 0;
}

// gk_sgemv_rows on a weight held exactly in a smaller form (kernels/exact_rows.py): int8 rows
// (W[n, k] = Q[n, k] · D[n, k / 32], each product exact in fp32: 8 by 24 significant bits) or bf16
// (bf16 -> fp32 is a 16-bit shift). Each decoded w is the fp32 weight itself and the sums are
// gk_sgemv_rows' own, in its order (16 lanes, its tail, the pairwise reduction): the same bits,
// from a quarter / half of the bytes. The 16 lanes are vector registers written out (GCC leaves
// the scalar form unvectorized here, and moves a 64-byte generic vector through the stack on AVX2).
#if defined(__AVX512F__)
struct f16x { __m512 v; };
static inline f16x f16_zero() { return {_mm512_setzero_ps()}; }
static inline f16x f16_fma(f16x w, const float* x, f16x a) { return {_mm512_fmadd_ps(w.v, _mm512_loadu_ps(x), a.v)}; }
static inline void f16_store(float* o, f16x a) { _mm512_storeu_ps(o, a.v); }
static inline f16x w16_q8(const int8_t* q, float d) {
    return {_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)q))), _mm512_set1_ps(d))};
}
static inline f16x w16_bf16(const uint16_t* w) {
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)w)), 16))};
}
#elif defined(__AVX2__) && defined(__FMA__)
struct f16x { __m256 lo, hi; };
static inline f16x f16_zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline f16x f16_fma(f16x w, const float* x, f16x a) {
    return {_mm256_fmadd_ps(w.lo, _mm256_loadu_ps(x), a.lo), _mm256_fmadd_ps(w.hi, _mm256_loadu_ps(x + 8), a.hi)};
}
static inline void f16_store(float* o, f16x a) { _mm256_storeu_ps(o, a.lo); _mm256_storeu_ps(o + 8, a.hi); }
static inline f16x w16_q8(const int8_t* q, float d) {
    const __m128i b = _mm_loadu_si128((const __m128i*)q);
    const __m256 dk = _mm256_set1_ps(d);
    return {_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), dk),
            _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), dk)};
}
static inline f16x w16_bf16(const uint16_t* w) {
    const __m256i b = _mm256_loadu_si256((const __m256i*)w);
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(b)), 16)),
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(b, 1)), 16))};
}
#else
struct f16x { float a[16]; };
static inline f16x f16_zero() { return {}; }
static inline f16x f16_fma(f16x w, const float* x, f16x a) {
    for (int j = 0; j < 16; ++j) a.a[j] += w.a[j] * x[j];
    return a;
}
static inline void f16_store(float* o, f16x a) { memcpy(o, a.a, sizeof a.a); }
static inline f16x w16_q8(const int8_t* q, float d) {
    f16x w;
    for (int j = 0; j < 16; ++j) w.a[j] = (float)q[j] * d;
    return w;
}
static inline float bf16_f32(uint16_t h);
static inline f16x w16_bf16(const uint16_t* w) {
    f16x r;
    for (int j = 0; j < 16; ++j) r.a[j] = bf16_f32(w[j]);
    return r;
}
#endif

static inline float bf16_f32(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

// y[n] = sum_k w(n, k) x[k] in gk_sgemv_rows' order: w16(n, k) gives 16 decoded weights, w1(n, k) one
// (the tail, K % 16)
template <class W16, class W1>
static void exact_gemv_rows(const float* x, float* y, int N, int K, int nthreads, W16 w16, W1 w1) {
#if defined(_OPENMP)
    #pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static)
#endif
    for (int n = 0; n < N; ++n) {
        f16x acc = f16_zero();
        int k = 0;
        for (; k + 16 <= K; k += 16) acc = f16_fma(w16(n, k), x + k, acc);
        float a[16];
        f16_store(a, acc);
        for (int j = 0; k + j < K; ++j) a[j] += w1(n, k + j) * x[k + j];
        for (int h = 8; h >= 1; h >>= 1)
            for (int j = 0; j < h; ++j) a[j] += a[j + h];
        y[n] = a[0];
    }
}

extern "C" int gk_q8_gemv_rows(const int8_t* Q, const float* D, const float* x, float* y, int N, int K,
                               int nthreads) {
    if (N < 0 || K < 0 || K % 32) return -1;
    const int G = K / 32;
    exact_gemv_rows(x, y, N, K, nthreads,
                    [=](int n, int k) { return w16_q8(Q + (size_t)n * K + k, D[(size_t)n * G + (k >> 5)]); },
                    [=](int n, int k) { return (float)Q[(size_t)n * K + k] * D[(size_t)n * G + (k >> 5)]; });
    return 0;
}

extern "C" int gk_bf16_gemv_rows(const uint16_t* W, const float* x, float* y, int N, int K, int nthreads) {
    if (N < 0 || K < 0) return -1;
    exact_gemv_rows(x, y, N, K, nthreads, [=](int n, int k) { return w16_bf16(W + (size_t)n * K + k); },
                    [=](int n, int k) { return bf16_f32(W[(size_t)n * K + k]); });
    return 0;
}
