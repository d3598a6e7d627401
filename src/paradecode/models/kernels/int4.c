/* Products with int4 weights and int8 activations (the int4 format's matrices), for the native engine.
 *
 * Weights: 4-bit codes q in 0..15 per (output channel n, input k), with a bfloat16 scale and zero per
 * channel and group of 32 inputs: w = (q - 8) * scale + zero (models/quant.py, GGUF's Q4_1 blocks).
 * Activations: each row's group of 32 inputs is quantized to int8 as GGUF's Q8 blocks are:
 * d = max |a| / 127, qa = round(a / d), plus the group's exact float sum.
 *
 *   y[m][n] = sum over groups b, in order, of   scale[n][b] * d[m][b] * (sum_k q * qa - 8 * sum_k qa)
 *                                             + zero[n][b] * (sum_k a)
 *
 * The integer dot products are exact, whatever the instructions (AVX-VNNI's vpdpbusd, AVX2's
 * vpmaddubsw + vpmaddwd, or plain C), and each output's float sum runs over the groups in one fixed
 * order: an output's bits depend only on its row and its channel, not on how many rows share the call
 * (position invariance), nor on the instruction set. A row costs one read of the weights; further rows
 * of the same call reuse each channel group's weights from L1.
 *
 * Packed layout (quant.py: pack_int4_w4a8): channels in groups of 16, each group a run of 320-byte
 * blocks, one per 32 inputs: 256 bytes of codes (4 vectors of 64 bytes; byte 4j + t of vector i holds
 * channel j's codes for inputs 4i + t (low nibble) and 4(i + 4) + t (high nibble)), then 16 bfloat16
 * scales and 16 bfloat16 zeros. AVX-512 VNNI runs a group per vector (chosen at run time where the CPU
 * has it), AVX2 a half group, plain C one channel at a time: the same exact sums and float operations.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define QG 32           /* inputs per group */
#define CG 16           /* output channels per packed group */
#define BLOCK 320       /* bytes per (channel group, input group) */
#define SCALES 256      /* offset of the scales in a block; the zeros follow at 288 */
#define MR 4            /* rows per register block */
#define AHEAD 24        /* calls of at most MR rows prefetch the weights this many blocks ahead (see pd_int4_mm) */

/* one row's group of 32 inputs -> int8 codes, scale d, sum of codes, exact sum of the inputs
 * (eight partial sums, k into k % 8, added in a fixed order: the vector path's lanes are the same sums) */
__attribute__((unused)) static void quantize_group(const float *a, int8_t *q, float *d, int32_t *sq, float *sum) {
    float amax = 0.0f, part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int k = 0; k < QG; k++) {
        const float x = fabsf(a[k]);
        amax = x > amax ? x : amax;
        part[k % 8] += a[k];
    }
    *sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    const float dd = amax / 127.0f;
    int32_t s = 0;
    for (int k = 0; k < QG; k++) {
        const int v = dd > 0.0f ? (int)nearbyintf(a[k] / dd) : 0;
        q[k] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
        s += q[k];
    }
    *d = dd;
    *sq = s;
}

/* the A16 variant's two levels: quantize_group's codes, scale and sum, then its residual's codes and scale
 * (r = a - q * d, one rounding: fmaf) */
__attribute__((unused)) static void quantize_group2(const float *a, int8_t *q, int8_t *q2, float *d, float *d2,
                                                    float *sum) {
    int32_t sq;
    float r[QG], rmax = 0.0f;
    quantize_group(a, q, d, &sq, sum);
    for (int k = 0; k < QG; k++) {
        r[k] = fmaf(-(float)q[k], *d, a[k]);
        const float x = fabsf(r[k]);
        rmax = x > rmax ? x : rmax;
    }
    const float dd = rmax / 127.0f;
    for (int k = 0; k < QG; k++) {
        const int v = dd > 0.0f ? (int)nearbyintf(r[k] / dd) : 0;
        q2[k] = (int8_t)(v > 127 ? 127 : v < -127 ? -127 : v);
    }
    *d2 = dd;
}

#if defined(__AVX2__) && defined(__FMA__)
/* the largest of 8 lanes (each >= 0) */
static inline float hmax8(__m256 v) {
    float m8[8], m = 0.0f;
    _mm256_storeu_ps(m8, v);
    for (int j = 0; j < 8; j++) m = m8[j] > m ? m8[j] : m;
    return m;
}

