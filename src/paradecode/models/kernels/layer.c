/* The glue of a decoder layer between its four projections, for the native engine's decode path.
 *
 * A decode step of the default model does 121 matrix products and, between them, ~25 small tensor
 * ops per layer (norms, dtype casts, RoPE, cache writes, slices, SiLU): each costs PyTorch a few
 * microseconds of dispatch for a few kilobytes of work, ~6 ms of an 18 ms bfloat16 step. Here each
 * stretch between two products is one call:
 *
 *   pd_add_rmsnorm   x += delta (a projection's output), then h = rmsnorm(x) * w, cast to h's type
 *   pd_rope_attend   RoPE on the new queries and keys, keys and values into the cache, attention
 *                    (attention.c), the output cast to the next projection's type
 *   pd_silu_mul      m = silu(gate) * up, cast once
 *
 * Every row is computed alone by one fixed sequence of operations (sums in a fixed order, the
 * same vector lanes whatever the row count), so a token's results do not depend on how many rows
 * share the call: the position invariance the engine's greedy verification needs (engine.md).
 * Activations are float32 (kind 1) or bfloat16 (kind 2, rounded to nearest even, as PyTorch casts).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

int pd_attend(const float *qk, const void *kt, long kb, long kh, long ldk, long kbs, const void *v, long vb,
              long vh, long ldv, int kk, const uint8_t *allow, float *out, int B, int T, int Hkv, int G, int D, int S,
              float scale, int nt);

#define CH 512   /* columns per chunk of a row's float32 scratch */

/* x (rows, H) float32, row stride H: x += delta (delta_kind 0: no delta; row stride ldd), then
 * out[r] = w * (x[r] / sqrt(mean(x[r]^2) + eps)) in out_kind (row stride H): LlamaRMSNorm's formula.
 * The sum of squares keeps 8 partial sums (element d into d % 8; the vector lanes are these sums),
 * then adds them in order. */
void pd_add_rmsnorm(float *x, const void *delta, int delta_kind, long ldd, long rows, int H, const float *w,
                    float eps, void *out, int out_kind) {
    float buf[CH];
    for (long r = 0; r < rows; r++) {
        float *xr = x + r * H;
        if (delta_kind)
            for (int c = 0; c < H; c += CH) {
                const int n = H - c < CH ? H - c : CH;
                to_f32(delta, delta_kind, r * ldd + c, n, buf);
                int d = 0;
#ifdef VW
                for (; d + VW <= n; d += VW) vstore(xr + c + d, vadd(vload(xr + c + d), vload(buf + d)));
#endif
                for (; d < n; d++) xr[c + d] += buf[d];
            }
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int d = 0;
#if defined(VW) && VW == 8
        vf acc = vzero();
        for (; d + 8 <= H; d += 8) acc = vfma(vload(xr + d), vload(xr + d), acc);
        vstore(part, acc);
#else
        for (; d + 8 <= H; d += 8)
            for (int j = 0; j < 8; j++) part[j] = fmaf(xr[d + j], xr[d + j], part[j]);
#endif
        for (int j = 0; d < H; d++, j++) part[j] = fmaf(xr[d], xr[d], part[j]);
        float ss = 0.0f;
        for (int j = 0; j < 8; j++) ss += part[j];
        const float inv = 1.0f / sqrtf(ss / (float)H + eps);
        for (int c = 0; c < H; c += CH) {
            const int n = H - c < CH ? H - c : CH;
            int k = 0;
#ifdef VW
            for (; k + VW <= n; k += VW) vstore(buf + k, vmul(vload(w + c + k), vmul(vload(xr + c + k), vset1(inv))));
#endif
            for (; k < n; k++) buf[k] = w[c + k] * (xr[c + k] * inv);
            from_f32(out, out_kind, r * H + c, n, buf);
        }
    }
}

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)
/* the vector loop of pd_silu_mul 16 lanes at a time, each lane its operations (the same bits); returns the
 * columns done */
__attribute__((target("avx512f"))) static int silu_mul_512(float *g, const float *u, int n) {
    int i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 vg = _mm512_loadu_ps(g + i);
        const __m512 e = vexp_512(_mm512_min_ps(_mm512_sub_ps(_mm512_setzero_ps(), vg), _mm512_set1_ps(88.0f)));
        _mm512_storeu_ps(g + i, _mm512_mul_ps(_mm512_div_ps(vg, _mm512_add_ps(_mm512_set1_ps(1.0f), e)),
                                              _mm512_loadu_ps(u + i)));
    }
    return i;
}
#endif

/* gu (rows, 2I), row stride ldg: gate then up. out (rows, I) = silu(gate) * up = gate / (1 + e^-gate) * up,
 * in kind; e^-gate by the vector exp over whole groups of VW columns, expf for the rest. */
