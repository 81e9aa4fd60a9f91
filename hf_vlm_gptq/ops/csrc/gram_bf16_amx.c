/* h[i, j] += alpha * sum_k x[k, i] * x[k, j] over the upper block triangle of h, for bfloat16 rows x, on AMX
 * tiles (ops/cpu_gram.py). The contract of gram_bf16_avx512bf16.c, but x as it is, not transposed:
 *
 *   x : bfloat16 [n, ldx], row-major (the rows themselves), n even (the caller pads an odd count with a zero row)
 *   h : float32 [d, ldh]; for every column panel [n0, n0 + 64) the rows [0, min(n0 + 64, d)) are updated (the
 *       diagonal panel whole, so the caller mirrors the strict upper triangle into the lower one)
 * Requirements (checked by the Python caller): d % 16 == 0, d <= ldx, AMX-TILE/AMX-BF16, AVX512F/BW.
 *
 * tdpbf16ps multiplies bfloat16 pairs exactly and sums them in float32 (inputs and results below float32's
 * normal range flushed to zero), so h gets float32 sums of exact products, as from the AVX512-BF16 kernel and
 * the float32 path, in another order. Rows go in chunks of KR. The second operand's tiles are two rows of x
 * interleaved (16 columns, a pair of rows per tile row: read in order, no transpose of x); the first
 * operand's are those tiles transposed as 16 x 16 pairs (its rows are x's columns). Then every 32 x 32 block
 * of the triangle is four float32 tiles summed over the chunk and added, times alpha, into h. Blocks are split
 * over the threads (each owns its blocks of h).
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "thread_scratch.h"

#ifndef KR
#define KR 256 /* rows per chunk (a multiple of 32): the chunk's tiles of both operands, 2 * d * KR * 2 bytes */
#endif
#define TR 16 /* rows of a tile */
#define TK 32 /* bfloat16 columns of a tile (64 bytes a row) */
#define TILE (TR * TK) /* bfloat16 numbers in a tile */
/* Tiles (amx_tiles.h configures them): 0-3 the 2 x 2 float32 sums of a 32 x 32 block; 4-5 the first operand
 * (x's columns), 6-7 the second (pairs of x's rows). */




/* b[(g * steps + s) * TILE] row p = for c = 0..15 the pair (x[k + 2p, 16 g + c], x[k + 2p + 1, 16 g + c]),
 * k = k0 + 32 s (0 past n): the layout of tdpbf16ps's second operand */
static void pack_pair_tiles(const uint16_t *x, int64_t ldx, int64_t groups, int64_t k0, int64_t kr, int64_t n,
                            uint16_t *b) {
    const int64_t steps = (kr + TK - 1) / TK;
#pragma omp for schedule(static)
    for (int64_t s = 0; s < steps; s++)
        for (int p = 0; p < TR; p++) {
            const int64_t k = k0 + s * TK + 2 * p; /* n is even: rows k and k + 1 both exist, or neither */
            for (int64_t g = 0; g < groups; g++) {
                __m512i pairs = _mm512_setzero_si512();
                if (k < n) {
                    const uint16_t *even = x + k * ldx + 16 * g, *odd = even + ldx;
                    const __m512i lo = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)even));
                    const __m512i hi = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)odd));
                    pairs = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
                }
                _mm512_storeu_si512((void *)(b + (g * steps + s) * TILE + p * TK), pairs);
            }
        }
}

/* a = b with each tile transposed as 16 x 16 pairs: a's row r holds x's column 16 g + r over the tile's 32 rows,
 * the layout of tdpbf16ps's first operand (a transpose of 32-bit pairs is its own inverse) */
static void pair_transpose_tiles(const uint16_t *b, int64_t tiles, uint16_t *a) {
    const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                           _mm512_set1_epi32(TK / 2));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int32_t *src = (const int32_t *)(b + t * TILE);
        __m512i *dst = (__m512i *)(a + t * TILE);
        for (int p = 0; p < TR; p++) _mm512_storeu_si512(dst + p, _mm512_i32gather_epi32(idx, src + p, 4));
    }
}