/* a group's 32 inputs into v[4], their exact sum as quantize_group's (lane j sums inputs j, j + 8, j + 16,
 * j + 24 in that order, then the lanes in a fixed order); returns max |a| */
static inline float load_group(const float *a, __m256 *v, float *sum) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 mx = _mm256_setzero_ps(), acc = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(a + 8 * i);
        mx = _mm256_max_ps(mx, _mm256_and_ps(v[i], sign));
        acc = _mm256_add_ps(acc, v[i]);
    }
    float part[8];
    _mm256_storeu_ps(part, acc);
    *sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    return hmax8(mx);
}

/* 8 lanes' round(v / d) clamped to [-127, 127], as floats (quantize_group's numbers) */
static inline __m256 codes8(__m256 v, __m256 vd) {
    const __m256 r = _mm256_round_ps(_mm256_div_ps(v, vd), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_min_ps(_mm256_max_ps(r, _mm256_set1_ps(-127.0f)), _mm256_set1_ps(127.0f));
}

/* 8 codes as int8; returns their sum */
static inline int32_t store_codes(__m256 c, int8_t *q) {
    int32_t iv[8], s = 0;
    _mm256_storeu_si256((__m256i *)iv, _mm256_cvtps_epi32(c));
    for (int j = 0; j < 8; j++) {
        q[j] = (int8_t)iv[j];
        s += iv[j];
    }
    return s;
}

/* quantize_group's numbers with 8 lanes */
static void quantize_group_v(const float *a, int8_t *q, float *d, int32_t *sq, float *sum) {
    __m256 v[4];
    const float dd = load_group(a, v, sum) / 127.0f;
    int32_t s = 0;
    if (dd > 0.0f) {
        const __m256 vd = _mm256_set1_ps(dd);
        for (int i = 0; i < 4; i++) s += store_codes(codes8(v[i], vd), q + 8 * i);
    } else {
        memset(q, 0, QG);
    }
    *d = dd;
    *sq = s;
}

/* quantize_group2's numbers with 8 lanes */
static void quantize_group2_v(const float *a, int8_t *q, int8_t *q2, float *d, float *d2, float *sum) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 v[4];
    const float dd = load_group(a, v, sum) / 127.0f;
    *d = dd;
    if (!(dd > 0.0f)) {             /* all zero: so are the residuals */
        memset(q, 0, QG);
        memset(q2, 0, QG);
        *d2 = 0.0f;
        return;
    }
    const __m256 vd = _mm256_set1_ps(dd);
    __m256 r[4], rmx = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        const __m256 c = codes8(v[i], vd);
        store_codes(c, q + 8 * i);
        r[i] = _mm256_fnmadd_ps(c, vd, v[i]);
        rmx = _mm256_max_ps(rmx, _mm256_and_ps(r[i], sign));
    }
    const float d2d = hmax8(rmx) / 127.0f;
    *d2 = d2d;
    if (!(d2d > 0.0f)) {
        memset(q2, 0, QG);
        return;
    }
    const __m256 vd2 = _mm256_set1_ps(d2d);
    for (int i = 0; i < 4; i++) store_codes(codes8(r[i], vd2), q2 + 8 * i);
}
#define QUANTIZE_GROUP quantize_group_v
#define QUANTIZE_GROUP2 quantize_group2_v
#else
#define QUANTIZE_GROUP quantize_group
#define QUANTIZE_GROUP2 quantize_group2
#endif

/* a16: also the second level (qa2, d2; sq unused) */
static void quantize_rows(const void *x, int kind, long ldx, int M, int K, int8_t *qa, float *d, int32_t *sq,
                          float *sum, int8_t *qa2, float *d2) {
    float buf[QG];
    const int NB = K / QG;
    for (int m = 0; m < M; m++)
        for (int b = 0; b < NB; b++) {
            to_f32(x, kind, (long)m * ldx + (long)b * QG, QG, buf);
            const long g = (long)m * NB + b;
            if (qa2)
                QUANTIZE_GROUP2(buf, qa + g * QG, qa2 + g * QG, d + g, d2 + g, sum + g);
            else
                QUANTIZE_GROUP(buf, qa + g * QG, d + g, sq + g, sum + g);
        }
}

