/* Products with bfloat16 weights in pair panels (the bfloat16 format's matrices), for the native engine: AMX
 * tiles where the CPU has them, else vdpbf16ps where the CPU has AVX-512 BF16, else the vdpbf16ps sums with
 * AVX2 + FMA or plain C.
 *
 * AMX (Intel Sapphire Rapids and later; PARADECODE_NO_AMX=1 turns it off): 16 pair rows of a panel are one
 * B tile of tdpbf16ps as they lie (1 KB), so a tile product takes up to 16 rows x 32 inputs of activations
 * straight from the rows and one tile step of each of four panels; every output is one tile's float32 sum
 * over the panel's steps in order. The tiles sum each step in an order of their own (no emulation tried here
 * reproduces it: session 15), but every call, whatever its row count, and every thread runs the same tile
 * operations for an output, so its bits again depend only on its row and its channel. Each process takes
 * the tiles for every call of a matrix whose inputs are whole tile steps (K a multiple of 32) or for none.
 * Intel Xeon here, one thread, the default model after a 512-token prompt, interleaved with oneDNN's AMX
 * products: a forward 0.69-0.73x oneDNN's time for 1 to 16 new tokens, 0.79x for 32; 16 tokens cost 1.34x
 * one (vdpbf16ps: 2.5x).
 *
 * The vector paths:
 * Activations are rounded to bfloat16 (to nearest even, as PyTorch casts; the bfloat16 format's activations
 * are bfloat16 already), and each output is
 *
 *   y[m][n] = sum over blocks b of KB inputs, in order, of
 *             dot_b,  dot_b = pair sums over the inputs 2p, 2p + 1 of b, in order:
 *             acc = (acc + x[2p+1] w[n][2p+1]) + x[2p] w[n][2p]
 *
 * which is what one vdpbf16ps lane does with a pair (each product of two bfloat16 values is exact in float32;
 * the two adds round to nearest even in that order, denormals flushed). Every output is that sequence whatever
 * the number of rows in the call and the thread count, so its bits depend only on its row and its channel
 * (position invariance). tests/test_kernels.py checks every path against this definition computed in float32
 * steps.
 *
 * Why not oneDNN: without AMX, its bfloat16 GEMM read the default model's layer matrices at about half the
 * memory's bandwidth here (Zen 4: 22 ms for 269 MB, one thread), and its single-row kernel sums in another
 * order than its multi-row one, so the engine padded every call to 4 rows and probed row blocks per shape.
 * A vdpbf16ps does 32 multiply-adds: at a 16-token block the arithmetic is about one more weight read.
 *
 * Packed layout (quant.py: pack_bf16_panels): output channels in panels of 16; a panel is K/2 rows of 64
 * bytes (K padded to even with a zero input), row p holding inputs 2p, 2p + 1 of its 16 channels
 * (element 2j + t: channel j, input 2p + t): one vector per pair of inputs, streamed in order.
 * A pass keeps 4 rows x 4 panels of accumulators for calls of up to 4 rows, else 8 rows x 2 panels (Zen 4,
 * interleaved: 4 panels 0.96x the time of 2 up to 4 rows, 1.05-1.09x at 8-24 rows); with several rows every
 * pass prefetches the next panel group into L2, as panels.c and int8.c do (without: 1.46x the time at 8
 * rows, 1.29x at 16). Tried, no gain: one panel x 16 rows (1.16-1.23x the time at 12-24 rows), 3 panels x 8
 * rows, prefetching two groups ahead or spreading the prefetches over the passes; a one-row call prefetching
 * ahead in its own panels' streams was 1.16-1.25x slower (it reads at the memory's bandwidth without).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define CG 16           /* output channels per panel */
#define KB 64           /* inputs per block sum (32 pairs) */
#define MR 8            /* rows per register block of one or two panels */
#define MR4 4           /* rows per register block of three or four panels */
#define PF_ROWS 2       /* calls of at least this many rows prefetch the next panel group */
#define NP4_ROWS 4      /* calls of up to this many rows take four panels per pass */

/* a pair word's two bfloat16 as float32 (low half: input 2p, high half: input 2p + 1), a denormal as zero, as
 * vdpbf16ps reads its inputs */
