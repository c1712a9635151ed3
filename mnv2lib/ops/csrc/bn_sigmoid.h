/* BatchNorm (one affine channel set, training or running statistics) followed by a sigmoid, on small
 * tensors y of layout (B, C, inner): channel c's values are y[(b * C + c) * inner + i]. Used for the
 * gates of Triplet Attention (C = 1, inner = a branch plane) and SelfNorm (inner = 1). Sums are
 * accumulated in double; loops are written so that they vectorize (vexpf, not libm's expf).
 * Exported (one copy per library, which ctypes loads privately). */
#pragma once
#include <math.h>
#include <stdint.h>
#include <omp.h>
#include "vexpf.h"

/* Samples are split evenly over nthreads threads (the Triplet Attention planes of a batch; SelfNorm's
 * handful of values per channel passes 1). Each thread sums its share and every thread adds the shares in
 * thread order, so a result depends on the thread count but not on timing. */
#define BN_MAX_THREADS 256  /* the shares are a fixed stack array (sized by the thread count it was a VLA) */
#define BN_SHARE \
    const int t = omp_get_thread_num(), nt = omp_get_num_threads(); \
    const int64_t b0 = B * t / nt, b1 = B * (t + 1) / nt;
static inline double bn_total(const double* shares, int nt) {
    double s = 0.0;
    for (int k = 0; k < nt; k++) s += shares[k];
    return s;
}

/* training: normalize with the batch mean and biased variance of y; bmean/bvar get the mean and the
 * unbiased variance (for the running statistics; NAN when a channel has one value). Otherwise the
 * running statistics rm/rv normalize. g = sigmoid(gamma * xhat + beta); xhat and invstd kept for backward. */
void bn_sigmoid_forward(const float* y, int64_t B, int64_t C, int64_t inner, const float* gamma, const float* beta,
                        const float* rm, const float* rv, int training, double eps, float* g, float* xhat,
                        float* invstd, float* bmean, float* bvar, int nthreads) {
    const int64_t n = B * inner;
    double shares[2][BN_MAX_THREADS];
    if (nthreads > BN_MAX_THREADS) nthreads = BN_MAX_THREADS;
#pragma omp parallel num_threads(nthreads)
    {
        BN_SHARE
        for (int64_t c = 0; c < C; c++) {
            double mean, var;
            if (training) {
                double s = 0.0;
                for (int64_t b = b0; b < b1; b++) {
                    const float* yr = y + (b * C + c) * inner;
#pragma omp simd reduction(+:s)
                    for (int64_t i = 0; i < inner; i++) s += yr[i];
                }
                shares[0][t] = s;
#pragma omp barrier
                mean = bn_total(shares[0], nt) / (double)n;
                double q = 0.0;
                const float mf = (float)mean;
                for (int64_t b = b0; b < b1; b++) {
                    const float* yr = y + (b * C + c) * inner;
#pragma omp simd reduction(+:q)
                    for (int64_t i = 0; i < inner; i++) {
                        const float d = yr[i] - mf;
                        q += (double)(d * d);
                    }
                }
                shares[1][t] = q;
#pragma omp barrier
                q = bn_total(shares[1], nt);
                var = q / (double)n;
                if (t == 0) {
                    bmean[c] = (float)mean;
                    bvar[c] = n > 1 ? (float)(q / (double)(n - 1)) : NAN;
                }
            } else {
                mean = rm[c];
                var = rv[c];
            }
            const float is = (float)(1.0 / sqrt(var + eps)), m = (float)mean, w = gamma[c], a = beta[c];
            if (t == 0) invstd[c] = is;
            for (int64_t b = b0; b < b1; b++) {
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
#pragma omp barrier  /* (the shares are reused by the next channel) */
        }
    }
}

/* From dg (gradient of the gate): dy (gradient of y), dgamma, dbeta (per channel). */
void bn_sigmoid_backward(const float* dg, const float* g, const float* xhat, int64_t B, int64_t C, int64_t inner,
                         const float* gamma, const float* invstd, int training, float* dy, float* dgamma,
                         float* dbeta, int nthreads) {
    const int64_t n = B * inner;
    double shares[2][BN_MAX_THREADS];
    if (nthreads > BN_MAX_THREADS) nthreads = BN_MAX_THREADS;
#pragma omp parallel num_threads(nthreads)
    {
        BN_SHARE
        for (int64_t c = 0; c < C; c++) {
            double sd = 0.0, sdx = 0.0;  /* sums of d(pre-sigmoid) and d(pre-sigmoid) * xhat */
            for (int64_t b = b0; b < b1; b++) {
                const int64_t o = (b * C + c) * inner;
#pragma omp simd reduction(+:sd, sdx)
                for (int64_t i = 0; i < inner; i++) {
                    const float d = dg[o + i] * g[o + i] * (1.f - g[o + i]);
                    dy[o + i] = d;
                    sd += (double)d;
                    sdx += (double)(d * xhat[o + i]);
                }
            }
            shares[0][t] = sd;
            shares[1][t] = sdx;
#pragma omp barrier
            sd = bn_total(shares[0], nt);
            sdx = bn_total(shares[1], nt);
            if (t == 0) {
                dgamma[c] = (float)sdx;
                dbeta[c] = (float)sd;
            }
            const float k = gamma[c] * invstd[c];
            const float mean_d = training ? (float)(sd / (double)n) : 0.f;
            const float mean_dx = training ? (float)(sdx / (double)n) : 0.f;
            for (int64_t b = b0; b < b1; b++) {
                const int64_t o = (b * C + c) * inner;
#pragma omp simd
                for (int64_t i = 0; i < inner; i++) dy[o + i] = k * (dy[o + i] - mean_d - xhat[o + i] * mean_dx);
            }
#pragma omp barrier
        }
    }
}
