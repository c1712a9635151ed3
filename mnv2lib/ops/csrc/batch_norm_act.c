#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <omp.h>
#include "mish_math.h"
typedef int64_t i64;

/* BatchNorm in training (batch statistics) followed by an activation (act: ACT_RELU6 or ACT_MISH), as one pass
 * over the input for the statistics and one for the output; backward from the input again (the activation's
 * input is recomputed from it, so neither the normalized nor the activated tensor is kept).
 * Layout (B, C, inner): element (b, c, i) lies at (b * C + c) * inner + i (NCHW, nhwc = 0) or at
 * (b * inner + i) * C + c (channels_last, nhwc = 1). Mish is mish_math.h's, as the Mish kernels compute it.
 * Sums are accumulated in double, so one pass gives the mean and the variance (E[x^2] - mean^2 loses nothing
 * of float's precision unless |mean| exceeds the standard deviation some 10^4-fold). Each thread sums its own
 * share and the shares are added in thread order: a result depends on the thread count, not on timing. */

/* the per-channel scale of the normalization, from the stored float statistics: forward and backward compute
 * the same z = (x - mean) * scale + b (mean first, as PyTorch's BatchNorm: folding it into one offset loses
 * digits where the mean is large), so backward's ReLU6 mask is forward's exactly */
static void affine(i64 C, const float* w, const float* invstd, float* scale) {
    for (i64 c = 0; c < C; c++) scale[c] = w[c] * invstd[c];
}

enum { ACT_RELU6 = 0, ACT_MISH = 1 };

#define AI static inline __attribute__((always_inline))

/* ReLU6 (NaN stays NaN, as clamp) and g times its derivative at z: its mask, 0 at the kinks as hardtanh_backward's */
AI float relu6_value(float z) { return z < 0.f ? 0.f : (z > 6.f ? 6.f : z); }
AI float relu6_grad(float z, float g) { return (z > 0.f && z < 6.f) ? g : 0.f; }

/* Each elementwise loop below is written once as a macro of the activation and expanded once per activation
 * behind a branch outside the loop: with the activation a run-time argument inside the loop, the compiler
 * evaluated both (Mish's exponential for ReLU6 too) and the ReLU6 kernels ran 2.5x slower. STORE: backward's
 * first pass keeps g' in dx for the second (Mish's derivative costs more than a store and a load; ReLU6's
 * mask less) */
#define BY_ACTIVATION(LOOP) \
    do { if (act == ACT_MISH) LOOP(mish_value, mish_grad, 1) else LOOP(relu6_value, relu6_grad, 0) } while (0)

/* (sum, sum of products) per channel over the thread's share of the rows (nhwc) or planes (nchw), into
 * acc[t][0..C) and acc[t][C..2C); with g == NULL the sums of x and x * x, else of g' and g' * xhat, where
 * g' is g through the activation's derivative at z = (x - mean) * scale + b and xhat = (x - mean) * invstd */
