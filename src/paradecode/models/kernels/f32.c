/* Products with float32 weights (the float32 format's matrices), for the native engine.
 *
 *   y[m][n] = sum over blocks b of KB inputs, in order, of   sum over k in b, in order, of x[m][k] w[n][k]
 *
 * each block's sum one chain of fused multiply-adds (fmaf), then added to the running total: every
 * output is the same sequence of float operations on every path (AVX-512, AVX2 + FMA, plain C), so its
 * bits depend only on its row and its channel, not on how many rows share the call (position
 * invariance), nor on the instruction set. The blocks keep the rounding error near a blocked GEMM's
 * (a single chain over K = 1536 inputs drifted ~2x further from float64 than MKL's sums). BLAS GEMMs give no
 * such promise (they switch kernels with the row count), and for the few rows of a decode step they
 * pack the weights anew on every call: a step with MKL's GEMM padded to 4 rows read the weights at
 * ~10 GB/s; this kernel streams them once per call, every row of the call reusing each vector.
 *
 * Packed layout (quant.py: pack_f32): output channels in panels of 16, each panel K vectors of 16
 * floats (input k's weights for the panel's 16 channels), so a panel streams in order. AVX-512 (chosen
 * at run time where the CPU has it) keeps up to 8 rows x 2 panels of accumulators, AVX2 4 rows x one
 * panel's two halves, plain C one output at a time: the same multiply-adds in the same order.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define CG 16           /* output channels per panel */
#define KB 64           /* inputs per block sum */

/* the reference path: each output's block sums, chains of fmaf over k, added in order */
__attribute__((unused)) static void panel_c(const float *w, int K, int rows, const float *x, long ldx, float *out) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < CG; j++) {
            float total = 0.0f;
            for (int k0 = 0; k0 < K; k0 += KB) {
                float acc = 0.0f;
                for (int k = k0; k < K && k < k0 + KB; k++) acc = fmaf(x[r * ldx + k], w[(long)k * CG + j], acc);
                total = k0 ? total + acc : acc;
            }
            out[r * CG + j] = total;
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define MR2 4           /* rows per register block on the AVX2 path */
/* ROWS rows of one panel, its two halves in two vectors: acc[2r + h] = channels 8h .. 8h + 7 of row r;
 * the block sums go to out (rows of 16) one block at a time */
static inline __attribute__((always_inline)) void panel_rows(const float *w, int K, const int ROWS, const float *x,
                                                             long ldx, float *out) {
    for (int k0 = 0; k0 < K; k0 += KB) {
        const int k1 = K < k0 + KB ? K : k0 + KB;
        __m256 acc[2 * MR2];
        _Pragma("GCC unroll 8") for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm256_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const __m256 lo = _mm256_loadu_ps(w + (long)k * CG), hi = _mm256_loadu_ps(w + (long)k * CG + 8);
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
                const __m256 xb = _mm256_set1_ps(x[r * ldx + k]);
                acc[2 * r] = _mm256_fmadd_ps(xb, lo, acc[2 * r]);
                acc[2 * r + 1] = _mm256_fmadd_ps(xb, hi, acc[2 * r + 1]);
            }
        }
        _Pragma("GCC unroll 8") for (int i = 0; i < 2 * ROWS; i++)
            _mm256_storeu_ps(out + 8 * i, k0 ? _mm256_add_ps(_mm256_loadu_ps(out + 8 * i), acc[i]) : acc[i]);
    }
}

static void panel_avx2(const float *w, int K, int rows, const float *x, long ldx, float *out) {
    for (int m0 = 0; m0 < rows; m0 += MR2) {
        const int n = rows - m0 < MR2 ? rows - m0 : MR2;
        const float *xr = x + m0 * ldx;
        float *o = out + m0 * CG;
        switch (n) {
            case 1: panel_rows(w, K, 1, xr, ldx, o); break;
            case 2: panel_rows(w, K, 2, xr, ldx, o); break;
            case 3: panel_rows(w, K, 3, xr, ldx, o); break;
            default: panel_rows(w, K, 4, xr, ldx, o); break;
        }
    }
}
#endif

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)   /* an upgrade of the AVX2 build */
#define HAVE_512 1
#define MR 8            /* rows per register block on the AVX-512 path */
#define T512 __attribute__((target("avx512f")))
/* ROWS rows of NP (1 or 2) panels, a panel per vector: 2 x 8 accumulators keep two FMA chains in flight
 * even for a single row, and each row's broadcast input serves both panels */
