/* A forward's decoder layers in one call, for the native engine's compiled weight formats.
 *
 * With the kernels, a layer is four products and three glue calls (layer.c). Driven from Python that is
 * seven ctypes calls per layer, each with its argument checks and output tensors: 210 per step of the
 * default model, ~6 ms of a ~26 ms int8 step. Here the whole stack of layers runs in C: the same functions,
 * in the same order, on the same buffers, so every bit is the one the Python loop computes (tested).
 *
 * A layer's matrices are described once, at load time, by pd_mat records (the weight's kind, pointers,
 * padded width); the activations and the products' outputs are buffers the caller allocates per call. */
#include <stdint.h>

#include "simd.h"

int pd_i8_i15_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, const float *scale, int N,
                 void *y, int y_kind, long ldy, int nt);
int pd_i8_mm(const void *x, int x_kind, long ldx, int M, int K, const int8_t *w, const float *scale, int N, void *y,
             int y_kind, long ldy, int nt);
int pd_f32_mm(const void *x, int x_kind, long ldx, int M, int K, const float *w, int N, void *y, int y_kind,
              long ldy, int nt);
int pd_int4_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, int N, void *y, int y_kind,
               long ldy, int nt);
int pd_int4_a16_mm(const void *x, int x_kind, long ldx, int M, int K, const uint8_t *w, int N, void *y,
                   int y_kind, long ldy, int nt);
int pd_bf16_mm(const void *x, int x_kind, long ldx, int M, int K, const uint16_t *w, int N, void *y, int y_kind,
               long ldy, int nt);
void pd_add_rmsnorm(float *x, const void *delta, int delta_kind, long ldd, long rows, int H, const float *w,
                    float eps, void *out, int out_kind);
void pd_silu_mul(const void *gu, int kind, long ldg, long rows, int I, void *out);
int pd_rope_attend(const void *qkv, int qkv_kind, long ldq, const float *cos, const float *sin, void *kt, long kb,
                   long kh, long ldk, long kbs, void *v, long vb, long vh, long ldv, int kk, const uint8_t *allow,
                   float *qk, float *att, void *out, int out_kind, int B, int T, int Hkv, int G, int D, int L0,
                   float scale, int nt);

/* Int8I15Weight, Int8PanelWeight, F32PanelWeight, Int4W4A8Weight, BF16PanelWeight, Int4W4A16Weight */
enum { W_I15 = 1, W_I8 = 2, W_F32 = 3, W_INT4 = 4, W_BF16 = 5, W_INT4_A16 = 6 };

typedef struct {
    int kind;
    int N;                   /* output channels, padded: the output's row stride */
    int K;                   /* inputs */
    int out_kind;            /* the output's activation kind */
    const void *w;           /* panels or blocks */
    const float *scale;      /* per-channel scales (int8 kinds), else NULL */
} pd_mat;

typedef struct {
    pd_mat qkv, o, gu, down;
    const float *ln1, *ln2;  /* the layer's norms, float32 */
} pd_layer;

/* y (M, N) of kind m->out_kind = x (M, K) of kind x_kind (row stride ldx) times the matrix */
static int product(const pd_mat *m, const void *x, int x_kind, long ldx, int M, void *y, int nt) {
    switch (m->kind) {
        case W_I15: return pd_i8_i15_mm(x, x_kind, ldx, M, m->K, m->w, m->scale, m->N, y, m->out_kind, m->N, nt);
        case W_I8: return pd_i8_mm(x, x_kind, ldx, M, m->K, m->w, m->scale, m->N, y, m->out_kind, m->N, nt);
        case W_F32: return pd_f32_mm(x, x_kind, ldx, M, m->K, m->w, m->N, y, m->out_kind, m->N, nt);
        case W_INT4: return pd_int4_mm(x, x_kind, ldx, M, m->K, m->w, m->N, y, m->out_kind, m->N, nt);
        case W_INT4_A16: return pd_int4_a16_mm(x, x_kind, ldx, M, m->K, m->w, m->N, y, m->out_kind, m->N, nt);
        case W_BF16: return pd_bf16_mm(x, x_kind, ldx, M, m->K, m->w, m->N, y, m->out_kind, m->N, nt);
        default: return -2;
    }
}

/* pd_add_rmsnorm over R rows, in slices of rows on up to nt threads */
static void add_rmsnorm(float *x, const void *delta, int delta_kind, long ldd, long R, int H, const float *w,
                        float eps, void *out, int out_kind, int nt) {
    nt = R >= PD_GLUE_ROWS ? nt : 1;
    (void)nt;
    PD_PARALLEL_FOR(nt)
    for (int t = 0; t < nt; t++) {
        const long r0 = R * t / nt, r1 = R * (t + 1) / nt;
        pd_add_rmsnorm(x + r0 * H, delta ? (const char *)delta + r0 * ldd * pd_kind_size(delta_kind) : NULL,
                       delta_kind, ldd, r1 - r0, H, w, eps, (char *)out + r0 * H * pd_kind_size(out_kind), out_kind);
    }
}

