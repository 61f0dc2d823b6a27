// Pushdown attention on CPU: the elementwise middle of a blocked (FlashAttention-style) forward
// and backward, fused into one pass per score row. The GEMMs (q k^T, P v, dO v^T, ...) stay in
// ATen/BLAS; these kernels do everything between them on a [B, H, m, kend] block of scores:
//
//   forward:  S row from the compact tape (or a dense int32 block) -> depth index ->
//             x = scale (s + QE[idx]), causal mask, softmax -> normalized P written over s, lse.
//   backward: P = exp(scale (s + QE[idx]) - lse) -> written over s (for dV = P^T dO);
//             dS = scale P (dP - delta) written over dp; H[t, v] += dS[t, j] for idx(t, j) = v.
// (s = q k^T and QE = q E^T unscaled: the scale is applied here, so q needs no scaled copy.)
//
// The S row of query t (absolute position t0 + i) is built once per (batch, row) and shared by
// the heads: a reverse running minimum of the boundary counts, S(t, j) = D_j - min_{j<=k<=t} c_k.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "cpu_simd.h"
#include "fastmodels_cpu.h"
#include "tape_row.h"

namespace {

struct Block {
    int64_t B, H, m, kend;  // score block [B, H, m, kend]
    int64_t t0;             // absolute position of the block's first query row
    int64_t Tk;             // row stride of depth / boundary [B, Tk]
    int64_t V;
    bool binary;
    double scale;
    const int32_t* depth;     // [B, Tk] or null
    const int32_t* boundary;  // [B, Tk] or null
    const int32_t* dense;     // [B, m, kend] or null
};

// Depth index of every key 0..t of query row i of batch b into idx[0..t].
inline void depth_row(const Block& k, int64_t b, int64_t i, int32_t* idx) {
    const int32_t* dense = k.dense ? k.dense + (b * k.m + i) * k.kend : nullptr;
    fastmodels::tape_row(dense, k.depth ? k.depth + b * k.Tk : nullptr, k.boundary ? k.boundary + b * k.Tk : nullptr,
                         k.t0 + i, static_cast<int32_t>(k.V - 1), k.binary, idx);
}

template <typename T>
FM_INLINE T exp_row(T x) {
    if constexpr (std::is_same_v<T, float>)
        return fastmodels::exp_simd(x);
    else
        return std::exp(x);
}

// One forward row: x[0..n) = scale (s + QE[idx]) -> softmax P in place, x[n..kend) = 0, *lse.
template <typename T>
FM_CLONES void fwd_row(T* __restrict x, const T* __restrict e, const int32_t* __restrict idx, int64_t n, int64_t kend,
                       T scale, T* lse) {
    T mx = -std::numeric_limits<T>::infinity();
#pragma omp simd reduction(max : mx)
    for (int64_t j = 0; j < n; ++j) {
        const T y = scale * (x[j] + e[idx[j]]);
        x[j] = y;
        mx = mx > y ? mx : y;
    }
    // The denominator in double: a float running sum drops the terms below half an ulp of itself,
    // so over a long peaked row it comes out low by up to ~n ulps, and the backward's
    // P = exp(x - lse) then sums to more than 1 (the excess reaches dq and the depth table through
    // the histogram; 7x the fp32 reference's dq error at T = 4096 on a binary tape).
    // (Two loops: GCC 12 leaves a float exp summed into a double reduction unvectorized.)
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = exp_row(x[j] - mx);
    double sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) sum += x[j];
    const T inv = T(1.0 / sum);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] *= inv;
    for (int64_t j = n; j < kend; ++j) x[j] = 0;
    *lse = mx + T(std::log(sum));
}

// One backward row: P = exp(scale (s + QE[idx]) - lse) over x, dS = scale P (dP - delta) over g,
// the row's depth histogram hr[v] = sum_j dS[j] [idx[j] = v], summed in double. A long row
// (n >= 4 V) sums into four tables, one per j mod 4, so that runs of one depth do not chain every
// add on the one before it; hacc holds 4 V doubles.
template <typename T>
FM_CLONES void bwd_row(T* __restrict x, T* __restrict g, const T* __restrict e, const int32_t* __restrict idx, int64_t n,
                       int64_t kend, int64_t V, T scale, T l, T dl, double* __restrict hacc, T* __restrict hr) {
    // The logits exactly as the forward rounded them, in a loop of their own: fused into the exp's
    // argument they would be contracted to fma(scale, s + QE, -lse) on FMA targets, and P would
    // then differ from the forward's P element by element (2.7x the fp32 reference's dq error on
    // the long peaked rows of the tests, through the histogram).
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) x[j] = scale * (x[j] + e[idx[j]]);
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
        const T p = exp_row(x[j] - l);
        x[j] = p;
        g[j] = scale * p * (g[j] - dl);
    }
    if (n >= 4 * V) {
        std::fill(hacc, hacc + 4 * V, 0.0);
        double *h0 = hacc, *h1 = hacc + V, *h2 = hacc + 2 * V, *h3 = hacc + 3 * V;
        int64_t j = 0;
        for (; j + 4 <= n; j += 4) {
            h0[idx[j]] += g[j];
            h1[idx[j + 1]] += g[j + 1];
            h2[idx[j + 2]] += g[j + 2];
            h3[idx[j + 3]] += g[j + 3];
        }
        for (; j < n; ++j) h0[idx[j]] += g[j];
        for (int64_t v = 0; v < V; ++v) hr[v] = T((h0[v] + h1[v]) + (h2[v] + h3[v]));
    } else {
        std::fill(hacc, hacc + V, 0.0);
        for (int64_t j = 0; j < n; ++j) hacc[idx[j]] += g[j];
        for (int64_t v = 0; v < V; ++v) hr[v] = T(hacc[v]);
    }
    for (int64_t j = n; j < kend; ++j) {
        x[j] = 0;
        g[j] = 0;
    }
}

