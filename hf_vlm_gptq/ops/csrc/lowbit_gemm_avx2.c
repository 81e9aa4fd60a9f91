/* y[M, N] = x[M, K] @ W^T (+ bias) for a 2-, 4- or 8-bit GPTQ weight on CPUs with AVX2 + FMA + F16C.
 *
 * W[n, k] = (code(k, n) - zero[g_idx[k], n]) * scale[g_idx[k], n]
 *   x, bias, y : bfloat16 (x_is_f32 == 0) or float32 (x_is_f32 == 1), row-major, x and y contiguous
 *   qweight    : int32 [ceil(K * bits / 32), N], c = 32 / bits codes per word:
 *                code(k, n) = (qweight[k / c, n] >> (bits * (k % c))) & (2^bits - 1)
 *   scales     : float16 [G, N]
 *   zeros      : uint8   [G, N] (the zero points themselves, unpacked once by the caller)
 *   g_idx      : int32   [K] (any order: act-order is served)
 * Requirements (checked by the Python caller): N % 8 == 0, AVX2/FMA/F16C.
 *
 * The weight is dequantized exactly as the float32 reference does it (integer code - zero, one float32
 * multiply) into an L1-sized float32 buffer of KC input columns x NP output columns, chunk by chunk, and every
 * row block of x (converted to float32 once) is multiplied against that buffer by a register-blocked FMA
 * micro-kernel of MR x NP. The weight is dequantized once per chunk and row block of up to MC_MAX rows, so
 * memory traffic stays that of the low-bit weight while the decode cost shrinks with the rows. The only
 * rounding beyond float32 arithmetic is the final one of a bfloat16 output (round to nearest even).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NP 16 /* output columns per panel: 2 vectors of 8 fp32 lanes (fixed by the micro-kernel table) */
#ifndef KC
#define KC 256 /* input columns dequantized per chunk: 16 KB of float32, fits L1 */
#endif
#define MR 6 /* rows per micro-kernel call: 6 x 2 accumulators + 2 weight vectors + 1 broadcast */
#ifndef MC_MAX
#define MC_MAX 240 /* rows per task (multiple of MR): its float32 block of x (KC columns) stays in L2 */
#endif

/* buf[(k - k0) * NP + 8 v + l] = W[n0 + 8 v + l, k] in float32, for k in [k0, k1) */
static void dequant_chunk(const int32_t *qweight, int64_t N, const uint16_t *scales, const uint8_t *zeros,
                          const int32_t *g_idx, int64_t k0, int64_t k1, int64_t n0, int nv, int bits, float *buf) {
    const int per_word_log2 = bits == 2 ? 4 : bits == 4 ? 3 : 2; /* 16, 8 or 4 codes per int32 */
    const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
    __m256 s[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    __m256i z[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
    int32_t g_prev = -1;
    for (int64_t k = k0; k < k1; k++) {
        const int32_t g = g_idx[k];
        if (g != g_prev) {
            for (int v = 0; v < nv; v++) {
                const int64_t at = (int64_t)g * N + n0 + 8 * v;
                s[v] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + at)));
                z[v] = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + at)));
            }
            g_prev = g;
        }
        const __m128i shift = _mm_cvtsi32_si128((int)(k & ((1 << per_word_log2) - 1)) * bits);
        const int32_t *row = qweight + (k >> per_word_log2) * N + n0;
        float *out = buf + (k - k0) * NP;
        for (int v = 0; v < nv; v++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + 8 * v));
            const __m256i c = _mm256_and_si256(_mm256_srl_epi32(w, shift), mask);
            _mm256_store_ps(out + 8 * v, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, z[v])), s[v]));
        }
    }
}

/* c[i * NP + 8 j + l] (+)= sum_p a[i, p] * b[p * NP + 8 j + l], for R <= MR rows and V <= 2 vectors. The
 * accumulators are named variables (gcc keeps an array of them in memory); R_ and V_ are constants, so the
 * unused ones vanish. */
#define ROW_ACC(i) __m256 c##i##0 = _mm256_setzero_ps(), c##i##1 = _mm256_setzero_ps();
#define ROW_LOAD(i)                                                                                            \
    if (R_ > i && !first) {                                                                                    \
        c##i##0 = _mm256_loadu_ps(c + i * NP);                                                                \
        if (V_ > 1) c##i##1 = _mm256_loadu_ps(c + i * NP + 8);                                                 \
    }
#define ROW_FMA(i)                                                                                             \
    if (R_ > i) {                                                                                              \
        const __m256 av = _mm256_broadcast_ss(a + i * lda + p);                                               \
        c##i##0 = _mm256_fmadd_ps(av, b0, c##i##0);                                                           \
        if (V_ > 1) c##i##1 = _mm256_fmadd_ps(av, b1, c##i##1);                                                \
    }
