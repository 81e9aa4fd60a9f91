/* y[M, N] = x[M, K] @ W^T (+ bias) for a 2-, 4- or 8-bit GPTQ weight on x86-64 CPUs with FMA + F16C. One
 * source, two builds: for AVX2 (8 float32 lanes, 16 vector registers) and, with -mavx512f, for AVX-512 (16
 * lanes, 32 registers); ops/cpu_avx2.py runs the faster of those this CPU has.
 *
 * W[n, k] = (code(k, n) - zero[g_idx[k], n]) * scale[g_idx[k], n]
 *   x, bias, y : bfloat16 (x_is_f32 == 0) or float32 (x_is_f32 == 1), row-major, x and y contiguous
 *   qweight    : int32 [ceil(K * bits / 32), N], c = 32 / bits codes per word:
 *                code(k, n) = (qweight[k / c, n] >> (bits * (k % c))) & (2^bits - 1)
 *   scales     : float16 [G, N]
 *   zeros      : uint8   [G, N] (the zero points themselves, unpacked once by the caller)
 *   g_idx      : int32   [K] (any order: act-order is served)
 *   group      : the inputs per group when g_idx[k] == k / group (a multiple of 8, or K), else 0
 *   x_order    : int32 [K] or NULL: the product is taken with x's columns in this order (x[:, x_order]), gathered
 *                while x is converted to float32 (an act-order layer's codes sorted by group, so that its
 *                groups are consecutive: ops/cpu_kernel.py's sorted_by_group)
 * Requirements (checked by the Python caller): N % 8 == 0, x_order's values in [0, K).
 *
 * (code - zero) is always an exact float32: the bits 0x4B000000 | code are the float 2^23 + code, and
 * (2^23 + code) - (2^23 + zero) is exact. Two paths:
 * - GEMM (more than SMALL_PASSES x SMALL_ROWS rows, or groups not of consecutive inputs): the weight is
 *   dequantized as the float32 reference does it ((code - zero) times the scale, one rounding) into an
 *   L1-sized float32 buffer of KC inputs x NP
 *   columns, chunk by chunk, and every row block of x (converted to float32 once) is multiplied against that
 *   buffer by a register-blocked FMA micro-kernel of MR x NP. The weight is decoded once per chunk and row
 *   block of up to MC_MAX rows, so memory traffic stays that of the low-bit weight.
 * - small batch (up to SMALL_PASSES x SMALL_ROWS rows, groups of consecutive inputs): no buffer. Each group's
 *   sums P[i, n] = sum_k x[i, k] (code - zero) are formed in registers straight from the packed words and
 *   scaled once per group: y[i, n] = sum_g scale[g, n] P_g[i, n]. A weight element then costs a shift, a mask
 *   and a subtraction besides its multiply-adds, where the GEMM path also multiplies it, stores and reloads
 *   it. Rows past what the registers hold go in further passes over the panel (its words then come from L2).
 *   Its roundings differ from the reference's by about as much as another summation order does.
 * The only rounding beyond float32 arithmetic is the final one of a bfloat16 output (round to nearest even).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "thread_scratch.h"

/* scratch_get slots (thread_scratch.h) */
#define SLOT_X32 0
#define SLOT_WEIGHT 1
#define SLOT_TILE 2

/* The vector layer: VL float32 lanes. A panel's last vector may hold VL / 2 columns (`half`: N % 8 == 0 but
 * the AVX-512 build's vectors are 16 wide); its other lanes are loaded as zeros and never stored. */
#if defined(__AVX512F__)
#define VL 16
#define MR 12 /* GEMM rows per micro-kernel call: 12 x 2 accumulators + 2 weight vectors + 1 broadcast */
#define SMALL_ROWS_MAX 8
typedef __m512 vf;
typedef __m512i vi;
#define vf_zero _mm512_setzero_ps
#define vf_load _mm512_load_ps
#define vf_loadu _mm512_loadu_ps
#define vf_storeu _mm512_storeu_ps
#define vf_store _mm512_store_ps
#define vf_set1 _mm512_set1_ps
#define vf_fma _mm512_fmadd_ps
#define vf_mul _mm512_mul_ps
#define vf_add _mm512_add_ps
#define vf_sub _mm512_sub_ps
#define vi_set1 _mm512_set1_epi32
#define vi_srl _mm512_srl_epi32
#define vi_srli _mm512_srli_epi32
static inline vi load_words(const int32_t *p, int half) {
    return half ? _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)p)) : _mm512_loadu_si512((const void *)p);
}
static inline vf load_fp16(const uint16_t *p, int half) {
    return _mm512_cvtph_ps(half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p))
                                : _mm256_loadu_si256((const __m256i *)p));
}
static inline vf load_u8(const uint8_t *p, int half) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(half ? _mm_loadl_epi64((const __m128i *)p)
                                                        : _mm_loadu_si128((const __m128i *)p)));
}
static inline vf load_bf16(const uint16_t *p, int half) {
    const __m256i h = half ? _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p))
                           : _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
