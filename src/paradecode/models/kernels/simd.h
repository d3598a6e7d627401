/* Vector helpers shared by the engine's kernels: AVX2 + FMA where the compiler targets them (VW lanes),
 * nothing elsewhere (the kernels then run their portable scalar C). */
#ifndef PD_SIMD_H
#define PD_SIMD_H

#include <stdint.h>
#include <string.h>

/* one bfloat16 to float32, and back rounded to nearest even (NaN -> 0x7fc0), as PyTorch casts */
static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define VW 8
typedef __m256 vf;
#define vzero() _mm256_setzero_ps()
#define vset1(x) _mm256_set1_ps(x)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, x) _mm256_storeu_ps(p, x)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vfnma(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vdiv(a, b) _mm256_div_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vmin(a, b) _mm256_min_ps(a, b)
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vpow2i(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#endif

/* the constants of the vector exp (vexp, and attention.c's 512-bit twin of it): x = n ln2 + r with ln2 split
 * in a high and a low part, and the degree-6 polynomial for e^r (Cephes) */
#define EXP_MIN -87.0f
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO -2.12194440e-4f
#define EXP_P0 1.9875691500e-4f
#define EXP_P1 1.3981999507e-3f
#define EXP_P2 8.3334519073e-3f
#define EXP_P3 4.1665795894e-2f
#define EXP_P4 1.6666665459e-1f
#define EXP_P5 5.0000001201e-1f

#ifdef VW
/* exp for x <= 88 (a softmax after subtracting the max; SiLU's e^-x, clamped), Cephes-style: x = n ln2 + r, |r| <= ln2 / 2,
 * a degree-6 polynomial for e^r, times 2^n; one fixed instruction sequence per lane */
static inline vf vexp(vf x) {
    x = vmax(x, vset1(EXP_MIN));
    vf n = vround(vmul(x, vset1(EXP_LOG2E)));
    vf r = vfnma(n, vset1(EXP_LN2_HI), x);
    r = vfnma(n, vset1(EXP_LN2_LO), r);
    vf p = vset1(EXP_P0);
    p = vfma(p, r, vset1(EXP_P1));
    p = vfma(p, r, vset1(EXP_P2));
    p = vfma(p, r, vset1(EXP_P3));
    p = vfma(p, r, vset1(EXP_P4));
    p = vfma(p, r, vset1(EXP_P5));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return vmul(p, vpow2i(n));
}
#endif

#ifdef VW
/* 8 bfloat16 values to float32, and back rounded to nearest even (NaN -> 0x7fc0), as PyTorch casts */
static inline vf vload_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

static inline void vstore_bf16(uint16_t *p, vf x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    _mm_storeu_si128((__m128i *)p, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
}
#endif

/* Threads: the products deal their output channel groups out to an OpenMP team (libgomp, the runtime
 * PyTorch itself runs on and loads first, so the process keeps one thread pool) of at most nt threads,
 * or fewer for small matrices, whose time would go to waking threads. Every output is computed by one
 * thread with the same code, so its bits do not depend on the thread count. Built without OpenMP, the
 * loops run on the calling thread. */
#define PD_MIN_WORK_PER_THREAD (1L << 16)     /* weights per thread below which more threads do not pay */
#define PD_THREADS(nt, work) ((nt) > 1 && (work) / (nt) >= PD_MIN_WORK_PER_THREAD ? (nt) : 1)
#ifdef _OPENMP
#define PD_PARALLEL_FOR(nt) _Pragma("omp parallel for num_threads(nt) schedule(static) if(nt > 1)")
#else
#define PD_PARALLEL_FOR(nt)
#endif
/* The layer glue (layer.c, stack.c) splits its rows over the threads from this many rows (a verification
 * block): each row is computed alone by the same code, so the bits do not change; a single-token step stays
 * on one thread, where waking the others would cost more than its row takes. */
#define PD_GLUE_ROWS 4

#if defined(__AVX2__) && defined(__x86_64__) && defined(__GNUC__)
#include <stdlib.h>
/* whether the CPU runs AVX-512 with VNNI (and PARADECODE_NO_AVX512 is unset): the int4 and int8 kernels'
 * run-time upgrade of the AVX2 build; asked once per kernel file */
static inline int pd_avx512_vnni(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512vnni") && getenv("PARADECODE_NO_AVX512") == NULL;
    }
    return known;
}

/* whether calls that read their weights in one pass (one row, or a few) prefetch the weight stream into L2
 * ahead of the hardware's own prefetchers: on Intel CPUs (a Xeon with AMX, session 22, 1 thread, right after
 * the bfloat16 model's products, interleaved: the int4 layer matrices at one row 0.81x the time, the int8
 * ones 0.78x, the int8 LM head 0.77x); not on AMD's, where the int8 kernel's one-row prefetch measured 1.1x
 * the time on the Zen 4 machine, which reads one stream at its memory's bandwidth already */
static inline int pd_stream_prefetch(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_is("intel");
    }
    return known;
}

