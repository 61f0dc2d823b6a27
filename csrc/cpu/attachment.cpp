// Attachment scores on CPU (spec section 4; fastmodels/ops/attachment.py):
//
//   out[b, i, j] = sum_w q[b, i, w] relu(keys[b, j, w] + feat[idx(i, j), w])     (j <= t = off + i)
//
// with off = Tk - Tq, idx = [S > 0] (binary) or clamp(S, 0, V - 1), S from a dense int32 tape
// [B, Tq, Tk] or the compact one (S(t, j) = depth_j - min_{j<=k<=t} boundary_k), -inf for j > t.
//
// The pre-activation depends on the pair only through (j, idx): r = relu(keys_j + feat_v) is one
// vector per (key, depth row). Down a key column j, S(t, j) is non-decreasing in t (compact tapes;
// dense tapes from trees alike), so the rows of a column fall into a few runs of equal idx:
//
//   forward, per column:  for each run (v, rows a..e): r = relu(keys_j + feat_v) once, then
//                          out[i, j] = q_i . r for the run's rows: one FMA per element, no relu;
//   backward, per column: u = sum_{i in run} g_ij q_i (an axpy per row), then once per run
//                          c = u [keys_j + feat_v > 0] -> dkeys_j += c, dfeat_v += c;
//   backward, per row:    dq_i = sum_{j <= t} g_ij relu(keys_j + feat_idx(i, j)), four rows at a
//                          time sharing each key row (and r itself where the four read one depth row).
//
// The column passes take 16 columns per task and walk them over row tiles of q that stay in L1;
// the forward pairs neighbouring columns (each q load serves two dot products), and the dot
// products keep one vector of partial sums per product. Hot loops are compiled for x86-64-v4 /
// v3 / baseline (target_clones), chosen at load time.
//
// Column passes regenerate S from the compact tape going down the column (a running minimum of
// boundary from the first visible query on, seeded from a per-batch suffix minimum), the row pass
// going left along the row as pushdown.cpp's depth_row does. dfeat is summed in per-thread [V, W]
// tables under a static schedule and reduced in thread order (deterministic for a thread count).
// Every element of out, dq, dkeys and dfeat is written (callers pass uninitialized buffers); the
// upstream gradient of a masked (j > t) score is never read.
//
// Python bindings (pointers as ints, 0 = null; float32, or float64 with is_double):
//   attachment_fwd(q, keys, keys_sb, feat, depth, boundary, dense, out, B, Tq, Tk, W, V, binary, is_double, threads)
//   attachment_bwd(g, q, keys, feat, depth, boundary, dense, dq, dkeys, dfeat, B, Tq, Tk, W, V, binary,
//                  is_double, threads)
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "cpu_simd.h"
#include "fastmodels_cpu.h"
#include "tape_row.h"

namespace {

constexpr int64_t kColumns = 16;  // key columns per task of the column passes

struct Problem {
    int64_t B, Tq, Tk, W, V;
    int64_t off;  // Tk - Tq: absolute position of query row 0
    bool binary;
    const int32_t* depth;     // [B, Tk] or null
    const int32_t* boundary;  // [B, Tk] or null
    const int32_t* dense;     // [B, Tq, Tk] or null
    std::vector<int32_t> sufmin;  // compact: [B, off + 1], min(boundary[j..off]) for j <= off

