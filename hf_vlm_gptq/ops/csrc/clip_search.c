/* The MSE clip search of ops/grid.py for float32 rows on x86-64, built for AVX2 + FMA or for AVX-512
 * (ops/cpu_clip.py).
 *
 * For row r of x [rows, cols] and candidate k of [steps] (scale s = scales[k * rows + r], zero point
 * z = zeros[k * rows + r]):  err = s^norm * sum_j |clamp(round(x / s), -z, maxq - z) - x / s|^norm,
 * round to nearest even, x / s as x * (1 / s) (within an ulp of the division: the error sums move by about
 * 1e-7 relative, and a value on a rounding tie is 0.5 from either neighbour). Each row keeps the first
 * candidate of least error (strict <), as the one-at-a-time loop does. Four candidates go through the row in
 * one pass (four independent chains of the polynomials below per vector of x). When the candidates shrink one
 * range (the ops/grid.py candidates do) the search stops at the first candidate whose clamped elements alone
 * cost more than the best error so far: no later candidate can be better (see `shrinking`).
 *
 * |e|^norm is computed as 2^(norm * log2 e) with two polynomials (log2(1 + t) on [0, 1): degree 8, error
 * 1.3e-7; 2^f on [0, 1): degree 6, relative error 6e-9; Chebyshev fits), about 3e-7 relative in all, in
 * loops the compiler vectorises (without `omp simd`, which kept gcc 12 from vectorising the four-candidate loop
 * at 512 bits); e below 1e-30 counts as 0. So the sums differ from torch's by that much:
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

/* over one row, for one candidate: sum_j |clamp(round(x_j * inv), lo, hi) - x_j * inv|^norm, and the part of
 * that sum from the clamped elements (round(x_j * inv) outside [lo, hi]) */
static inline void row_error(const float *xr, int64_t cols, float inv, float lo, float hi, float norm, float *sum,
                             float *clamped) {
    float acc = 0.0f, cut = 0.0f;
    for (int64_t j = 0; j < cols; j++) {
        const float t = xr[j] * inv, r = nearbyintf(t);
        const float q = r < lo ? lo : (r > hi ? hi : r);
        const float e = pow_abs(fabsf(q - t), norm);
        acc += e;
        cut += q != r ? e : 0.0f;
    }
    *sum = acc, *clamped = cut;
}

/* the same sums for four candidates in one pass over the row (four independent chains per vector of x); the
 * clamped part for the last of them only (the one the stopping rule reads) */
static inline void row_errors4(const float *xr, int64_t cols, const float *inv, const float *lo, const float *hi,
                               float norm, float *sum, float *clamped_last) {
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, c3 = 0.0f;
    for (int64_t j = 0; j < cols; j++) {
        const float x = xr[j];
        const float t0 = x * inv[0], t1 = x * inv[1], t2 = x * inv[2], t3 = x * inv[3];
        float q0 = nearbyintf(t0), q1 = nearbyintf(t1), q2 = nearbyintf(t2), q3 = nearbyintf(t3);
        const float r3 = q3;
        q0 = q0 < lo[0] ? lo[0] : (q0 > hi[0] ? hi[0] : q0);
        q1 = q1 < lo[1] ? lo[1] : (q1 > hi[1] ? hi[1] : q1);
        q2 = q2 < lo[2] ? lo[2] : (q2 > hi[2] ? hi[2] : q2);
        q3 = q3 < lo[3] ? lo[3] : (q3 > hi[3] ? hi[3] : q3);
        a0 += pow_abs(fabsf(q0 - t0), norm);
        a1 += pow_abs(fabsf(q1 - t1), norm);
        a2 += pow_abs(fabsf(q2 - t2), norm);
        const float e3 = pow_abs(fabsf(q3 - t3), norm);
        a3 += e3;
        c3 += q3 != r3 ? e3 : 0.0f;
    }
    sum[0] = a0, sum[1] = a1, sum[2] = a2, sum[3] = a3;
    *clamped_last = c3;
}

/* Whether row r's candidates shrink one range: the same zero point, scales that never grow. Then an element
 * clamped by candidate k is clamped by every later one, further from its edge (the edges are -z * s and
 * (maxq - z) * s), so the clamped elements' error never decreases along the candidates. */
static int shrinking(const float *scales, const float *zeros, int64_t rows, int64_t steps, int64_t r) {
    for (int64_t k = 1; k < steps; k++)
        if (zeros[k * rows + r] != zeros[r] || scales[k * rows + r] > scales[(k - 1) * rows + r]) return 0;
    return 1;
}

/* a candidate whose clamped elements alone cost this much more than the best error so far ends the search when
 * the range shrinks: every later candidate costs at least as much (the slack covers the sums' rounding) */
#define CLAMPED_SLACK 1e-5f

int hvg_clip_search(const float *x, int64_t rows, int64_t cols, const float *scales, const float *zeros,
                    int64_t steps, int maxq, float norm, int64_t *best_step, int threads) {
    if (rows < 0 || cols <= 0 || steps <= 0 || threads <= 0) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *xr = x + r * cols;
        const int stop_early = shrinking(scales, zeros, rows, steps, r);
        float best = FLT_MAX;
        int64_t at = 0;
        for (int64_t k0 = 0; k0 < steps; k0 += 4) {
            const int64_t n = steps - k0 < 4 ? steps - k0 : 4;
            float inv[4], lo[4], hi[4], sums[4], clamped[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int64_t c = 0; c < n; c++) {
                const float z = zeros[(k0 + c) * rows + r];
                inv[c] = 1.0f / scales[(k0 + c) * rows + r];
                lo[c] = -z, hi[c] = (float)maxq - z;
            }
            if (n == 4) {
                row_errors4(xr, cols, inv, lo, hi, norm, sums, clamped + 3);
            } else {
                for (int64_t c = 0; c < n; c++) row_error(xr, cols, inv[c], lo[c], hi[c], norm, sums + c, clamped + c);
            }
            int done = 0;
            for (int64_t c = 0; c < n; c++) { /* in candidate order: the first of least error wins */
                const float unit = powf(scales[(k0 + c) * rows + r], norm);
                const float err = sums[c] * unit;
                if (k0 + c == 0 || err < best) { /* built with finite math: no infinities to compare with */
                    best = err;
                    at = k0 + c;
                }
                done |= stop_early && clamped[c] * unit > best * (1.0f + CLAMPED_SLACK);
            }
            if (done) break;
        }
        best_step[r] = at;
    }
    return 0;
}
