/* CNSN kernels, float32: per-(sample, channel) plane statistics and the SelfNorm gating, for
 * contiguous (B, C, H, W) tensors (nhwc = 0: a plane of n = H * W values is read twice while it
 * is in cache) and channels_last ones (nhwc = 1: memory (B, H, W, C); a sample's n rows of C
 * values are read twice, vectorized over the channels). Per-plane arrays are (B, C) in both.
 * Statistics of an empty plane (n = 0) are NaN, as torch.mean and torch.std of an empty set; the
 * operators return early for an empty x, so the other kernels never see n = 0. */
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <omp.h>

typedef int64_t i64;
#define INLINE static inline __attribute__((always_inline))


#include "vexpf.h"

/* mean and std = sqrt(var + eps) of a plane; var unbiased, 0 for a single value, NaN for none */
INLINE void plane_stats(const float* restrict p, i64 n, float eps, float* mean, float* std) {
    float s = 0.f;
#pragma omp simd reduction(+:s)
    for (i64 i = 0; i < n; i++) s += p[i];
    const float m = s / (float)n;
    float q = 0.f;
#pragma omp simd reduction(+:q)
    for (i64 i = 0; i < n; i++) { const float d = p[i] - m; q += d * d; }
    *mean = m;
    *std = sqrtf((n > 1 ? q / (float)(n - 1) : n == 1 ? 0.f : NAN) + eps);
}

/* NHWC: mean and std of C channels of one sample (n rows of ld floats, the channels first in each).
 * Narrow rows (the early layers' 8-32 channels) are compiled with C constant, so the per-channel sums stay in
 * registers and a row is one or two vector operations instead of a short loop; wider ones go NHWC_BLOCK
 * channels at a time (the sums are stack arrays of C <= NHWC_BLOCK floats: sized by C they overflowed the
 * stack at a million channels). The same sums in the same order, with the products fused explicitly (fmaf)
 * as the vectorized loops of the general case fuse them: the same results to the bit. */
#define NHWC_BLOCK 1024
INLINE void stats_nhwc_impl(const float* restrict xb, const i64 C, i64 ld, i64 n, float eps, float* restrict mean,
                            float* restrict std) {
    float m[C], v[C];
    for (i64 c = 0; c < C; c++) { m[c] = 0.f; v[c] = 0.f; }
    for (i64 i = 0; i < n; i++) {
        const float* row = xb + i * ld;
#pragma omp simd
        for (i64 c = 0; c < C; c++) m[c] += row[c];
    }
    for (i64 c = 0; c < C; c++) m[c] /= (float)n;
    for (i64 i = 0; i < n; i++) {
        const float* row = xb + i * ld;
#pragma omp simd
        for (i64 c = 0; c < C; c++) { const float d = row[c] - m[c]; v[c] = fmaf(d, d, v[c]); }
    }
    for (i64 c = 0; c < C; c++) {
        mean[c] = m[c];
        std[c] = sqrtf((n > 1 ? v[c] / (float)(n - 1) : n == 1 ? 0.f : NAN) + eps);
    }
}

/* NHWC: out = x * g + shift per channel over C channels of one sample's n rows of ld floats (out may be x:
 * no restrict); C <= NHWC_BLOCK as in stats_nhwc_impl */
INLINE void apply_nhwc_impl(const float* xb, const i64 C, i64 ld, i64 n, const float* restrict g,
                            const float* restrict shift, float* ob) {
    float gl[C], sl[C];
    for (i64 c = 0; c < C; c++) { gl[c] = g[c]; sl[c] = shift[c]; }
    for (i64 i = 0; i < n; i++) {
        const float* xr = xb + i * ld;
        float* orow = ob + i * ld;
#pragma omp simd
        for (i64 c = 0; c < C; c++) orow[c] = fmaf(xr[c], gl[c], sl[c]);
    }
}

