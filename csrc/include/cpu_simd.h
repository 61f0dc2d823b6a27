// Vectorization helpers shared by the C++ CPU kernels: per-ISA clones of hot functions and an
// exp that vectorizes.
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

// x86-64-v4 (AVX-512) / v3 (AVX2 + FMA) / baseline clones of a hot function, chosen at load time
// from the running CPU. FASTMODELS_CLONES=0 at build time compiles one version for the compiler's
// target instead (the tests build the extension that way to run the v3 and baseline code, which
// an AVX-512 machine never selects).
#if !defined(FASTMODELS_CLONES)
#define FASTMODELS_CLONES 1
#endif
#if FASTMODELS_CLONES && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FM_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FM_CLONES
#endif

// Helpers are forced inline so that each clone compiles them for its own target.
#if defined(__GNUC__)
#define FM_INLINE inline __attribute__((always_inline))
#else
#define FM_INLINE inline
#endif

namespace fastmodels {

// Which code the FM_CLONES functions run on this CPU (what the load-time resolver picks), or the
// single target of a FASTMODELS_CLONES=0 build.
inline const char* simd_target() {
#if FASTMODELS_CLONES && defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("x86-64-v4")) return "x86-64-v4";
    if (__builtin_cpu_supports("x86-64-v3")) return "x86-64-v3";
    return "x86-64 (baseline)";
#else
    return "one build for the compiler's target (no per-ISA clones)";
#endif
}

// exp(x) in float that the compiler vectorizes inside `omp simd` loops (std::exp is a scalar libm
// call unless the whole build uses -ffast-math). x = n ln2 + r with n an integer and |r| <= ln2/2;
// exp(r) by its degree-7 Taylor polynomial (truncation below 6e-9 relative, under a tenth of an
// fp32 ulp); 2^n from the exponent bits. Against double-precision exp rounded to float, on every
// float of [-87.3, 88], with the x86-64-v4, v3 and baseline code: at most 1 ulp, as std::exp.
// Below -87.3 it returns 0 (std::exp would go subnormal: a softmax weight below 1e-38 of the
// row's largest), above 88 +inf; NaN gives NaN. n is read from the bits of x log2(e) + 1.5 2^23
// rather than as (that - 1.5 2^23), which -ffast-math would fold back to x log2(e); a -ffast-math
// build is still not supported (it reassociates the two-part ln 2 reduction: 61 ulp, and NaN is
// lost). The loops need -fno-trapping-math (setup.py) to vectorize on targets without AVX-512
// masking.
FM_INLINE float exp_simd(float x) {
    constexpr float kLo = -87.3f, kHi = 88.0f;
    constexpr float kLog2e = 1.44269504088896341f;
    constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;  // ln 2 = hi + lo, hi exact in 9 bits
    constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: in [2^23, 2^24) the float's low bits are the integer
    constexpr int32_t kRoundBits = 0x4B400000;  // the bits of kRound
    float xc = x > kLo ? x : kLo;  // NaN -> kLo, so no NaN reaches the integer conversion
    xc = xc < kHi ? xc : kHi;
    const float t = xc * kLog2e + kRound;
    int32_t tb;
    std::memcpy(&tb, &t, sizeof(tb));
    const int32_t n = tb - kRoundBits;  // round(x log2 e), in [-126, 127]
    const float nf = static_cast<float>(n);
    const float r = (xc - nf * kLn2Hi) - nf * kLn2Lo;
    float p = 1.0f / 5040;
    p = p * r + 1.0f / 720;
    p = p * r + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = (n + 127) << 23;  // a normal 2^n
    float two_n;
    std::memcpy(&two_n, &bits, sizeof(two_n));
    const float y = p * two_n;
    return x < kLo ? 0.0f : (x > kHi ? std::numeric_limits<float>::infinity() : (x == x ? y : x));
}

}  // namespace fastmodels
