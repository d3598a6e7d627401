/* Products with int8 weights and 15-bit integer activations (the int8 format's matrices), for the native
 * engine.
 *
 * Weights: int8 values w in -127..127 with one scale per output channel (models/quant.py: quantize_int8).
 * Activations: each row is scaled to integers q = round(x / d), d = max |x| / 16319, so |q| <= 16319, and
 * q is split into two int8 digits, q = 128 hi + lo with hi in -127..127 and lo in -64..63. Fifteen bits
 * per activation keep the int8 format's quality (the default model's perplexity: +0.35% over float32, against
 * +0.44% with bfloat16 activations; 8-bit activations in groups of 32 measured +0.6% to +1.1%), and
 *
 *   y[m][n] = float( double(scale[n] * d[m]) * (128 H + L) ),   H = sum_k hi[m][k] w[n][k],  L = sum_k lo w
 *
 * where H and L are exact integer dot products whatever computes them (AMX tiles, AVX-512 VNNI, AVX2,
 * plain C) and the last line is the same scalar operations on every path. So an output's bits depend only
 * on its row and its channel: not on how many rows share the call (position invariance), nor on the
 * instruction set or the thread count.
 *
 * Packed layout (quant.py: pack_int8_i15): output channels in panels of 16; a panel is K/4 rows of 64
 * bytes, row i holding inputs 4i .. 4i + 3 of its 16 channels (byte 4j + t: channel j, input 4i + t), each
 * value stored plus 128 as an unsigned byte u (u8 x s8 instructions; sum hi * w = sum hi * u - 128 sum hi).
 * A row is one VNNI vector, and 16 rows (64 inputs) one AMX B tile.
 *
 * AMX (Intel Sapphire Rapids and later; chosen at run time for calls of AMX_MIN_ROWS rows and more,
 * PARADECODE_NO_AMX=1 turns it off) takes 16 rows per tile product straight from the packed weights, two
 * panels per pass sharing each step's digit tiles, so a call over 16 rows reads the weights once (the
 * default model's matrices, float32 in and out: 1.0-1.3x the time of one row, session 11); AVX-512 VNNI
 * (PARADECODE_NO_AVX512=1 turns it and AMX off) 4 rows per weight read; AVX2 4 rows per half panel
 * (with the sign trick: |w| times hi carrying w's sign, no int16 overflow); plain C one output at a time.
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
#define QMAX 16319      /* 128 * 127 + 63: the largest |q| whose digits fit */
#define MR 4            /* rows per register block (VNNI, AVX2) */
#define TR 16           /* rows per AMX tile */
#define KT 64           /* inputs per AMX tile step */
#define AMX_MIN_ROWS 3  /* fewer rows: the vector path (same bits) is faster (1 row: ~5%; 4 rows: ~5% slower) */
#define PFD 4           /* tile steps ahead that the AMX loop prefetches its weights (8 and 16 rows: ~0.9x the time) */

/* inputs k0 .. K-1 of a row (float32 in buf) as digits hi, lo, their sums added to *sh, *sl (d = dd) */
static void digits(const float *buf, int k0, int K, float dd, int8_t *hi, int8_t *lo, int32_t *sh, int32_t *sl) {
    for (int k = k0; k < K; k++) {
        int q = dd > 0.0f ? (int)nearbyintf(buf[k] / dd) : 0;
        q = q > QMAX ? QMAX : q < -QMAX ? -QMAX : q;
        const int h = (q + 64) >> 7;                 /* floor((q + 64) / 128): lo = q - 128 h in -64..63 */
        hi[k] = (int8_t)h;
        lo[k] = (int8_t)(q - 128 * h);
        *sh += h;
        *sl += q - 128 * h;
    }
}

/* one row (float32 in buf) as digits: hi, lo (K each), their sums, and d */
__attribute__((unused)) static void quantize_row(const float *buf, int K, int8_t *hi, int8_t *lo, int32_t *sums,
                                                 float *d) {
    float amax = 0.0f;
    for (int k = 0; k < K; k++) {
        const float a = fabsf(buf[k]);
        amax = a > amax ? a : amax;
    }
    const float dd = amax / (float)QMAX;
    sums[0] = sums[1] = 0;
    digits(buf, 0, K, dd, hi, lo, sums, sums + 1);
    *d = dd;
}

/* the outputs of `rows` rows x 16 channels from their integer sums (hs, ls: row r's 16 channels at 16 r;
 * |H|, |L| <= 127 * 127 * K: exact in int32, and 128 H + L exact in double) */