/* whether the CPU runs AVX-512F (and PARADECODE_NO_AVX512 is unset): the panel and attention kernels'
 * run-time upgrade of the AVX2 build, each lane the AVX2 code's operations (the same bits) */
static inline int pd_avx512f(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && getenv("PARADECODE_NO_AVX512") == NULL;
    }
    return known;
}

/* whether the CPU runs AVX-512 with BF16 (vdpbf16ps; and PARADECODE_NO_AVX512 is unset): the bfloat16 kernels'
 * run-time upgrade, the other paths' bits */
static inline int pd_avx512_bf16(void) {
    static int known = -1;
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                __builtin_cpu_supports("avx512bf16") && getenv("PARADECODE_NO_AVX512") == NULL;
    }
    return known;
}

/* whether this process may use AMX tiles: the CPU has them, Linux lets it use them (arch_prctl
 * ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, as PyTorch's oneDNN asks) and PARADECODE_NO_AMX is unset; with
 * which = "amx-int8" or "amx-bf16", the products that kind of tile takes (int8.c, bf16.c) */
#include <sys/syscall.h>
#include <unistd.h>
#define pd_amx_tiles(which) (__builtin_cpu_supports("amx-tile") && __builtin_cpu_supports(which) && \
                             getenv("PARADECODE_NO_AMX") == NULL && syscall(SYS_arch_prctl, 0x1023, 18) == 0)

/* an AMX tile configuration (palette 1): bytes per row and rows of each of the 8 tiles. Keep configurations
 * in static constants: GCC dropped the stores to a stack copy as dead (attention.c; ldtilecfg then faulted) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) pd_tile_config;

/* vexp's numbers 16 lanes at a time: its constants, each instruction its 512-bit twin (the same roundings) */
__attribute__((target("avx512f"))) static inline __m512 vexp_512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(EXP_MIN));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(EXP_LOG2E)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(EXP_LN2_LO), r);
    __m512 p = _mm512_set1_ps(EXP_P0);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P1));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P2));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P3));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P4));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(EXP_P5));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

/* activation types of the kernels' arguments (and of the KV cache's elements) */
enum { KIND_F32 = 1, KIND_BF16 = 2 };

/* bytes per element of kind k */
static inline long pd_kind_size(int k) { return k == KIND_BF16 ? 2 : 4; }

/* slots per block of the KV cache's keys (attention.c's pd_attend; kernels/__init__.py's KEY_BLOCK) */
#define PD_KEY_BLOCK 16

/* where slot s of dimension d of a head's keys is: float32, (s / 16) * kbs + d * ldk + s % 16; bfloat16,
 * dimensions in pairs, (s / 16) * kbs + (d / 2) * ldk + 2 (s % 16) + d % 2: each pair row of a block is 16
 * slots x 2 dimensions, the layout AMX takes for the second operand of a bfloat16 tile product */
static inline long pd_key_at(int kk, long ldk, long kbs, int d, int s) {
    const long blk = (long)(s / PD_KEY_BLOCK) * kbs;
    return kk == KIND_BF16 ? blk + (long)(d / 2) * ldk + 2 * (s % PD_KEY_BLOCK) + d % 2
                           : blk + (long)d * ldk + s % PD_KEY_BLOCK;
}

/* dst[0:n) = p[off:off + n) as float32 */
static inline void to_f32(const void *p, int kind, long off, int n, float *dst) {
    if (kind == KIND_F32) {
        memcpy(dst, (const float *)p + off, sizeof(float) * n);
        return;
    }
    const uint16_t *s = (const uint16_t *)p + off;
    int i = 0;
#ifdef VW
    for (; i + VW <= n; i += VW) vstore(dst + i, vload_bf16(s + i));
#endif
    for (; i < n; i++) dst[i] = bf16_to_f32(s[i]);
}

/* p[off:off + n) = src[0:n) cast to kind (the vector and the scalar cast round alike) */
static inline void from_f32(void *p, int kind, long off, int n, const float *src) {
    if (kind == KIND_F32) {
        memcpy((float *)p + off, src, sizeof(float) * n);
        return;
    }
    uint16_t *d = (uint16_t *)p + off;
    int i = 0;
#ifdef VW
    for (; i + VW <= n; i += VW) vstore_bf16(d + i, vload(src + i));
#endif
    for (; i < n; i++) d[i] = f32_to_bf16(src[i]);
}

#endif