T512 static inline __attribute__((always_inline)) void panels_rows_512(const float *w0, const float *w1, int K,
                                                                       const int NP, const int ROWS, const float *x,
                                                                       long ldx, float *out, long ldo) {
    for (int k0 = 0; k0 < K; k0 += KB) {
        const int k1 = K < k0 + KB ? K : k0 + KB;
        __m512 a0[MR], a1[MR];
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const __m512 u = _mm512_loadu_ps(w0 + (long)k * CG);
            const __m512 v = NP == 2 ? _mm512_loadu_ps(w1 + (long)k * CG) : u;
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {
                const __m512 xb = _mm512_set1_ps(x[r * ldx + k]);
                a0[r] = _mm512_fmadd_ps(xb, u, a0[r]);
                if (NP == 2) a1[r] = _mm512_fmadd_ps(xb, v, a1[r]);
            }
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {   /* out: the block sums so far, in order */
            float *o = out + r * ldo;
            _mm512_storeu_ps(o, k0 ? _mm512_add_ps(_mm512_loadu_ps(o), a0[r]) : a0[r]);
            if (NP == 2) _mm512_storeu_ps(o + CG, k0 ? _mm512_add_ps(_mm512_loadu_ps(o + CG), a1[r]) : a1[r]);
        }
    }
}

#define ROWS_CASES(NP)                                                                             \
    switch (rows) {                                                                                \
        case 1: panels_rows_512(w0, w1, K, NP, 1, x, ldx, out, ldo); break;                       \
        case 2: panels_rows_512(w0, w1, K, NP, 2, x, ldx, out, ldo); break;                       \
        case 3: panels_rows_512(w0, w1, K, NP, 3, x, ldx, out, ldo); break;                       \
        case 4: panels_rows_512(w0, w1, K, NP, 4, x, ldx, out, ldo); break;                       \
        case 5: panels_rows_512(w0, w1, K, NP, 5, x, ldx, out, ldo); break;                       \
        case 6: panels_rows_512(w0, w1, K, NP, 6, x, ldx, out, ldo); break;                       \
        case 7: panels_rows_512(w0, w1, K, NP, 7, x, ldx, out, ldo); break;                       \
        default: panels_rows_512(w0, w1, K, NP, 8, x, ldx, out, ldo); break;                      \
    }

/* rows (<= MR) rows of one panel (w1 NULL) or two adjacent ones; out: rows of 16 or 32 floats, stride ldo */
T512 static void panels_512(const float *w0, const float *w1, int K, int rows, const float *x, long ldx, float *out,
                            long ldo) {
    if (w1) {
        ROWS_CASES(2)
    } else {
        ROWS_CASES(1)
    }
}

static int use_512(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && getenv("PARADECODE_NO_AVX512") == NULL;
    }
    return known;
}
#endif

/* y (M, N) float32 (row stride ldy) = x (M, K) float32 (row stride ldx) times the packed weight of
 * N channels (N a multiple of 16: the packing pads), on up to nt threads (panels dealt out: each output
 * is computed by one thread, the same way whatever the thread count). */
void pd_f32_mm(const float *x, long ldx, int M, int K, const float *w, int N, float *y, long ldy, int nt) {
    const int P = N / CG;
    const long panel = (long)K * CG;
    nt = PD_THREADS(nt, (long)N * K);
    (void)nt;
#ifdef HAVE_512
    if (use_512()) {
        /* panels outer, row blocks inner: a pair of panels (2 x 16 x K floats) stays in L2 for every row block */
        PD_PARALLEL_FOR(nt)
        for (int c = 0; c < P; c += 2) {
            const float *w0 = w + c * panel, *w1 = c + 1 < P ? w0 + panel : NULL;
            for (int m0 = 0; m0 < M; m0 += MR) {
                const int rows = M - m0 < MR ? M - m0 : MR;
                panels_512(w0, w1, K, rows, x + m0 * ldx, ldx, y + m0 * ldy + (long)c * CG, ldy);
            }
        }
        return;
    }
#endif
    PD_PARALLEL_FOR(nt)
    for (int c = 0; c < P; c++) {
        float out[64 * CG];
        for (int m0 = 0; m0 < M; m0 += 64) {
            const int rows = M - m0 < 64 ? M - m0 : 64;
#if defined(__AVX2__) && defined(__FMA__)
            panel_avx2(w + c * panel, K, rows, x + m0 * ldx, ldx, out);
#else
            panel_c(w + c * panel, K, rows, x + m0 * ldx, ldx, out);
#endif
            for (int r = 0; r < rows; r++) memcpy(y + (m0 + r) * ldy + (long)c * CG, out + r * CG, sizeof(float) * CG);
        }
    }
}

/* 1 when the library was built with OpenMP (the products then use up to nt threads) */
int pd_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
