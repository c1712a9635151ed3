/* Mish and its derivative, one value at a time, as C that compilers vectorize: shared by the Mish kernels
 * (mish.c) and BatchNorm + Mish (batch_norm_act.c), so both compute the same function.
 * mish(v) = v * (t / (t + 2)), t = e (e + 2), e = exp(min(v, 20)) (0 below -87.3, as float's exp underflows
 * there, so that mish(-inf) is NaN like F.mish's). The ratio first: t / (t + 2) is exactly 1 from v = 20, so
 * mish(v) = v up to float's maximum (v * t overflowed from v ~ 1.5e21).
 * g * mish'(v): d/dv mish = t + v sigmoid(v) (1 - t^2) with t = n / d, n = e (e + 2), d = n + 2, and
 * sigmoid(v) (1 - t^2) = 4 e (e + 1) / d^2: one exponential. From v = 20 the second term, about 4 v e^-2v, is
 * far below float's resolution of 1: taken as 0 there, as F.mish's backward rounds it (with e clamped at e^20
 * it grew with v instead: 1.17 at v = 1e16); v * 0 keeps F.mish's NaN at v = +inf. */
#pragma once
#include "vexpf.h"

static inline __attribute__((always_inline)) float mish_value(float v) {
    const float e = v >= -87.3f ? vexpf(v < 20.f ? v : 20.f) : 0.f;
    const float t = e * (e + 2.f);
    return v * (t / (t + 2.f));
}

static inline __attribute__((always_inline)) float mish_grad(float v, float g) {
    const float e = v >= -87.3f ? vexpf(v < 20.f ? v : 20.f) : 0.f;
    const float d = e * (e + 2.f) + 2.f;
    const float r = 1.f / d;
    const float s = v < 20.f ? (4.f * e * (e + 1.f)) * (r * r) : 0.f;
    return g * ((d - 2.f) * r + v * s);
}