static void channel_sums(const float* x, const float* g, i64 B, i64 C, i64 inner, int nhwc, const float* scale,
                         const float* b, const float* mean, const float* invstd, int act, float* dg, double* acc,
                         int nthreads) {
#pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        double* s = acc + (i64)t * 2 * C;
        double* q = s + C;
        for (i64 c = 0; c < 2 * C; c++) s[c] = 0.0;
        if (nhwc) {
            const i64 rows = B * inner, r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
            for (i64 r = r0; r < r1; r++) {
                const float* xr = x + r * C;
                if (!g) {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) {
                        const double v = xr[c];
                        s[c] += v;
                        q[c] += v * v;
                    }
                } else {
                    const float* gr = g + r * C;
#define SUMS_ROW(VALUE, GRAD, STORE) {                                                         \
    _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                                   \
        const float d = GRAD((xr[c] - mean[c]) * scale[c] + b[c], gr[c]);               \
        if (STORE) dr[c] = d;                                                           \
        s[c] += (double)d;                                                              \
        q[c] += (double)(d * ((xr[c] - mean[c]) * invstd[c]));                          \
    } }
                    float* dr = dg + r * C;
                    BY_ACTIVATION(SUMS_ROW);
                }
            }
        } else {
            const i64 c0 = C * t / nt, c1 = C * (t + 1) / nt;  /* whole channels per thread */
            for (i64 c = c0; c < c1; c++) {
                double sc = 0.0, qc = 0.0;
                for (i64 bb = 0; bb < B; bb++) {
                    const float* xr = x + (bb * C + c) * inner;
                    if (!g) {
#pragma omp simd reduction(+:sc, qc)
                        for (i64 i = 0; i < inner; i++) {
                            const double v = xr[i];
                            sc += v;
                            qc += v * v;
                        }
                    } else {
                        const float* gr = g + (bb * C + c) * inner;
                        const float a = scale[c], o = b[c], m = mean[c], is = invstd[c];
#define SUMS_PLANE(VALUE, GRAD, STORE) {                                                       \
    _Pragma("omp simd reduction(+:sc, qc)") for (i64 i = 0; i < inner; i++) {           \
        const float d = GRAD((xr[i] - m) * a + o, gr[i]);                               \
        if (STORE) dr[i] = d;                                                           \
        sc += (double)d;                                                                \
        qc += (double)(d * ((xr[i] - m) * is));                                         \
    } }
                        float* dr = dg + (bb * C + c) * inner;
                        BY_ACTIVATION(SUMS_PLANE);
                    }
                }
                s[c] = sc;
                q[c] = qc;
            }
        }
    }
}

/* thread shares added in thread order into out[0..2C) (channels of the NCHW split have one nonzero share) */
static void add_shares(const double* acc, i64 C, int nt, double* out) {
    for (i64 c = 0; c < 2 * C; c++) out[c] = 0.0;
    for (int t = 0; t < nt; t++)
        for (i64 c = 0; c < 2 * C; c++) out[c] += acc[(i64)t * 2 * C + c];
}

static int threads_for(i64 work, int nthreads) {
    return work < nthreads ? (work > 0 ? (int)work : 1) : nthreads;
}

/* y = act(w * (x - mean) * invstd + b) with the batch's mean and biased variance (n = B * inner > 1 values
 * per channel); mean, invstd and the unbiased variance (for the running statistics) per channel.
 * Returns nonzero when the work buffers cannot be allocated (nothing written then). */
int bn_act_forward(const float* x, i64 B, i64 C, i64 inner, int nhwc, const float* w, const float* b, double eps,
                   int act, float* y, float* mean, float* invstd, float* unbiased_var, int nthreads) {
    const i64 n = B * inner;
    nthreads = threads_for(nhwc ? n : C, nthreads);
    double* acc = malloc(sizeof(double) * 2 * C * (nthreads + 1));
    float* scale = malloc(sizeof(float) * C);
    if (!acc || !scale) {
        free(acc);
        free(scale);
        return 1;
    }
    double* total = acc + (i64)nthreads * 2 * C;
    channel_sums(x, NULL, B, C, inner, nhwc, NULL, NULL, NULL, NULL, act, NULL, acc, nthreads);
    add_shares(acc, C, nthreads, total);
    for (i64 c = 0; c < C; c++) {
        const double m = total[c] / (double)n;
        double var = total[C + c] / (double)n - m * m;
        if (var < 0.0) var = 0.0;  /* (rounding of a constant channel) */
        mean[c] = (float)m;
        invstd[c] = (float)(1.0 / sqrt(var + eps));
        unbiased_var[c] = (float)(var * (double)n / (double)(n - 1));
    }
    affine(C, w, invstd, scale);
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 r = 0; r < n; r++) {
            const float* xr = x + r * C;
            float* yr = y + r * C;
#define OUT_ROW(VALUE, GRAD, STORE) { \
    _Pragma("omp simd") for (i64 c = 0; c < C; c++) yr[c] = VALUE((xr[c] - mean[c]) * scale[c] + b[c]); }
            BY_ACTIVATION(OUT_ROW);
        }
    } else {
#pragma omp parallel for num_threads(threads_for(B * C, nthreads)) schedule(static)
        for (i64 p = 0; p < B * C; p++) {
            const i64 c = p % C;
            const float a = scale[c], o = b[c], m = mean[c];
            const float* xr = x + p * inner;
            float* yr = y + p * inner;
#define OUT_PLANE(VALUE, GRAD, STORE) { \
    _Pragma("omp simd") for (i64 i = 0; i < inner; i++) yr[i] = VALUE((xr[i] - m) * a + o); }
            BY_ACTIVATION(OUT_PLANE);
        }
    }
    free(acc);
    free(scale);
    return 0;
}