/* a float16's value (the A16 blocks' scales and lows): normals, subnormals, zeros, infinities */
static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    uint32_t bits;
    if (e == 0) {
        const float v = ldexpf((float)m, -24);
        memcpy(&bits, &v, 4);
        bits |= sign;
    } else if (e == 31) {
        bits = sign | 0x7f800000u | (m << 13);
    } else {
        bits = sign | ((e + 112) << 23) | (m << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#if defined(__AVX2__)
#include <immintrin.h>
#if defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#else   /* u8 x s8 pairs into int16 (at most 2 * 15 * 127: no saturation), then pairs into int32 */
#define DPBUSD(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#endif

static inline __m256 load8_bf16(const uint8_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline __m256 load8_f16(const uint8_t *p) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    float f[8];
    for (int j = 0; j < 8; j++) {
        uint16_t h;
        memcpy(&h, p + 2 * j, 2);
        f[j] = f16_to_f32(h);
    }
    return _mm256_loadu_ps(f);
#endif
}

/* ROWS rows of one half (h: channels 8h .. 8h + 7) of a channel group: acc[r] = its outputs for row r.
 * A16: the second level's codes qa2 and scales d2 too, float16 scales and lows (sq unused) */
static inline __attribute__((always_inline)) void group_rows(const uint8_t *w, int NB, const int ROWS, int h,
                                                             const int8_t *qa, const float *d, const int32_t *sq,
                                                             const float *sum, __m256 *acc, const uint8_t *end,
                                                             const int A16, const int8_t *qa2, const float *d2) {
    const __m256i lo = _mm256_set1_epi8(0x0f);
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < NB; b++) {
        const uint8_t *blk = w + (long)b * BLOCK;
        if (end && blk + AHEAD * BLOCK < end)     /* the stream AHEAD blocks on, into L2 (see pd_int4_mm) */
            for (int l = 0; l < BLOCK; l += 64) _mm_prefetch((const char *)(blk + AHEAD * BLOCK + l), _MM_HINT_T1);
        __m256i dot[MR][2], dot2[MR][2];    /* two independent chains per row and level (integer sums: exact) */
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
            dot[r][0] = dot[r][1] = _mm256_setzero_si256();
            if (A16) dot2[r][0] = dot2[r][1] = _mm256_setzero_si256();
        }
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
            const __m256i p = _mm256_loadu_si256((const __m256i *)(blk + 64 * i + 32 * h));
            const __m256i u0 = _mm256_and_si256(p, lo), u1 = _mm256_and_si256(_mm256_srli_epi16(p, 4), lo);
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
                const int8_t *q = qa + ((long)r * NB + b) * QG;
                int32_t a0, a1;
                memcpy(&a0, q + 4 * i, 4);
                memcpy(&a1, q + 4 * (i + 4), 4);
                dot[r][0] = DPBUSD(dot[r][0], u0, _mm256_set1_epi32(a0));
                dot[r][1] = DPBUSD(dot[r][1], u1, _mm256_set1_epi32(a1));
                if (A16) {
                    const int8_t *q2 = qa2 + ((long)r * NB + b) * QG;
                    memcpy(&a0, q2 + 4 * i, 4);
                    memcpy(&a1, q2 + 4 * (i + 4), 4);
                    dot2[r][0] = DPBUSD(dot2[r][0], u0, _mm256_set1_epi32(a0));
                    dot2[r][1] = DPBUSD(dot2[r][1], u1, _mm256_set1_epi32(a1));
                }
            }
        }
        if (A16) {
            const __m256 sc = load8_f16(blk + SCALES + 16 * h), lw = load8_f16(blk + SCALES + 32 + 16 * h);
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
                const long g = (long)r * NB + b;
                const __m256i i1 = _mm256_add_epi32(dot[r][0], dot[r][1]);
                const __m256i i2 = _mm256_add_epi32(dot2[r][0], dot2[r][1]);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(d[g])), _mm256_cvtepi32_ps(i1), acc[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(d2[g])), _mm256_cvtepi32_ps(i2), acc[r]);
                acc[r] = _mm256_fmadd_ps(lw, _mm256_set1_ps(sum[g]), acc[r]);
            }
            continue;
        }
        const __m256 sc = load8_bf16(blk + SCALES + 16 * h), ze = load8_bf16(blk + SCALES + 32 + 16 * h);
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
            const long g = (long)r * NB + b;
            const __m256i idot = _mm256_sub_epi32(_mm256_add_epi32(dot[r][0], dot[r][1]), _mm256_set1_epi32(8 * sq[g]));
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(d[g])), _mm256_cvtepi32_ps(idot), acc[r]);
            acc[r] = _mm256_fmadd_ps(ze, _mm256_set1_ps(sum[g]), acc[r]);
        }
    }
}
#endif

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)   /* an upgrade of the AVX2 build */
#define HAVE_512 1
#define T512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
/* a whole channel group per vector: what group_rows does for one half, for all 16 channels */
T512 static inline __attribute__((always_inline)) void group_rows_512(const uint8_t *w, int NB, const int ROWS,
                                                                      const int8_t *qa, const float *d,
                                                                      const int32_t *sq, const float *sum,
                                                                      __m512 *acc, const uint8_t *next,
                                                                      const uint8_t *end, const int A16,
                                                                      const int8_t *qa2, const float *d2) {
    const __m512i lo = _mm512_set1_epi8(0x0f);
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int b = 0; b < NB; b++) {
        const uint8_t *blk = w + (long)b * BLOCK;
        if (next)                           /* the next channel group's block, into L2 (see pd_int4_mm) */
            for (int l = 0; l < BLOCK; l += 64) _mm_prefetch((const char *)(next + (long)b * BLOCK + l), _MM_HINT_T1);
        else if (end && blk + AHEAD * BLOCK < end)   /* the stream AHEAD blocks on, into L2 */
            for (int l = 0; l < BLOCK; l += 64) _mm_prefetch((const char *)(blk + AHEAD * BLOCK + l), _MM_HINT_T1);
        /* four independent chains per row (integer sums: exact); A16: two per level */
        __m512i dot[MR][4];
        if (A16)
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
                dot[r][0] = dot[r][1] = dot[r][2] = dot[r][3] = _mm512_setzero_si512();
        _Pragma("GCC unroll 4") for (int i = 0; i < 4; i++) {
            const __m512i p = _mm512_loadu_si512((const void *)(blk + 64 * i));
            const __m512i u0 = _mm512_and_si512(p, lo), u1 = _mm512_and_si512(_mm512_srli_epi16(p, 4), lo);
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
                const int8_t *q = qa + ((long)r * NB + b) * QG;
                int32_t a0, a1;
                memcpy(&a0, q + 4 * i, 4);
                memcpy(&a1, q + 4 * (i + 4), 4);
                if (A16) {
                    const int8_t *q2 = qa2 + ((long)r * NB + b) * QG;
                    int32_t b0, b1;
                    memcpy(&b0, q2 + 4 * i, 4);
                    memcpy(&b1, q2 + 4 * (i + 4), 4);
                    dot[r][i & 1] = _mm512_dpbusd_epi32(dot[r][i & 1], u0, _mm512_set1_epi32(a0));
                    dot[r][i & 1] = _mm512_dpbusd_epi32(dot[r][i & 1], u1, _mm512_set1_epi32(a1));
                    dot[r][2 + (i & 1)] = _mm512_dpbusd_epi32(dot[r][2 + (i & 1)], u0, _mm512_set1_epi32(b0));
                    dot[r][2 + (i & 1)] = _mm512_dpbusd_epi32(dot[r][2 + (i & 1)], u1, _mm512_set1_epi32(b1));
                } else {
                    dot[r][i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u0, _mm512_set1_epi32(a0));
                    dot[r][i] = _mm512_dpbusd_epi32(dot[r][i], u1, _mm512_set1_epi32(a1));
                }
            }
        }
        if (A16) {
            const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + SCALES)));
            const __m512 lw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + SCALES + 32)));
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
                const long g = (long)r * NB + b;
                const __m512i i1 = _mm512_add_epi32(dot[r][0], dot[r][1]), i2 = _mm512_add_epi32(dot[r][2], dot[r][3]);
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(d[g])), _mm512_cvtepi32_ps(i1), acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(d2[g])), _mm512_cvtepi32_ps(i2), acc[r]);
                acc[r] = _mm512_fmadd_ps(lw, _mm512_set1_ps(sum[g]), acc[r]);
            }
            continue;
        }
        const __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + SCALES))), 16));
        const __m512 ze = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(blk + SCALES + 32))), 16));
        _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) {
            const long g = (long)r * NB + b;
            const __m512i sum4 = _mm512_add_epi32(_mm512_add_epi32(dot[r][0], dot[r][1]),
                                                  _mm512_add_epi32(dot[r][2], dot[r][3]));
            const __m512i idot = _mm512_sub_epi32(sum4, _mm512_set1_epi32(8 * sq[g]));
            acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(d[g])), _mm512_cvtepi32_ps(idot), acc[r]);
            acc[r] = _mm512_fmadd_ps(ze, _mm512_set1_ps(sum[g]), acc[r]);
        }
    }
}

