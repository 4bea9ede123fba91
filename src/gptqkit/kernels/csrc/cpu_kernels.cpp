// gptqkit CPU kernels: fused dequantize-GEMV/GEMM for 2/4/8-bit GPTQ weights, and a tiled
// dequantizer for the BLAS path. Built at first use by gptqkit/kernels/cpu.py with
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

// rows of x per pass over a weight block: 4 rows x 4 vectors = 16 accumulators fit AVX2's and
// AVX-512's register files; with 32 vector registers (AVX-512) 6 rows amortize decoding better
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
    // if(): a single-threaded call (all of a small model's M = 1 layers) never enters the pool
#pragma omp parallel for num_threads(nthreads) schedule(dynamic, 1) if (nthreads > 1)
    for (int j = 0; j < nblk; ++j) {
        const uint8_t* Wb = W + (size_t)j * K * B;
        const float* Sb = S + (size_t)j * G * 64;
        const float* SZb = SZ + (size_t)j * G * 64;
        const int ncols = (N - 64 * j) < 64 ? (N - 64 * j) : 64;
        float* Yb = Y + 64 * (size_t)j;
        int m = 0;
        for (; m + GK_MR <= M; m += GK_MR)
            block_rows<BITS, GK_MR>(Wb, Sb, SZb, seg, G, X + (size_t)m * K, K, XS + (size_t)m * G,
                                    Yb + (size_t)m * N, N, ncols);
#define GK_TAIL(R) case R: block_rows<BITS, R>(Wb, Sb, SZb, seg, G, X + (size_t)m * K, K, XS + (size_t)m * G, Yb + (size_t)m * N, N, ncols); break;
        switch (M - m) {
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
                v16f w[4];
                decode<BITS>(Wb + (size_t)k * B, w);
                const float* s = Sb + (size_t)gk[k] * 64;
                const float* sz = SZb + (size_t)gk[k] * 64;
                float* o = out + (size_t)k * ldo + 64 * jb;
                for (int v = 0; v < 4; ++v) storef(o + 16 * v, loadf(s + 16 * v) * w[v] - loadf(sz + 16 * v));
            }
        }
}

extern "C" {
int gk_abi_version(void) { return 2; }

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
}