    int64_t chunks_per_batch() const { return (Tk + kColumns - 1) / kColumns; }
};

using fastmodels::depth_index;

Problem make_problem(uintptr_t depth, uintptr_t boundary, uintptr_t dense, int64_t B, int64_t Tq, int64_t Tk,
                     int64_t W, int64_t V, bool binary) {
    Problem p{B, Tq, Tk, W, V, Tk - Tq, binary, reinterpret_cast<const int32_t*>(depth),
              reinterpret_cast<const int32_t*>(boundary), reinterpret_cast<const int32_t*>(dense), {}};
    if (p.dense == nullptr && Tq > 0) {
        const int64_t n = p.off + 1;
        p.sufmin.resize(B * n);
        for (int64_t b = 0; b < B; ++b) {
            const int32_t* c = p.boundary + b * Tk;
            int32_t* s = p.sufmin.data() + b * n;
            int32_t running = std::numeric_limits<int32_t>::max();
            for (int64_t j = p.off; j >= 0; --j) s[j] = running = std::min(running, c[j]);
        }
    }
    return p;
}

// Depth index of key j for query rows i0..Tq-1 (i0 = the first row that sees j) into idx[i]; returns i0.
inline int64_t idx_column(const Problem& p, int64_t b, int64_t j, int32_t* idx) {
    const int64_t i0 = std::max<int64_t>(0, j - p.off);
    const int32_t vmax = static_cast<int32_t>(p.V - 1);
    if (i0 >= p.Tq) return p.Tq;  // no query row (Tq = 0)
    if (p.dense) {
        const int32_t* col = p.dense + b * p.Tq * p.Tk + j;
        for (int64_t i = i0; i < p.Tq; ++i) idx[i] = depth_index(col[i * p.Tk], vmax, p.binary);
        return i0;
    }
    const int32_t d = p.depth[b * p.Tk + j];
    const int32_t* c = p.boundary + b * p.Tk + p.off;  // c[i] = boundary at t = off + i
    // running = min(boundary[j..t]) for t = off + i0: the suffix minimum (j <= off) or boundary[j]
    int32_t running = j <= p.off ? p.sufmin[b * (p.off + 1) + j] : c[i0];
    idx[i0] = depth_index(d - running, vmax, p.binary);
    for (int64_t i = i0 + 1; i < p.Tq; ++i) {
        running = std::min(running, c[i]);
        idx[i] = depth_index(d - running, vmax, p.binary);  // >= 0: StackTape checks boundary <= depth
    }
    return i0;
}

// Depth index of keys 0..t of query row i (t = off + i) into idx[0..t].
inline void idx_row(const Problem& p, int64_t b, int64_t i, int32_t* idx) {
    const int32_t* dense = p.dense ? p.dense + (b * p.Tq + i) * p.Tk : nullptr;
    fastmodels::tape_row(dense, p.depth ? p.depth + b * p.Tk : nullptr, p.boundary ? p.boundary + b * p.Tk : nullptr, p.off + i, static_cast<int32_t>(p.V - 1),
                         p.binary, idx);
}

// Rows per tile of the column passes: a tile of q (about 16 KB) stays in L1 while the chunk's
// kColumns columns use it.
inline int64_t row_tile(int64_t W, int64_t elem) {
    return std::max<int64_t>(4, std::min<int64_t>(64, 16384 / (std::max<int64_t>(W, 1) * elem) / 4 * 4));
}

template <typename T>
struct Scratch {
    std::vector<int32_t> idx;  // column passes: [kColumns, Tq]; row pass: [4, Tk]
    std::vector<int64_t> i0;   // [kColumns] first query row that sees the column
    std::vector<int32_t> cur;  // [kColumns] depth row of the column's current run (-1: none)
    std::vector<T> vec;        // [kColumns, W]: r = relu(keys_j + feat_v) (forward) or u (backward)
    Scratch(const Problem& p)
        : idx(std::max(kColumns * p.Tq, 4 * p.Tk)), i0(kColumns), cur(kColumns), vec(kColumns * p.W) {}
};

// r = relu(k + f)
template <typename T>
FM_INLINE void relu_sum(const T* __restrict k, const T* __restrict f, T* __restrict r, int64_t W) {
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) r[w] = std::max(k[w] + f[w], T(0));
}

// Dot products accumulate in kLanes<T> partial sums (one 512-bit vector) and reduce them by
// halving at the end: an `omp simd reduction` of four sums reduces lane by lane in scalar code,
// which cost as much as the products themselves at W = 256.
template <typename T>
constexpr int64_t kLanes = 64 / sizeof(T);

template <typename T>
FM_INLINE T lane_sum(T* s) {
#pragma GCC unroll 8
    for (int64_t h = kLanes<T> / 2; h >= 1; h /= 2)
        for (int64_t l = 0; l < h; ++l) s[l] += s[l + h];
    return s[0];
}