#define GROUP_512(A16)                                                                                          \
    switch (rows) {                                                                                             \
        case 1: group_rows_512(wg, NB, 1, q, d, sq, sum, acc, next, end, A16, q2, d2); break;                   \
        case 2: group_rows_512(wg, NB, 2, q, d, sq, sum, acc, next, end, A16, q2, d2); break;                   \
        case 3: group_rows_512(wg, NB, 3, q, d, sq, sum, acc, next, end, A16, q2, d2); break;                   \
        default: group_rows_512(wg, NB, 4, q, d, sq, sum, acc, next, end, A16, q2, d2); break;                  \
    }

T512 static void group_512(const uint8_t *wg, int NB, int rows, const int8_t *q, const float *d, const int32_t *sq,
                           const float *sum, float *out, const uint8_t *next, const uint8_t *end, const int8_t *q2,
                           const float *d2) {
    __m512 acc[MR];
    if (q2) {
        GROUP_512(1)
    } else {
        GROUP_512(0)
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(out + r * CG, acc[r]);
}

#endif

/* the same sums in plain C (the vector paths' bits: exact integer dots, the same float operations) */
__attribute__((unused)) static void group_rows_c(const uint8_t *w, int NB, int rows, const int8_t *qa, const float *d,
                                                 const int32_t *sq, const float *sum, float *acc, const int8_t *qa2,
                                                 const float *d2) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < CG; j++) acc[r * CG + j] = 0.0f;
    for (int b = 0; b < NB; b++) {
        const uint8_t *blk = w + (long)b * BLOCK;
        for (int r = 0; r < rows; r++) {
            const long g = (long)r * NB + b;
            const int8_t *q = qa + g * QG, *q2 = qa2 ? qa2 + g * QG : NULL;
            for (int j = 0; j < CG; j++) {
                int32_t dot = 0, dot2 = 0;
                for (int i = 0; i < 4; i++)
                    for (int t = 0; t < 4; t++) {
                        const uint8_t byte = blk[64 * i + 4 * j + t];
                        dot += (int32_t)(byte & 0x0f) * q[4 * i + t] + (int32_t)(byte >> 4) * q[4 * (i + 4) + t];
                        if (q2)
                            dot2 += (int32_t)(byte & 0x0f) * q2[4 * i + t] + (int32_t)(byte >> 4) * q2[4 * (i + 4) + t];
                    }
                uint16_t sb, zb;
                memcpy(&sb, blk + SCALES + 2 * j, 2);
                memcpy(&zb, blk + SCALES + 32 + 2 * j, 2);
                if (q2) {
                    const float s = f16_to_f32(sb);
                    acc[r * CG + j] = fmaf(s * d[g], (float)dot, acc[r * CG + j]);
                    acc[r * CG + j] = fmaf(s * d2[g], (float)dot2, acc[r * CG + j]);
                    acc[r * CG + j] = fmaf(f16_to_f32(zb), sum[g], acc[r * CG + j]);
                } else {
                    acc[r * CG + j] = fmaf(bf16_to_f32(sb) * d[g], (float)(dot - 8 * sq[g]), acc[r * CG + j]);
                    acc[r * CG + j] = fmaf(bf16_to_f32(zb), sum[g], acc[r * CG + j]);
                }
            }
        }
    }
}