static inline float lo_f32(uint32_t u) {
    const uint32_t b = u << 16;
    float f;
    memcpy(&f, (b & 0x7f800000u) ? &b : &(uint32_t){b & 0x80000000u}, 4);
    return f;
}

static inline float hi_f32(uint32_t u) {
    const uint32_t b = u & 0xffff0000u;
    float f;
    memcpy(&f, (b & 0x7f800000u) ? &b : &(uint32_t){b & 0x80000000u}, 4);
    return f;
}

/* the definition, one output at a time: rows rows of one panel (w) into out (row stride ldo). A product of two
 * bfloat16 is exact in float32, so fmaf adds it with the one rounding vdpbf16ps does */
__attribute__((unused)) static void panel_c(const uint16_t *w, int K2, int rows, const uint32_t *x, long ldx,
                                            float *out, long ldo) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < CG; j++) {
            float total = 0.0f;
            for (int p0 = 0; p0 < K2; p0 += KB / 2) {
                float acc = 0.0f;
                for (int p = p0; p < K2 && p < p0 + KB / 2; p++) {
                    const uint32_t xp = x[r * ldx + p], wp = ((const uint32_t *)w)[(long)p * CG + j];
                    acc = fmaf(hi_f32(xp), hi_f32(wp), acc);
                    acc = fmaf(lo_f32(xp), lo_f32(wp), acc);
                }
                total = p0 ? total + acc : acc;
            }
            out[r * ldo + j] = total;
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#define MR2 4           /* rows per register block on the AVX2 path */
/* the definition 8 channels per vector: rows (<= MR2) rows of one panel, its two halves in two vectors each
 * (inputs 2p + 1 and 2p of 8 channels, widened from one load) */
static inline __attribute__((always_inline)) void panel_rows_avx2(const uint16_t *w, int K2, const int ROWS,
                                                                  const uint32_t *x, long ldx, float *out, long ldo) {
    const __m256i hi_mask = _mm256_set1_epi32((int)0xffff0000u);
    for (int p0 = 0; p0 < K2; p0 += KB / 2) {
        const int p1 = K2 < p0 + KB / 2 ? K2 : p0 + KB / 2;
        __m256 acc[2 * MR2];
        _Pragma("GCC unroll 8") for (int i = 0; i < 2 * ROWS; i++) acc[i] = _mm256_setzero_ps();
        for (int p = p0; p < p1; p++) {
            const __m256i u0 = _mm256_loadu_si256((const __m256i *)(w + (long)p * 2 * CG));
            const __m256i u1 = _mm256_loadu_si256((const __m256i *)(w + (long)p * 2 * CG + CG));
            const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(u0, hi_mask)),
                         e0 = _mm256_castsi256_ps(_mm256_slli_epi32(u0, 16)),
                         o1 = _mm256_castsi256_ps(_mm256_and_si256(u1, hi_mask)),
                         e1 = _mm256_castsi256_ps(_mm256_slli_epi32(u1, 16));
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
                const uint32_t xp = x[r * ldx + p];
                const __m256 xo = _mm256_set1_ps(hi_f32(xp)), xe = _mm256_set1_ps(lo_f32(xp));
                acc[2 * r] = _mm256_fmadd_ps(xe, e0, _mm256_fmadd_ps(xo, o0, acc[2 * r]));
                acc[2 * r + 1] = _mm256_fmadd_ps(xe, e1, _mm256_fmadd_ps(xo, o1, acc[2 * r + 1]));
            }
        }
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
            _Pragma("GCC unroll 2") for (int h = 0; h < 2; h++) {
                float *o = out + r * ldo + 8 * h;
                _mm256_storeu_ps(o, p0 ? _mm256_add_ps(_mm256_loadu_ps(o), acc[2 * r + h]) : acc[2 * r + h]);
            }
    }
}

