/* What the bf16 low-bit GEMM kernels share (lowbit_gemm_avx512bf16.c, lowbit_gemm_amx.c): the exact
 * dequantization of a weight chunk into the pair-interleaved layout that both vdpbf16ps and AMX's tdpbf16ps
 * read as their second operand, and the float32 -> bfloat16 store of finished rows (+ bias). Needs
 * AVX512F/BW/VBMI/BF16 and F16C. */
#ifndef HVG_LOWBIT_DEQUANT_H
#define HVG_LOWBIT_DEQUANT_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

/* s[v], z[v]: the scales and 2^23 + the zero points of columns at + 16 v .. at + 16 v + 15, for v < nv */
static inline __attribute__((always_inline)) void group_params(const uint16_t *scales, const uint8_t *zeros,
                                                               int64_t at, const int nv, __m512 two23, __m512 *s,
                                                               __m512 *z) {
    for (int v = 0; v < nv; v++) {
        s[v] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + at + 16 * v)));
        z[v] = _mm512_add_ps(two23, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                        _mm_loadu_si128((const __m128i *)(zeros + at + 16 * v)))));
    }
}

/* buf[p * ld + v] = 32 bfloat16: W[n0 + 16 v + i, k0 + 2 p + j] at position 2 i + j, for v < nv <= 4.
 * (code - zero) is formed as a float32 without an integer conversion: the bits 0x4B000000 | code are the
 * float 2^23 + code, and (2^23 + code) - (2^23 + zero) is exact, so the product and its rounding are the
 * reference's. */
static inline __attribute__((always_inline)) void dequant_body(
    const int32_t *qweight, int64_t N, const uint16_t *scales, const uint8_t *zeros, const int32_t *g_idx,
    int64_t k0, int64_t k1, int64_t n0, const int nv, int bits, __m512bh *buf, int64_t ld, int64_t ahead,
    int64_t K) {
    const int per_word_log2 = bits == 2 ? 4 : bits == 4 ? 3 : 2; /* 16, 8 or 4 codes per int32 */
    static const short order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i interleave = _mm512_loadu_si512((const void *)order);
    const __m512i mask = _mm512_set1_epi32((1 << bits) - 1), magic = _mm512_set1_epi32(0x4B000000);
    const __m512 two23 = _mm512_set1_ps(8388608.0f);
    __m512 s_even[4], s_odd[4], z_even[4], z_odd[4]; /* z: 2^23 + zero point; set at the first pair */
    for (int v = 0; v < 4; v++) s_even[v] = s_odd[v] = z_even[v] = z_odd[v] = two23;
    int32_t g_even = -1, g_odd = -1;
    for (int64_t k = k0; k < k1; k += 2) {
        const int32_t ge = g_idx[k], go = g_idx[k + 1];
        if (ge != g_even) {
            group_params(scales, zeros, (int64_t)ge * N + n0, nv, two23, s_even, z_even);
            g_even = ge;
        }
        if (go != g_odd) {
            group_params(scales, zeros, (int64_t)go * N + n0, nv, two23, s_odd, z_odd);
            g_odd = go;
        }
        const int at_bit = (int)(k & ((1 << per_word_log2) - 1)) * bits; /* k even: k + 1 is in the same word */
        const __m128i shift_even = _mm_cvtsi32_si128(at_bit);
        const __m128i shift_odd = _mm_cvtsi32_si128(at_bit + bits);
        const int32_t *row = qweight + (k >> per_word_log2) * N + n0;
        __m512bh *out = buf + ((k - k0) >> 1) * ld;
        if (ahead && at_bit == 0 && k + ahead < K) /* the same columns of a word row `ahead` inputs on */
            for (int v = 0; v < nv; v++)
                _mm_prefetch((const char *)(qweight + ((k + ahead) >> per_word_log2) * N + n0 + 16 * v), _MM_HINT_T1);
        for (int v = 0; v < nv; v++) {
            const __m512i w = _mm512_loadu_si512((const void *)(row + 16 * v));
            /* (w >> shift) & mask | magic: one ternary-logic op after the shift */
            const __m512 ce = (__m512)_mm512_ternarylogic_epi32(_mm512_srl_epi32(w, shift_even), mask, magic, 0xEA);
            const __m512 co = (__m512)_mm512_ternarylogic_epi32(_mm512_srl_epi32(w, shift_odd), mask, magic, 0xEA);
            const __m512 fe = _mm512_mul_ps(_mm512_sub_ps(ce, z_even[v]), s_even[v]);
            const __m512 fo = _mm512_mul_ps(_mm512_sub_ps(co, z_odd[v]), s_odd[v]);
            const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(fo, fe); /* fe -> low 16, fo -> high 16 */
            out[v] = as_bh(_mm512_permutexvar_epi16(interleave, halves));
        }
    }
}

/* dequant_body, with the four-vector case (whole 64-column panels) compiled on its own; ahead > 0: the
 * words of input ahead (of K inputs) are prefetched into L2 on the way (the next chunk, read from memory) */
static void dequant_chunk(const int32_t *qweight, int64_t N, const uint16_t *scales, const uint8_t *zeros,
                          const int32_t *g_idx, int64_t k0, int64_t k1, int64_t n0, int nv, int bits,
                          __m512bh *buf, int64_t ld, int64_t ahead, int64_t K) {
    if (nv == 4)
        dequant_body(qweight, N, scales, zeros, g_idx, k0, k1, n0, 4, bits, buf, ld, ahead, K);
    else
        dequant_body(qweight, N, scales, zeros, g_idx, k0, k1, n0, nv, bits, buf, ld, ahead, K);
}

/* 4 bits: 16 packed words (one per output column) -> pair j of their 8 codes as the bfloat16 numbers 128 + q,
 * in the pair-interleaved layout (column i: lanes 2 i, 2 i + 1). select: codes_select(j). 128 + q is exact
 * (0x4300 | q: 128 has an exponent whose ulp is 1), so a product with it is exact in float32. */
static inline __m512i codes_select(int j) {
    const int64_t o = 8 * j;
    return _mm512_set1_epi64((o) | (o + 4) << 16 | (o + 32) << 32 | (o + 36) << 48);
}

static inline __m512i codes_as_bf16(__m512i words, __m512i select) {
    /* select (per byte): bit offsets so that each dword gets [q(2j), -, q(2j+1), -]; then keep the low
     * nibbles of bytes 0 and 2 and set the high bytes to 0x43: (r & 0x000F000F) | 0x43004300 */
    const __m512i r = _mm512_multishift_epi64_epi8(select, words);
    return _mm512_ternarylogic_epi32(r, _mm512_set1_epi32(0x000F000F), _mm512_set1_epi32(0x43004300), 0xEA);
}

static inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* y[i, n0 + 16 v + l] = bf16(c[i * ldc + 16 v + l] + bias[n0 + 16 v + l]) */
static void store_rows(const float *c, int64_t ldc, int64_t rows, int nv, const uint16_t *bias, int64_t n0,
                       uint16_t *y, int64_t N) {
    for (int64_t i = 0; i < rows; i++) {
        for (int v = 0; v < nv; v++) {
            __m512 acc = _mm512_loadu_ps(c + i * ldc + 16 * v);
            if (bias) {
                float b[16];
                for (int l = 0; l < 16; l++) b[l] = bf16_to_float(bias[n0 + 16 * v + l]);
                acc = _mm512_add_ps(acc, _mm512_loadu_ps(b));
            }
            _mm256_storeu_si256((__m256i *)(y + i * N + n0 + 16 * v), (__m256i)_mm512_cvtneps_pbh(acc));
        }
    }
}

#endif
