/* The MSE clip search of ops/grid.py for float32 rows on x86-64 with AVX2 + FMA (ops/cpu_clip.py).
 *
 * For row r of x [rows, cols] and candidate k of [steps] (scale s = scales[k * rows + r], zero point
 * z = zeros[k * rows + r]):  err = s^norm * sum_j |clamp(round(x / s), -z, maxq - z) - x / s|^norm,
 * round to nearest even, the division exact (built without reciprocal math; the inputs are finite). Each row keeps the first
 * candidate of least error (strict <), as the one-at-a-time loop does. |.|^norm goes through glibc's vector
 * powf (libmvec, 8 lanes), so the sums round differently from torch's: candidates whose errors agree to
 * about 1e-6 may be told apart the other way.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

int hvg_clip_search(const float *x, int64_t rows, int64_t cols, const float *scales, const float *zeros,
                    int64_t steps, int maxq, float norm, int64_t *best_step, int threads) {
    if (rows < 0 || cols <= 0 || steps <= 0 || threads <= 0) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        float best = FLT_MAX;
        int64_t at = 0;
        for (int64_t k = 0; k < steps; k++) {
            const float s = scales[k * rows + r], z = zeros[k * rows + r];
            const float lo = -z, hi = (float)maxq - z;
            float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
            for (int64_t j = 0; j < cols; j++) {
                const float t = xr[j] / s;
                float q = nearbyintf(t);
                q = q < lo ? lo : (q > hi ? hi : q);
                acc += powf(fabsf(q - t), norm);
            }
            const float err = acc * powf(s, norm);
            if (k == 0 || err < best) { /* built with finite math: no infinities to compare with */
                best = err;
                at = k;
            }
        }
        best_step[r] = at;
    }
    return 0;
}
