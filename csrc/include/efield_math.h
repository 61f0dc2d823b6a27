// Electric-image formulas shared by the C++ CPU kernel (csrc/cpu/efield.cpp) and the CUDA kernel
// (csrc/cuda/efield.cu), so both compute exactly the same thing. fp32, normalized units (see
// docs/efield.md): a pole of charge q at s has field q d / rho^3 at r, d = r - s, rho = |d| + eps;
// an induced dipole P at c has field (3 (P.d) d / |d|^2 - P) / rho^3.
//
// Every function takes the displacement d = receptor - source already formed: callers compute it
// as (fish position - source) + receptor offset, which keeps large arena coordinates out of the
// fp32 rounding of the small receptor offsets.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FM_HD __host__ __device__ __forceinline__
#else
#define FM_HD inline
#endif

namespace fastmodels {
namespace efield {

// Wall images, k = 0..3: mirrored across x = 0, x = W, y = 0, y = H. A point (x, y) maps to
// (sx * x + tx * W, sy * y + ty * H) and a dipole moment (px, py) to (sx * px, sy * py).
FM_HD float image_sign_x(int k) { return k < 2 ? -1.0f : 1.0f; }
FM_HD float image_sign_y(int k) { return k < 2 ? 1.0f : -1.0f; }
FM_HD float image_shift_x(int k, float W) { return k == 1 ? 2.0f * W : 0.0f; }
FM_HD float image_shift_y(int k, float H) { return k == 3 ? 2.0f * H : 0.0f; }

// Quotient a / b (b is a positive rho^3 or a clamped denominator, far inside 2^-126..2^126). On the GPU the
// hardware reciprocal (__fdividef, 2 ulp): the build has no --use_fast_math, and IEEE division
// with its slow-path check is the likely reason the kernel got 1.6x slower than its fast-math
// revision (0.403 vs 0.245 ms on an H200; to be re-measured).
FM_HD float fm_div(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fdividef(a, b);
#else
    return a / b;
#endif
}

// |d| from r2 = |d|^2 >= 0. On the GPU |d| = r2 rsqrt(r2) with the hardware rsqrt (2 ulp; 0 -> 0),
// not the IEEE sqrtf that a build without --use_fast_math emits. On the CPU, g++ without
// -fno-math-errno (the build's flags are shared by every op) keeps sqrtf's errno branch, which
// stops the loops over receptors from vectorizing; there: rsqrt from the classic bit-level guess
// and three Newton steps (relative error ~1e-7, the fp32 rounding), plain arithmetic. 0 -> 0.
FM_HD float fm_norm(float r2) {
#if defined(__CUDA_ARCH__)
    return r2 > 0.0f ? r2 * rsqrtf(r2) : 0.0f;
#else
    uint32_t bits;
    memcpy(&bits, &r2, sizeof bits);
    bits = 0x5f375a86u - (bits >> 1);
    float y;
    memcpy(&y, &bits, sizeof y);
    const float h = 0.5f * r2;
    y = y * (1.5f - h * y * y);
    y = y * (1.5f - h * y * y);
    y = y * (1.5f - h * y * y);
    return r2 * y;
#endif
}

// 1 / rho^3 with rho = |d| + eps (r2 = |d|^2).
FM_HD float inv_rho3(float r2, float eps) {
    const float rho = fm_norm(r2) + eps;
    return fm_div(1.0f, rho * rho * rho);  // rho >= eps (1e-3 by default)
}

// n . (q d / rho^3): the signal of a point pole at a receptor with skin normal n.
FM_HD float pole_signal(float dx, float dy, float nx, float ny, float q, float eps) {
    const float r2 = dx * dx + dy * dy;
    return q * (nx * dx + ny * dy) * inv_rho3(r2, eps);
}

// Field (ex, ey) += q d / rho^3 of a pole (used for the field that induces the object dipoles).
FM_HD void pole_field_add(float dx, float dy, float q, float eps, float& ex, float& ey) {
    const float r2 = dx * dx + dy * dy;
    const float w = q * inv_rho3(r2, eps);
    ex += w * dx;
    ey += w * dy;
}

// n . (3 (P.d) d / |d|^2 - P) / rho^3: the signal of a dipole P at a receptor with normal n.
// Written with one division, (3 (P.d)(n.d) - (n.P) |d|^2) / (|d|^2 rho^3); the denominator is
// clamped away from 0 so a receptor exactly at a dipole's centre reads 0 instead of NaN.
FM_HD float dipole_signal(float dx, float dy, float nx, float ny, float px, float py, float eps) {
    const float r2 = dx * dx + dy * dy;
    const float rho = fm_norm(r2) + eps;
    const float pd = px * dx + py * dy;
    const float nd = nx * dx + ny * dy;
    const float np = nx * px + ny * py;
    float den = r2 * rho * rho * rho;
    den = den > 1e-30f ? den : 1e-30f;  // a select, not fmaxf: it vectorizes without -ffast-math
    return fm_div(3.0f * pd * nd - np * r2, den);
}

}  // namespace efield
}  // namespace fastmodels