/* CALL(channels, offset of the first, row length): constant C for the narrow rows, else blocks of NHWC_BLOCK */
#define C_DISPATCH(CALL) \
    switch (C) { \
        case 8: CALL(8, 0, 8); break; \
        case 12: CALL(12, 0, 12); break; \
        case 16: CALL(16, 0, 16); break; \
        case 24: CALL(24, 0, 24); break; \
        case 32: CALL(32, 0, 32); break; \
        default: \
            for (i64 c0 = 0; c0 < C; c0 += NHWC_BLOCK) CALL(C - c0 < NHWC_BLOCK ? C - c0 : NHWC_BLOCK, c0, C); \
    }

static void sample_stats_nhwc(const float* restrict xb, i64 C, i64 n, float eps, float* restrict mean,
                              float* restrict std) {
    #define STATS_CALL(CC, C0, LD) stats_nhwc_impl(xb + (C0), CC, LD, n, eps, mean + (C0), std + (C0))
    C_DISPATCH(STATS_CALL)
    #undef STATS_CALL
}

static void sample_apply_nhwc(const float* xb, i64 C, i64 n, const float* restrict g,
                              const float* restrict shift, float* ob) {
    #define APPLY_CALL(CC, C0, LD) apply_nhwc_impl(xb + (C0), CC, LD, n, g + (C0), shift + (C0), ob + (C0))
    C_DISPATCH(APPLY_CALL)
    #undef APPLY_CALL
}

void cn_stats(const float* x, i64 B, i64 C, i64 n, int nhwc, double eps, float* mean, float* std, int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) sample_stats_nhwc(x + b * n * C, C, n, (float)eps, mean + b * C, std + b * C);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < B * C; k++) plane_stats(x + k * n, n, (float)eps, mean + k, std + k);
}

/* out = x * g + h, per plane (h may be NULL) */
void sn_apply(const float* x, i64 B, i64 C, i64 n, int nhwc, const float* g, const float* h, float* out,
              int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float *gb = g + b * C, *hb = h ? h + b * C : NULL;
            for (i64 i = 0; i < n; i++) {
                const float* xr = x + (b * n + i) * C;
                float* orow = out + (b * n + i) * C;
                if (hb) {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) orow[c] = xr[c] * gb[c] + hb[c];
                } else {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) orow[c] = xr[c] * gb[c];
                }
            }
        }
        return;
    }
    const i64 planes = B * C;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < planes; k++) {
        const float gk = g[k], hk = h ? h[k] : 0.f;
        const float* xp = x + k * n;
        float* op = out + k * n;
#pragma omp simd
        for (i64 i = 0; i < n; i++) op[i] = xp[i] * gk + hk;
    }
}

/* per plane: sgx = sum(grad * x), sg = sum(grad) (sg may be NULL) */
void sn_backward_reduce(const float* x, const float* go, i64 B, i64 C, i64 n, int nhwc, float* sgx, float* sg,
                        int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) {
            float *a = sgx + b * C, *s = sg ? sg + b * C : NULL;
            for (i64 c = 0; c < C; c++) a[c] = 0.f;
            if (s) for (i64 c = 0; c < C; c++) s[c] = 0.f;
            for (i64 i = 0; i < n; i++) {
                const float* xr = x + (b * n + i) * C;
                const float* gr = go + (b * n + i) * C;
#pragma omp simd
                for (i64 c = 0; c < C; c++) a[c] += gr[c] * xr[c];
                if (s) {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) s[c] += gr[c];
                }
            }
        }
        return;
    }
    const i64 planes = B * C;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < planes; k++) {
        const float* xp = x + k * n;
        const float* gp = go + k * n;
        float a = 0.f, b = 0.f;
#pragma omp simd reduction(+:a, b)
        for (i64 i = 0; i < n; i++) { a += gp[i] * xp[i]; b += gp[i]; }
        sgx[k] = a;
        if (sg) sg[k] = b;
    }
}

/* dx = grad * g + alpha + beta * (x - mean), per plane (grad and g may be NULL). The deviation is
 * taken first: alpha + beta * x - beta * mean would cancel catastrophically when |mean| >> std. */