static inline vf load_f32(const float *p, int half) {
    return half ? _mm512_zextps256_ps512(_mm256_loadu_ps(p)) : _mm512_loadu_ps(p);
}
/* 2^23 + (w & mask), as a float: one ternary-logic op */
static inline vf code_plus_two23(vi w, vi mask, vi magic) {
    return _mm512_castsi512_ps(_mm512_ternarylogic_epi32(w, mask, magic, 0xEA));
}
static inline void store_f32(float *p, vf v, int half) {
    if (half)
        _mm256_storeu_ps(p, _mm512_castps512_ps256(v));
    else
        _mm512_storeu_ps(p, v);
}
/* float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN */
static inline void store_bf16(uint16_t *p, vf f, int half) {
    const vi bits = _mm512_castps_si512(f);
    const vi lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    vi r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(0x40)));
    const __m256i packed = _mm512_cvtepi32_epi16(r);
    if (half)
        _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
    else
        _mm256_storeu_si256((__m256i *)p, packed);
}
#else
#define VL 8
#define MR 6 /* 6 x 2 accumulators + 2 weight vectors + 1 broadcast: 15 of 16 registers */
#define SMALL_ROWS_MAX 4
typedef __m256 vf;
typedef __m256i vi;
#define vf_zero _mm256_setzero_ps
#define vf_load _mm256_load_ps
#define vf_loadu _mm256_loadu_ps
#define vf_storeu _mm256_storeu_ps
#define vf_store _mm256_store_ps
#define vf_set1 _mm256_set1_ps
#define vf_fma _mm256_fmadd_ps
#define vf_mul _mm256_mul_ps
#define vf_add _mm256_add_ps
#define vf_sub _mm256_sub_ps
#define vi_set1 _mm256_set1_epi32
#define vi_srl _mm256_srl_epi32
#define vi_srli _mm256_srli_epi32
/* with 8 lanes and N % 8 == 0 a vector is never half full: `half` is always 0 here */
static inline vi load_words(const int32_t *p, int half) {
    (void)half;
    return _mm256_loadu_si256((const __m256i *)p);
}
static inline vf load_fp16(const uint16_t *p, int half) {
    (void)half;
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
}
static inline vf load_u8(const uint8_t *p, int half) {
    (void)half;
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline vf load_bf16(const uint16_t *p, int half) {
    (void)half;
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
static inline vf load_f32(const float *p, int half) {
    (void)half;
    return _mm256_loadu_ps(p);
}
static inline vf code_plus_two23(vi w, vi mask, vi magic) {
    return _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(w, mask), magic));
}
static inline void store_f32(float *p, vf v, int half) {
    (void)half;
    _mm256_storeu_ps(p, v);
}
static inline void store_bf16(uint16_t *p, vf f, int half) {
    (void)half;
    const vi bits = _mm256_castps_si256(f);
    const vi lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    vi r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const vi nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
    /* pack the 8 low halves of the 32-bit lanes: packus over 128-bit halves, then fix the lane order */
    const __m256i packed = _mm256_packus_epi32(r, r);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08)));
}
#endif

#define NP (2 * VL) /* output columns per panel: 2 vectors (fixed by the micro-kernel table) */
#ifndef KC
#define KC (4096 / VL) /* input columns dequantized per chunk: 16 KB of float32, fits L1 */
#endif
#ifndef MC_MAX
#define MC_MAX 240 /* GEMM rows per task (a multiple of MR): its float32 block of x (KC columns) stays in L2 */
#endif
/* The small-batch path serves up to SMALL_PASSES x SMALL_ROWS rows, in balanced passes of at most SMALL_ROWS
 * rows (<= SMALL_ROWS_MAX, what the registers hold); both are set by the build (ops/cpu_avx2.py) */