template <typename T>
void fwd_block(const Block& k, T* s, const T* qe, T* lse, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> idx(k.kend);
#pragma omp for schedule(dynamic, 4)
        for (int64_t bi = 0; bi < k.B * k.m; ++bi) {
            const int64_t b = bi / k.m, i = bi % k.m;
            const int64_t n = k.t0 + i + 1;  // visible keys
            depth_row(k, b, i, idx.data());
            for (int64_t h = 0; h < k.H; ++h) {
                const int64_t r = (b * k.H + h) * k.m + i;
                fwd_row<T>(s + r * k.kend, qe + r * k.V, idx.data(), n, k.kend, T(k.scale), lse + r);
            }
        }
    }
}

template <typename T>
void bwd_block(const Block& k, T* s, T* dp, const T* qe, const T* lse, const T* delta, T* hist, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> idx(k.kend);
        std::vector<double> hacc(4 * k.V);
#pragma omp for schedule(dynamic, 4)
        for (int64_t bi = 0; bi < k.B * k.m; ++bi) {
            const int64_t b = bi / k.m, i = bi % k.m;
            const int64_t n = k.t0 + i + 1;
            depth_row(k, b, i, idx.data());
            for (int64_t h = 0; h < k.H; ++h) {
                const int64_t r = (b * k.H + h) * k.m + i;
                bwd_row<T>(s + r * k.kend, dp + r * k.kend, qe + r * k.V, idx.data(), n, k.kend, k.V, T(k.scale), lse[r],
                           delta[r], hacc.data(), hist + r * k.V);
            }
        }
    }
}

Block make_block(int64_t B, int64_t H, int64_t m, int64_t kend, int64_t t0, int64_t Tk, int64_t V, bool binary,
                 double scale, uintptr_t depth, uintptr_t boundary, uintptr_t dense) {
    return Block{B, H, m, kend, t0, Tk, V, binary, scale, reinterpret_cast<const int32_t*>(depth),
                 reinterpret_cast<const int32_t*>(boundary), reinterpret_cast<const int32_t*>(dense)};
}

}  // namespace

namespace fastmodels {

void register_pushdown(pybind11::module_& m) {
    m.def(
        "pushdown_fwd_block",
        [](uintptr_t s, uintptr_t qe, uintptr_t lse, uintptr_t depth, uintptr_t boundary, uintptr_t dense, int64_t B,
           int64_t H, int64_t mrows, int64_t kend, int64_t t0, int64_t Tk, int64_t V, bool binary, double scale, bool fp64, int threads) {
            const Block k = make_block(B, H, mrows, kend, t0, Tk, V, binary, scale, depth, boundary, dense);
            pybind11::gil_scoped_release release;
            if (fp64)
                fwd_block<double>(k, reinterpret_cast<double*>(s), reinterpret_cast<const double*>(qe), reinterpret_cast<double*>(lse), threads);
            else
                fwd_block<float>(k, reinterpret_cast<float*>(s), reinterpret_cast<const float*>(qe), reinterpret_cast<float*>(lse), threads);
        },
        "Pushdown attention forward block: scores (in place -> P), lse.");
    m.def(
        "pushdown_bwd_block",
        [](uintptr_t s, uintptr_t dp, uintptr_t qe, uintptr_t lse, uintptr_t delta, uintptr_t hist, uintptr_t depth,
           uintptr_t boundary, uintptr_t dense, int64_t B, int64_t H, int64_t mrows, int64_t kend, int64_t t0, int64_t Tk,
           int64_t V, bool binary, double scale, bool fp64, int threads) {
            const Block k = make_block(B, H, mrows, kend, t0, Tk, V, binary, scale, depth, boundary, dense);
            pybind11::gil_scoped_release release;
            if (fp64)
                bwd_block<double>(k, reinterpret_cast<double*>(s), reinterpret_cast<double*>(dp), reinterpret_cast<const double*>(qe),
                                  reinterpret_cast<const double*>(lse), reinterpret_cast<const double*>(delta), reinterpret_cast<double*>(hist), threads);
            else
                bwd_block<float>(k, reinterpret_cast<float*>(s), reinterpret_cast<float*>(dp), reinterpret_cast<const float*>(qe),
                                 reinterpret_cast<const float*>(lse), reinterpret_cast<const float*>(delta), reinterpret_cast<float*>(hist), threads);
        },
        "Pushdown attention backward block: P over s, dS over dp, depth histogram.");
}

}  // namespace fastmodels