void sn_backward_dx(const float* x, const float* go, i64 B, i64 C, i64 n, int nhwc, const float* g,
                    const float* alpha, const float* beta, const float* mean, float* dx, int nthreads) {
    if (nhwc) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float *ab = alpha + b * C, *bb = beta + b * C, *mb = mean + b * C, *gk = go ? g + b * C : NULL;
            for (i64 i = 0; i < n; i++) {
                const float* xr = x + (b * n + i) * C;
                float* dr = dx + (b * n + i) * C;
                if (go) {
                    const float* gr = go + (b * n + i) * C;
#pragma omp simd
                    for (i64 c = 0; c < C; c++) dr[c] = gr[c] * gk[c] + ab[c] + bb[c] * (xr[c] - mb[c]);
                } else {
#pragma omp simd
                    for (i64 c = 0; c < C; c++) dr[c] = ab[c] + bb[c] * (xr[c] - mb[c]);
                }
            }
        }
        return;
    }
    const i64 planes = B * C;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (i64 k = 0; k < planes; k++) {
        const float* xp = x + k * n;
        float* dp = dx + k * n;
        const float a = alpha[k], b = beta[k], m = mean[k];
        if (go) {
            const float* gp = go + k * n;
            const float gk = g[k];
#pragma omp simd
            for (i64 i = 0; i < n; i++) dp[i] = gp[i] * gk + a + b * (xp[i] - m);
        } else {
#pragma omp simd
            for (i64 i = 0; i < n; i++) dp[i] = a + b * (xp[i] - m);
        }
    }
}

/* gates of channels c0 .. c0+m-1 from their statistics (mean, std indexed from 0): out = x * g + shift */
INLINE void gate_values(const float* restrict q, i64 C, i64 c0, i64 m, int two, const float* restrict mean,
                        const float* restrict std, float* restrict g, float* restrict shift) {
    const float *q0 = q + c0, *q1 = q + C + c0, *q2 = q + 2 * C + c0;
    const float *q3 = q + 3 * C + c0, *q4 = q + 4 * C + c0, *q5 = q + 5 * C + c0;
#pragma omp simd
    for (i64 c = 0; c < m; c++) {
        const float gv = 1.f / (1.f + vexpf(-(q0[c] * mean[c] + q1[c] * std[c] + q2[c])));
        float sh = 0.f;
        if (two) {
            const float fv = 1.f / (1.f + vexpf(-(q3[c] * mean[c] + q4[c] * std[c] + q5[c])));
            sh = (fv - gv) * mean[c];
        }
        g[c] = gv;
        shift[c] = sh;
    }
}

/* xb and ob may be the same memory (the in-place operator): no restrict on them */
INLINE void sn_sample(const float* xb, i64 C, const i64 n, float eps, const float* restrict q, int two,
                      float* restrict st, float* ob) {
    const i64 chunk = n >= 4096 ? 1 : 4096 / n;
    for (i64 c0 = 0; c0 < C; c0 += chunk) {
        const i64 m = C - c0 < chunk ? C - c0 : chunk;
        float* mean = st;
        float* std = st + chunk;
        float* g = st + 2 * chunk;
        float* shift = st + 3 * chunk;
        for (i64 c = 0; c < m; c++) plane_stats(xb + (c0 + c) * n, n, eps, mean + c, std + c);
        gate_values(q, C, c0, m, two, mean, std, g, shift);
        for (i64 c = 0; c < m; c++) {
            const float* xp = xb + (c0 + c) * n;
            float* op = ob + (c0 + c) * n;
            const float gv = g[c], sh = shift[c];
#pragma omp simd
            for (i64 i = 0; i < n; i++) op[i] = xp[i] * gv + sh;
        }
    }
}

/* SelfNorm inference. Per channel c, gate(mean, std) = sigmoid(fc0 * mean + fc1 * std) through the BN
 * affine with running statistics; fc: (C, 2); bn: weight, bias, running mean, running var (C each).
 * One gate: out = x * g; two gates: out = g * (x - mean) + f * mean. f* may be NULL. */