/* pd_silu_mul over R rows, in slices of rows on up to nt threads */
static void silu_mul(const void *gu, int kind, long ldg, long R, int I, void *out, int nt) {
    nt = R >= PD_GLUE_ROWS ? nt : 1;
    (void)nt;
    PD_PARALLEL_FOR(nt)
    for (int t = 0; t < nt; t++) {
        const long r0 = R * t / nt, r1 = R * (t + 1) / nt;
        pd_silu_mul((const char *)gu + r0 * ldg * pd_kind_size(kind), kind, ldg, r1 - r0, I,
                    (char *)out + r0 * I * pd_kind_size(kind));
    }
}

/* The layers order[0 .. n-1] of layer table L over R = B*T rows, as NativeLlama._forward_kernel's loop:
 *
 *   h = rmsnorm(x) * ln1[first]
 *   per layer: qkv = h Wqkv; RoPE, cache write, attention -> a; x += a Wo, h = rmsnorm(x) * ln2;
 *              m = silu(h Wg) * (h Wu); x += m Wdown, h = rmsnorm(x) * (next layer's ln1, or final_norm)
 *
 * x (R, H) float32 is the residual stream (updated in place); h (R, H), a (R, Hq*D) and m (R, I) are
 * activations of kind act; yqkv, yo, ygu, ydown the four products' outputs (row stride: the matrix's
 * padded width); qk, att scratch as pd_rope_attend takes them (att may be a when act is float32). kt, v:
 * layer 0's cache (keys transposed, values; elements of kind kk), layer i's at + i * k_layer / v_layer
 * elements. With n = 0 only h = rmsnorm(x) * final_norm. Returns 0, or the first failing kernel's code. */
int pd_layers(const pd_layer *L, const int *order, int n, const float *final_norm, float *x, void *h, void *a,
              void *m, int act, void *yqkv, void *yo, void *ygu, void *ydown, float *qk, float *att,
              const float *cos, const float *sin, void *kt, long k_layer, long kb, long kh, long ldk, long kbs,
              void *v, long v_layer, long vb, long vh, long ldv, int kk, const uint8_t *allow, int B, int T, int Hkv,
              int G, int D, int H, int I, int L0, float scale, float eps, int nt) {
    const int R = B * T, Hq = Hkv * G;
    add_rmsnorm(x, NULL, 0, 0, R, H, n ? L[order[0]].ln1 : final_norm, eps, h, act, nt);
    for (int j = 0; j < n; j++) {
        const pd_layer *l = L + order[j];
        const float *after = j + 1 < n ? L[order[j + 1]].ln1 : final_norm;
        int rc = product(&l->qkv, h, act, H, R, yqkv, nt);
        if (rc) return rc;
        const long esz = pd_kind_size(kk);               /* bytes per cache element */
        rc = pd_rope_attend(yqkv, l->qkv.out_kind, l->qkv.N, cos, sin, (char *)kt + order[j] * k_layer * esz, kb,
                            kh, ldk, kbs, (char *)v + order[j] * v_layer * esz, vb, vh, ldv, kk, allow, qk, att, a, act,
                            B, T, Hkv, G, D, L0, scale, nt);
        if (rc) return rc;
        if ((rc = product(&l->o, a, act, (long)Hq * D, R, yo, nt))) return rc;
        add_rmsnorm(x, yo, l->o.out_kind, l->o.N, R, H, l->ln2, eps, h, act, nt);
        if ((rc = product(&l->gu, h, act, H, R, ygu, nt))) return rc;
        silu_mul(ygu, l->gu.out_kind, l->gu.N, R, I, m, nt);
        if ((rc = product(&l->down, m, act, I, R, ydown, nt))) return rc;
        add_rmsnorm(x, ydown, l->down.out_kind, l->down.N, R, H, after, eps, h, act, nt);
    }
    return 0;
}

/* The four products of the layers order[0 .. n-1] alone, as pd_layers runs them, on fixed inputs h (R, H),
 * a (R, Hq*D) and m (R, I) of kind act into the same output buffers: what a forward's products cost
 * without anything between them (benchmarks/engine.py). Returns 0 or the first failing kernel's code. */
int pd_layer_products(const pd_layer *L, const int *order, int n, const void *h, const void *a, const void *m,
                      int act, void *yqkv, void *yo, void *ygu, void *ydown, int R, int H, int HqD, int I, int nt) {
    for (int j = 0; j < n; j++) {
        const pd_layer *l = L + order[j];
        int rc;
        if ((rc = product(&l->qkv, h, act, H, R, yqkv, nt)) || (rc = product(&l->o, a, act, HqD, R, yo, nt)) ||
            (rc = product(&l->gu, h, act, H, R, ygu, nt)) || (rc = product(&l->down, m, act, I, R, ydown, nt)))
            return rc;
    }
    return 0;
}
