/* The MSE clip search of ops/grid.py for float32 rows on x86-64 with AVX2 + FMA (ops/cpu_clip.py).
 *
 * For row r of x [rows, cols] and candidate k of [steps] (scale s = scales[k * rows + r], zero point
 * z = zeros[k * rows + r]):  err = s^norm * sum_j |clamp(round(x / s), -z, maxq - z) - x / s|^norm,
 * round to nearest even, the division exact (built without reciprocal math; the inputs are finite). Each
 * row keeps the first candidate of least error (strict <), as the one-at-a-time loop does.
 *
 * |e|^norm is computed as 2^(norm * log2 e) with two polynomials (log2(1 + t) on [0, 1): degree 8, error
 * 1.3e-7; 2^f on [0, 1): degree 6, relative error 6e-9; Chebyshev fits), about 3e-7 relative in all, in
 * a loop the compiler vectorises; e below 1e-30 counts as 0. So the sums differ from torch's by that much:
 * candidates whose errors agree to about 1e-6 may be told apart the other way (the self-check allows 1e-5).
 */
#include <float.h>
#include <math.h>
#include <stdint.h>

static inline float pow_abs(float e, float norm) {
    union { float f; int32_t i; } u = {e}, v;
    const float ex = (float)(((u.i >> 23) & 0xff) - 127);
    u.i = (u.i & 0x007fffff) | 0x3f800000; /* the mantissa, in [1, 2) */
    const float t = u.f - 1.0f;
    float l = -0.008764195848772185f;
    l = l * t + 0.049655534179227086f;
    l = l * t - 0.13318061625456162f;
    l = l * t + 0.2377323343643341f;
    l = l * t - 0.3450792617026278f;
    l = l * t + 0.4780139269367432f;
    l = l * t - 0.7210606595845298f;
    l = l * t + 1.4426827124420007f;
    l = l * t + 1.3105134288871056e-07f;
    float y = norm * (ex + l);
    y = y < -126.0f ? -126.0f : (y > 127.0f ? 127.0f : y);
    const float whole = floorf(y), f = y - whole;
    float p = 0.00021871262344259372f;
    p = p * f + 0.001238241553112487f;
    p = p * f + 0.009686186291273446f;
    p = p * f + 0.055478912462218914f;
    p = p * f + 0.24023109676179424f;
    p = p * f + 0.6931468377006936f;
    p = p * f + 1.0000000061582064f;
    v.i = ((int32_t)whole + 127) << 23;
    return e < 1e-30f ? 0.0f : p * v.f;
}

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
                acc += pow_abs(fabsf(q - t), norm);
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
