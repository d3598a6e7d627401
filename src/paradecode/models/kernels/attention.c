/* Attention of a short block of new tokens against the KV cache, for the native engine.
 *
 * Every output row is computed by one fixed sequence of operations that depends only on the row's
 * query and on the keys/values it may see, in cache order:
 *
 *   score[s] = (sum over d, in order, of q[d] * K[d][s], one fused multiply-add per step) * scale
 *   e[s]     = exp(score[s] - max over visible s of score)
 *   out      = (sum over visible s, in order, of e[s] * V[s]) / (sum over visible s, in order, of e[s])
 *
 * Nothing depends on how many tokens share the call, on where the row sits in it, on how many
 * slots the cache holds beyond the visible ones, or on the thread count (one thread computes a row
 * whole). So a token's attention output has the same bits alone, in a block, and as a
 * node of a token tree whose ancestors sit at other cache slots: masked slots are skipped, never
 * added as zeros. This is what lets greedy verification use every tree node's logits.
 *
 * Work is dealt out per (sequence, kv head, block of TB new tokens): the query rows of those tokens' G heads
 * share every block of keys and every chunk of values read from the cache (a 16-token verification call
 * reads the cache twice per layer, not 16 times). A token's visible slots are a list; its head, the slots
 * 0 .. p-1 that every token of a verification call sees (the cache before the call), is found with one
 * memchr and read with straight vector loads in the max and the sum: the list's operations, so the same
 * bits. Plain C with AVX2+FMA intrinsics where the compiler
 * targets them, portable scalar C elsewhere (same formulas, its own bits; the engine's invariance holds
 * per machine, not across machines). The loader compiles without AVX-512 on x86; where the CPU has it
 * (and PARADECODE_NO_AVX512 is unset) the scores and the weighted sums run 16 lanes wide, each lane doing
 * the AVX2 code's operations in its order, so the bits are the same (tested).
 * The cache holds float32 or bfloat16 keys and values (kk: KIND_F32 or KIND_BF16, one kind for both); a
 * bfloat16 element is widened to float32 exactly where it is read, so the formulas above and their order are
 * the same for either storage, and a bfloat16 cache reads half the bytes.
 * Loaded with ctypes by paradecode/models/kernels/__init__.py, which compiles it once per CPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define SB PD_KEY_BLOCK   /* slots per score block; the keys are stored in whole blocks (kbs: elements apart) */
#define RB 4    /* query rows per register block */
#define TB 8    /* new tokens per work item: their query rows share every block of keys and values read */
#define CH 32   /* slots per chunk of values that the rows of a work item take in turn */
#define PFS 64  /* slots ahead whose keys score_block prefetches */