int sn_eval(const float* x, i64 B, i64 C, i64 n, int nhwc, double eps,
            const float* gfc, const float* gw, const float* gb, const float* grm, const float* grv, double geps,
            const float* ffc, const float* fw, const float* fb, const float* frm, const float* frv, double feps,
            float* out, int nthreads) {
    const int two = ffc != NULL;
    /* per thread: the statistics, gates and shifts of the channels in hand (all C with NHWC; without, a
     * chunk of 4096 / n, n >= 1: the operators return early for an empty x) */
    const i64 per_thread = 4 * (nhwc ? C : n >= 4096 ? 1 : 4096 / n);
    /* per channel: gate input = q0 * mean + q1 * std + q2 (structure of arrays), then each thread's slice */
    float* q = malloc(sizeof(float) * (6 * C + per_thread * nthreads));
    if (!q) return 1;
    for (i64 c = 0; c < C; c++) {
        const double ga = gw[c] / sqrt((double)grv[c] + geps);
        q[c] = (float)(gfc[2 * c] * ga);
        q[C + c] = (float)(gfc[2 * c + 1] * ga);
        q[2 * C + c] = (float)(gb[c] - grm[c] * ga);
        if (two) {
            const double fa = fw[c] / sqrt((double)frv[c] + feps);
            q[3 * C + c] = (float)(ffc[2 * c] * fa);
            q[4 * C + c] = (float)(ffc[2 * c + 1] * fa);
            q[5 * C + c] = (float)(fb[c] - frm[c] * fa);
        }
    }
    if (nhwc) {
#pragma omp parallel num_threads(nthreads)
        {
            float* st = q + 6 * C + omp_get_thread_num() * per_thread;
            float *mean = st, *std = st + C, *g = st + 2 * C, *shift = st + 3 * C;
#pragma omp for schedule(static)
            for (i64 b = 0; b < B; b++) {
                sample_stats_nhwc(x + b * n * C, C, n, (float)eps, mean, std);
                gate_values(q, C, 0, C, two, mean, std, g, shift);
                sample_apply_nhwc(x + b * n * C, C, n, g, shift, out + b * n * C);
            }
        }
        free(q);
        return 0;
    }
#pragma omp parallel num_threads(nthreads)
    {
        float* st = q + 6 * C + omp_get_thread_num() * per_thread;
#pragma omp for schedule(static)
        for (i64 b = 0; b < B; b++) {
            const float* xb = x + b * C * n;
            float* ob = out + b * C * n;
            switch (n) {  /* constant plane sizes: unrolled reductions for the small maps */
                case 16: sn_sample(xb, C, 16, (float)eps, q, two, st, ob); break;
                case 64: sn_sample(xb, C, 64, (float)eps, q, two, st, ob); break;
                case 256: sn_sample(xb, C, 256, (float)eps, q, two, st, ob); break;
                case 1024: sn_sample(xb, C, 1024, (float)eps, q, two, st, ob); break;
                default: sn_sample(xb, C, n, (float)eps, q, two, st, ob);
            }
        }
    }
    free(q);
    return 0;
}

#include "bn_sigmoid.h"

/* SelfNorm's gate input, a grouped two-tap Conv1d on (mean, std): y[b][c] = fc[c][0] mean + fc[c][1] std */
void sn_gate_input(const float* mean, const float* std, const float* fc, i64 B, i64 C, float* y) {
    for (i64 b = 0; b < B; b++)
        for (i64 c = 0; c < C; c++) y[b * C + c] = fc[2 * c] * mean[b * C + c] + fc[2 * c + 1] * std[b * C + c];
}

/* its backward: d mean and d std accumulate (+=), dfc is written */
void sn_gate_input_backward(const float* dy, const float* mean, const float* std, const float* fc, i64 B, i64 C,
                            float* dmean, float* dstd, float* dfc) {
    for (i64 c = 0; c < C; c++) {
        double a = 0.0, s = 0.0;
        for (i64 b = 0; b < B; b++) {
            const float d = dy[b * C + c];
            dmean[b * C + c] += d * fc[2 * c];
            dstd[b * C + c] += d * fc[2 * c + 1];
            a += (double)d * mean[b * C + c];
            s += (double)d * std[b * C + c];
        }
        dfc[2 * c] = (float)a;
        dfc[2 * c + 1] = (float)s;
    }
}