#if !defined(SMALL_ROWS) || !defined(SMALL_PASSES)
#error "build with -DSMALL_ROWS=... -DSMALL_PASSES=... (ops/cpu_avx2.py sets them)"
#endif
#if SMALL_ROWS > SMALL_ROWS_MAX || SMALL_ROWS < 1 || SMALL_PASSES < 0
#error "SMALL_ROWS must lie in [1, SMALL_ROWS_MAX] and SMALL_PASSES be >= 0"
#endif
#ifndef PREFETCH_WORDS
#define PREFETCH_WORDS 16 /* the small path prefetches the panel's packed words this many word rows ahead */
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1 /* into L2: measured on a par with T0 hot, ahead with the weights in memory */
#endif

static inline int half_at(int cols, int v) { return cols - v * VL < VL; }

/* buf[(k - k0) * NP + VL v + l] = W[n0 + VL v + l, k] in float32, for k in [k0, k1) and the panel's `cols`
 * columns (zeros in the lanes past them) */
static void dequant_chunk(const int32_t *qweight, int64_t N, const uint16_t *scales, const uint8_t *zeros,
                          const int32_t *g_idx, int64_t k0, int64_t k1, int64_t n0, int cols, int bits, float *buf) {
    const int per_word_log2 = bits == 2 ? 4 : bits == 4 ? 3 : 2; /* 16, 8 or 4 codes per int32 */
    const int nv = (cols + VL - 1) / VL;
    const vi mask = vi_set1((1 << bits) - 1), magic = vi_set1(0x4B000000);
    const vf two23 = vf_set1(8388608.0f);
    vf s[2] = {vf_zero(), vf_zero()}, z[2] = {two23, two23}; /* z: 2^23 + the zero point */
    int32_t g_prev = -1;
    for (int64_t k = k0; k < k1; k++) {
        const int32_t g = g_idx[k];
        if (g != g_prev) {
            for (int v = 0; v < nv; v++) {
                const int64_t at = (int64_t)g * N + n0 + VL * v;
                s[v] = load_fp16(scales + at, half_at(cols, v));
                z[v] = vf_add(two23, load_u8(zeros + at, half_at(cols, v)));
            }
            g_prev = g;
        }
        const __m128i shift = _mm_cvtsi32_si128((int)(k & ((1 << per_word_log2) - 1)) * bits);
        const int32_t *row = qweight + (k >> per_word_log2) * N + n0;
        float *out = buf + (k - k0) * NP;
        for (int v = 0; v < nv; v++) {
            const vi w = vi_srl(load_words(row + VL * v, half_at(cols, v)), shift);
            vf_store(out + VL * v, vf_mul(vf_sub(code_plus_two23(w, mask, magic), z[v]), s[v]));
        }
    }
}

/* c[i * NP + VL j + l] (+)= sum_p a[i, p] * b[p * NP + VL j + l], for R <= MR rows and V <= 2 vectors. The
 * accumulators are named variables (gcc keeps an array of them in memory); R_ and V_ are constants, so the
 * unused ones vanish. */
#define ROW_ACC(i) vf c##i##0 = vf_zero(), c##i##1 = vf_zero();
#define ROW_LOAD(i)                                                                                            \
    if (R_ > i && !first) {                                                                                    \
        c##i##0 = vf_loadu(c + i * NP);                                                                        \
        if (V_ > 1) c##i##1 = vf_loadu(c + i * NP + VL);                                                       \
    }
#define ROW_FMA(i)                                                                                             \
    if (R_ > i) {                                                                                              \
        const vf av = vf_set1(a[i * lda + p]);                                                                 \
        c##i##0 = vf_fma(av, b0, c##i##0);                                                                     \
        if (V_ > 1) c##i##1 = vf_fma(av, b1, c##i##1);                                                         \
    }