__attribute__((unused)) static void finish(const int32_t *hs, const int32_t *ls, int rows, const float *d, const float *scale, void *y,
                   int y_kind, long ldy, long off) {
    float out[CG];
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < CG; j++)
            out[j] = (float)((double)(scale[j] * d[r]) * (128.0 * (double)hs[r * CG + j] + (double)ls[r * CG + j]));
        from_f32(y, y_kind, off + r * ldy, CG, out);
    }
}

/* plain C: each output's exact sums */
__attribute__((unused)) static void panel_c(const uint8_t *w, int K, int rows, const int8_t *hi, const int8_t *lo,
                                            long ldq, int32_t *hs, int32_t *ls) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < CG; j++) {
            int32_t h = 0, l = 0;
            for (int k = 0; k < K; k++) {
                const int v = (int)w[(long)(k / 4) * 64 + 4 * j + k % 4] - 128;
                h += (int32_t)hi[r * ldq + k] * v;
                l += (int32_t)lo[r * ldq + k] * v;
            }
            hs[r * CG + j] = h;
            ls[r * CG + j] = l;
        }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* ROWS rows of one half (h: channels 8h .. 8h + 7) of a panel, with the sign trick */
static inline __attribute__((always_inline)) void panel_rows(const uint8_t *w, int K, const int ROWS, int h,
                                                             const int8_t *hi, const int8_t *lo, long ldq,
                                                             int32_t *hs, int32_t *ls) {
    const __m256i flip = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256i dh[MR], dl[MR];
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) dh[r] = dl[r] = _mm256_setzero_si256();
    for (int i = 0; i < K / 4; i++) {
        const __m256i s = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(w + 64L * i + 32 * h)), flip);
        const __m256i mag = _mm256_sign_epi8(s, s);
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
            int32_t a, b;
            memcpy(&a, hi + r * ldq + 4 * i, 4);
            memcpy(&b, lo + r * ldq + 4 * i, 4);
            const __m256i ah = _mm256_sign_epi8(_mm256_set1_epi32(a), s), al = _mm256_sign_epi8(_mm256_set1_epi32(b), s);
            dh[r] = _mm256_add_epi32(dh[r], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, ah), ones));
            dl[r] = _mm256_add_epi32(dl[r], _mm256_madd_epi16(_mm256_maddubs_epi16(mag, al), ones));
        }
    }
    for (int r = 0; r < ROWS; r++) {
        int32_t th[8], tl[8];
        _mm256_storeu_si256((__m256i *)th, dh[r]);
        _mm256_storeu_si256((__m256i *)tl, dl[r]);
        for (int j = 0; j < 8; j++) hs[r * CG + 8 * h + j] = th[j], ls[r * CG + 8 * h + j] = tl[j];
    }
}
#endif

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)   /* upgrades of the AVX2 build */
#define HAVE_512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni")))
#define TAMX __attribute__((target("avx512f,avx512bw,avx512dq,avx512vnni,amx-tile,amx-int8")))

/* finish's operations for one row of 16 channels, 8 lanes of doubles at a time (the same roundings) */
T512 static inline void finish_row_512(__m512i h, __m512i l, float d, const float *scale, void *y, int y_kind,
                                       long off) {
    const __m512 s = _mm512_mul_ps(_mm512_loadu_ps(scale), _mm512_set1_ps(d));
    const __m512d c128 = _mm512_set1_pd(128.0);
    float out[CG];
    for (int half = 0; half < 2; half++) {
        const __m256i h8 = half ? _mm512_extracti64x4_epi64(h, 1) : _mm512_castsi512_si256(h);
        const __m256i l8 = half ? _mm512_extracti64x4_epi64(l, 1) : _mm512_castsi512_si256(l);
        const __m256 s8 = half ? _mm512_extractf32x8_ps(s, 1) : _mm512_castps512_ps256(s);
        const __m512d v = _mm512_add_pd(_mm512_mul_pd(c128, _mm512_cvtepi32_pd(h8)), _mm512_cvtepi32_pd(l8));
        _mm256_storeu_ps(out + 8 * half, _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtps_pd(s8), v)));
    }
    from_f32(y, y_kind, off, CG, out);
}

/* ROWS rows of a whole panel: u8 (w + 128) x s8 digits with vpdpbusd, then the -128 sum corrections. next:
 * the panel to prefetch into L2 meanwhile, or NULL (see pd_i8_i15_mm) */
