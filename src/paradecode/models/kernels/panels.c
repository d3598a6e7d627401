/* Products with panel-packed weights, for the native engine: the float32 format's matrices, and int8
 * matrices with one scale per output channel (the int8 format's, the int4 format's LM head).
 *
 *   y[m][n] = scale[n] * (sum over blocks b of KB inputs, in order, of   sum over k in b, in order, of x[m][k] w[n][k])
 *
 * (float32 weights: no scale). Each block's sum is one chain of fused multiply-adds (fmaf) in input
 * order, then added to the running total; an int8 weight is converted to float exactly. Every output
 * is the same sequence of float operations on every path (AVX-512, AVX2 + FMA, plain C), so its bits
 * depend only on its row and its channel, not on how many rows share the call (position
 * invariance), nor on the instruction set or the thread count. The blocks keep the rounding error
 * near a blocked GEMM's (a single chain over K = 1536 inputs drifted ~2x further from float64 than
 * MKL's sums). BLAS GEMMs give no such promise (they switch kernels with the row count), and for the
 * few rows of a decode step MKL's float32 GEMM packs the weights anew on every call: a step padded to
 * 4 rows read them at ~10 GB/s; this kernel streams them once per call, every row of the call reusing
 * each vector.
 *
 * Packed layout (quant.py: pack_f32, pack_int8_panels): output channels in panels of 16, each panel K
 * vectors of 16 weights (input k's weights for the panel's 16 channels), so a panel streams in order.
 * AVX-512 (chosen at run time where the CPU has it) keeps up to 8 rows x 2 panels of accumulators,
 * AVX2 4 rows x one panel's two halves, plain C one output at a time: the same operations in the same
 * order. Activations come in as float32 or bfloat16 (converted exactly), outputs go out as either.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define CG 16           /* output channels per panel */
#define KB 64           /* inputs per block sum */

/* weight j of input k's vector in a panel (W8: int8, else float32), as float */
static inline float wget(const void *w, const int W8, long k, int j) {
    return W8 ? (float)((const int8_t *)w)[k * CG + j] : ((const float *)w)[k * CG + j];
}

static inline const void *panel_at(const void *w, const int W8, long c, int K) {
    return W8 ? (const void *)((const int8_t *)w + c * K * CG) : (const void *)((const float *)w + c * K * CG);
}

/* the reference path: each output's block sums, chains of fmaf over k, added in order */
__attribute__((unused)) static void panel_c(const void *w, const int W8, int K, int rows, const float *x, long ldx,
                                            float *out) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < CG; j++) {
            float total = 0.0f;
            for (int k0 = 0; k0 < K; k0 += KB) {
                float acc = 0.0f;
                for (int k = k0; k < K && k < k0 + KB; k++) acc = fmaf(x[r * ldx + k], wget(w, W8, k, j), acc);
                total = k0 ? total + acc : acc;
            }
            out[r * CG + j] = total;
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define MR2 4           /* rows per register block on the AVX2 path */
/* 8 weights (channels 8h .. 8h + 7 of input k) as floats */
static inline __m256 wload8(const void *w, const int W8, long k, int h) {
    if (W8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)w + k * CG + 8 * h))));
    return _mm256_loadu_ps((const float *)w + k * CG + 8 * h);
}

/* ROWS rows of one panel, its two halves in two vectors: acc[2r + h] = channels 8h .. 8h + 7 of row r;
 * the block sums go to out (rows of 16) one block at a time */
static inline __attribute__((always_inline)) void panel_rows(const void *w, const int W8, int K, const int ROWS,
                                                             const float *x, long ldx, float *out) {
    for (int k0 = 0; k0 < K; k0 += KB) {
        const int k1 = K < k0 + KB ? K : k0 + KB;
        __m256 acc[2 * MR2];
        _Pragma("GCC unroll 8") for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm256_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const __m256 lo = wload8(w, W8, k, 0), hi = wload8(w, W8, k, 1);
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

static void panel_avx2(const void *w, const int W8, int K, int rows, const float *x, long ldx, float *out) {
    for (int m0 = 0; m0 < rows; m0 += MR2) {
        const int n = rows - m0 < MR2 ? rows - m0 : MR2;
        const float *xr = x + m0 * ldx;
        float *o = out + m0 * CG;
        if (W8) {
            switch (n) {
                case 1: panel_rows(w, 1, K, 1, xr, ldx, o); break;
                case 2: panel_rows(w, 1, K, 2, xr, ldx, o); break;
                case 3: panel_rows(w, 1, K, 3, xr, ldx, o); break;
                default: panel_rows(w, 1, K, 4, xr, ldx, o); break;
            }
        } else {
            switch (n) {
                case 1: panel_rows(w, 0, K, 1, xr, ldx, o); break;
                case 2: panel_rows(w, 0, K, 2, xr, ldx, o); break;
                case 3: panel_rows(w, 0, K, 3, xr, ldx, o); break;
                default: panel_rows(w, 0, K, 4, xr, ldx, o); break;
            }
        }
    }
}
#endif

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)   /* an upgrade of the AVX2 build */
#define HAVE_512 1
#define MR 8            /* rows per register block on the AVX-512 path */
#define T512 __attribute__((target("avx512f")))
T512 static inline __m512 wload16(const void *w, const int W8, long k) {
    if (W8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)w + k * CG))));
    return _mm512_loadu_ps((const float *)w + k * CG);
}