static void panel_avx2(const uint16_t *w, int K2, int rows, const uint32_t *x, long ldx, float *out, long ldo) {
    for (int m0 = 0; m0 < rows; m0 += MR2) {
        const uint32_t *xr = x + m0 * ldx;
        float *o = out + m0 * ldo;
        switch (rows - m0 < MR2 ? rows - m0 : MR2) {
            case 1: panel_rows_avx2(w, K2, 1, xr, ldx, o, ldo); break;
            case 2: panel_rows_avx2(w, K2, 2, xr, ldx, o, ldo); break;
            case 3: panel_rows_avx2(w, K2, 3, xr, ldx, o, ldo); break;
            default: panel_rows_avx2(w, K2, 4, xr, ldx, o, ldo); break;
        }
    }
}
#endif

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)
#define HAVE_BF16 1
#define TBF __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* ROWS rows (pairs of bfloat16 as 32-bit words, row stride ldx words) of NP adjacent panels of K2 pair rows
 * from w: per row and panel one accumulator per block, added to out (row stride ldo) in block order; next:
 * NP panels to prefetch into L2 meanwhile, or NULL */
TBF static inline __attribute__((always_inline)) void rows_bf16(const uint16_t *w, const int NP, const int ROWS,
                                                                int K2, const uint32_t *x, long ldx, float *out,
                                                                long ldo, const char *next) {
    const long ps = (long)K2 * 2 * CG;       /* elements per panel */
    for (int p0 = 0; p0 < K2; p0 += KB / 2) {
        const int p1 = K2 < p0 + KB / 2 ? K2 : p0 + KB / 2;
        __m512 a[4][MR];
        _Pragma("GCC unroll 4") for (int q = 0; q < NP; q++)
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) a[q][r] = _mm512_setzero_ps();
        for (int p = p0; p < p1; p++) {
            __m512bh u[4];
            _Pragma("GCC unroll 4") for (int q = 0; q < NP; q++) {
                u[q] = (__m512bh)_mm512_loadu_si512(w + q * ps + (long)p * 2 * CG);
                if (next) _mm_prefetch(next + 2 * (q * ps + (long)p * 2 * CG), _MM_HINT_T1);
            }
            _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) {
                const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x[r * ldx + p]);
                _Pragma("GCC unroll 4") for (int q = 0; q < NP; q++) a[q][r] = _mm512_dpbf16_ps(a[q][r], xb, u[q]);
            }
        }
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++)
            _Pragma("GCC unroll 4") for (int q = 0; q < NP; q++) {
                float *o = out + r * ldo + q * CG;
                _mm512_storeu_ps(o, p0 ? _mm512_add_ps(_mm512_loadu_ps(o), a[q][r]) : a[q][r]);
            }
    }
}

#define BF16_ROWS(NP, R)                                                                     \
    switch (rows) {                                                                          \
        case 1: rows_bf16(w, NP, 1, K2, x, ldx, out, ldo, next); break;                      \
        case 2: if (R >= 2) { rows_bf16(w, NP, 2, K2, x, ldx, out, ldo, next); break; }      \
        /* fall through */                                                                   \
        case 3: if (R >= 3) { rows_bf16(w, NP, 3, K2, x, ldx, out, ldo, next); break; }      \
        /* fall through */                                                                   \
        case 4: if (R >= 4) { rows_bf16(w, NP, 4, K2, x, ldx, out, ldo, next); break; }      \
        /* fall through */                                                                   \
        case 5: if (R >= 5) { rows_bf16(w, NP, 5, K2, x, ldx, out, ldo, next); break; }      \
        /* fall through */                                                                   \
        case 6: if (R >= 6) { rows_bf16(w, NP, 6, K2, x, ldx, out, ldo, next); break; }      \
        /* fall through */                                                                   \
        case 7: if (R >= 7) { rows_bf16(w, NP, 7, K2, x, ldx, out, ldo, next); break; }      \
        /* fall through */                                                                   \
        default: rows_bf16(w, NP, R, K2, x, ldx, out, ldo, next); break;                     \
    }

/* rows (<= the block's row limit for np) rows of np (1..4) adjacent panels */
TBF static void panels_bf16(const uint16_t *w, int np, int K2, int rows, const uint32_t *x, long ldx, float *out,
                            long ldo, const char *next) {
    switch (np) {
        case 4: BF16_ROWS(4, MR4) break;
        case 3: BF16_ROWS(3, MR4) break;
        case 2: BF16_ROWS(2, MR) break;
        default: BF16_ROWS(1, MR) break;
    }
}
#endif