// o[i * os] = q_i . r for rows a..e-1 (four rows per pass over r)
template <typename T>
FM_INLINE void dot_rows(const T* __restrict qb, const T* __restrict r, int64_t a, int64_t e, int64_t W, T* o,
                        int64_t os) {
    constexpr int64_t L = kLanes<T>;
    const int64_t Wv = W / L * L;
    int64_t i = a;
    for (; i + 4 <= e; i += 4) {
        const T *q0 = qb + i * W, *q1 = q0 + W, *q2 = q1 + W, *q3 = q2 + W;
        T s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {};
        for (int64_t w = 0; w < Wv; w += L) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
                s0[l] += q0[w + l] * r[w + l];
                s1[l] += q1[w + l] * r[w + l];
                s2[l] += q2[w + l] * r[w + l];
                s3[l] += q3[w + l] * r[w + l];
            }
        }
        for (int64_t l = 0; l < W - Wv; ++l) {
            s0[l] += q0[Wv + l] * r[Wv + l];
            s1[l] += q1[Wv + l] * r[Wv + l];
            s2[l] += q2[Wv + l] * r[Wv + l];
            s3[l] += q3[Wv + l] * r[Wv + l];
        }
        o[i * os] = lane_sum(s0);
        o[(i + 1) * os] = lane_sum(s1);
        o[(i + 2) * os] = lane_sum(s2);
        o[(i + 3) * os] = lane_sum(s3);
    }
    for (; i < e; ++i) {
        const T* q0 = qb + i * W;
        T s0[L] = {};
        for (int64_t w = 0; w < Wv; w += L) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) s0[l] += q0[w + l] * r[w + l];
        }
        for (int64_t l = 0; l < W - Wv; ++l) s0[l] += q0[Wv + l] * r[Wv + l];
        o[i * os] = lane_sum(s0);
    }
}

// o[i * os] = q_i . r0 and o[i * os + 1] = q_i . r1 for rows a..e-1 (two neighbouring columns:
// each load of q serves two products)
template <typename T>
FM_INLINE void dot_rows2(const T* __restrict qb, const T* __restrict r0, const T* __restrict r1, int64_t a, int64_t e,
                         int64_t W, T* o, int64_t os) {
    constexpr int64_t L = kLanes<T>;
    const int64_t Wv = W / L * L;
    int64_t i = a;
    for (; i + 4 <= e; i += 4) {
        const T *q0 = qb + i * W, *q1 = q0 + W, *q2 = q1 + W, *q3 = q2 + W;
        T s0[L] = {}, s1[L] = {}, s2[L] = {}, s3[L] = {}, t0[L] = {}, t1[L] = {}, t2[L] = {}, t3[L] = {};
        for (int64_t w = 0; w < Wv; w += L) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
                const T a0 = r0[w + l], a1 = r1[w + l];
                s0[l] += q0[w + l] * a0;
                t0[l] += q0[w + l] * a1;
                s1[l] += q1[w + l] * a0;
                t1[l] += q1[w + l] * a1;
                s2[l] += q2[w + l] * a0;
                t2[l] += q2[w + l] * a1;
                s3[l] += q3[w + l] * a0;
                t3[l] += q3[w + l] * a1;
            }
        }
        for (int64_t l = 0; l < W - Wv; ++l) {
            const T a0 = r0[Wv + l], a1 = r1[Wv + l];
            s0[l] += q0[Wv + l] * a0;
            t0[l] += q0[Wv + l] * a1;
            s1[l] += q1[Wv + l] * a0;
            t1[l] += q1[Wv + l] * a1;
            s2[l] += q2[Wv + l] * a0;
            t2[l] += q2[Wv + l] * a1;
            s3[l] += q3[Wv + l] * a0;
            t3[l] += q3[Wv + l] * a1;
        }
        o[i * os] = lane_sum(s0);
        o[i * os + 1] = lane_sum(t0);
        o[(i + 1) * os] = lane_sum(s1);
        o[(i + 1) * os + 1] = lane_sum(t1);
        o[(i + 2) * os] = lane_sum(s2);
        o[(i + 2) * os + 1] = lane_sum(t2);
        o[(i + 3) * os] = lane_sum(s3);
        o[(i + 3) * os + 1] = lane_sum(t3);
    }
    for (; i < e; ++i) {
        const T* q0 = qb + i * W;
        T s0[L] = {}, t0[L] = {};
        for (int64_t w = 0; w < Wv; w += L) {
#pragma omp simd
            for (int64_t l = 0; l < L; ++l) {
                s0[l] += q0[w + l] * r0[w + l];
                t0[l] += q0[w + l] * r1[w + l];
            }
        }
        for (int64_t l = 0; l < W - Wv; ++l) {
            s0[l] += q0[Wv + l] * r0[Wv + l];
            t0[l] += q0[Wv + l] * r1[Wv + l];
        }
        o[i * os] = lane_sum(s0);
        o[i * os + 1] = lane_sum(t0);
    }
}