/* element i of the cache storage p of kind kk, as float32 (a bfloat16 widens exactly) */
static inline __attribute__((always_inline)) float kv_at(const void *p, const int kk, long i) {
    return kk == KIND_BF16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* the address of element i of the cache storage p of kind kk */
static inline __attribute__((always_inline)) const char *kv_addr(const void *p, const int kk, long i) {
    return (const char *)p + i * pd_kind_size(kk);
}

#ifdef VW
#define TV (SB / VW)   /* vectors per slot block */

/* VW elements of the cache storage from element i, as float32 */
static inline __attribute__((always_inline)) vf kv_vload(const void *p, const int kk, long i) {
    return kk == KIND_BF16 ? vload_bf16((const uint16_t *)p + i) : vload((const float *)p + i);
}
/* the keys of dimension d (odd: d % 2) for VW slots from slot j * VW of the block whose row of d starts at
 * element kd (pd_key_at): a bfloat16 pair row holds both dimensions of a pair, each widened exactly */
static inline __attribute__((always_inline)) vf key_vload(const void *K, const int KK, long kd, int j, int odd) {
    if (KK != KIND_BF16) return vload((const float *)K + kd + j * VW);
    const __m256i x = _mm256_loadu_si256((const __m256i *)((const uint16_t *)K + kd + 2 * j * VW));
    return _mm256_castsi256_ps(odd ? _mm256_and_si256(x, _mm256_set1_epi32((int)0xFFFF0000u))
                                   : _mm256_slli_epi32(x, 16));
}

/* element kd of the block's rows (pd_key_at) where dimension d's keys are */
static inline __attribute__((always_inline)) long key_row(const int KK, long ldk, long blk, int d) {
    return blk + (KK == KIND_BF16 ? (long)(d / 2) * ldk : (long)d * ldk);
}

/* scores of ROWS query rows against the slots of [s0, s0 + SB): each lane one slot, d in order */
static inline __attribute__((always_inline)) void score_block(const float *const *q, const int ROWS,
                                                              const void *K, const int KK, long ldk, long kbs, int D,
                                                              int s0, float scale, float *sc, long ldsc) {
    vf acc[RB][TV];
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < TV; j++) acc[r][j] = vzero();
    for (int d = 0; d < D; d++) {
        const long kd = key_row(KK, ldk, (long)(s0 / SB) * kbs, d);
        _mm_prefetch(kv_addr(K, KK, kd + PFS / SB * kbs), _MM_HINT_T0);
        _Pragma("GCC unroll 4") for (int j = 0; j < TV; j++) {
            const vf k = key_vload(K, KK, kd, j, d & 1);
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) acc[r][j] = vfma(vset1(q[r][d]), k, acc[r][j]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < TV; j++) vstore(sc + r * ldsc + s0 + j * VW, vmul(acc[r][j], vset1(scale)));
}
#endif

/* scores of `rows` query rows (q[r]) against slots [0, S) rounded up to whole blocks of SB: sc[r*ldsc + s].
 * Keys of kind KK, slot s of dimension d at K[pd_key_at(KK, ldk, kbs, d, s)]. Each block of keys is read once
 * for all the rows. */
static inline __attribute__((always_inline)) void scores_kind(const float *const *q, int rows, const void *K,
                                                              const int KK, long ldk, long kbs, int D, int S,
                                                              float scale, float *sc, long ldsc) {
#ifdef VW
    for (int s0 = 0; s0 < S; s0 += SB)
        for (int r0 = 0; r0 < rows; r0 += RB) {
            float *o = sc + r0 * ldsc;
            switch (rows - r0 < RB ? rows - r0 : RB) {
                case 1: score_block(q + r0, 1, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 2: score_block(q + r0, 2, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 3: score_block(q + r0, 3, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                default: score_block(q + r0, 4, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
            }
        }
#else
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < S; s++) {
            float a = 0.0f;
            for (int d = 0; d < D; d++)
                a = fmaf(q[r][d], kv_at(K, KK, pd_key_at(KK, ldk, kbs, d, s)), a);
            sc[r * ldsc + s] = a * scale;
        }
#endif
}

static void scores(const float *const *q, int rows, const void *K, int kk, long ldk, long kbs, int D, int S,
                   float scale, float *sc, long ldsc) {
    if (kk == KIND_BF16)
        scores_kind(q, rows, K, KIND_BF16, ldk, kbs, D, S, scale, sc, ldsc);
    else
        scores_kind(q, rows, K, KIND_F32, ldk, kbs, D, S, scale, sc, ldsc);
}

/* the largest of sc[slot[i]] over the list, whose first p entries are the slots 0 .. p-1: eight
 * independent running maxima (a max does not depend on the order it is taken in), so no chain of n
 * dependent compares; over the contiguous head, straight vector loads */
static float visible_max(const float *sc, const int *slot, int n, int p) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int i = 0;
#if defined(VW) && VW == 8
    vf acc = vset1(-INFINITY), acc1 = acc, acc2 = acc, acc3 = acc;      /* four chains: no wait on one */
    for (; i + 32 <= p; i += 32) {             /* a NaN score is passed over (the accumulator stays), as below */
        acc = vmax(vload(sc + i), acc);
        acc1 = vmax(vload(sc + i + 8), acc1);
        acc2 = vmax(vload(sc + i + 16), acc2);
        acc3 = vmax(vload(sc + i + 24), acc3);
    }
    for (; i + 8 <= p; i += 8) acc = vmax(vload(sc + i), acc);
    vstore(m, vmax(vmax(acc, acc1), vmax(acc2, acc3)));
#endif
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) m[j] = sc[slot[i + j]] > m[j] ? sc[slot[i + j]] : m[j];
    for (; i < n; i++) m[0] = sc[slot[i]] > m[0] ? sc[slot[i]] : m[0];
    for (int j = 1; j < 8; j++) m[0] = m[j] > m[0] ? m[j] : m[0];
    return m[0];
}

/* e[s] = exp(sc[s] - m) for every s in [0, S) rounded up to SB (values at masked slots are unused) */
static void exps(float *sc, int S, float m) {
#ifdef VW
    const vf vm = vset1(m);
    for (int s0 = 0; s0 < S; s0 += VW) vstore(sc + s0, vexp(vsub(vload(sc + s0), vm)));
#else
    for (int s = 0; s < S; s++) sc[s] = expf(sc[s] - m);
#endif
}

/* the sum of e[slot[i]] over the list, whose first p entries are the slots 0 .. p-1: eight partial sums
 * (entry i into i % 8, each in list order; over the contiguous head, the lanes of one vector), added in a
 * fixed order */
static float visible_sum(const float *e, const int *slot, int n, int p) {
    float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int i = 0;
#if defined(VW) && VW == 8
    vf acc = vzero();
    for (; i + 8 <= p; i += 8) acc = vadd(acc, vload(e + i));
    vstore(part, acc);
#endif
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) part[j] += e[slot[i + j]];
    for (int j = 0; i < n; i++, j++) part[j] += e[slot[i]];
    return ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
}

#ifdef VW
/* o[0:NV*VW) += e[s] * V[s][0:NV*VW) over the listed slots, in order (o holds the running sums) */
static inline __attribute__((always_inline)) void weighted_chunk(const float *e, const int *slot, int n,
                                                                 const void *V, const int KK, long ldv, int d0,
                                                                 const int NV, float *o) {
    vf acc[8];
    _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) acc[j] = vload(o + j * VW);
    for (int i = 0; i < n; i++) {
        const int s = slot[i];
        const vf w = vset1(e[s]);
        const long v = (long)s * ldv + d0;
        _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) acc[j] = vfma(w, kv_vload(V, KK, v + j * VW), acc[j]);
    }
    _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) vstore(o + j * VW, acc[j]);
}
#endif