#ifdef HAVE_BF16
#define TAMX __attribute__((target("avx512f,avx512bw,avx512bf16,amx-tile,amx-bf16")))
#define TR 16           /* rows per AMX tile */
#define TP 16           /* pair rows of a panel per tile step: one B tile, 1 KB (32 inputs of 16 channels) */
#define NPA 4           /* panels per AMX pass */
#define PFD 4           /* tile steps ahead that a pass's first row block prefetches its panels */

/* AMX: the CPU has bfloat16 tiles, and this process may use them (simd.h) */
static int use_amx(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = pd_avx512_bf16() && pd_amx_tiles("amx-bf16");
    }
    return known;
}

/* AMX_CFG[r]: tiles 0-3 the float32 sums of r rows x 16 channels of four panels, 4 r rows x 32 inputs of the
 * activations, 5-7 one tile step of a panel (16 pair rows x 16 channels) */
#define CFG(r) {1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {r, r, r, r, r, TP, TP, TP}}
static const pd_tile_config AMX_CFG[TR + 1] __attribute__((aligned(64))) = {
    CFG(1), CFG(1), CFG(2), CFG(3), CFG(4), CFG(5), CFG(6), CFG(7), CFG(8),
    CFG(9), CFG(10), CFG(11), CFG(12), CFG(13), CFG(14), CFG(15), CFG(16)};

/* the tiles' rows (configured) rows of np (1..4) adjacent panels (ps elements apart, K2 pair rows, a multiple
 * of TP) times x (pairs as 32-bit words, row stride ldx words): row r of panel q into s + (q TR + r) CG, every
 * sum one tile accumulating the panel's steps in order; pf: prefetch the panels PFD steps ahead */