// u += sum_{i = a..e-1} g[i * gs] q_i (eight rows per pass over u)
template <typename T>
FM_INLINE void axpy_rows(const T* __restrict qb, const T* __restrict g, int64_t gs, int64_t a, int64_t e, int64_t W,
                         T* __restrict u) {
    int64_t i = a;
    for (; i + 8 <= e; i += 8) {
        T gg[8];
        for (int r = 0; r < 8; ++r) gg[r] = g[(i + r) * gs];
        const T* q0 = qb + i * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w)
            u[w] += ((gg[0] * q0[w] + gg[1] * q0[W + w]) + (gg[2] * q0[2 * W + w] + gg[3] * q0[3 * W + w])) +
                    ((gg[4] * q0[4 * W + w] + gg[5] * q0[5 * W + w]) + (gg[6] * q0[6 * W + w] + gg[7] * q0[7 * W + w]));
    }
    for (; i + 4 <= e; i += 4) {
        const T g0 = g[i * gs], g1 = g[(i + 1) * gs], g2 = g[(i + 2) * gs], g3 = g[(i + 3) * gs];
        const T *q0 = qb + i * W, *q1 = q0 + W, *q2 = q1 + W, *q3 = q2 + W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) u[w] += (g0 * q0[w] + g1 * q1[w]) + (g2 * q2[w] + g3 * q3[w]);
    }
    for (; i < e; ++i) {
        const T g0 = g[i * gs];
        const T* q0 = qb + i * W;
#pragma omp simd
        for (int64_t w = 0; w < W; ++w) u[w] += g0 * q0[w];
    }
}

// Depth index columns of the chunk's columns j0..j0+nc-1 into s.idx / s.i0; returns the first
// row that sees any of them (that of column j0).
inline int64_t chunk_columns(const Problem& p, int64_t b, int64_t j0, int64_t nc, int32_t* idx, int64_t* i0,
                             int32_t* cur) {
    for (int64_t c = 0; c < nc; ++c) {
        i0[c] = idx_column(p, b, j0 + c, idx + c * p.Tq);
        cur[c] = -1;
    }
    return i0[0];
}

// r = relu(keys_j + feat_v) of chunk column c (keys_j = kc + c W) for depth row v, in s.vec; only
// recomputed when the column's run changes.
template <typename T>
FM_INLINE const T* run_vector(Scratch<T>& s, int64_t c, int32_t v, const T* kc, const T* feat, int64_t W) {
    T* r = s.vec.data() + c * W;
    if (s.cur[c] != v) {
        relu_sum(kc + c * W, feat + v * W, r, W);
        s.cur[c] = v;
    }
    return r;
}

// ---------------------------------------------------------------------------------------------
// Forward: columns j0..j0+nc-1 of batch b, over row tiles (a tile of q serves every column). The
// keys' rows are contiguous [Tk, W] per batch, at any batch stride keys_sb (elements): a prefix
// view of a decoder's preallocated key cache is read in place.
// ---------------------------------------------------------------------------------------------