#define ROW_STORE(i)                                                                                           \
    if (R_ > i) {                                                                                              \
        vf_storeu(c + i * NP, c##i##0);                                                                        \
        if (V_ > 1) vf_storeu(c + i * NP + VL, c##i##1);                                                       \
    }
#define ALL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define DEFINE_MICRO(R, V)                                                                                     \
    static void micro_##R##_##V(const float *a, int64_t lda, const float *b, int kc, float *c, int first) {   \
        enum { R_ = R, V_ = V };                                                                              \
        ALL_ROWS(ROW_ACC)                                                                                     \
        ALL_ROWS(ROW_LOAD)                                                                                    \
        for (int p = 0; p < kc; p++) {                                                                        \
            const vf b0 = vf_load(b + p * NP);                                                                \
            const vf b1 = V_ > 1 ? vf_load(b + p * NP + VL) : b0;                                             \
            ALL_ROWS(ROW_FMA)                                                                                 \
        }                                                                                                     \
        ALL_ROWS(ROW_STORE)                                                                                   \
    }

#define DEFINE_ROW(R) DEFINE_MICRO(R, 1) DEFINE_MICRO(R, 2)
#define ROW_TABLE(R) {micro_##R##_1, micro_##R##_2}
typedef void (*micro_fn)(const float *, int64_t, const float *, int, float *, int);
DEFINE_ROW(1) DEFINE_ROW(2) DEFINE_ROW(3) DEFINE_ROW(4) DEFINE_ROW(5) DEFINE_ROW(6)
#if MR == 12
DEFINE_ROW(7) DEFINE_ROW(8) DEFINE_ROW(9) DEFINE_ROW(10) DEFINE_ROW(11) DEFINE_ROW(12)
static const micro_fn MICRO[MR][2] = {ROW_TABLE(1), ROW_TABLE(2), ROW_TABLE(3),  ROW_TABLE(4),
                                      ROW_TABLE(5), ROW_TABLE(6), ROW_TABLE(7),  ROW_TABLE(8),
                                      ROW_TABLE(9), ROW_TABLE(10), ROW_TABLE(11), ROW_TABLE(12)};
#else
static const micro_fn MICRO[MR][2] = {ROW_TABLE(1), ROW_TABLE(2), ROW_TABLE(3), ROW_TABLE(4), ROW_TABLE(5),
                                      ROW_TABLE(6)};
#endif

/* y[i, n0 + l] = c[i * NP + l] + bias[n0 + l], in y's dtype, for the panel's `cols` columns */
static void store_rows(const float *c, int64_t rows, int cols, const void *bias, int is_f32, int64_t n0, void *y,
                       int64_t N) {
    for (int v = 0; v * VL < cols; v++) {
        const int64_t n = n0 + VL * v;
        const int half = half_at(cols, v);
        vf b = vf_zero();
        if (bias) b = is_f32 ? load_f32((const float *)bias + n, half) : load_bf16((const uint16_t *)bias + n, half);
        for (int64_t i = 0; i < rows; i++) {
            const vf acc = vf_add(vf_loadu(c + i * NP + VL * v), b);
            if (is_f32)
                store_f32((float *)y + i * N + n, acc, half);
            else
                store_bf16((uint16_t *)y + i * N + n, acc, half);
        }
    }
}

/* The small-batch path for one panel: acc[i * NP + l] = sum_g scale[g, n0 + l] * sum_{k in g} x[i, k]
 * (code(k, n0 + l) - zero[g, n0 + l]), for R rows, V vectors and `bits`, all constants once inlined (the
 * sums p[][] then live in registers and the shifts are immediates). */
static inline __attribute__((always_inline)) void small_panel(const float *x, const int R, int64_t K,
                                                              const int32_t *qweight, int64_t N,
                                                              const uint16_t *scales, const uint8_t *zeros,
                                                              int64_t group, const int bits, int64_t n0,
                                                              const int V, int cols, float *acc) {
    const int per_word = 32 / bits;
    const int64_t words = (K + per_word - 1) / per_word;
    const vi mask = vi_set1((1 << bits) - 1), magic = vi_set1(0x4B000000);
    const vf two23 = vf_set1(8388608.0f);
    vf p[SMALL_ROWS_MAX][2];
    for (int i = 0; i < R; i++)
        for (int v = 0; v < V; v++) vf_storeu(acc + i * NP + VL * v, vf_zero());
    for (int64_t k0 = 0, g = 0; k0 < K; k0 += group, g++) {
        const int64_t k1 = k0 + group < K ? k0 + group : K;
        vf z[2], s[2];
        for (int v = 0; v < V; v++) {
            z[v] = vf_add(two23, load_u8(zeros + g * N + n0 + VL * v, half_at(cols, v)));
            s[v] = load_fp16(scales + g * N + n0 + VL * v, half_at(cols, v));
        }
        for (int i = 0; i < R; i++)
            for (int v = 0; v < V; v++) p[i][v] = vf_zero();
        for (int64_t k = k0; k < k1;) {
            if (k % per_word || k + per_word > k1) { /* one input: a group edge inside a word (2 bits), or the
                                                     * inputs of a last, partial word */
                const __m128i shift = _mm_cvtsi32_si128((int)(k % per_word) * bits);
                const int32_t *row = qweight + (k / per_word) * N + n0;
                for (int v = 0; v < V; v++) {
                    const vf d = vf_sub(code_plus_two23(vi_srl(load_words(row + VL * v, half_at(cols, v)), shift),
                                                        mask, magic), z[v]);
                    for (int i = 0; i < R; i++) p[i][v] = vf_fma(vf_set1(x[i * K + k]), d, p[i][v]);
                }
                k++;
                continue;
            }
            const int64_t word = k / per_word; /* a whole word */
            const int32_t *row = qweight + word * N + n0;
            /* the same columns PREFETCH_WORDS word rows on; near the end, the next panel's first rows (what this
             * thread most likely runs next) */
            const int32_t *ahead = word + PREFETCH_WORDS < words ? row + PREFETCH_WORDS * N
                                   : n0 + NP < N ? qweight + (word + PREFETCH_WORDS - words) * N + n0 + NP : NULL;
            if (ahead)
                for (int v = 0; v < 2; v++) _mm_prefetch((const char *)(ahead + VL * v), PREFETCH_HINT);
            vi w[2];
            for (int v = 0; v < V; v++) w[v] = load_words(row + VL * v, half_at(cols, v));
#pragma GCC unroll 16
            for (int j = 0; j < per_word; j++) {
                vf d[2];
                for (int v = 0; v < V; v++) d[v] = vf_sub(code_plus_two23(vi_srli(w[v], j * bits), mask, magic), z[v]);
                for (int i = 0; i < R; i++) {
                    const vf xv = vf_set1(x[i * K + k + j]);
                    for (int v = 0; v < V; v++) p[i][v] = vf_fma(xv, d[v], p[i][v]);
                }
            }
            k += per_word;
        }
        for (int i = 0; i < R; i++)
            for (int v = 0; v < V; v++)
                vf_storeu(acc + i * NP + VL * v, vf_fma(s[v], p[i][v], vf_loadu(acc + i * NP + VL * v)));
    }
}

/* small_panel with its constants: one instance per (bits, rows, vectors) */
#define SMALL_V(B, R)                                                                                          \
    if (R <= SMALL_ROWS) {                                                                                     \
        if (nv == 1)                                                                                           \
            small_panel(x, R, K, qweight, N, scales, zeros, group, B, n0, 1, cols, acc);                        \
        else                                                                                                   \
            small_panel(x, R, K, qweight, N, scales, zeros, group, B, n0, 2, cols, acc);                        \
    }
#define SMALL_R(B)                                                                                             \
    switch (rows) {                                                                                            \
    case 1: SMALL_V(B, 1) break;                                                                               \
    case 2: SMALL_V(B, 2) break;                                                                               \
    case 3: SMALL_V(B, 3) break;                                                                               \
    case 4: SMALL_V(B, 4) break;                                                                               \
    case 5: SMALL_V(B, 5) break;                                                                               \
    case 6: SMALL_V(B, 6) break;                                                                               \
    case 7: SMALL_V(B, 7) break;                                                                               \
    case 8: SMALL_V(B, 8) break;                                                                               \
    }
static void small_rows(const float *x, int rows, int64_t K, const int32_t *qweight, int64_t N, const uint16_t *scales,
                       const uint8_t *zeros, int64_t group, int bits, int64_t n0, int cols, float *acc) {
    const int nv = (cols + VL - 1) / VL;
    if (bits == 2) {
        SMALL_R(2)
    } else if (bits == 4) {
        SMALL_R(4)
    } else {
        SMALL_R(8)
    }
}

/* Returns 0 on success, 1 on bad arguments, 2 when a work buffer could not be allocated. */
int hvg_lowbit_gemm_fma(const void *x, int x_is_f32, int64_t M, int64_t K, const int32_t *qweight,
                        const uint16_t *scales, const uint8_t *zeros, const int32_t *g_idx, int64_t N,
                        const void *bias, void *y, int nthreads, int bits, int64_t group, const int32_t *x_order) {
    if (M <= 0 || K <= 0 || N <= 0 || (N & 7) || nthreads <= 0 || group < 0) return 1;
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    const float *xf = (const float *)x;
    float *converted = NULL;
    if (!x_is_f32 || x_order) { /* bfloat16 -> float32 is exact: once per call, not once per panel */
        converted = scratch_get(SLOT_X32, sizeof(float) * (size_t)(M * K));
        if (!converted) return 2;
        const uint16_t *xb = (const uint16_t *)x;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= (1 << 20)) /* else one fork costs more */
        for (int64_t i = 0; i < M; i++) {
            float *row = converted + i * K;
            int64_t k = 0;
            if (x_order && x_is_f32) {
                for (; k < K; k++) row[k] = xf[i * K + x_order[k]];
            } else {
                if (!x_order)
                    for (; k + VL <= K; k += VL) vf_storeu(row + k, load_bf16(xb + i * K + k, 0));
                for (; k < K; k++) {
                    const uint32_t b = (uint32_t)xb[i * K + (x_order ? x_order[k] : k)] << 16;
                    memcpy(row + k, &b, sizeof b);
                }
            }
        }
        xf = converted;
    }
    const int64_t panels = (N + NP - 1) / NP;
    const size_t elem = x_is_f32 ? 4 : 2;
    int failed = 0;
    if (M <= SMALL_PASSES * SMALL_ROWS && group > 0) {
        const int64_t passes = (M + SMALL_ROWS - 1) / SMALL_ROWS, per_pass = (M + passes - 1) / passes;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int64_t t = 0; t < panels; t++) { /* each thread: consecutive panels */
            float acc[SMALL_ROWS_MAX * NP];
            const int64_t n0 = t * NP;
            const int cols = (int)(N - n0 < NP ? N - n0 : NP);
            for (int64_t m0 = 0; m0 < M; m0 += per_pass) {
                const int rows = (int)(M - m0 < per_pass ? M - m0 : per_pass);
                small_rows(xf + m0 * K, rows, K, qweight, N, scales, zeros, group, bits, n0, cols, acc);
                store_rows(acc, rows, cols, bias, x_is_f32, n0, (char *)y + m0 * N * elem, N);
            }
        }
        scratch_done(SLOT_X32);
        return 0;
    }
    const int64_t m_tasks = (M + MC_MAX - 1) / MC_MAX;
    int64_t mc = (M + m_tasks - 1) / m_tasks;
    mc = (mc + MR - 1) / MR * MR; /* rows per task, balanced, <= MC_MAX */
    const int64_t tasks = m_tasks * panels;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *buf = scratch_get(SLOT_WEIGHT, KC * NP * sizeof(float));
        float *tile = scratch_get(SLOT_TILE, MC_MAX * NP * sizeof(float));
        if (!buf || !tile) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) { /* consecutive tasks of a thread share their rows of x */
            if (!buf || !tile) continue;
            const int64_t m0 = (t / panels) * mc, n0 = (t % panels) * NP;
            const int64_t rows = (M - m0 < mc) ? M - m0 : mc;
            const int cols = (int)(N - n0 < NP ? N - n0 : NP);
            const int nv = (cols + VL - 1) / VL;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t k1 = (k0 + KC < K) ? k0 + KC : K;
                dequant_chunk(qweight, N, scales, zeros, g_idx, k0, k1, n0, cols, bits, buf);
                for (int64_t r0 = 0; r0 < rows; r0 += MR) {
                    const int r = (int)(rows - r0 < MR ? rows - r0 : MR);
                    MICRO[r - 1][nv - 1](xf + (m0 + r0) * K + k0, K, buf, (int)(k1 - k0), tile + r0 * NP, k0 == 0);
                }
            }
            store_rows(tile, rows, cols, bias, x_is_f32, n0, (char *)y + m0 * N * elem, N);
        }
    }
    scratch_done(SLOT_X32);
    return failed ? 2 : 0;
}
