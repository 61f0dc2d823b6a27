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
#include <cstring>
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

// A 64-byte vector of T (GCC's vector extension: one zmm on x86-64-v4, split into two ymm or four
// xmm registers by the other clones), loaded from unaligned memory.
template <typename T>
struct Vec64 {
    typedef T type __attribute__((vector_size(64)));
    static constexpr int64_t lanes = 64 / sizeof(T);
    static FM_INLINE type load(const T* p) {
        type v;
        std::memcpy(&v, p, sizeof(v));
        return v;
    }
    static FM_INLINE T sum(type v) {
        T s = 0;
        for (int64_t l = 0; l < lanes; ++l) s += v[l];
        return s;
    }
};

// out[j] = q . rows[j] for n contiguous rows of length D (accumulated in T, as BLAS does). Four
// rows at a time, each into its own vector accumulator: one pass over q serves four rows, and a
// row costs one horizontal sum instead of one per vector. (Written as `omp simd` loops, GCC 12
// vectorized across the four rows instead, with shuffles for every element.)
template <typename T>
FM_INLINE void dots(const T* __restrict q, const T* __restrict rows, int64_t n, int64_t D, T* __restrict out) {
    using V = Vec64<T>;
    const int64_t Dv = D / V::lanes * V::lanes;
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const T *r0 = rows + j * D, *r1 = r0 + D, *r2 = r1 + D, *r3 = r2 + D;
        typename V::type a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t d = 0; d < Dv; d += V::lanes) {
            const typename V::type qv = V::load(q + d);
            a0 += qv * V::load(r0 + d);
            a1 += qv * V::load(r1 + d);
            a2 += qv * V::load(r2 + d);
            a3 += qv * V::load(r3 + d);
        }
        T s0 = V::sum(a0), s1 = V::sum(a1), s2 = V::sum(a2), s3 = V::sum(a3);
        for (int64_t d = Dv; d < D; ++d) {
            s0 += q[d] * r0[d];
            s1 += q[d] * r1[d];
            s2 += q[d] * r2[d];
            s3 += q[d] * r3[d];
        }
        out[j] = s0;
        out[j + 1] = s1;
        out[j + 2] = s2;
        out[j + 3] = s3;
    }
    for (; j < n; ++j) {
        const T* r = rows + j * D;
        typename V::type a = {};
        for (int64_t d = 0; d < Dv; d += V::lanes) a += V::load(q + d) * V::load(r + d);
        T s = V::sum(a);
        for (int64_t d = Dv; d < D; ++d) s += q[d] * r[d];
        out[j] = s;
    }
}

// One query row of the fused small-Tq forward: x = q k^T over the n visible keys, e = q E^T, the
// softmax row of fwd_row over x, then o = P v. All of a row's operands stay in cache.
template <typename T>
FM_CLONES void decode_row(const T* __restrict q, const T* __restrict k, const T* __restrict v, const T* __restrict emb,
                          const int32_t* __restrict idx, int64_t n, int64_t D, int64_t V, T scale, T* __restrict x,
                          T* __restrict e, T* __restrict o, T* lse) {
    dots(q, k, n, D, x);
    dots(q, emb, V, D, e);
    fwd_row<T>(x, e, idx, n, n, scale, lse);
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) o[d] = 0;
    for (int64_t j = 0; j < n; ++j) {
        const T p = x[j];
        const T* __restrict vj = v + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += p * vj[d];
    }
}

// The whole forward of a few query rows (decoding: Tq new tokens against Tk cached keys), without
// the GEMMs of the blocked form: for a handful of rows their dispatch and the score buffers cost
// more than the arithmetic. q, o [B, H, m, D]; emb [V, D], or [H, V, D] with per_head; lse [B, H,
// m]; all contiguous. k, v [B, H, Tk, D] with contiguous [Tk, D] rows per (batch, head) and any
// batch and head strides (kv_stride: elements; a KV cache's capacity buffer, read in place). The
// block's m rows sit at t0 .. t0 + m - 1 = Tk - 1.
template <typename T>
void decode_fwd(const Block& k, const T* q, const T* kk, const T* v, const int64_t* kv_stride, const T* emb, bool per_head,
                int64_t D, T* o, T* lse, int threads) {
#pragma omp parallel num_threads(threads)
    {
        std::vector<int32_t> idx(k.kend);
        std::vector<T> x(k.kend), e(k.V);
        // One (batch, head, row) per iteration, so that a single sequence (B = 1) still spreads
        // over the threads; the depth row is rebuilt per head (O(Tk), against O(Tk D) of work).
#pragma omp for schedule(static)
        for (int64_t r = 0; r < k.B * k.H * k.m; ++r) {
            const int64_t bh = r / k.m, i = r % k.m, b = bh / k.H, h = bh % k.H;
            const int64_t n = k.t0 + i + 1;  // visible keys
            depth_row(k, b, i, idx.data());
            decode_row<T>(q + r * D, kk + b * kv_stride[0] + h * kv_stride[1], v + b * kv_stride[2] + h * kv_stride[3],
                          emb + (per_head ? h * k.V * D : 0),
                          idx.data(), n, D, k.V, T(k.scale), x.data(), e.data(), o + r * D, lse + r);
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
        "pushdown_decode_fwd",
        [](uintptr_t q, uintptr_t k, uintptr_t v, int64_t k_sb, int64_t k_sh, int64_t v_sb, int64_t v_sh, uintptr_t emb,
           bool per_head, uintptr_t out, uintptr_t lse, uintptr_t depth, uintptr_t boundary, uintptr_t dense, int64_t B,
           int64_t H, int64_t mrows, int64_t Tk, int64_t D, int64_t V, bool binary, double scale, bool fp64, int threads) {
            const int64_t kv_stride[4] = {k_sb, k_sh, v_sb, v_sh};  // elements, per batch and per head
            const Block blk = make_block(B, H, mrows, Tk, Tk - mrows, Tk, V, binary, scale, depth, boundary, dense);
            pybind11::gil_scoped_release release;
            if (fp64)
                decode_fwd<double>(blk, reinterpret_cast<const double*>(q), reinterpret_cast<const double*>(k),
                                   reinterpret_cast<const double*>(v), kv_stride, reinterpret_cast<const double*>(emb), per_head, D,
                                   reinterpret_cast<double*>(out), reinterpret_cast<double*>(lse), threads);
            else
                decode_fwd<float>(blk, reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(k),
                                  reinterpret_cast<const float*>(v), kv_stride, reinterpret_cast<const float*>(emb), per_head, D,
                                  reinterpret_cast<float*>(out), reinterpret_cast<float*>(lse), threads);
        },
        "Pushdown attention forward of a few query rows (decoding), fused: out and lse.");
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