void pd_silu_mul(const void *gu, int kind, long ldg, long rows, int I, void *out) {
    float g[CH], u[CH];
    for (long r = 0; r < rows; r++)
        for (int c = 0; c < I; c += CH) {
            const int n = I - c < CH ? I - c : CH;
            to_f32(gu, kind, r * ldg + c, n, g);
            to_f32(gu, kind, r * ldg + I + c, n, u);
            int i = 0;
#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)
            if (pd_avx512f()) i = silu_mul_512(g, u, n);
#endif
#ifdef VW
            for (; i + VW <= n; i += VW) {
                const vf vg = vload(g + i);
                const vf e = vexp(vmin(vsub(vzero(), vg), vset1(88.0f)));      /* e^-g, finite */
                vstore(g + i, vmul(vdiv(vg, vadd(vset1(1.0f), e)), vload(u + i)));
            }
#endif
            for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            from_f32(out, kind, r * I + c, n, g);
        }
}

/* One layer's attention for B sequences of T new tokens, Hkv key/value heads of G query heads each.
 *
 * qkv:     (B*T rows, row stride ldq) in qkv_kind: the projected queries (head h = kv * G + g), keys, values
 * cos/sin: (B*T, D) float32, the RoPE tables at each token's position (attention scaling folded in)
 * kt, v:   this layer's cache as pd_attend takes it (elements of kind kk); the new keys and values go to
 *          slots L0 .. L0 + T - 1, rounded to nearest even into a bfloat16 cache
 * allow:   (B, T, L0 + T) uint8 or NULL, as pd_attend
 * qk:      scratch (B*T, Hq + Hkv, D) float32: the rotated queries and keys
 * att:     (B*T, Hq*D) float32: the attention output; when out_kind is bfloat16 it is cast into out
 * Returns pd_attend's code. */
int pd_rope_attend(const void *qkv, int qkv_kind, long ldq, const float *cos, const float *sin, void *kt, long kb,
                   long kh, long ldk, long kbs, void *v, long vb, long vh, long ldv, int kk, const uint8_t *allow,
                   float *qk, float *att, void *out, int out_kind, int B, int T, int Hkv, int G, int D, int L0,
                   float scale, int nt) {
    const int Hq = Hkv * G, h2 = D / 2, W = (Hq + 2 * Hkv) * D;
    const long rows = (long)B * T;
    const int pt = nt > 1 && rows >= PD_GLUE_ROWS ? nt : 1;   /* threads for the rows' RoPE and cache writes */
    float *xfs = (float *)malloc(sizeof(float) * (size_t)W * pt);   /* per thread: one row of qkv as float32 */
    if (!xfs) return -1;
    (void)pt;
    PD_PARALLEL_FOR(pt)
    for (int part = 0; part < pt; part++) {             /* rows in slices, each row computed alone */
        float *xf = xfs + (long)part * W;
        for (long row = rows * part / pt; row < rows * (part + 1) / pt; row++) {
            const int b = (int)(row / T), t = (int)(row % T);
            const float *c = cos + row * D, *s = sin + row * D;
            float *dst = qk + row * (Hq + Hkv) * D;
            to_f32(qkv, qkv_kind, row * ldq, W, xf);
            for (int h = 0; h < Hq + Hkv; h++) {         /* rotate_half(x) = cat(-x2, x1) */
                const float *x = xf + (long)h * D;
                float *o = dst + (long)h * D;
                int d = 0;
#ifdef VW
                const vf sign = vset1(-0.0f);
                for (; d + VW <= h2; d += VW) {            /* the scalar loop's operations, lane by lane */
                    const vf x1 = vload(x + d), x2 = vload(x + h2 + d);
                    vstore(o + d, vfma(x1, vload(c + d), vmul(_mm256_xor_ps(x2, sign), vload(s + d))));
                    vstore(o + h2 + d, vfma(x2, vload(c + h2 + d), vmul(x1, vload(s + h2 + d))));
                }
#endif
                for (; d < h2; d++) {
                    const float x1 = x[d], x2 = x[h2 + d];
                    o[d] = fmaf(x1, c[d], (-x2) * s[d]);
                    o[h2 + d] = fmaf(x2, c[h2 + d], x1 * s[h2 + d]);
                }
            }
            for (int kv = 0; kv < Hkv; kv++) {
                const float *kr = dst + (long)(Hq + kv) * D;
                const long k0 = b * kb + kv * kh;
                if (kk == KIND_BF16)
                    for (int d = 0; d < D; d++)
                        ((uint16_t *)kt)[k0 + pd_key_at(kk, ldk, kbs, d, L0 + t)] = f32_to_bf16(kr[d]);
                else
                    for (int d = 0; d < D; d++) ((float *)kt)[k0 + pd_key_at(kk, ldk, kbs, d, L0 + t)] = kr[d];
                from_f32(v, kk, b * vb + kv * vh + (long)(L0 + t) * ldv, D, xf + (long)(Hq + Hkv + kv) * D);
            }
        }
    }
    free(xfs);
    const int rc = pd_attend(qk, kt, kb, kh, ldk, kbs, v, vb, vh, ldv, kk, allow, att, B, T, Hkv, G, D, L0 + T, scale,
                             nt);
    if (rc == 0 && out_kind == KIND_BF16) from_f32(out, KIND_BF16, 0, B * T * Hq * D, att);
    return rc;
}