template <typename T>
FM_CLONES void fwd_chunk(const Problem& p, int64_t b, int64_t j0, int64_t nc, const T* __restrict q,
                         const T* __restrict keys, int64_t keys_sb, const T* __restrict feat, T* __restrict out,
                         Scratch<T>& s) {
    const int64_t W = p.W, Tq = p.Tq, Tk = p.Tk, tile = row_tile(W, sizeof(T));
    const T* qb = q + b * Tq * W;
    T* ob = out + b * Tq * Tk + j0;  // ob[i * Tk + c] = out[b, i, j0 + c]
    const int64_t first = chunk_columns(p, b, j0, nc, s.idx.data(), s.i0.data(), s.cur.data());
    for (int64_t c = 0; c < nc; ++c)
        for (int64_t i = 0; i < s.i0[c]; ++i) ob[i * Tk + c] = -std::numeric_limits<T>::infinity();
    const T* kc = keys + b * keys_sb + j0 * W;
    for (int64_t ia = first; ia < Tq; ia += tile) {
        const int64_t ib = std::min(Tq, ia + tile);
        for (int64_t c = 0; c < nc; c += 2) {
            const int32_t* x0 = s.idx.data() + c * Tq;
            // rows that see column c but not c + 1 (or all of them for a last odd column): one column
            const int64_t both = c + 1 < nc ? std::min(ib, std::max(ia, s.i0[c + 1])) : ib;
            for (int64_t a = std::max(ia, s.i0[c]); a < both;) {
                const int32_t v = x0[a];
                int64_t e = a + 1;
                while (e < both && x0[e] == v) ++e;
                dot_rows(qb, run_vector(s, c, v, kc, feat, W), a, e, W, ob + c, Tk);
                a = e;
            }
            if (c + 1 >= nc) break;
            // rows that see both columns: runs of equal depth rows in both
            const int32_t* x1 = x0 + Tq;
            for (int64_t a = both; a < ib;) {
                const int32_t v0 = x0[a], v1 = x1[a];
                int64_t e = a + 1;
                while (e < ib && x0[e] == v0 && x1[e] == v1) ++e;
                const T* r0 = run_vector(s, c, v0, kc, feat, W);
                dot_rows2(qb, r0, run_vector(s, c + 1, v1, kc, feat, W), a, e, W, ob + c, Tk);
                a = e;
            }
        }
    }
}

