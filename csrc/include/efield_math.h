// Electric-image formulas shared by the C++ CPU kernel (csrc/cpu/efield.cpp) and the CUDA kernel
// (csrc/cuda/efield.cu), so both compute exactly the same thing. fp32, normalized units (see
// docs/efield.md): a pole of charge q at s has field q d / rho^3 at r, d = r - s, rho = |d| + eps;
// an induced dipole P at c has field (3 (P.d) d / |d|^2 - P) / rho^3.
//
// Every function takes the displacement d = receptor - source already formed: callers compute it
// as (fish position - source) + receptor offset, which keeps large arena coordinates out of the
// fp32 rounding of the small receptor offsets.
//
// Instruction budget (these run ~200 times per receptor per step, so the GPU kernels are bound by
// instruction issue, not memory): a pole costs 11 fp32 instructions and a dipole 17, plus one
// square root and one reciprocal each, both single hardware instructions on the GPU (MUFU.SQRT,
// MUFU.RCP; 2^-23-level relative error, flush-to-zero below 1e-38, far from any distance or
// denominator that occurs here).
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

// Strength s = chi a^3 of an object of radius a and contrast chi: its induced dipole is s E. The
// kernels take radius, contrast and the live mask and form it while staging the objects, so a step
// needs no separate elementwise kernels; a masked object or s = 0 contributes nothing.
FM_HD float object_strength(float radius, float contrast) { return contrast * (radius * radius * radius); }

// 1 / x for a positive x (a rho^3 or a dipole denominator). On the GPU the hardware reciprocal
// (rcp.approx.ftz: one MUFU.RCP, against the ~4 extra instructions of __fdividef's range checks
// and the slow path of an IEEE division; the build has no --use_fast_math).
FM_HD float fm_rcp(float x) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
#else
    return 1.0f / x;
#endif
}

// |d| from r2 = |d|^2 >= 0 (0 -> 0). On the GPU one MUFU.SQRT (sqrt.approx.ftz); IEEE sqrtf, or
// rsqrtf without ftz, adds a denormal-scaling sequence of ~6 instructions. On the CPU, g++ without
// -fno-math-errno (the build's flags are shared by every op) keeps sqrtf's errno branch, which
// stops the loops over receptors from vectorizing; there: rsqrt from the classic bit-level guess
// and three Newton steps (relative error ~1e-7, the fp32 rounding), plain arithmetic.
FM_HD float fm_norm(float r2) {
#if defined(__CUDA_ARCH__)
    float r;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(r2));
    return r;
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
    return fm_rcp(rho * rho * rho);  // rho >= eps (1e-3 by default)
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

// n . (3 (P.d) d / |d|^2 - P) / rho^3: the signal of a dipole P at a receptor with normal n, given
// also n3 = 3 n (a per-receptor constant, so the factor 3 costs nothing here). Written with one
// reciprocal, ((P.d)(n3.d) - (n.P) |d|^2) / (|d|^2 rho^3 + 1e-30): the 1e-30 (not a clamp: one
// fused multiply-add) makes a receptor exactly at a dipole's centre read 0 instead of NaN and
// changes nothing else that matters (relative change < 1e-8 for |d| >= 1e-6 cm at eps = 1e-3).
FM_HD float dipole_signal(float dx, float dy, float nx, float ny, float n3x, float n3y, float px, float py,
                          float eps) {
    const float r2 = dx * dx + dy * dy;
    const float rho = fm_norm(r2) + eps;
    const float pd = px * dx + py * dy;
    const float nd3 = n3x * dx + n3y * dy;
    const float np = nx * px + ny * py;
    const float den = r2 * (rho * rho * rho) + 1e-30f;
    return (pd * nd3 - np * r2) * fm_rcp(den);
}

}  // namespace efield
}  // namespace fastmodels
