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
 * slots the cache holds beyond the visible ones, or on the thread count (the kernel runs on the
 * calling thread). So a token's attention output has the same bits alone, in a block, and as a
 * node of a token tree whose ancestors sit at other cache slots: masked slots are skipped, never
 * added as zeros. This is what lets greedy verification use every tree node's logits.
 *
 * Plain C with AVX2+FMA intrinsics where the compiler targets them, portable scalar C elsewhere (same
 * formulas, its own bits; the engine's invariance holds per machine, not across machines). The loader
 * compiles without AVX-512 on x86: one vector path, the one tested on the machines here.
 * Loaded with ctypes by paradecode/models/kernels/__init__.py, which compiles it once per CPU.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define SB 16   /* slots per score block; the key storage holds whole blocks */
#define RB 4    /* query rows (heads of one kv group, same token) per register block */
#define PF 64   /* floats ahead in each key row that score_block prefetches (the rows are 4 KB+ apart) */

#ifdef VW
#define TV (SB / VW)   /* vectors per slot block */
/* scores of ROWS query rows against the slots of [s0, s0 + SB): each lane one slot, d in order */
static inline __attribute__((always_inline)) void score_block(const float *q, long qstride, const int ROWS,
                                                              const float *K, long ldk, int D, int s0,
                                                              float scale, float *sc, long ldsc) {
    vf acc[RB][TV];
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < TV; j++) acc[r][j] = vzero();
    for (int d = 0; d < D; d++) {
        const float *kd = K + (long)d * ldk + s0;
        _mm_prefetch((const char *)(kd + PF), _MM_HINT_T0);
        _Pragma("GCC unroll 4") for (int j = 0; j < TV; j++) {
            const vf k = vload(kd + j * VW);
            _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++) acc[r][j] = vfma(vset1(q[r * qstride + d]), k, acc[r][j]);
        }
    }
    _Pragma("GCC unroll 4") for (int r = 0; r < ROWS; r++)
        _Pragma("GCC unroll 4") for (int j = 0; j < TV; j++) vstore(sc + r * ldsc + s0 + j * VW, vmul(acc[r][j], vset1(scale)));
}
#endif

/* scores of `rows` query rows (q + r*qstride) against slots [0, S) rounded up to whole blocks of SB:
 * sc[r*ldsc + s]. Keys are stored transposed: K[d*ldk + s]. */
static void scores(const float *q, long qstride, int rows, const float *K, long ldk, int D, int S,
                   float scale, float *sc, long ldsc) {
#ifdef VW
    for (int s0 = 0; s0 < S; s0 += SB) {
        switch (rows) {
            case 1: score_block(q, qstride, 1, K, ldk, D, s0, scale, sc, ldsc); break;
            case 2: score_block(q, qstride, 2, K, ldk, D, s0, scale, sc, ldsc); break;
            case 3: score_block(q, qstride, 3, K, ldk, D, s0, scale, sc, ldsc); break;
            default: score_block(q, qstride, 4, K, ldk, D, s0, scale, sc, ldsc); break;
        }
    }
#else
    for (int r = 0; r < rows; r++)
        for (int s = 0; s < S; s++) {
            float a = 0.0f;
            for (int d = 0; d < D; d++) a = fmaf(q[r * qstride + d], K[(long)d * ldk + s], a);
            sc[r * ldsc + s] = a * scale;
        }
#endif
}

/* the largest of sc[slot[i]] over the list: eight independent running maxima (a max does not depend on
 * the order it is taken in), so no chain of n dependent compares */
static float visible_max(const float *sc, const int *slot, int n) {
    float m[8] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int i = 0;
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

#ifdef VW
/* o[0:NV*VW) = sum over the listed slots, in order, of e[s] * V[s][0:NV*VW), divided by den */
static inline __attribute__((always_inline)) void weighted_chunk(const float *e, const int *slot, int n,
                                                                 const float *V, long ldv, const int NV,
                                                                 float den, float *o) {
    vf acc[8];
    _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) acc[j] = vzero();
    for (int i = 0; i < n; i++) {
        const int s = slot[i];
        const vf w = vset1(e[s]);
        const float *v = V + (long)s * ldv;
        _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) acc[j] = vfma(w, vload(v + j * VW), acc[j]);
    }
    const vf vd = vset1(den);
    _Pragma("GCC unroll 8") for (int j = 0; j < NV; j++) vstore(o + j * VW, vdiv(acc[j], vd));
}
#endif