template <typename T>
void attachment_fwd_impl(const Problem& p, const T* q, const T* keys, int64_t keys_sb, const T* feat, T* out, int threads) {
    const int64_t per_b = p.chunks_per_batch();
#pragma omp parallel num_threads(threads)
    {
        Scratch<T> s(p);
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < p.B * per_b; ++c) {
            const int64_t b = c / per_b, j0 = (c % per_b) * kColumns;
            fwd_chunk<T>(p, b, j0, std::min(kColumns, p.Tk - j0), q, keys, keys_sb, feat, out, s);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, row pass: dq for query rows i..i+nr-1 (nr <= 4) of batch b; four rows share each key
// row they load.
// ---------------------------------------------------------------------------------------------

template <typename T>
FM_CLONES void bwd_dq_rows(const Problem& p, int64_t b, int64_t i, int64_t nr, const T* __restrict g,
                           const T* __restrict keys, const T* __restrict feat, T* __restrict dq, int32_t* idx) {
    const int64_t W = p.W, Tk = p.Tk;
    const T* gi = g + (b * p.Tq + i) * Tk;  // gi[r * Tk + j] = g[b, i + r, j]
    const T* kb = keys + b * Tk * W;
    T* d = dq + (b * p.Tq + i) * W;  // d[r * W + w] = dq[b, i + r, w]
    for (int64_t r = 0; r < nr; ++r) idx_row(p, b, i + r, idx + r * Tk);
    for (int64_t w = 0; w < nr * W; ++w) d[w] = 0;
    int64_t shared = 0;  // columns 0..shared-1 are visible to all four rows
    if (nr == 4) {
        shared = p.off + i + 1;
        T *d0 = d, *d1 = d + W, *d2 = d + 2 * W, *d3 = d + 3 * W;
        const int32_t *x0 = idx, *x1 = idx + Tk, *x2 = idx + 2 * Tk, *x3 = idx + 3 * Tk;
        const T *g0 = gi, *g1 = gi + Tk, *g2 = gi + 2 * Tk, *g3 = gi + 3 * Tk;
        int64_t j = 0;
        for (; j + 4 <= shared; j += 4) {
            bool uniform = true;  // the four rows read one depth row in each of the four columns
            for (int64_t c = 0; c < 4; ++c)
                uniform = uniform && x1[j + c] == x0[j + c] && x2[j + c] == x0[j + c] && x3[j + c] == x0[j + c];
            if (uniform) {  // r = relu(k_j + feat_v) once per column, shared by the four rows
                const T *ka = kb + j * W, *kc = ka + W, *ke = kc + W, *kg = ke + W;
                const T *fa = feat + x0[j] * W, *fc = feat + x0[j + 1] * W, *fe = feat + x0[j + 2] * W,
                        *fg = feat + x0[j + 3] * W;
                T gg[4][4];
                for (int r = 0; r < 4; ++r)
                    for (int c = 0; c < 4; ++c) gg[r][c] = gi[r * Tk + j + c];
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) {
                    const T ra = std::max(ka[w] + fa[w], T(0)), rc = std::max(kc[w] + fc[w], T(0));
                    const T re = std::max(ke[w] + fe[w], T(0)), rg = std::max(kg[w] + fg[w], T(0));
                    d0[w] += (gg[0][0] * ra + gg[0][1] * rc) + (gg[0][2] * re + gg[0][3] * rg);
                    d1[w] += (gg[1][0] * ra + gg[1][1] * rc) + (gg[1][2] * re + gg[1][3] * rg);
                    d2[w] += (gg[2][0] * ra + gg[2][1] * rc) + (gg[2][2] * re + gg[2][3] * rg);
                    d3[w] += (gg[3][0] * ra + gg[3][1] * rc) + (gg[3][2] * re + gg[3][3] * rg);
                }
                continue;
            }
            for (int64_t jj = j; jj < j + 4; jj += 2) {
                const T *ka = kb + jj * W, *kc = ka + W;
                const T *f0a = feat + x0[jj] * W, *f1a = feat + x1[jj] * W, *f2a = feat + x2[jj] * W,
                        *f3a = feat + x3[jj] * W;
                const T *f0c = feat + x0[jj + 1] * W, *f1c = feat + x1[jj + 1] * W, *f2c = feat + x2[jj + 1] * W,
                        *f3c = feat + x3[jj + 1] * W;
                const T g0a = g0[jj], g1a = g1[jj], g2a = g2[jj], g3a = g3[jj];
                const T g0c = g0[jj + 1], g1c = g1[jj + 1], g2c = g2[jj + 1], g3c = g3[jj + 1];
#pragma omp simd
                for (int64_t w = 0; w < W; ++w) {
                    const T a = ka[w], c = kc[w];
                    d0[w] += g0a * std::max(a + f0a[w], T(0)) + g0c * std::max(c + f0c[w], T(0));
                    d1[w] += g1a * std::max(a + f1a[w], T(0)) + g1c * std::max(c + f1c[w], T(0));
                    d2[w] += g2a * std::max(a + f2a[w], T(0)) + g2c * std::max(c + f2c[w], T(0));
                    d3[w] += g3a * std::max(a + f3a[w], T(0)) + g3c * std::max(c + f3c[w], T(0));
                }
            }
        }
        for (; j < shared; ++j) {
            const T* ka = kb + j * W;
            const T *f0a = feat + x0[j] * W, *f1a = feat + x1[j] * W, *f2a = feat + x2[j] * W, *f3a = feat + x3[j] * W;
            const T g0a = g0[j], g1a = g1[j], g2a = g2[j], g3a = g3[j];
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) {
                const T a = ka[w];
                d0[w] += g0a * std::max(a + f0a[w], T(0));
                d1[w] += g1a * std::max(a + f1a[w], T(0));
                d2[w] += g2a * std::max(a + f2a[w], T(0));
                d3[w] += g3a * std::max(a + f3a[w], T(0));
            }
        }
    }
    for (int64_t r = 0; r < nr; ++r) {  // the remaining columns of each row, one row at a time
        const int64_t n = p.off + i + r + 1;
        const int32_t* x = idx + r * Tk;
        const T* gr = gi + r * Tk;
        T* dr = d + r * W;
        for (int64_t j = shared; j < n; ++j) {
            const T gj = gr[j];
            const T *k0 = kb + j * W, *f0 = feat + x[j] * W;
#pragma omp simd
            for (int64_t w = 0; w < W; ++w) dr[w] += gj * std::max(k0[w] + f0[w], T(0));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Backward, column pass: dkeys for columns j0..j0+nc-1 of batch b, dfeat into the thread's table.
// Per column, u = sum g_ij q_i over the current run of equal depth row v; when the run ends,
// c = u [keys_j + feat_v > 0] goes into dkeys_j and table_v.
// ---------------------------------------------------------------------------------------------

// c = [k + f > 0] ? u : 0 as a bit mask on u (exactly the select: +0 where masked, even for an
// infinite u): the baseline x86-64 clone has no blend instruction, and GCC compiled the select
// there as a branch per element (73.8 ms against 7.4 ms for the AVX-512 backward, B8 T128 W512).
template <typename T>
FM_INLINE void flush_run(const T* __restrict k, const T* __restrict f, const T* __restrict u, T* __restrict dk,
                         T* __restrict tv, int64_t W) {
    using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
#pragma omp simd
    for (int64_t w = 0; w < W; ++w) {
        U bits;
        std::memcpy(&bits, &u[w], sizeof(T));
        bits &= U(0) - U(k[w] + f[w] > T(0));
        T c;
        std::memcpy(&c, &bits, sizeof(T));
        dk[w] += c;
        tv[w] += c;
    }
}

template <typename T>
FM_CLONES void bwd_chunk(const Problem& p, int64_t b, int64_t j0, int64_t nc, const T* __restrict g,
                         const T* __restrict q, const T* __restrict keys, const T* __restrict feat,
                         T* __restrict dkeys, T* __restrict table, Scratch<T>& s) {
    const int64_t W = p.W, Tq = p.Tq, Tk = p.Tk, tile = row_tile(W, sizeof(T));
    const T* qb = q + b * Tq * W;
    const T* gb = g + b * Tq * Tk + j0;  // gb[i * Tk + c] = g[b, i, j0 + c]
    const T* kc = keys + (b * Tk + j0) * W;
    T* dk = dkeys + (b * Tk + j0) * W;
    const int64_t first = chunk_columns(p, b, j0, nc, s.idx.data(), s.i0.data(), s.cur.data());
    for (int64_t w = 0; w < nc * W; ++w) dk[w] = 0;
    for (int64_t ia = first; ia < Tq; ia += tile) {
        const int64_t ib = std::min(Tq, ia + tile);
        for (int64_t c = 0; c < nc; ++c) {
            const int32_t* ix = s.idx.data() + c * Tq;
            T* u = s.vec.data() + c * W;
            for (int64_t a = std::max(ia, s.i0[c]); a < ib;) {
                const int32_t v = ix[a];
                int64_t e = a + 1;
                while (e < ib && ix[e] == v) ++e;
                if (s.cur[c] != v) {
                    if (s.cur[c] >= 0) flush_run(kc + c * W, feat + s.cur[c] * W, u, dk + c * W, table + s.cur[c] * W, W);
                    for (int64_t w = 0; w < W; ++w) u[w] = 0;
                    s.cur[c] = v;
                }
                axpy_rows(qb, gb + c, Tk, a, e, W, u);
                a = e;
            }
        }
    }
    for (int64_t c = 0; c < nc; ++c)
        if (s.cur[c] >= 0)
            flush_run(kc + c * W, feat + s.cur[c] * W, s.vec.data() + c * W, dk + c * W, table + s.cur[c] * W, W);
}

template <typename T>
void attachment_bwd_impl(const Problem& p, const T* g, const T* q, const T* keys, const T* feat, T* dq, T* dkeys,
                         T* dfeat, int threads) {
    const int64_t VW = p.V * p.W;
    const int64_t per_b = p.chunks_per_batch();
    const int64_t groups = (p.Tq + 3) / 4;  // row pass: four query rows per task
    std::vector<T> tables(static_cast<size_t>(threads) * VW, T(0));
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        Scratch<T> s(p);
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t x = 0; x < p.B * groups; ++x) {
            const int64_t b = x / groups, i = (x % groups) * 4;
            bwd_dq_rows<T>(p, b, i, std::min<int64_t>(4, p.Tq - i), g, keys, feat, dq, s.idx.data());
        }
        // static: which columns (hence the rounding of each table) a thread gets does not depend on timing
#pragma omp for schedule(static, 1)
        for (int64_t c = 0; c < p.B * per_b; ++c) {
            const int64_t b = c / per_b, j0 = (c % per_b) * kColumns;
            bwd_chunk<T>(p, b, j0, std::min(kColumns, p.Tk - j0), g, q, keys, feat, dkeys, tables.data() + tid * VW, s);
        }
#pragma omp for schedule(static)
        for (int64_t x = 0; x < VW; ++x) {
            T sum = 0;
            for (int th = 0; th < threads; ++th) sum += tables[th * VW + x];
            dfeat[x] = sum;
        }
    }
}

}  // namespace