#if defined(__AVX2__)
#define GROUP_AVX2(A16)                                                                                         \
    switch (rows) {                                                                                             \
        case 1: group_rows(wg, NB, 1, h, q, d + g0, sq + g0, sum + g0, acc, h ? NULL : end, A16, q2, d2g); break; \
        case 2: group_rows(wg, NB, 2, h, q, d + g0, sq + g0, sum + g0, acc, h ? NULL : end, A16, q2, d2g); break; \
        case 3: group_rows(wg, NB, 3, h, q, d + g0, sq + g0, sum + g0, acc, h ? NULL : end, A16, q2, d2g); break; \
        default: group_rows(wg, NB, 4, h, q, d + g0, sq + g0, sum + g0, acc, h ? NULL : end, A16, q2, d2g); break; \
    }
#endif

/* y (M, N) in y_kind (row stride ldy) = x (M, K) in x_kind (row stride ldx) times the packed weight of
 * N channels (N a multiple of 16: the packing pads) and K inputs (a multiple of 32), the channel groups
 * on up to nt threads (simd.h: PD_PARALLEL_FOR); a16: the A16 variant's blocks and activations.
 * Returns 0, or -1 when scratch memory could not be allocated. */
static int int4_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, int N, void *y, int y_kind,
                   long ldy, int nt, int a16) {
    const int NB = K / QG;
    int8_t *qa = (int8_t *)malloc((size_t)M * K + 1);
    float *d = (float *)malloc(sizeof(float) * ((size_t)M * NB + 1));
    int32_t *sq = (int32_t *)malloc(sizeof(int32_t) * ((size_t)M * NB + 1));
    float *sum = (float *)malloc(sizeof(float) * ((size_t)M * NB + 1));
    int8_t *qa2 = a16 ? (int8_t *)malloc((size_t)M * K + 1) : NULL;
    float *d2 = a16 ? (float *)malloc(sizeof(float) * ((size_t)M * NB + 1)) : NULL;
    if (!qa || !d || !sq || !sum || (a16 && (!qa2 || !d2))) {
        free(qa);
        free(d);
        free(sq);
        free(sum);
        free(qa2);
        free(d2);
        return -1;
    }
    quantize_rows(x, x_kind, ldx, M, K, qa, d, sq, sum, qa2, d2);
#ifdef HAVE_512
    const int fast = pd_avx512_vnni(), stream = pd_stream_prefetch();
#else
    const int stream = 0;
#endif
    nt = PD_THREADS(nt, (long)N * K);
    (void)nt;
    PD_PARALLEL_FOR(nt)
    for (int c = 0; c < N / CG; c++) {
        const uint8_t *wg = w + (long)c * NB * BLOCK;
        /* as in int8.c: with more rows than one pass takes, every pass prefetches the next channel group into
         * L2 (Zen 4, after a 512-token prompt, interleaved: int4 forwards of 5 to 16 tokens 0.90-0.94x the
         * time; 2 to 4 rows gained nothing) */
        const uint8_t *next = M > MR && c + 1 < N / CG ? wg + (long)NB * BLOCK : NULL;
        /* with at most MR rows (one pass: plain decoding, quantspec's twin) the weights are one stream; on
         * Intel CPUs (simd.h: pd_stream_prefetch) prefetching it AHEAD blocks on into L2 (across channel
         * groups, up to the matrix's end) makes it faster to read. The default model's 120 int4 layer
         * matrices at one row, 1 thread, Xeon with AMX, interleaved: right after the bfloat16 model's products
         * (what quantspec's twin meets after a verification) 0.81x the time, 12 to 32 blocks ahead alike
         * (into L1 instead: 1.08x, slower); warm in the L3 0.69x (into L1 the same) */
        const uint8_t *end = stream && M <= MR ? w + (long)(N / CG) * NB * BLOCK : NULL;
        (void)next;
        (void)end;
        for (int m0 = 0; m0 < M; m0 += MR) {
            const int rows = M - m0 < MR ? M - m0 : MR;
            const int8_t *q = qa + (long)m0 * K, *q2 = a16 ? qa2 + (long)m0 * K : NULL;
            const long g0 = (long)m0 * NB;
            const float *d2g = a16 ? d2 + g0 : NULL;
            float out[MR * CG];
#ifdef HAVE_512
            if (fast) {
                group_512(wg, NB, rows, q, d + g0, sq + g0, sum + g0, out, next, end, q2, d2g);
            } else
#endif
            {
#if defined(__AVX2__)
                for (int h = 0; h < 2; h++) {
                    __m256 acc[MR];
                    if (a16) {
                        GROUP_AVX2(1)
                    } else {
                        GROUP_AVX2(0)
                    }
                    for (int r = 0; r < rows; r++) _mm256_storeu_ps(out + r * CG + 8 * h, acc[r]);
                }
#else
                group_rows_c(wg, NB, rows, q, d + g0, sq + g0, sum + g0, out, q2, d2g);
#endif
            }
            for (int r = 0; r < rows; r++) from_f32(y, y_kind, (long)(m0 + r) * ldy + (long)c * CG, CG, out + r * CG);
        }
    }
    free(qa);
    free(d);
    free(sq);
    free(sum);
    free(qa2);
    free(d2);
    return 0;
}

int pd_int4_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, int N, void *y, int y_kind,
               long ldy, int nt) {
    return int4_mm(x, x_kind, ldx, M, K, w, N, y, y_kind, ldy, nt, 0);
}

/* the A16 variant (see the top of this file) */
int pd_int4_a16_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, int N, void *y, int y_kind,
                   long ldy, int nt) {
    return int4_mm(x, x_kind, ldx, M, K, w, N, y, y_kind, ldy, nt, 1);
}