#define ROW_STORE(i)                                                                                           \
    if (R_ > i) {                                                                                              \
        _mm256_storeu_ps(c + i * NP, c##i##0);                                                                \
        if (V_ > 1) _mm256_storeu_ps(c + i * NP + 8, c##i##1);                                                 \
    }
#define ALL_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5)
#define DEFINE_MICRO(R, V)                                                                                     \
    static void micro_##R##_##V(const float *a, int64_t lda, const float *b, int kc, float *c, int first) {   \
        enum { R_ = R, V_ = V };                                                                              \
        ALL_ROWS(ROW_ACC)                                                                                     \
        ALL_ROWS(ROW_LOAD)                                                                                    \
        for (int p = 0; p < kc; p++) {                                                                        \
            const __m256 b0 = _mm256_load_ps(b + p * NP);                                                     \
            const __m256 b1 = V_ > 1 ? _mm256_load_ps(b + p * NP + 8) : b0;                                    \
            ALL_ROWS(ROW_FMA)                                                                                 \
        }                                                                                                     \
        ALL_ROWS(ROW_STORE)                                                                                   \
    }

#define DEFINE_ROW(R) DEFINE_MICRO(R, 1) DEFINE_MICRO(R, 2)
DEFINE_ROW(1) DEFINE_ROW(2) DEFINE_ROW(3) DEFINE_ROW(4) DEFINE_ROW(5) DEFINE_ROW(6)

typedef void (*micro_fn)(const float *, int64_t, const float *, int, float *, int);
#define ROW_TABLE(R) {micro_##R##_1, micro_##R##_2}
static const micro_fn MICRO[MR][2] = {ROW_TABLE(1), ROW_TABLE(2), ROW_TABLE(3), ROW_TABLE(4), ROW_TABLE(5),
                                      ROW_TABLE(6)};

static inline __m256 load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* float32 -> bfloat16, round to nearest even; NaN stays a (quiet) NaN */
static inline __m128i to_bf16(__m256 f) {
    const __m256i bits = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40)), nan);
    /* pack the 8 low halves of the 32-bit lanes: packus over 128-bit halves, then fix the lane order */
    const __m256i packed = _mm256_packus_epi32(r, r);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

/* y[i, n0 + 8 v + l] = c[i * NP + 8 v + l] + bias[n0 + 8 v + l], in y's dtype */
static void store_rows(const float *c, int64_t rows, int nv, const void *bias, int is_f32, int64_t n0, void *y,
                       int64_t N) {
    for (int v = 0; v < nv; v++) {
        const int64_t n = n0 + 8 * v;
        __m256 b = _mm256_setzero_ps();
        if (bias) b = is_f32 ? _mm256_loadu_ps((const float *)bias + n) : load_bf16((const uint16_t *)bias + n);
        for (int64_t i = 0; i < rows; i++) {
            const __m256 acc = _mm256_add_ps(_mm256_loadu_ps(c + i * NP + 8 * v), b);
            if (is_f32)
                _mm256_storeu_ps((float *)y + i * N + n, acc);
            else
                _mm_storeu_si128((__m128i *)((uint16_t *)y + i * N + n), to_bf16(acc));
        }
    }
}

/* Returns 0 on success, 1 on bad arguments, 2 when a work buffer could not be allocated. */
int hvg_lowbit_gemm_avx2(const void *x, int x_is_f32, int64_t M, int64_t K, const int32_t *qweight,
                         const uint16_t *scales, const uint8_t *zeros, const int32_t *g_idx, int64_t N,
                         const void *bias, void *y, int nthreads, int bits) {
    if (M <= 0 || K <= 0 || N <= 0 || (N & 7) || nthreads <= 0) return 1;
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    const float *xf = (const float *)x;
    float *converted = NULL;
    if (!x_is_f32) { /* bfloat16 -> float32 is exact: once per call, not once per panel */
        converted = malloc(sizeof(float) * (size_t)(M * K));
        if (!converted) return 2;
        const uint16_t *xb = (const uint16_t *)x;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M * K >= (1 << 20)) /* else one fork costs more */
        for (int64_t i = 0; i < M; i++) {
            int64_t k = 0;
            for (; k + 8 <= K; k += 8) _mm256_storeu_ps(converted + i * K + k, load_bf16(xb + i * K + k));
            for (; k < K; k++) {
                const uint32_t b = (uint32_t)xb[i * K + k] << 16;
                memcpy(converted + i * K + k, &b, sizeof b);
            }
        }
        xf = converted;
    }
    const int64_t m_tasks = (M + MC_MAX - 1) / MC_MAX;
    int64_t mc = (M + m_tasks - 1) / m_tasks;
    mc = (mc + MR - 1) / MR * MR; /* rows per task, balanced, <= MC_MAX */
    const int64_t panels = (N + NP - 1) / NP;
    const int64_t tasks = m_tasks * panels;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        float *buf = aligned_alloc(32, KC * NP * sizeof(float));
        float *tile = aligned_alloc(32, MC_MAX * NP * sizeof(float));
        if (!buf || !tile) failed = 1;
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) { /* consecutive tasks of a thread share their rows of x */
            if (!buf || !tile) continue;
            const int64_t m0 = (t / panels) * mc, n0 = (t % panels) * NP;
            const int64_t rows = (M - m0 < mc) ? M - m0 : mc;
            const int nv = (N - n0) >= NP ? 2 : 1;
            for (int64_t k0 = 0; k0 < K; k0 += KC) {
                const int64_t k1 = (k0 + KC < K) ? k0 + KC : K;
                dequant_chunk(qweight, N, scales, zeros, g_idx, k0, k1, n0, nv, bits, buf);
                for (int64_t r0 = 0; r0 < rows; r0 += MR) {
                    const int r = (int)(rows - r0 < MR ? rows - r0 : MR);
                    MICRO[r - 1][nv - 1](xf + (m0 + r0) * K + k0, K, buf, (int)(k1 - k0), tile + r0 * NP, k0 == 0);
                }
            }
            store_rows(tile, rows, nv, bias, x_is_f32, n0, (char *)y + m0 * N * (x_is_f32 ? 4 : 2), N);
        }
        free(buf);
        free(tile);
    }
    free(converted);
    return failed ? 2 : 0;
}