/* From grad (of y): dx, dw = sum(g' * xhat), db = sum(g'), with g' = grad * act'(z) and BatchNorm's training
 * backward dx = w * invstd * (g' - mean(g') - xhat * mean(g' xhat)).
 * Returns nonzero when the work buffers cannot be allocated. */
int bn_act_backward(const float* grad, const float* x, i64 B, i64 C, i64 inner, int nhwc, const float* w,
                    const float* b, const float* mean, const float* invstd, int act, float* dx, float* dw, float* db,
                    int nthreads) {
    const i64 n = B * inner;
    nthreads = threads_for(nhwc ? n : C, nthreads);
    double* acc = malloc(sizeof(double) * 2 * C * (nthreads + 1));
    float* buf = malloc(sizeof(float) * 3 * C);
    if (!acc || !buf) {
        free(acc);
        free(buf);
        return 1;
    }
    double* total = acc + (i64)nthreads * 2 * C;
    float *scale = buf, *mean_g = buf + C, *mean_gx = buf + 2 * C;
    affine(C, w, invstd, scale);
    channel_sums(x, grad, B, C, inner, nhwc, scale, b, mean, invstd, act, dx, acc, nthreads);
    add_shares(acc, C, nthreads, total);
    for (i64 c = 0; c < C; c++) {
        db[c] = (float)total[c];
        dw[c] = (float)total[C + c];
        mean_g[c] = (float)(total[c] / (double)n);
        mean_gx[c] = (float)(total[C + c] / (double)n);
    }
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 r = 0; r < n; r++) {
            const float* xr = x + r * C;
            const float* gr = grad + r * C;
            float* dr = dx + r * C;
#define DX_ROW(VALUE, GRAD, STORE) {                                                           \
    _Pragma("omp simd") for (i64 c = 0; c < C; c++) {                                   \
        const float d = STORE ? dr[c] : GRAD((xr[c] - mean[c]) * scale[c] + b[c], gr[c]); \
        const float h = (xr[c] - mean[c]) * invstd[c];                                  \
        dr[c] = scale[c] * (d - mean_g[c] - h * mean_gx[c]);                            \
    } }
            BY_ACTIVATION(DX_ROW);
        }
    } else {
#pragma omp parallel for num_threads(threads_for(B * C, nthreads)) schedule(static)
        for (i64 p = 0; p < B * C; p++) {
            const i64 c = p % C;
            const float a = scale[c], o = b[c], m = mean[c], is = invstd[c], mg = mean_g[c], mgx = mean_gx[c];
            const float* xr = x + p * inner;
            const float* gr = grad + p * inner;
            float* dr = dx + p * inner;
#define DX_PLANE(VALUE, GRAD, STORE) {                                                         \
    _Pragma("omp simd") for (i64 i = 0; i < inner; i++) {                               \
        const float d = STORE ? dr[i] : GRAD((xr[i] - m) * a + o, gr[i]);               \
        dr[i] = a * (d - mg - (xr[i] - m) * is * mgx);                                  \
    } }
            BY_ACTIVATION(DX_PLANE);
        }
    }
    free(acc);
    free(buf);
    return 0;
}