T512 static inline __attribute__((always_inline)) void panel_rows_512(const uint8_t *w, const uint8_t *next, int K,
                                                                      const int ROWS, const int8_t *hi,
                                                                      const int8_t *lo, long ldq,
                                                                      const int32_t *sums, const float *d,
                                                                      const float *scale, void *y, int y_kind,
                                                                      long ldy, long off) {
    __m512i dh[MR], dl[MR];
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) dh[r] = dl[r] = _mm512_setzero_si512();
    for (int i = 0; i < K / 4; i++) {
        const __m512i u = _mm512_loadu_si512((const void *)(w + 64L * i));
        if (next) _mm_prefetch((const char *)(next + 64L * i), _MM_HINT_T1);
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
            int32_t a, b;
            memcpy(&a, hi + r * ldq + 4 * i, 4);
            memcpy(&b, lo + r * ldq + 4 * i, 4);
            dh[r] = _mm512_dpbusd_epi32(dh[r], u, _mm512_set1_epi32(a));
            dl[r] = _mm512_dpbusd_epi32(dl[r], u, _mm512_set1_epi32(b));
        }
    }
    for (int r = 0; r < ROWS; r++)
        finish_row_512(_mm512_sub_epi32(dh[r], _mm512_set1_epi32(128 * sums[2 * r])),
                       _mm512_sub_epi32(dl[r], _mm512_set1_epi32(128 * sums[2 * r + 1])), d[r], scale, y, y_kind,
                       off + r * ldy);
}

T512 static void panel_512(const uint8_t *w, const uint8_t *next, int K, int rows, const int8_t *hi,
                           const int8_t *lo, long ldq, const int32_t *sums, const float *d, const float *scale,
                           void *y, int y_kind, long ldy, long off) {
    switch (rows) {
        case 1: panel_rows_512(w, next, K, 1, hi, lo, ldq, sums, d, scale, y, y_kind, ldy, off); break;
        case 2: panel_rows_512(w, next, K, 2, hi, lo, ldq, sums, d, scale, y, y_kind, ldy, off); break;
        case 3: panel_rows_512(w, next, K, 3, hi, lo, ldq, sums, d, scale, y, y_kind, ldy, off); break;
        default: panel_rows_512(w, next, K, 4, hi, lo, ldq, sums, d, scale, y, y_kind, ldy, off); break;
    }
}

/* quantize_row's numbers, 16 lanes at a time (the max, the quotients and their rounding are exact per lane) */
T512 static void quantize_row_512(const float *buf, int K, int8_t *hi, int8_t *lo, int32_t *sums, float *d) {
    __m512 mx = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_loadu_ps(buf + k)));
    float amax = _mm512_reduce_max_ps(mx);
    for (; k < K; k++) amax = fabsf(buf[k]) > amax ? fabsf(buf[k]) : amax;
    const float dd = amax / (float)QMAX;
    int32_t sh = 0, sl = 0;
    k = 0;
    if (dd > 0.0f) {
        const __m512 vd = _mm512_set1_ps(dd), lim = _mm512_set1_ps((float)QMAX), nlim = _mm512_set1_ps((float)-QMAX);
        __m512i ah = _mm512_setzero_si512(), al = _mm512_setzero_si512();
        for (; k + 16 <= K; k += 16) {
            __m512 r = _mm512_roundscale_ps(_mm512_div_ps(_mm512_loadu_ps(buf + k), vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            r = _mm512_min_ps(_mm512_max_ps(r, nlim), lim);
            const __m512i q = _mm512_cvtps_epi32(r);
            const __m512i h = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(64)), 7);
            const __m512i l = _mm512_sub_epi32(q, _mm512_slli_epi32(h, 7));
            _mm_storeu_si128((__m128i *)(hi + k), _mm512_cvtepi32_epi8(h));
            _mm_storeu_si128((__m128i *)(lo + k), _mm512_cvtepi32_epi8(l));
            ah = _mm512_add_epi32(ah, h);
            al = _mm512_add_epi32(al, l);
        }
        sh = _mm512_reduce_add_epi32(ah);
        sl = _mm512_reduce_add_epi32(al);
    }
    digits(buf, k, K, dd, hi, lo, &sh, &sl);
    sums[0] = sh;
    sums[1] = sl;
    *d = dd;
}


/* AMX: the CPU has int8 tiles, and this process may use them (simd.h) */
static int use_amx(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = pd_avx512_vnni() && pd_amx_tiles("amx-int8");
    }
    return known;
}

