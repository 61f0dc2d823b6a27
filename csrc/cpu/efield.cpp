// Electric images, C++ CPU backend (fp32, OpenMP over environments, SIMD over receptors).
//
// Per environment: build the source lists once (each fish's two EOD poles, the induced dipole of
// every object, and with walls the four images of each), then for every fish accumulate each
// source's signal at all R receptors in one vectorized loop. The formulas are those of
// csrc/include/efield_math.h, shared with the CUDA kernel. No baseline is ever subtracted: the
// fish's own direct poles are simply not summed into `active`.
//
// Python binding: fastmodels._C.efield_fwd(pointers as ints, sizes, scalars); see
// fastmodels/ops/efield.py for the argument layout (all fp32, contiguous).
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_simd.h"
#include "efield_math.h"
#include "fastmodels_cpu.h"

namespace fastmodels {
namespace {

using namespace efield;

constexpr int64_t kLanes = 16;  // fp32 lanes of the widest vector the build targets (AVX-512)

struct Scratch {
    // Sources of one environment, structure of arrays.
    std::vector<float> pole_x, pole_y, pole_ox, pole_oy, pole_q;  // 2N direct poles: anchor, offset, charge
                                                                 // (fish j owns poles 2j, 2j + 1)
    std::vector<float> img_x, img_y, img_ox, img_oy, img_q;  // 8N image poles (gamma folded into q)
    std::vector<float> dip_x, dip_y, dip_px, dip_py;  // K induced dipoles, then their 4K images
    // Per fish: receptor offsets and normals in the world frame, accumulators.
    std::vector<float> ox, oy, nx, ny, n3x, n3y, acc, tmp;  // n3 = 3 n (see dipole_signal)
};

FM_CLONES void efield_env(const float* fish_pos, const float* heading, const float* eod, const float* obj_pos,
                          const float* obj_radius, const float* obj_contrast, const uint8_t* obj_mask,
                          const float* rec_pos, const float* rec_nrm, const float* arena,
                          float* active, float* comm, int64_t N, int64_t M, int64_t R, float half, float eps,
                          float gamma, Scratch& s) {
    // --- fish poles: anchor (the fish centre, or its wall image) + small offset (+-l/2 u) --------
    // Differences of anchors are formed first, so arena-sized coordinates never round the offsets.
    s.pole_x.resize(2 * N); s.pole_y.resize(2 * N); s.pole_ox.resize(2 * N); s.pole_oy.resize(2 * N); s.pole_q.resize(2 * N);
    for (int64_t j = 0; j < N; ++j) {
        const float ux = half * std::cos(heading[j]), uy = half * std::sin(heading[j]);
        for (int p = 0; p < 2; ++p) {
            s.pole_x[2 * j + p] = fish_pos[2 * j]; s.pole_y[2 * j + p] = fish_pos[2 * j + 1];
            s.pole_ox[2 * j + p] = p ? -ux : ux; s.pole_oy[2 * j + p] = p ? -uy : uy;
            s.pole_q[2 * j + p] = p ? -eod[j] : eod[j];
        }
    }
    // --- induced dipoles P_m = chi a^3 E_eod(c_m) (direct poles only, no images) -----------------
    s.dip_x.clear(); s.dip_y.clear(); s.dip_px.clear(); s.dip_py.clear();
    for (int64_t m = 0; m < M; ++m) {
        if (!obj_mask[m]) continue;
        const float st = object_strength(obj_radius[m], obj_contrast[m]);
        if (st == 0.0f) continue;  // zero radius or contrast
        const float cx = obj_pos[2 * m], cy = obj_pos[2 * m + 1];
        float ex = 0.0f, ey = 0.0f;
        for (int64_t k = 0; k < 2 * N; ++k)
            pole_field_add((cx - s.pole_x[k]) - s.pole_ox[k], (cy - s.pole_y[k]) - s.pole_oy[k], s.pole_q[k], eps, ex, ey);
        s.dip_x.push_back(cx); s.dip_y.push_back(cy);
        s.dip_px.push_back(st * ex); s.dip_py.push_back(st * ey);
    }
    const int64_t K = static_cast<int64_t>(s.dip_x.size());
    // --- wall images ------------------------------------------------------------------------
    int64_t n_img = 0;
    if (arena != nullptr) {
        const float W = arena[0], H = arena[1];
        n_img = 8 * N;
        s.img_x.resize(n_img); s.img_y.resize(n_img); s.img_ox.resize(n_img); s.img_oy.resize(n_img); s.img_q.resize(n_img);
        for (int k = 0; k < 4; ++k) {
            const float sx = image_sign_x(k), sy = image_sign_y(k), tx = image_shift_x(k, W), ty = image_shift_y(k, H);
            for (int64_t p = 0; p < 2 * N; ++p) {
                s.img_x[k * 2 * N + p] = sx * s.pole_x[p] + tx;
                s.img_y[k * 2 * N + p] = sy * s.pole_y[p] + ty;
                s.img_ox[k * 2 * N + p] = sx * s.pole_ox[p];
                s.img_oy[k * 2 * N + p] = sy * s.pole_oy[p];
                s.img_q[k * 2 * N + p] = gamma * s.pole_q[p];
            }
            for (int64_t m = 0; m < K; ++m) {
                s.dip_x.push_back(sx * s.dip_x[m] + tx); s.dip_y.push_back(sy * s.dip_y[m] + ty);
                s.dip_px.push_back(gamma * sx * s.dip_px[m]); s.dip_py.push_back(gamma * sy * s.dip_py[m]);
            }
        }
    }
    const int64_t n_dip = static_cast<int64_t>(s.dip_x.size());
    // --- receptors of every fish ------------------------------------------------------------
    // The receptor loops run over Rp = R rounded up to 16 lanes (one AVX-512 vector of fp32), so no
    // receptor falls into a scalar remainder loop: with R = 36 or 12 (the paper's active and
    // communication receptor counts) the 4 left over after the vector loop cost as much as 16 more.
    // The padding lanes are a receptor with zero offset and normal (signal 0); they are computed
    // and never stored.
    const int64_t Rp = (R + kLanes - 1) / kLanes * kLanes;
    s.ox.resize(Rp); s.oy.resize(Rp); s.nx.resize(Rp); s.ny.resize(Rp); s.n3x.resize(Rp); s.n3y.resize(Rp);
    s.acc.resize(Rp); s.tmp.resize(Rp);
    float* __restrict ox = s.ox.data(); float* __restrict oy = s.oy.data();
    float* __restrict nx = s.nx.data(); float* __restrict ny = s.ny.data();
    float* __restrict n3x = s.n3x.data(); float* __restrict n3y = s.n3y.data();
    float* __restrict acc = s.acc.data(); float* __restrict tmp = s.tmp.data();
    for (int64_t i = 0; i < N; ++i) {
        const float c = std::cos(heading[i]), sn = std::sin(heading[i]);
        const float xi = fish_pos[2 * i], yi = fish_pos[2 * i + 1];
        for (int64_t r = 0; r < Rp; ++r) {
            const bool real = r < R;
            const float px = real ? rec_pos[2 * r] : 0.0f, py = real ? rec_pos[2 * r + 1] : 0.0f;
            const float qx = real ? rec_nrm[2 * r] : 0.0f, qy = real ? rec_nrm[2 * r + 1] : 0.0f;
            ox[r] = c * px - sn * py; oy[r] = sn * px + c * py;
            nx[r] = c * qx - sn * qy; ny[r] = sn * qx + c * qy;
            n3x[r] = 3.0f * nx[r]; n3y[r] = 3.0f * ny[r];
            acc[r] = 0.0f;
        }
        // Direct poles of each fish j: the communication signal, and part of `active` for j != i.
        for (int64_t j = 0; j < N; ++j) {
            float* out = comm == nullptr ? nullptr : comm + (i * N + j) * R;
            if (j == i) {
                if (out) for (int64_t r = 0; r < R; ++r) out[r] = 0.0f;
                continue;
            }
            const float dx0 = xi - s.pole_x[2 * j], dy0 = yi - s.pole_y[2 * j];  // fish i - fish j
            const float ax = dx0 - s.pole_ox[2 * j], ay = dy0 - s.pole_oy[2 * j], aq = s.pole_q[2 * j];
            const float bx = dx0 - s.pole_ox[2 * j + 1], by = dy0 - s.pole_oy[2 * j + 1], bq = s.pole_q[2 * j + 1];
#pragma omp simd
            for (int64_t r = 0; r < Rp; ++r) {
                tmp[r] = pole_signal(ax + ox[r], ay + oy[r], nx[r], ny[r], aq, eps) +
                         pole_signal(bx + ox[r], by + oy[r], nx[r], ny[r], bq, eps);
                acc[r] += tmp[r];
            }
            if (out) for (int64_t r = 0; r < R; ++r) out[r] = tmp[r];
        }
        // Image poles (every fish's, fish i's own included).
        for (int64_t k = 0; k < n_img; ++k) {
            const float ax = (xi - s.img_x[k]) - s.img_ox[k], ay = (yi - s.img_y[k]) - s.img_oy[k], q = s.img_q[k];
#pragma omp simd
            for (int64_t r = 0; r < Rp; ++r) acc[r] += pole_signal(ax + ox[r], ay + oy[r], nx[r], ny[r], q, eps);
        }
        // Induced dipoles and their images.
        for (int64_t k = 0; k < n_dip; ++k) {
            const float ax = xi - s.dip_x[k], ay = yi - s.dip_y[k], px = s.dip_px[k], py = s.dip_py[k];
#pragma omp simd
            for (int64_t r = 0; r < Rp; ++r) acc[r] += dipole_signal(ax + ox[r], ay + oy[r], nx[r], ny[r], n3x[r], n3y[r], px, py, eps);
        }
        for (int64_t r = 0; r < R; ++r) active[i * R + r] = acc[r];
    }
}

void efield_fwd(uintptr_t fish_pos, uintptr_t heading, uintptr_t eod, uintptr_t obj_pos, uintptr_t obj_radius,
                uintptr_t obj_contrast, uintptr_t obj_mask, uintptr_t rec_pos, uintptr_t rec_nrm, uintptr_t arena,
                uintptr_t active, uintptr_t comm, int64_t B, int64_t N, int64_t M, int64_t R, double pole_separation,
                double eps, double gamma) {
    auto f = [](uintptr_t p) { return reinterpret_cast<float*>(p); };
    const float half = static_cast<float>(0.5 * pole_separation);
    pybind11::gil_scoped_release release;
#pragma omp parallel
    {
        Scratch s;
#pragma omp for schedule(dynamic, 4)
        for (int64_t b = 0; b < B; ++b) {
            efield_env(f(fish_pos) + b * N * 2, f(heading) + b * N, f(eod) + b * N, f(obj_pos) + b * M * 2,
                       f(obj_radius) + b * M, f(obj_contrast) + b * M,
                       reinterpret_cast<const uint8_t*>(obj_mask) + b * M, f(rec_pos), f(rec_nrm),
                       arena ? f(arena) + b * 2 : nullptr,
                       f(active) + b * N * R, comm ? f(comm) + b * N * N * R : nullptr, N, M, R, half,
                       static_cast<float>(eps), static_cast<float>(gamma), s);
        }
    }
}

}  // namespace

void register_efield(pybind11::module_& m) {
    m.def("efield_fwd", &efield_fwd,
          "Electric images (fp32): efield_fwd(fish_pos, heading, eod, obj_pos, obj_radius, obj_contrast, "
          "obj_mask (bool), rec_pos, rec_nrm, arena|0, "
          "active, comm|0, B, N, M, R, pole_separation, eps, image_strength); pointers as ints.");
}

}  // namespace fastmodels