int hvg_gram_bf16_rows(const uint16_t *x, int64_t ldx, int64_t d, int64_t n, float *h, int64_t ldh, float alpha,
                       int threads) {
    if (d <= 0 || n < 0 || d % 16 != 0 || n % 2 != 0 || ldx < d || ldh < d || threads < 1) return 1;
    if (n == 0) return 0;
    if (!amx_permitted()) return 3;
    const int64_t groups = d / 16, blocks = (groups + 1) / 2, steps_max = KR / TK;
    /* the blocks (row block i, column block j) of the panels' contract: j's 64-column panel, rows up to its end */
    int64_t pairs = 0;
    for (int64_t j = 0; j < blocks; j++) pairs += (j / 2) * 2 + 2 < blocks ? (j / 2) * 2 + 2 : blocks;
    int32_t *todo = malloc(sizeof(int32_t) * 2 * (size_t)pairs);
    const size_t operand = (size_t)groups * steps_max * TILE * sizeof(uint16_t);
    uint16_t *a = scratch_get(0, operand), *b = scratch_get(1, operand);
    if (!todo || !a || !b) {
        free(todo);
        return 2;
    }
    int64_t at = 0;
    for (int64_t j = 0; j < blocks; j++) {
        const int64_t top = (j / 2) * 2 + 2 < blocks ? (j / 2) * 2 + 2 : blocks;
        for (int64_t i = 0; i < top; i++, at++) todo[2 * at] = (int32_t)i, todo[2 * at + 1] = (int32_t)j;
    }
#pragma omp parallel num_threads(threads)
    {
        float sums[2 * TR * 2 * TR];
        configure_tiles();
        for (int64_t k0 = 0; k0 < n; k0 += KR) {
            const int64_t kr = n - k0 < KR ? n - k0 : KR, steps = (kr + TK - 1) / TK;
            pack_pair_tiles(x, ldx, groups, k0, kr, n, b);
            pair_transpose_tiles(b, groups * steps, a);
#pragma omp for schedule(static)
            for (int64_t q = 0; q < pairs; q++) {
                const int64_t i = todo[2 * q], j = todo[2 * q + 1];
                const int mi = 2 * i + 1 < groups ? 2 : 1, nj = 2 * j + 1 < groups ? 2 : 1;
                const uint16_t *a0 = a + (2 * i) * steps * TILE, *a1 = a0 + steps * TILE;
                const uint16_t *b0 = b + (2 * j) * steps * TILE, *b1 = b0 + steps * TILE;
                _tile_zero(0);
                _tile_zero(1);
                _tile_zero(2);
                _tile_zero(3);
                for (int64_t s = 0; s < steps; s++) {
                    _tile_loadd(4, a0 + s * TILE, 64);
                    _tile_loadd(6, b0 + s * TILE, 64);
                    _tile_dpbf16ps(0, 4, 6);
                    if (nj > 1) {
                        _tile_loadd(7, b1 + s * TILE, 64);
                        _tile_dpbf16ps(1, 4, 7);
                    }
                    if (mi > 1) {
                        _tile_loadd(5, a1 + s * TILE, 64);
                        _tile_dpbf16ps(2, 5, 6);
                        if (nj > 1) _tile_dpbf16ps(3, 5, 7);
                    }
                }
                _tile_stored(0, sums, 2 * TR * sizeof(float));
                _tile_stored(1, sums + TR, 2 * TR * sizeof(float));
                _tile_stored(2, sums + TR * 2 * TR, 2 * TR * sizeof(float));
                _tile_stored(3, sums + TR * 2 * TR + TR, 2 * TR * sizeof(float));
                const __m512 av = _mm512_set1_ps(alpha);
                for (int r = 0; r < TR * mi; r++) {
                    float *row = h + (32 * i + r) * ldh + 32 * j;
                    for (int v = 0; v < nj; v++)
                        _mm512_storeu_ps(row + 16 * v, _mm512_fmadd_ps(_mm512_loadu_ps(sums + r * 2 * TR + 16 * v), av,
                                                                       _mm512_loadu_ps(row + 16 * v)));
                }
            }
        }
        _tile_release();
    }
    scratch_done(0);
    scratch_done(1);
    free(todo);
    return 0;
}