/* tiles 0, 1: the int32 sums (16 rows x 16 channels) of hi and lo for one panel, 2, 3: for the next;
 * 4, 5: the hi and lo digits of 16 rows x 64 inputs; 6, 7: the two panels' weights for one step */
TAMX static void amx_configure(void) {
    static const pd_tile_config c __attribute__((aligned(64))) = {
        1, 0, {0}, {64, 64, 64, 64, 64, 64, 64, 64}, {TR, TR, TR, TR, TR, TR, TR, TR}};
    _tile_loadconfig(&c);
}

/* 16 rows (digits at row stride K, zeros past the call's rows) times two panels a and b: the sums, each
 * step's digit tiles loaded once for both (a == b computes one panel twice) */
TAMX static void panel_pair_amx(const uint8_t *wa, const uint8_t *wb, int K, const int8_t *hi, const int8_t *lo,
                                int32_t *s) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int k = 0; k < K / KT; k++) {
        for (int j = 0; j < 1024; j += 64) {   /* tile loads stall on memory without it */
            _mm_prefetch((const char *)(wa + (long)(k + PFD) * 1024 + j), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + (long)(k + PFD) * 1024 + j), _MM_HINT_T0);
        }
        _tile_loadd(4, hi + (long)k * KT, K);
        _tile_loadd(6, wa + (long)k * 1024, 64);
        _tile_loadd(5, lo + (long)k * KT, K);
        _tile_dpbsud(0, 4, 6);
        _tile_loadd(7, wb + (long)k * 1024, 64);
        _tile_dpbsud(1, 5, 6);
        _tile_dpbsud(2, 4, 7);
        _tile_dpbsud(3, 5, 7);
    }
    _tile_stored(0, s, 64);                 /* tile numbers are immediates */
    _tile_stored(1, s + TR * CG, 64);
    _tile_stored(2, s + 2 * TR * CG, 64);
    _tile_stored(3, s + 3 * TR * CG, 64);
}

/* panels [c0, c1) on the calling thread, tiles configured for it */
TAMX static void panels_amx(int c0, int c1, int M, int K, const uint8_t *w, const int8_t *hi, const int8_t *lo,
                            const int32_t *sums, const float *d, const float *scale, void *y, int y_kind, long ldy) {
    int32_t s[4 * TR * CG] __attribute__((aligned(64)));
    amx_configure();
    for (int c = c0; c < c1; c += 2) {
        const int np = c + 1 < c1 ? 2 : 1;                  /* panels in this pair */
        for (int m0 = 0; m0 < M; m0 += TR) {
            const int rows = M - m0 < TR ? M - m0 : TR;
            panel_pair_amx(w + (long)c * K * CG, w + (long)(c + np - 1) * K * CG, K, hi + (long)m0 * K,
                           lo + (long)m0 * K, s);
            for (int p = 0; p < np; p++)
                for (int r = 0; r < rows; r++) {
                    const int32_t *e = s + 2 * p * TR * CG + r * CG;
                    const __m512i h = _mm512_load_si512((const void *)e);
                    const __m512i l = _mm512_load_si512((const void *)(e + TR * CG));
                    finish_row_512(_mm512_sub_epi32(h, _mm512_set1_epi32(128 * sums[2 * (m0 + r)])),
                                   _mm512_sub_epi32(l, _mm512_set1_epi32(128 * sums[2 * (m0 + r) + 1])), d[m0 + r],
                                   scale + (long)(c + p) * CG, y, y_kind, (long)(m0 + r) * ldy + (long)(c + p) * CG);
                }
        }
    }
    _tile_release();
}
#endif

/* whether the int8 products of this process take AMX tiles for blocks of rows (for reports and tests) */
int pd_amx(void) {
#ifdef HAVE_512
    return use_amx();
#else
    return 0;
#endif
}

/* y (M, N) in y_kind (row stride ldy) = x (M, K) in x_kind (row stride ldx) times the packed weight of N
 * channels (a multiple of 16: the packing pads) and K inputs (a multiple of 4) with per-channel scales (N
 * floats), the panels on up to nt threads. Returns 0, or -1 when scratch memory could not be allocated. */