/* o[0:D) += e[s] * V[s] over the listed slots, in order: one running sum per output element */
static inline __attribute__((always_inline)) void weighted_kind(const float *e, const int *slot, int n,
                                                                const void *V, const int KK, long ldv, int D,
                                                                float *o) {
#ifdef VW
    if (D % VW == 0) {
        for (int d0 = 0; d0 < D; d0 += 8 * VW) {
            const int nv = (D - d0) / VW < 8 ? (D - d0) / VW : 8;
            switch (nv) {
                case 1: weighted_chunk(e, slot, n, V, KK, ldv, d0, 1, o + d0); break;
                case 2: weighted_chunk(e, slot, n, V, KK, ldv, d0, 2, o + d0); break;
                case 3: weighted_chunk(e, slot, n, V, KK, ldv, d0, 3, o + d0); break;
                case 4: weighted_chunk(e, slot, n, V, KK, ldv, d0, 4, o + d0); break;
                case 5: weighted_chunk(e, slot, n, V, KK, ldv, d0, 5, o + d0); break;
                case 6: weighted_chunk(e, slot, n, V, KK, ldv, d0, 6, o + d0); break;
                case 7: weighted_chunk(e, slot, n, V, KK, ldv, d0, 7, o + d0); break;
                default: weighted_chunk(e, slot, n, V, KK, ldv, d0, 8, o + d0); break;
            }
        }
        return;
    }
#endif
    for (int i = 0; i < n; i++) {
        const int s = slot[i];
        const float w = e[s];
        const long v = (long)s * ldv;
        for (int d = 0; d < D; d++) o[d] = fmaf(w, kv_at(V, KK, v + d), o[d]);
    }
}

static void weighted(const float *e, const int *slot, int n, const void *V, int kk, long ldv, int D, float *o) {
    if (kk == KIND_BF16)
        weighted_kind(e, slot, n, V, KIND_BF16, ldv, D, o);
    else
        weighted_kind(e, slot, n, V, KIND_F32, ldv, D, o);
}

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)   /* upgrades of the AVX2 build */
#define HAVE_512 1
#define T512 __attribute__((target("avx512f")))
#define RW 6    /* rows per value register block with AVX-512 */