namespace fastmodels {

void register_attachment(pybind11::module_& m) {
    m.def(
        "attachment_fwd",
        [](uintptr_t q, uintptr_t keys, int64_t keys_sb, uintptr_t feat, uintptr_t depth, uintptr_t boundary,
           uintptr_t dense, uintptr_t out, int64_t B, int64_t Tq, int64_t Tk, int64_t W, int64_t V, bool binary,
           bool is_double, int threads) {
            pybind11::gil_scoped_release release;
            const Problem p = make_problem(depth, boundary, dense, B, Tq, Tk, W, V, binary);
            threads = std::max(1, threads);
            if (is_double)
                attachment_fwd_impl<double>(p, reinterpret_cast<const double*>(q), reinterpret_cast<const double*>(keys), keys_sb,
                                            reinterpret_cast<const double*>(feat), reinterpret_cast<double*>(out), threads);
            else
                attachment_fwd_impl<float>(p, reinterpret_cast<const float*>(q), reinterpret_cast<const float*>(keys), keys_sb,
                                           reinterpret_cast<const float*>(feat), reinterpret_cast<float*>(out), threads);
        },
        "Attachment scores forward: out[B, Tq, Tk] (-inf above the diagonal); pointers as ints, 0 = null.");
    m.def(
        "attachment_bwd",
        [](uintptr_t g, uintptr_t q, uintptr_t keys, uintptr_t feat, uintptr_t depth, uintptr_t boundary,
           uintptr_t dense, uintptr_t dq, uintptr_t dkeys, uintptr_t dfeat, int64_t B, int64_t Tq, int64_t Tk,
           int64_t W, int64_t V, bool binary, bool is_double, int threads) {
            pybind11::gil_scoped_release release;
            const Problem p = make_problem(depth, boundary, dense, B, Tq, Tk, W, V, binary);
            threads = std::max(1, threads);
            if (is_double)
                attachment_bwd_impl<double>(p, reinterpret_cast<const double*>(g), reinterpret_cast<const double*>(q),
                                            reinterpret_cast<const double*>(keys), reinterpret_cast<const double*>(feat),
                                            reinterpret_cast<double*>(dq), reinterpret_cast<double*>(dkeys),
                                            reinterpret_cast<double*>(dfeat), threads);
            else
                attachment_bwd_impl<float>(p, reinterpret_cast<const float*>(g), reinterpret_cast<const float*>(q),
                                           reinterpret_cast<const float*>(keys), reinterpret_cast<const float*>(feat),
                                           reinterpret_cast<float*>(dq), reinterpret_cast<float*>(dkeys),
                                           reinterpret_cast<float*>(dfeat), threads);
        },
        "Attachment scores backward: dq, dkeys, dfeat (gradients of masked scores ignored); pointers as ints.");
}

}  // namespace fastmodels