int pd_i8_i15_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, const float *scale, int N,
                 void *y, int y_kind, long ldy, int nt) {
#ifdef HAVE_512
    const int fast = pd_avx512_vnni(), amx = M >= AMX_MIN_ROWS && K % KT == 0 && use_amx();
    const int stream = pd_stream_prefetch();
#else
    const int amx = 0, stream = 0;
#endif
    const int Mp = amx ? (M + TR - 1) / TR * TR : M;     /* AMX reads whole tiles of rows: zero rows past M */
    int8_t *hi = (int8_t *)malloc((size_t)Mp * K + 1), *lo = (int8_t *)malloc((size_t)Mp * K + 1);
    int32_t *sums = (int32_t *)malloc(sizeof(int32_t) * 2 * (size_t)M);
    float *d = (float *)malloc(sizeof(float) * (size_t)M), *buf = (float *)malloc(sizeof(float) * (size_t)K);
    if (!hi || !lo || !sums || !d || !buf) {
        free(hi);
        free(lo);
        free(sums);
        free(d);
        free(buf);
        return -1;
    }
    memset(hi + (long)M * K, 0, (size_t)(Mp - M) * K);
    memset(lo + (long)M * K, 0, (size_t)(Mp - M) * K);
    for (int m = 0; m < M; m++) {
        to_f32(x, x_kind, (long)m * ldx, K, buf);
#ifdef HAVE_512
        if (fast) {
            quantize_row_512(buf, K, hi + (long)m * K, lo + (long)m * K, sums + 2 * m, d + m);
            continue;
        }
#endif
        quantize_row(buf, K, hi + (long)m * K, lo + (long)m * K, sums + 2 * m, d + m);
    }
    const int C = N / CG;
    nt = PD_THREADS(nt, (long)N * K);
    (void)nt;
#ifdef HAVE_512
    if (amx) {
#ifdef _OPENMP
        _Pragma("omp parallel num_threads(nt) if(nt > 1)")
        {
            const int t = omp_get_thread_num(), T = omp_get_num_threads();
            panels_amx((int)((long)C * t / T), (int)((long)C * (t + 1) / T), M, K, w, hi, lo, sums, d, scale, y,
                       y_kind, ldy);
        }
#else
        panels_amx(0, C, M, K, w, hi, lo, sums, d, scale, y, y_kind, ldy);
#endif
    } else
#endif
    {
        PD_PARALLEL_FOR(nt)
        for (int c = 0; c < C; c++) {
            const uint8_t *wp = w + (long)c * K * CG;
            /* A forward's matrices stream from memory (they do not stay in the caches). With more rows than one
             * register block, the passes after the first over a panel read it from L1 while no read of the
             * matrix is under way; so every pass prefetches the next panel into L2. Zen 4, the default model's
             * layer matrices, interleaved: 5 to 8 rows 0.6-0.66x the time, 16 rows 0.75x, 2 to 4 rows (one
             * pass) 0.76-0.97x; one row there 1.1x, since it reads at the memory's bandwidth already, but on
             * Intel CPUs 0.77-0.78x (simd.h: pd_stream_prefetch), so one row prefetches where that says so. */
            const uint8_t *next = (M > 1 || stream) && c + 1 < C ? wp + (long)K * CG : NULL;
            (void)next;
            for (int m0 = 0; m0 < M; m0 += MR) {
                const int rows = M - m0 < MR ? M - m0 : MR;
                const int8_t *qh = hi + (long)m0 * K, *ql = lo + (long)m0 * K;
                const long off = (long)m0 * ldy + (long)c * CG;
#ifdef HAVE_512
                if (fast) {
                    panel_512(wp, next, K, rows, qh, ql, K, sums + 2 * m0, d + m0, scale + (long)c * CG, y, y_kind,
                              ldy, off);
                    continue;
                }
#endif
                int32_t hs[MR * CG], ls[MR * CG];
                {
#if defined(__AVX2__) && defined(__FMA__)
                    for (int h = 0; h < 2; h++) {
                        switch (rows) {
                            case 1: panel_rows(wp, K, 1, h, qh, ql, K, hs, ls); break;
                            case 2: panel_rows(wp, K, 2, h, qh, ql, K, hs, ls); break;
                            case 3: panel_rows(wp, K, 3, h, qh, ql, K, hs, ls); break;
                            default: panel_rows(wp, K, 4, h, qh, ql, K, hs, ls); break;
                        }
                    }
#else
                    panel_c(wp, K, rows, qh, ql, K, hs, ls);
#endif
                }
                finish(hs, ls, rows, d + m0, scale + (long)c * CG, y, y_kind, ldy, off);
            }
        }
    }
    free(hi);
    free(lo);
    free(sums);
    free(d);
    free(buf);
    return 0;
}
