/* The whole weight W[N, K] of a 2-, 4- or 8-bit GPTQ checkpoint on x86-64 with AVX2 + FMA + F16C
 * (ops/cpu_dequant.py), bit for bit what ops/packing.py's torch path computes:
 *
 *   W[n, k] = (float)(code(k, n) - zero(g_idx[k], n)) * (float)scales[g_idx[k], n], cast once to the output
 *
 *   qweight : int32 [>= ceil(K / c), N], c = 32 / bits codes per word, low bits first:
 *             code(k, n) = (qweight[k / c, n] >> (bits * (k % c))) & (2^bits - 1)
 *   qzeros  : int32 [G, zw], zw >= ceil(N / c), packed along n the same way, v1: zero = (stored + 1) mod 2^bits
 *   scales  : float16 [G, N];  g_idx : int32 [K], each in [0, G) (checked by the caller), any order
 *   out     : [N, K] row-major in float32 (out_kind 0), bfloat16 (1) or float16 (2)
 *
 * code - zero is an exact integer and converts exactly, so the one float32 multiply is the only rounding
 * before the final cast; bfloat16 rounds to nearest even (NaN -> 0xFFFF, as torch's vectorised cast), float16
 * through F16C to nearest even. Built without fast math (nothing here may be reassociated or flushed).
 *
 * Work: the zero points are unpacked once into uint8 [G, N]; then blocks of 8 output rows are spread over the
 * threads, and each block is done 8 input columns at a time: 8 vectors (one per column, lanes along n) as the
 * checkpoint lays them out, transposed 8 x 8 into rows, cast and stored (two such for each 32-byte store of
 * bfloat16). Rows of a last partial block of 8 and columns past the last multiple of 8 take the same formula
 * one value at a time. The output's whole 2 MB
 * pages are advised as huge pages before they are written (where transparent huge pages are "madvise" or
 * "always"): faulting a fresh output in 4 KB pages can take longer than the dequantization itself.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

static inline uint16_t bf16_scalar(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if (f != f) return 0xFFFF;
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* 8 float32 -> their bfloat16 in the low halves of 32-bit lanes, round to nearest even, NaN -> 0xFFFF */
static inline __m256i bf16_bits(__m256 f) {
    const __m256i u = _mm256_castps_si256(f);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_UNORD_Q));
    return _mm256_or_si256(r, _mm256_and_si256(nan, _mm256_set1_epi32(0xFFFF)));
}

/* 8 float32 -> 8 bfloat16 */
static inline __m128i bf16_vec(__m256 f) {
    const __m256i r = bf16_bits(f);
    const __m256i packed = _mm256_packus_epi32(r, r); /* the low halves of both 128-bit lanes */
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

static inline void store8(void *out, int kind, int64_t at, __m256 v) {
    if (kind == 0)
        _mm256_storeu_ps((float *)out + at, v);
    else if (kind == 1)
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), bf16_vec(v));
    else
        _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}

static inline void store16(void *out, int kind, int64_t at, __m256 lo, __m256 hi) {
    if (kind == 1) { /* the bfloat16 of both in one 32-byte store */
        const __m256i packed = _mm256_packus_epi32(bf16_bits(lo), bf16_bits(hi)); /* lo0-3 hi0-3 lo4-7 hi4-7 */
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + at), _mm256_permute4x64_epi64(packed, 0xD8));
    } else {
        store8(out, kind, at, lo);
        store8(out, kind, at + 8, hi);
    }
}

static inline void store1(void *out, int kind, int64_t at, float v) {
    if (kind == 0)
        ((float *)out)[at] = v;
    else if (kind == 1)
        ((uint16_t *)out)[at] = bf16_scalar(v);
    else
        ((uint16_t *)out)[at] = (uint16_t)_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
}

static inline float value(const int32_t *qweight, int64_t N, const uint16_t *scales, const uint8_t *zeros,
                          const int32_t *g_idx, int64_t k, int64_t n, int bits) {
    const int per_word = 32 / bits;
    const uint32_t word = (uint32_t)qweight[(k / per_word) * N + n];
    const int32_t code = (int32_t)((word >> (bits * (k % per_word))) & ((1u << bits) - 1));
    const int64_t at = (int64_t)g_idx[k] * N + n;
    return (float)(code - (int32_t)zeros[at]) * _cvtsh_ss(scales[at]);
}

/* in-place 8 x 8 transpose: r[j] lane i -> r[i] lane j */
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
    r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
    r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
    r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
    r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

/* The group's scales and zero points for 8 output rows, as loaded last */
typedef struct {
    __m256 s;
    __m256i z;
    int32_t g;
} group8;

static inline void load_group(group8 *q, const uint16_t *scales, const uint8_t *zeros, int64_t N, int64_t n0,
                              int32_t g) {
    const int64_t at = (int64_t)g * N + n0;
    q->s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + at)));
    q->z = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zeros + at)));
    q->g = g;
}

/* r[j] lane i = W[n0 + i, k0 + j], j < 8; same: whether columns k0..k0+7 share one group */
static inline __attribute__((always_inline)) void columns8(const int32_t *qweight, int64_t N,
                                                           const uint16_t *scales, const uint8_t *zeros,
                                                           const int32_t *g_idx, int64_t n0, int64_t k0, int same,
                                                           group8 *q, __m256 r[8], const int BITS) {
    const int per_word = 32 / BITS;
    const __m256i mask = _mm256_set1_epi32((1 << BITS) - 1);
    if (same && g_idx[k0] != q->g) load_group(q, scales, zeros, N, n0, g_idx[k0]);
    __m256i w = _mm256_setzero_si256();
    for (int j = 0; j < 8; j++) {
        const int64_t k = k0 + j;
        if (!same && g_idx[k] != q->g) load_group(q, scales, zeros, N, n0, g_idx[k]);
        const int slot = (int)(k % per_word);
        if (slot == 0 || j == 0) w = _mm256_loadu_si256((const __m256i *)(qweight + (k / per_word) * N + n0));
        const __m256i c = _mm256_and_si256(_mm256_srli_epi32(w, BITS * slot), mask);
        r[j] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(c, q->z)), q->s);
    }
    transpose8(r);
}

