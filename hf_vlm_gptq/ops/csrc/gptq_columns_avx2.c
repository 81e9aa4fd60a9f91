/* The inner loop of GPTQ's column sweep (ops/gptq.py) for float32 on x86-64 with AVX2 + FMA (ops/cpu_gptq.py).
 *
 * The weight is held transposed: row j of w (stride ldw) is column j of the layer, `out` floats. For the
 * columns j = 0 .. n-1 of one range (a group, or what is left of a block), in order, with the grid of the
 * range (scale[o], zero[o] per output o):
 *
 *   code = clamp(round(w_j / scale) + zero, 0, maxq)      round to nearest even, the division exact
 *   q    = (code - zero) * scale
 *   err_j = (w_j - q) / u[j, j]                            (pre_j = w_j before rounding, GPTAQ)
 *   w_j  = q
 *   w_k -= u[j, k] * err_j  (+ p[j, k] * pre_j)           for k = j+1 .. n-1
 *
 * which is the column loop of the torch version with every update inside the range done as it goes (the
 * torch version defers some into a matrix product: the same sums, added in another order). Outputs are
 * independent: they are cut into tiles that stay in cache for the whole range, split over threads.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

static void tile(float *restrict w, int64_t ldw, int64_t o0, int64_t o1, int64_t n, const float *restrict u,
                 int64_t ldu, const float *restrict scale, const float *restrict zero, float maxq,
                 uint8_t *restrict codes, int64_t ldc, float *restrict err, int64_t lde, float *restrict pre,
                 const float *restrict p, int64_t ldp) {
    for (int64_t j = 0; j < n; j++) {
        float *restrict wj = w + j * ldw;
        float *restrict ej = err + j * lde;
        uint8_t *restrict cj = codes + j * ldc;
        float *restrict pj = pre != NULL ? pre + j * lde : NULL;
        const float d = u[j * ldu + j];
        if (pj != NULL)
            for (int64_t o = o0; o < o1; o++) pj[o] = wj[o];
        for (int64_t o = o0; o < o1; o++) {
            const float col = wj[o], s = scale[o], z = zero[o];
            float c = nearbyintf(col / s) + z;
            c = c < 0.0f ? 0.0f : (c > maxq ? maxq : c);
            const float q = (c - z) * s;
            cj[o] = (uint8_t)c;
            ej[o] = (col - q) / d;
            wj[o] = q;
        }
        for (int64_t k = j + 1; k < n; k++) {
            float *restrict wk = w + k * ldw;
            const float a = u[j * ldu + k];
            for (int64_t o = o0; o < o1; o++) wk[o] -= a * ej[o];
            if (pj != NULL) {
                const float b = p[j * ldp + k];
                for (int64_t o = o0; o < o1; o++) wk[o] += b * pj[o];
            }
        }
    }
}

int hvg_gptq_columns(float *w, int64_t ldw, int64_t out, int64_t n, const float *u, int64_t ldu,
                     const float *scale, const float *zero, int maxq, uint8_t *codes, int64_t ldc, float *err,
                     int64_t lde, float *pre, const float *p, int64_t ldp, int64_t tile_width, int threads) {
    if (out <= 0 || n <= 0 || tile_width <= 0 || threads <= 0 || maxq <= 0 || maxq > 255) return 1;
    if ((pre == NULL) != (p == NULL)) return 2;
    const int64_t tiles = (out + tile_width - 1) / tile_width;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t o0 = t * tile_width, o1 = o0 + tile_width < out ? o0 + tile_width : out;
        tile(w, ldw, o0, o1, n, u, ldu, scale, zero, (float)maxq, codes, ldc, err, lde, pre, p, ldp);
    }
    return 0;
}
