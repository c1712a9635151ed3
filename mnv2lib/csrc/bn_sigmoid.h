/* BatchNorm (one affine channel set, training or running statistics) followed by a sigmoid, on small
 * tensors y of layout (B, C, inner): channel c's values are y[(b * C + c) * inner + i]. Used for the
 * gates of Triplet Attention (C = 1, inner = a branch plane) and SelfNorm (inner = 1). Sums are
 * accumulated in double; loops are written so that they vectorize (vexpf, not libm's expf).
 * Exported (one copy per library, which ctypes loads privately). */
#pragma once
#include <math.h>
#include <stdint.h>
#include "vexpf.h"

/* training: normalize with the batch mean and biased variance of y; bmean/bvar get the mean and the
 * unbiased variance (for the running statistics; NAN when a channel has one value). Otherwise the
 * running statistics rm/rv normalize. g = sigmoid(gamma * xhat + beta); xhat and invstd kept for backward. */
void bn_sigmoid_forward(const float* y, int64_t B, int64_t C, int64_t inner, const float* gamma, const float* beta,
                        const float* rm, const float* rv, int training, double eps, float* g, float* xhat,
                        float* invstd, float* bmean, float* bvar) {
    const int64_t n = B * inner;
    for (int64_t c = 0; c < C; c++) {
        double mean, var;
        if (training) {
            double s = 0.0;
            for (int64_t b = 0; b < B; b++) {
                const float* yr = y + (b * C + c) * inner;
#pragma omp simd reduction(+:s)
                for (int64_t i = 0; i < inner; i++) s += yr[i];
            }
            mean = s / (double)n;
            double q = 0.0;
            const float mf = (float)mean;
            for (int64_t b = 0; b < B; b++) {
                const float* yr = y + (b * C + c) * inner;
#pragma omp simd reduction(+:q)
                for (int64_t i = 0; i < inner; i++) {
                    const float d = yr[i] - mf;
                    q += (double)(d * d);
                }
            }
            var = q / (double)n;
            bmean[c] = (float)mean;
            bvar[c] = n > 1 ? (float)(q / (double)(n - 1)) : NAN;
        } else {
            mean = rm[c];
            var = rv[c];
        }
        const float is = (float)(1.0 / sqrt(var + eps)), m = (float)mean, w = gamma[c], a = beta[c];
        invstd[c] = is;
        for (int64_t b = 0; b < B; b++) {
            const float* yr = y + (b * C + c) * inner;
            float* xr = xhat + (b * C + c) * inner;
            float* gr = g + (b * C + c) * inner;
#pragma omp simd
            for (int64_t i = 0; i < inner; i++) {
                const float h = (yr[i] - m) * is;
                xr[i] = h;
                gr[i] = 1.f / (1.f + vexpf(-(h * w + a)));
            }
        }
    }
}

/* From dg (gradient of the gate): dy (gradient of y), dgamma, dbeta (per channel). */
void bn_sigmoid_backward(const float* dg, const float* g, const float* xhat, int64_t B, int64_t C, int64_t inner,
                         const float* gamma, const float* invstd, int training, float* dy, float* dgamma,
                         float* dbeta) {
    const int64_t n = B * inner;
    for (int64_t c = 0; c < C; c++) {
        double sd = 0.0, sdx = 0.0;  /* sums of d(pre-sigmoid) and d(pre-sigmoid) * xhat */
        for (int64_t b = 0; b < B; b++) {
            const int64_t o = (b * C + c) * inner;
#pragma omp simd reduction(+:sd, sdx)
            for (int64_t i = 0; i < inner; i++) {
                const float d = dg[o + i] * g[o + i] * (1.f - g[o + i]);
                dy[o + i] = d;
                sd += (double)d;
                sdx += (double)(d * xhat[o + i]);
            }
        }
        dgamma[c] = (float)sdx;
        dbeta[c] = (float)sd;
        const float k = gamma[c] * invstd[c];
        const float mean_d = training ? (float)(sd / (double)n) : 0.f;
        const float mean_dx = training ? (float)(sdx / (double)n) : 0.f;
        for (int64_t b = 0; b < B; b++) {
            const int64_t o = (b * C + c) * inner;
#pragma omp simd
            for (int64_t i = 0; i < inner; i++) dy[o + i] = k * (dy[o + i] - mean_d - xhat[o + i] * mean_dx);
        }
    }
}