/* 16 elements of the cache storage from element i, as float32 */
T512 static inline __attribute__((always_inline)) __m512 kv_vload_512(const void *p, const int kk, long i) {
    if (kk == KIND_BF16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

/* the keys of dimension d (odd: d % 2) of the 16 slots of a block whose row of d starts at element kd */
T512 static inline __attribute__((always_inline)) __m512 key_vload_512(const void *K, const int KK, long kd, int odd) {
    if (KK != KIND_BF16) return _mm512_loadu_ps((const float *)K + kd);
    const __m512i x = _mm512_loadu_si512((const void *)((const uint16_t *)K + kd));
    return _mm512_castsi512_ps(odd ? _mm512_and_si512(x, _mm512_set1_epi32((int)0xFFFF0000u)) : _mm512_slli_epi32(x, 16));
}

/* score_block's numbers for one block of SB = 16 slots (one vector) and up to 8 rows */
T512 static inline __attribute__((always_inline)) void score_block_512(const float *const *q, const int ROWS,
                                                                      const void *K, const int KK, long ldk, long kbs,
                                                                      int D, int s0, float scale, float *sc,
                                                                      long ldsc) {
    __m512 acc[8];
    _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) acc[r] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const long kd = key_row(KK, ldk, (long)(s0 / SB) * kbs, d);
        _mm_prefetch(kv_addr(K, KK, kd + PFS / SB * kbs), _MM_HINT_T0);
        const __m512 k = key_vload_512(K, KK, kd, d & 1);
        _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(q[r][d]), k, acc[r]);
    }
    _Pragma("GCC unroll 8") for (int r = 0; r < ROWS; r++)
        _mm512_storeu_ps(sc + r * ldsc + s0, _mm512_mul_ps(acc[r], _mm512_set1_ps(scale)));
}

/* score_block_512's numbers for four blocks (64 slots) at once and up to 6 rows: the four blocks' keys of
 * each dimension read together, those of the next four blocks prefetched */