/* rows [n0, n0 + 8) x columns [0, K), 16 then 8 columns at a time, then one by one; BITS and KIND are
 * constants in each instance, so the shifts, masks and the cast fold. same8[c]: columns 8c..8c+7 share a group */
static inline __attribute__((always_inline)) void block8(const int32_t *qweight, int64_t N, int64_t K,
                                                         const uint16_t *scales, const uint8_t *zeros,
                                                         const int32_t *g_idx, const uint8_t *same8, int64_t n0,
                                                         void *out, const int BITS, const int KIND) {
    group8 q = {_mm256_setzero_ps(), _mm256_setzero_si256(), -1};
    __m256 a[8], b[8];
    int64_t k0 = 0;
    for (; k0 + 16 <= K; k0 += 16) {
        columns8(qweight, N, scales, zeros, g_idx, n0, k0, same8[k0 / 8], &q, a, BITS);
        columns8(qweight, N, scales, zeros, g_idx, n0, k0 + 8, same8[k0 / 8 + 1], &q, b, BITS);
        for (int i = 0; i < 8; i++) store16(out, KIND, (n0 + i) * K + k0, a[i], b[i]);
    }
    if (k0 + 8 <= K) {
        columns8(qweight, N, scales, zeros, g_idx, n0, k0, same8[k0 / 8], &q, a, BITS);
        for (int i = 0; i < 8; i++) store8(out, KIND, (n0 + i) * K + k0, a[i]);
        k0 += 8;
    }
    for (int i = 0; i < 8; i++)
        for (int64_t k = k0; k < K; k++)
            store1(out, KIND, (n0 + i) * K + k, value(qweight, N, scales, zeros, g_idx, k, n0 + i, BITS));
}

#define DEFINE_BLOCK(B, T)                                                                                     \
    static void block8_##B##_##T(const int32_t *qweight, int64_t N, int64_t K, const uint16_t *scales,         \
                                 const uint8_t *zeros, const int32_t *g_idx, const uint8_t *same8, int64_t n0,  \
                                 void *out) {                                                                  \
        block8(qweight, N, K, scales, zeros, g_idx, same8, n0, out, B, T);                                     \
    }
#define DEFINE_BITS(B) DEFINE_BLOCK(B, 0) DEFINE_BLOCK(B, 1) DEFINE_BLOCK(B, 2)
DEFINE_BITS(2)
DEFINE_BITS(4)
DEFINE_BITS(8)

typedef void (*block_fn)(const int32_t *, int64_t, int64_t, const uint16_t *, const uint8_t *, const int32_t *,
                         const uint8_t *, int64_t, void *);
#define BITS_ROW(B) {block8_##B##_0, block8_##B##_1, block8_##B##_2}
static const block_fn BLOCKS[3][3] = {BITS_ROW(2), BITS_ROW(4), BITS_ROW(8)};

/* Returns 0 on success, 1 on bad arguments, 2 when the zero-point buffer could not be allocated. */
int hvg_dequant_avx2(const int32_t *qweight, const int32_t *qzeros, int64_t zw, const uint16_t *scales,
                     const int32_t *g_idx, int64_t G, int64_t N, int64_t K, int bits, int out_kind, void *out,
                     int threads) {
    if (N <= 0 || K <= 0 || G <= 0 || threads <= 0 || out_kind < 0 || out_kind > 2) return 1;
    if (bits != 2 && bits != 4 && bits != 8) return 1;
    const int per_word = 32 / bits;
    if (zw * per_word < N) return 1;
    uint8_t *zeros = malloc((size_t)(G * N)), *same8 = malloc((size_t)(K / 8 + 1));
    if (!zeros || !same8) {
        free(zeros);
        free(same8);
        return 2;
    }
    const uint32_t mask = (1u << bits) - 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t g = 0; g < G; g++)
        for (int64_t n = 0; n < N; n++) {
            const uint32_t word = (uint32_t)qzeros[g * zw + n / per_word];
            zeros[g * N + n] = (uint8_t)(((word >> (bits * (n % per_word))) + 1) & mask);
        }
    for (int64_t c = 0; c < K / 8; c++) {
        int same = 1;
        for (int j = 1; j < 8; j++) same &= g_idx[8 * c + j] == g_idx[8 * c];
        same8[c] = (uint8_t)same;
    }
    { /* huge pages for the (usually fresh) output: on first touch, 4 KB page faults cost more than the work */
        const uintptr_t huge = (uintptr_t)1 << 21, lo = ((uintptr_t)out + huge - 1) & ~(huge - 1);
        const uintptr_t hi = ((uintptr_t)out + (uintptr_t)(N * K) * (out_kind ? 2 : 4)) & ~(huge - 1);
        if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE); /* a hint: its failure changes nothing */
    }
    const block_fn block = BLOCKS[bits == 2 ? 0 : bits == 4 ? 1 : 2][out_kind];
    const int64_t blocks = N / 8;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) block(qweight, N, K, scales, zeros, g_idx, same8, 8 * b, out);
    for (int64_t n = 8 * blocks; n < N; n++)
        for (int64_t k = 0; k < K; k++)
            store1(out, out_kind, n * K + k, value(qweight, N, scales, zeros, g_idx, k, n, bits));
    free(zeros);
    free(same8);
    return 0;
}