/* ROWS rows of NP (1 or 2) panels, a panel per vector: 2 x 8 accumulators keep two FMA chains in flight
 * even for a single row, and each row's broadcast input serves both panels */
T512 static inline __attribute__((always_inline)) void panels_rows_512(const void *w0, const void *w1, const int W8,
                                                                       int K, const int NP, const int ROWS,
                                                                       const float *x, long ldx, float *out, long ldo,
                                                                       const char *next) {
    const long wb = W8 ? CG : CG * 4;          /* bytes of an input's weights in a panel */
    for (int k0 = 0; k0 < K; k0 += KB) {
        const int k1 = K < k0 + KB ? K : k0 + KB;
        __m512 a0[MR], a1[MR];
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) a0[r] = a1[r] = _mm512_setzero_ps();
        for (int k = k0; k < k1; k++) {
            const __m512 u = wload16(w0, W8, k);
            const __m512 v = NP == 2 ? wload16(w1, W8, k) : u;
            if (next && (!W8 || k % 4 == 0)) {       /* the next panels' line that holds input k */
                _mm_prefetch(next + k * wb, _MM_HINT_T1);
                _mm_prefetch(next + K * wb + k * wb, _MM_HINT_T1);
            }
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

#define ROWS_CASES(W8, NP)                                                                         \
    switch (rows) {                                                                                \
        case 1: panels_rows_512(w0, w1, W8, K, NP, 1, x, ldx, out, ldo, next); break;              \
        case 2: panels_rows_512(w0, w1, W8, K, NP, 2, x, ldx, out, ldo, next); break;              \
        case 3: panels_rows_512(w0, w1, W8, K, NP, 3, x, ldx, out, ldo, next); break;              \
        case 4: panels_rows_512(w0, w1, W8, K, NP, 4, x, ldx, out, ldo, next); break;              \
        case 5: panels_rows_512(w0, w1, W8, K, NP, 5, x, ldx, out, ldo, next); break;              \
        case 6: panels_rows_512(w0, w1, W8, K, NP, 6, x, ldx, out, ldo, next); break;              \
        case 7: panels_rows_512(w0, w1, W8, K, NP, 7, x, ldx, out, ldo, next); break;              \
        default: panels_rows_512(w0, w1, W8, K, NP, 8, x, ldx, out, ldo, next); break;             \
    }

/* rows (<= MR) rows of one panel (w1 NULL) or two adjacent ones; out: rows of 16 or 32 floats, stride ldo;
 * next: the two panels to prefetch into L2 meanwhile, or NULL (see panel_mm) */
T512 static void panels_512(const void *w0, const void *w1, int W8, int K, int rows, const float *x, long ldx,
                            float *out, long ldo, const char *next) {
    if (W8) {
        if (w1) {
            ROWS_CASES(1, 2)
        } else {
            ROWS_CASES(1, 1)
        }
    } else if (w1) {
        ROWS_CASES(0, 2)
    } else {
        ROWS_CASES(0, 1)
    }
}

#endif

/* rows of 16 or 32 sums (stride lds) of panel c onward -> y rows in y_kind, times the scales (if any) */
static void finish(const float *sums, long lds, int rows, int n, const float *scale, long c, void *y, int y_kind,
                   long ldy, long m0) {
    float buf[2 * CG];
    for (int r = 0; r < rows; r++) {
        const float *s = sums + r * lds;
        if (scale) {
            for (int j = 0; j < n; j++) buf[j] = s[j] * scale[c * CG + j];
            s = buf;
        }
        from_f32(y, y_kind, (m0 + r) * ldy + c * CG, n, s);
    }
}

/* y (M, N) in y_kind (row stride ldy) = x (M, K) in x_kind (row stride ldx) times the packed weight of N
 * channels (N a multiple of 16: the packing pads), float32 (scale NULL) or int8 with per-channel float32
 * scales, on up to nt threads (panels dealt out: each output is computed by one thread, the same way
 * whatever the thread count). Returns 0, or -1 when scratch memory could not be allocated. */
static int panel_mm(const void *x, int x_kind, long ldx, int M, int K, const void *w, const int W8,
                    const float *scale, int N, void *y, int y_kind, long ldy, int nt) {
    const int P = N / CG;
    float *scratch = NULL;           /* bfloat16 rows converted once; float32 rows are read in place */
    const float *xf = (const float *)x;
    long ldf = ldx;
    if (x_kind != KIND_F32) {
        scratch = (float *)malloc(sizeof(float) * ((size_t)M * K + 1));
        if (!scratch) return -1;
        for (int m = 0; m < M; m++) to_f32(x, x_kind, (long)m * ldx, K, scratch + (long)m * K);
        xf = scratch;
        ldf = K;
    }
    nt = PD_THREADS(nt, (long)N * K);
    (void)nt;
#ifdef HAVE_512
    if (pd_avx512f()) {
        /* panels outer, row blocks inner: a pair of panels stays in L2 for every row block */
        PD_PARALLEL_FOR(nt)
        for (int c = 0; c < P; c += 2) {
            const void *w0 = panel_at(w, W8, c, K), *w1 = c + 1 < P ? panel_at(w, W8, c + 1, K) : NULL;
            /* as in int8.c's pd_i8_i15_mm, every pass prefetches the next two panels into L2, where the rows
             * leave time for it: Zen 4, the default model's layer matrices, interleaved: int8 2 to 6 rows
             * 0.67-0.86x the time, 8 to 16 rows 0.94-0.99x; float32 4 to 16 rows 0.70-0.92x, but 2 rows 1.07x
             * (a float32 input's weights fill a cache line per panel: a prefetch per load) */
            const char *next = M > (W8 ? 1 : 3) && c + 3 < P ? (const char *)panel_at(w, W8, c + 2, K) : NULL;
            float sums[MR * 2 * CG];
            for (int m0 = 0; m0 < M; m0 += MR) {
                const int rows = M - m0 < MR ? M - m0 : MR;
                panels_512(w0, w1, W8, K, rows, xf + m0 * ldf, ldf, sums, 2 * CG, next);
                finish(sums, 2 * CG, rows, w1 ? 2 * CG : CG, scale, c, y, y_kind, ldy, m0);
            }
        }
        free(scratch);
        return 0;
    }
#endif
    PD_PARALLEL_FOR(nt)
    for (int c = 0; c < P; c++) {
        float sums[64 * CG];
        for (int m0 = 0; m0 < M; m0 += 64) {
            const int rows = M - m0 < 64 ? M - m0 : 64;
#if defined(__AVX2__) && defined(__FMA__)
            panel_avx2(panel_at(w, W8, c, K), W8, K, rows, xf + m0 * ldf, ldf, sums);
#else
            panel_c(panel_at(w, W8, c, K), W8, K, rows, xf + m0 * ldf, ldf, sums);
#endif
            finish(sums, CG, rows, CG, scale, c, y, y_kind, ldy, m0);
        }
    }
    free(scratch);
    return 0;
}

int pd_f32_mm(const void *x, int x_kind, long ldx, int M, int K, const float *w, int N, void *y, int y_kind,
              long ldy, int nt) {
    return panel_mm(x, x_kind, ldx, M, K, w, 0, NULL, N, y, y_kind, ldy, nt);
}

int pd_i8_mm(const void *x, int x_kind, long ldx, int M, int K, const int8_t *w, const float *scale, int N, void *y,
             int y_kind, long ldy, int nt) {
    return panel_mm(x, x_kind, ldx, M, K, w, 1, scale, N, y, y_kind, ldy, nt);
}

/* the vector paths the products take in this process, as the kernels' own run-time checks decide (simd.h; for
 * reports): 3 AVX-512 with BF16, 2 AVX-512 (F), 1 AVX2, 0 plain C */
int pd_vector_isa(void) {
#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)
    return pd_avx512_bf16() ? 3 : pd_avx512f() ? 2 : 1;
#else
    return 0;
#endif
}

/* 1 when the library was built with OpenMP (the products then use up to nt threads) */
int pd_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