T512 static inline __attribute__((always_inline)) void score_wide_512(const float *const *q, const int ROWS,
                                                                     const void *K, const int KK, long ldk, long kbs,
                                                                     int D, int s0, float scale, float *sc,
                                                                     long ldsc) {
    __m512 acc[6][4];
    _Pragma("GCC unroll 6") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int d = 0; d < D; d++) {
        const long kd = key_row(KK, ldk, (long)(s0 / SB) * kbs, d);
        const int odd = d & 1;
        _Pragma("GCC unroll 4") for (int j = 4; j < 8; j++) _mm_prefetch(kv_addr(K, KK, kd + j * kbs), _MM_HINT_T0);
        const __m512 k0 = key_vload_512(K, KK, kd, odd), k1 = key_vload_512(K, KK, kd + kbs, odd),
                     k2 = key_vload_512(K, KK, kd + 2 * kbs, odd), k3 = key_vload_512(K, KK, kd + 3 * kbs, odd);
        _Pragma("GCC unroll 6") for (int r = 0; r < ROWS; r++) {
            const __m512 x = _mm512_set1_ps(q[r][d]);
            acc[r][0] = _mm512_fmadd_ps(x, k0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(x, k1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(x, k2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(x, k3, acc[r][3]);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++)
            _mm512_storeu_ps(sc + r * ldsc + s0 + j * SB, _mm512_mul_ps(acc[r][j], _mm512_set1_ps(scale)));
}

T512 static inline __attribute__((always_inline)) void scores_512_kind(const float *const *q, int rows,
                                                                      const void *K, const int KK, long ldk, long kbs,
                                                                      int D, int S, float scale, float *sc,
                                                                      long ldsc) {
    int s0 = 0;
    for (; rows >= 6 && s0 + 4 * SB <= S; s0 += 4 * SB)      /* few rows: the narrow blocks below are faster */
        for (int r0 = 0; r0 < rows; r0 += 6) {
            float *o = sc + r0 * ldsc;
            switch (rows - r0 < 6 ? rows - r0 : 6) {
                case 1: score_wide_512(q + r0, 1, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 2: score_wide_512(q + r0, 2, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 3: score_wide_512(q + r0, 3, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 4: score_wide_512(q + r0, 4, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 5: score_wide_512(q + r0, 5, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                default: score_wide_512(q + r0, 6, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
            }
        }
    for (; s0 < S; s0 += SB)
        for (int r0 = 0; r0 < rows; r0 += 8) {
            float *o = sc + r0 * ldsc;
            switch (rows - r0 < 8 ? rows - r0 : 8) {
                case 1: score_block_512(q + r0, 1, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 2: score_block_512(q + r0, 2, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 3: score_block_512(q + r0, 3, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 4: score_block_512(q + r0, 4, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 5: score_block_512(q + r0, 5, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 6: score_block_512(q + r0, 6, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                case 7: score_block_512(q + r0, 7, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
                default: score_block_512(q + r0, 8, K, KK, ldk, kbs, D, s0, scale, o, ldsc); break;
            }
        }
}

T512 static void scores_512(const float *const *q, int rows, const void *K, int kk, long ldk, long kbs, int D, int S,
                            float scale, float *sc, long ldsc) {
    if (kk == KIND_BF16)
        scores_512_kind(q, rows, K, KIND_BF16, ldk, kbs, D, S, scale, sc, ldsc);
    else
        scores_512_kind(q, rows, K, KIND_F32, ldk, kbs, D, S, scale, sc, ldsc);
}

/* weighted's numbers for ROWS rows that share one slot list (heads of one token), 64 outputs (d0 ..) at a
 * time: each value vector read once for all the rows */
T512 static inline __attribute__((always_inline)) void weighted_rows_512(const float *const *e, const int ROWS,
                                                                        const int *slot, int n, const void *V,
                                                                        const int KK, long ldv, int d0,
                                                                        float *const *o) {
    __m512 acc[RW][4];
    _Pragma("GCC unroll 6") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) acc[r][j] = _mm512_loadu_ps(o[r] + d0 + 16 * j);
    for (int i = 0; i < n; i++) {
        const int s = slot[i];
        const long v = (long)s * ldv + d0;
        const __m512 v0 = kv_vload_512(V, KK, v), v1 = kv_vload_512(V, KK, v + 16),
                     v2 = kv_vload_512(V, KK, v + 32), v3 = kv_vload_512(V, KK, v + 48);
        _Pragma("GCC unroll 6") for (int r = 0; r < ROWS; r++) {
            const __m512 w = _mm512_set1_ps(e[r][s]);
            acc[r][0] = _mm512_fmadd_ps(w, v0, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w, v1, acc[r][1]);
            acc[r][2] = _mm512_fmadd_ps(w, v2, acc[r][2]);
            acc[r][3] = _mm512_fmadd_ps(w, v3, acc[r][3]);
        }
    }
    _Pragma("GCC unroll 6") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < 4; j++) _mm512_storeu_ps(o[r] + d0 + 16 * j, acc[r][j]);
}

/* exps's numbers 16 lanes at a time (simd.h's vexp_512: the same roundings) */
T512 static void exps_512(float *sc, int S, float m) {
    const __m512 vm = _mm512_set1_ps(m);
    for (int s0 = 0; s0 < S; s0 += 16) _mm512_storeu_ps(sc + s0, vexp_512(_mm512_sub_ps(_mm512_loadu_ps(sc + s0), vm)));
}

/* o[r] += e[r][s] * V[s] over one slot list for `rows` rows; D a multiple of 64 */
T512 static inline __attribute__((always_inline)) void weighted_512_kind(const float *const *e, int rows,
                                                                        const int *slot, int n, const void *V,
                                                                        const int KK, long ldv, int D,
                                                                        float *const *o) {
    for (int r0 = 0; r0 < rows; r0 += RW)
        for (int d0 = 0; d0 < D; d0 += 64) {
            switch (rows - r0 < RW ? rows - r0 : RW) {
                case 1: weighted_rows_512(e + r0, 1, slot, n, V, KK, ldv, d0, o + r0); break;
                case 2: weighted_rows_512(e + r0, 2, slot, n, V, KK, ldv, d0, o + r0); break;
                case 3: weighted_rows_512(e + r0, 3, slot, n, V, KK, ldv, d0, o + r0); break;
                case 4: weighted_rows_512(e + r0, 4, slot, n, V, KK, ldv, d0, o + r0); break;
                case 5: weighted_rows_512(e + r0, 5, slot, n, V, KK, ldv, d0, o + r0); break;
                default: weighted_rows_512(e + r0, 6, slot, n, V, KK, ldv, d0, o + r0); break;
            }
        }
}

T512 static void weighted_512(const float *const *e, int rows, const int *slot, int n, const void *V, int kk,
                              long ldv, int D, float *const *o) {
    if (kk == KIND_BF16)
        weighted_512_kind(e, rows, slot, n, V, KIND_BF16, ldv, D, o);
    else
        weighted_512_kind(e, rows, slot, n, V, KIND_F32, ldv, D, o);
}
#endif

/* Attention for B sequences, Hkv key/value heads of G query heads each, T new tokens.
 *
 * qk:    (B, T, Hq + Hkv, D) float32 contiguous: the rotated queries (head h = kv * G + g) then keys
 * kt:    keys in blocks of 16 slots: element [b][kv][d][s] at kt[b*kb + kv*kh + pd_key_at(kk, ldk, kbs, d, s)]
 *        (simd.h). float32: kbs = 16, ldk = slots: one transposed matrix; kbs = 16 D, ldk = 16: each block of
 *        16 slots one contiguous (D, 16) tile. bfloat16: kbs = 16 D, ldk = 32: each block a (D / 2, 16, 2) tile
 * v:     values [b][kv][s][d] at v[b*vb + kv*vh + s*ldv + d]
 * kk:    the kind of kt's and v's elements, KIND_F32 or KIND_BF16 (strides count elements)
 * allow: (B, T, S) uint8, 1 where token t may see slot s; NULL: every slot below S
 * out:   (B, T, Hq, D) float32
 * S:     slots in use; the storage must hold S rounded up to a multiple of 16 readable elements.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int pd_attend(const float *qk, const void *kt, long kb, long kh, long ldk, long kbs, const void *v, long vb,
              long vh, long ldv, int kk, const uint8_t *allow, float *out, int B, int T, int Hkv, int G, int D, int S,
              float scale, int nt) {
    const int Sp = (S + SB - 1) / SB * SB;
    const int Hq = Hkv * G, NB = (T + TB - 1) / TB, R = TB * G;
    const long items = (long)B * Hkv * NB;          /* one (kv head, block of TB tokens) each: dealt to threads */
#ifdef HAVE_512
    const int fast = pd_avx512f();
#endif
    nt = PD_THREADS(nt, (long)B * T * Hkv * (long)S * D * (G + 1) * 4);
    (void)nt;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if(nt > 1) reduction(|:failed)
#endif
    {
        float *sc = (float *)malloc(sizeof(float) * (size_t)R * Sp), *den = (float *)malloc(sizeof(float) * R);
        int *slot = (int *)malloc(sizeof(int) * TB * (S > 0 ? S : 1));
        const float **q = (const float **)malloc(sizeof(float *) * R);
        float **o = (float **)malloc(sizeof(float *) * R);
        const float **ew = (const float **)malloc(sizeof(float *) * R);   /* row r's exps: sc + r * Sp */
        if (!sc || !den || !slot || !q || !o || !ew) {
            failed = 1;
        } else {
            for (int r = 0; r < R; r++) ew[r] = sc + (long)r * Sp;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (long it = 0; it < items; it++) {
                const int b = (int)(it / ((long)Hkv * NB)), kv = (int)(it / NB % Hkv), t0 = (int)(it % NB) * TB;
                const int tn = T - t0 < TB ? T - t0 : TB, rows = tn * G;
                /* each token's visible slots, how many of them are the slots 0 .. p-1, and a cursor in them */
                int n[TB], p[TB], at[TB];
                for (int u = 0; u < tn; u++) {
                    int *sl = slot + u * S, c = 0;
                    const uint8_t *a = allow ? allow + ((long)b * T + t0 + u) * S : NULL;
                    const uint8_t *z = a ? (const uint8_t *)memchr(a, 0, (size_t)S) : NULL;
                    p[u] = z ? (int)(z - a) : S;              /* the cache's head is visible to every token */
#ifdef VW
                    for (__m256i at8 = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7); c + 8 <= p[u]; c += 8) {
                        _mm256_storeu_si256((__m256i *)(sl + c), at8);
                        at8 = _mm256_add_epi32(at8, _mm256_set1_epi32(8));
                    }
#endif
                    for (; c < p[u]; c++) sl[c] = c;
                    for (int s = p[u]; s < S; s++)
                        if (a[s]) sl[c++] = s;
                    n[u] = c;
                    at[u] = 0;
                    for (int g = 0; g < G; g++) {         /* row u*G + g: head kv*G + g of token t0 + u */
                        q[u * G + g] = qk + (((long)b * T + t0 + u) * (Hq + Hkv) + kv * G + g) * D;
                        o[u * G + g] = out + (((long)b * T + t0 + u) * Hq + kv * G + g) * D;
                    }
                }
                const void *K = kv_addr(kt, kk, b * kb + kv * kh);
                const void *Vh = kv_addr(v, kk, b * vb + kv * vh);
                int Se = 0;             /* the slots below the last one any of the tokens sees: all they need */
                for (int u = 0; u < tn; u++)
                    if (n[u] && slot[u * S + n[u] - 1] + 1 > Se) Se = slot[u * S + n[u] - 1] + 1;
#ifdef HAVE_512
                if (fast)
                    scores_512(q, rows, K, kk, ldk, kbs, D, Se, scale, sc, Sp);
                else
#endif
                    scores(q, rows, K, kk, ldk, kbs, D, Se, scale, sc, Sp);
                for (int r = 0; r < rows; r++) {
                    const int *sl = slot + r / G * S, c = n[r / G];
                    const float mx = c ? visible_max(sc + r * Sp, sl, c, p[r / G]) : 0.0f;
#ifdef HAVE_512
                    if (fast)
                        exps_512(sc + r * Sp, Se, mx);
                    else
#endif
                        exps(sc + r * Sp, Se, mx);
                    den[r] = visible_sum(sc + r * Sp, sl, c, p[r / G]);
                    memset(o[r], 0, sizeof(float) * D);
                }
                /* out = sum over visible slots, in order, of e[s] * V[s]: the slots in chunks of CH, each
                 * chunk's values read once for all the rows; a row's running sums wait in its output. A chunk
                 * inside every token's head (the slots all of them see) is one list for all the rows: its
                 * values go through the registers once per block of RW rows, not once per token. */
                int pmin = S;
                for (int u = 0; u < tn; u++) pmin = p[u] < pmin ? p[u] : pmin;
                for (int c0 = 0; c0 < Se; c0 += CH) {
                    if (c0 + CH <= pmin) {          /* token 0's list holds the slots c0 .. c0 + CH - 1 there */
#ifdef HAVE_512
                        if (fast && D % 64 == 0)
                            weighted_512(ew, rows, slot + c0, CH, Vh, kk, ldv, D, o);
                        else
#endif
                            for (int r = 0; r < rows; r++)
                                weighted(sc + r * Sp, slot + c0, CH, Vh, kk, ldv, D, o[r]);
                        for (int u = 0; u < tn; u++) at[u] = c0 + CH;
                        continue;
                    }
                    for (int u = 0; u < tn; u++) {
                        const int *sl = slot + u * S;
                        int e = c0 + CH <= p[u] ? c0 + CH : at[u] > p[u] ? at[u] : p[u];
                        while (e < n[u] && sl[e] < c0 + CH) e++;
#ifdef HAVE_512
                        if (fast && D % 64 == 0) {
                            weighted_512(ew + u * G, G, sl + at[u], e - at[u], Vh, kk, ldv, D, o + u * G);
                            at[u] = e;
                            continue;
                        }
#endif
                        for (int g = 0; g < G; g++)
                            weighted(sc + (u * G + g) * Sp, sl + at[u], e - at[u], Vh, kk, ldv, D, o[u * G + g]);
                        at[u] = e;
                    }
                }
                for (int r = 0; r < rows; r++) {
                    float *w = o[r];
#ifdef VW
                    if (D % VW == 0) {
                        const vf vd = vset1(den[r]);
                        for (int d = 0; d < D; d += VW) vstore(w + d, vdiv(vload(w + d), vd));
                        continue;
                    }
#endif
                    for (int d = 0; d < D; d++) w[d] = w[d] / den[r];
                }
            }
        }
        free(sc);
        free(den);
        free(slot);
        free(q);
        free(o);
        free(ew);
    }
    return failed ? -1 : 0;
}