TAMX static void block_amx(const uint16_t *w, int np, long ps, int K2, const uint32_t *x, long ldx, float *s,
                           int pf) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int k = 0; k < K2 / TP; k++) {
        const uint16_t *wk = w + (long)k * TP * 2 * CG;
        if (pf)                             /* tile loads stall on memory without it (int8.c) */
            for (int q = 0; q < np; q++)
                for (int j = 0; j < TP * 2 * CG; j += 32)
                    _mm_prefetch((const char *)(wk + q * ps + (long)PFD * TP * 2 * CG + j), _MM_HINT_T0);
        _tile_loadd(4, x + k * TP, 4 * ldx);
        _tile_loadd(5, wk, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (np > 1) {
            _tile_loadd(6, wk + ps, 64);
            _tile_dpbf16ps(1, 4, 6);
        }
        if (np > 2) {
            _tile_loadd(7, wk + 2 * ps, 64);
            _tile_dpbf16ps(2, 4, 7);
        }
        if (np > 3) {
            _tile_loadd(5, wk + 3 * ps, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
    }
    _tile_stored(0, s, 4 * CG);             /* tile numbers are immediates */
    if (np > 1) _tile_stored(1, s + TR * CG, 4 * CG);
    if (np > 2) _tile_stored(2, s + 2 * TR * CG, 4 * CG);
    if (np > 3) _tile_stored(3, s + 3 * TR * CG, 4 * CG);
}

/* panels [c0, c1) on the calling thread: every row block of up to 16 rows against every group of NPA panels */
TAMX static void panels_amx(int c0, int c1, int M, int K2, const uint16_t *w, const uint32_t *x, long ldx, void *y,
                            int y_kind, long ldy) {
    float s[NPA * TR * CG] __attribute__((aligned(64)));
    const long ps = (long)K2 * 2 * CG;
    int configured = 0;
    for (int c = c0; c < c1; c += NPA) {
        const int np = c1 - c < NPA ? c1 - c : NPA;
        for (int m0 = 0; m0 < M; m0 += TR) {
            const int rows = M - m0 < TR ? M - m0 : TR;
            if (rows != configured) {
                _tile_loadconfig(&AMX_CFG[rows]);
                configured = rows;
            }
            block_amx(w + (long)c * ps, np, ps, K2, x + m0 * ldx, ldx, s, m0 == 0);
            for (int q = 0; q < np; q++)
                for (int r = 0; r < rows; r++)
                    from_f32(y, y_kind, (m0 + r) * ldy + (long)(c + q) * CG, CG, s + (q * TR + r) * CG);
        }
    }
    if (configured) _tile_release();
}
#endif

/* whether the bfloat16 products of this process take AMX tiles (for reports and tests) */
int pd_bf16_amx(void) {
#ifdef HAVE_BF16
    return use_amx();
#else
    return 0;
#endif
}

/* y (M, N) in y_kind (row stride ldy) = x (M, K) in x_kind (row stride ldx) times the packed weight of N
 * channels (a multiple of 16: the packing pads) and K inputs, the panels on up to nt threads: vdpbf16ps where
 * the CPU has AVX-512 BF16, else the same sums with AVX2 + FMA or plain C. Returns 0, or -1 when scratch
 * memory could not be allocated. */
int pd_bf16_mm(const void *x, int x_kind, long ldx, int M, int K, const uint16_t *w, int N, void *y, int y_kind,
               long ldy, int nt) {
    const int K2 = (K + 1) / 2, P = N / CG;
    uint16_t *scratch = NULL;       /* rows as bfloat16 with an even length; bfloat16 rows are read in place */
    const uint32_t *xw = (const uint32_t *)x;
    long ldw = ldx / 2;
    if (x_kind != KIND_BF16 || K % 2 || ldx % 2) {
        scratch = (uint16_t *)malloc(sizeof(uint16_t) * ((size_t)M * 2 * K2 + 2));
        if (!scratch) return -1;
        for (int m = 0; m < M; m++) {
            uint16_t *d = scratch + (long)m * 2 * K2;
            if (x_kind == KIND_BF16) {
                memcpy(d, (const uint16_t *)x + (long)m * ldx, sizeof(uint16_t) * K);
            } else {
                const float *s = (const float *)x + (long)m * ldx;
                for (int k = 0; k < K; k++) d[k] = f32_to_bf16(s[k]);
            }
            if (K % 2) d[K] = 0;
        }
        xw = (const uint32_t *)scratch;
        ldw = K2;
    }
    nt = PD_THREADS(nt, (long)N * K);
    (void)nt;
#ifdef HAVE_BF16
    if (K2 % TP == 0 && use_amx()) {
#ifdef _OPENMP
        _Pragma("omp parallel num_threads(nt) if(nt > 1)")
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            panels_amx((int)((long)P * t / T), (int)((long)P * (t + 1) / T), M, K2, w, xw, ldw, y, y_kind, ldy);
        }
#else
        panels_amx(0, P, M, K2, w, xw, ldw, y, y_kind, ldy);
#endif
        free(scratch);
        return 0;
    }
    if (pd_avx512_bf16()) {
        /* groups of npg panels (4 when rows come in blocks of up to MR4, else 2), dealt out to the threads */
        const int npg = M <= NP4_ROWS ? 4 : 2, mr = npg == 4 ? MR4 : MR;
        PD_PARALLEL_FOR(nt)
        for (int c = 0; c < P; c += npg) {
            const int np = P - c < npg ? P - c : npg;
            const uint16_t *w0 = w + (long)c * K2 * 2 * CG;
            const char *next = M >= PF_ROWS && c + 2 * npg <= P ? (const char *)(w0 + (long)npg * K2 * 2 * CG) : NULL;
            float sums[MR * 4 * CG];
            for (int m0 = 0; m0 < M; m0 += mr) {
                const int rows = M - m0 < mr ? M - m0 : mr;
                panels_bf16(w0, np, K2, rows, xw + m0 * ldw, ldw, sums, 4 * CG, next);
                for (int r = 0; r < rows; r++)
                    from_f32(y, y_kind, (m0 + r) * ldy + (long)c * CG, np * CG, sums + r * 4 * CG);
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
            panel_avx2(w + (long)c * K2 * 2 * CG, K2, rows, xw + m0 * ldw, ldw, sums, CG);
#else
            panel_c(w + (long)c * K2 * 2 * CG, K2, rows, xw + m0 * ldw, ldw, sums, CG);
#endif
            for (int r = 0; r < rows; r++) from_f32(y, y_kind, (m0 + r) * ldy + (long)c * CG, CG, sums + r * CG);
        }
    }
    free(scratch);
    return 0;
}