/* out[r] = sum over the listed slots of e[r][s] * V[s] / sum of e[r][s], slots in list order */
static void weighted(const float *e, long lde, int rows, const int *slot, int n, const float *V, long ldv,
                     int D, float *out, long ostride) {
    for (int r = 0; r < rows; r++) {
        const float *er = e + r * lde;
        float *o = out + r * ostride;
        float den = 0.0f;
        {   /* eight partial sums over the list (entry i into i % 8), added in a fixed order */
            float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int i = 0;
            for (; i + 8 <= n; i += 8)
                for (int j = 0; j < 8; j++) part[j] += er[slot[i + j]];
            for (int j = 0; i < n; i++, j++) part[j] += er[slot[i]];
            den = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
        }
#ifdef VW
        if (D % VW == 0) {
            for (int d0 = 0; d0 < D; d0 += 8 * VW) {
                const int nv = (D - d0) / VW < 8 ? (D - d0) / VW : 8;
                switch (nv) {
                    case 1: weighted_chunk(er, slot, n, V + d0, ldv, 1, den, o + d0); break;
                    case 2: weighted_chunk(er, slot, n, V + d0, ldv, 2, den, o + d0); break;
                    case 3: weighted_chunk(er, slot, n, V + d0, ldv, 3, den, o + d0); break;
                    case 4: weighted_chunk(er, slot, n, V + d0, ldv, 4, den, o + d0); break;
                    case 5: weighted_chunk(er, slot, n, V + d0, ldv, 5, den, o + d0); break;
                    case 6: weighted_chunk(er, slot, n, V + d0, ldv, 6, den, o + d0); break;
                    case 7: weighted_chunk(er, slot, n, V + d0, ldv, 7, den, o + d0); break;
                    default: weighted_chunk(er, slot, n, V + d0, ldv, 8, den, o + d0); break;
                }
            }
            continue;
        }
#endif
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (int i = 0; i < n; i++) {
            const int s = slot[i];
            const float w = er[s];
            const float *v = V + (long)s * ldv;
            for (int d = 0; d < D; d++) o[d] = fmaf(w, v[d], o[d]);
        }
        for (int d = 0; d < D; d++) o[d] = o[d] / den;
    }
}

/* Attention for B sequences, Hkv key/value heads of G query heads each, T new tokens.
 *
 * qk:    (B, T, Hq + Hkv, D) float32 contiguous: the rotated queries (head h = kv * G + g) then keys
 * kt:    keys, transposed: element [b][kv][d][s] at kt[b*kb + kv*kh + d*ldk + s]
 * v:     values [b][kv][s][d] at v[b*vb + kv*vh + s*ldv + d]
 * allow: (B, T, S) uint8, 1 where token t may see slot s; NULL: every slot below S
 * out:   (B, T, Hq, D) float32
 * S:     slots in use; the storage must hold S rounded up to a multiple of 16 readable floats.
 * Returns 0, or -1 when scratch memory could not be allocated. */
int pd_attend(const float *qk, const float *kt, long kb, long kh, long ldk, const float *v, long vb, long vh,
              long ldv, const uint8_t *allow, float *out, int B, int T, int Hkv, int G, int D, int S,
              float scale, int nt) {
    const int Sp = (S + SB - 1) / SB * SB;
    const int Hq = Hkv * G;
    const long items = (long)B * T * Hkv;          /* one (token, kv head) each: dealt out to threads */
    nt = PD_THREADS(nt, items * (long)S * D * (G + 1) * 4);
    (void)nt;
    int failed = 0;
#ifdef _OPENMP
#pragma omp parallel num_threads(nt) if(nt > 1) reduction(|:failed)
#endif
    {
        float *sc = (float *)malloc(sizeof(float) * RB * Sp);
        int *slot = (int *)malloc(sizeof(int) * (S > 0 ? S : 1));
        if (!sc || !slot) {
            failed = 1;
        } else {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (long it = 0; it < items; it++) {
                const int b = (int)(it / ((long)T * Hkv)), t = (int)(it / Hkv % T), kv = (int)(it % Hkv);
                int n = 0;
                if (allow) {
                    const uint8_t *a = allow + ((long)b * T + t) * S;
                    for (int s = 0; s < S; s++)
                        if (a[s]) slot[n++] = s;
                } else {
                    for (int s = 0; s < S; s++) slot[n++] = s;
                }
                const float *qrow = qk + ((long)b * T + t) * (Hq + Hkv) * D;
                float *orow = out + ((long)b * T + t) * Hq * D;
                const float *K = kt + b * kb + kv * kh;
                const float *Vh = v + b * vb + kv * vh;
                for (int g0 = 0; g0 < G; g0 += RB) {
                    const int rows = G - g0 < RB ? G - g0 : RB;
                    const int h = kv * G + g0;
                    scores(qrow + (long)h * D, D, rows, K, ldk, D, S, scale, sc, Sp);
                    for (int r = 0; r < rows; r++) {
                        const float m = visible_max(sc + r * Sp, slot, n);
                        exps(sc + r * Sp, S, n ? m : 0.0f);
                    }
                    weighted(sc, Sp, rows, slot, n, Vh, ldv, D, orow + (long)h * D, D);
                }
            }
        }
        free(sc);
        free(slot);
    }
    return failed ? -1 : 0;
}
