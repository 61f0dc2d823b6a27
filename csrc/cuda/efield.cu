// Electric images, CUDA C++ backend (fp32). One block per environment:
//   1. the block builds the environment's sources in shared memory: each fish's two EOD poles
//      (anchor = fish centre, offset = +-l/2 u, charge), the induced dipole of every object
//      (P_m = chi a^3 E_eod(c_m), one thread per object) and, with walls, the four images of each;
//   2. each thread owns one (fish, receptor) pair and sums every source's signal at it, reading
//      the sources from shared memory (every thread reads the same address: a broadcast).
// The formulas are those of csrc/include/efield_math.h, shared with the C++ CPU kernel. Nothing is
// ever subtracted from a total field: fish i's own direct poles are just not summed into active.
//
// Host entry point: fm_efield_fwd (extern "C", raw device pointers, fp32, contiguous); returns a
// cudaError_t as int (0 = success). Loaded with ctypes by fastmodels/ops/efield.py.
#include <cuda_runtime.h>

#include <cstdint>

#include "efield_math.h"

using namespace fastmodels::efield;

namespace {

constexpr int kMaxThreads = 256;

// Shared-memory layout of one environment (floats):
//   poles  [5][2N]  anchor x, anchor y, offset x, offset y, charge
//   images [5][8N]  the same for the 4 wall images of every pole (gamma folded into the charge)
//   dips   [4][5M]  centre x, centre y, moment x, moment y of the M dipoles, then of their images
__host__ __device__ inline int64_t shared_floats(int N, int M) { return 5 * 2 * N + 5 * 8 * N + 4 * 5 * M; }

__global__ void efield_fwd_kernel(const float* __restrict__ fish_pos, const float* __restrict__ heading,
                                  const float* __restrict__ eod, const float* __restrict__ obj_pos,
                                  const float* __restrict__ strength, const float* __restrict__ rec_pos,
                                  const float* __restrict__ rec_nrm, const float* __restrict__ arena,
                                  float* __restrict__ active, float* __restrict__ comm, int N, int M, int R,
                                  float half, float eps, float gamma) {
    extern __shared__ float smem[];
    const int64_t b = blockIdx.x;
    const int P = 2 * N;
    float* p_x = smem;
    float* p_y = p_x + P;
    float* p_ox = p_y + P;
    float* p_oy = p_ox + P;
    float* p_q = p_oy + P;
    float* i_x = p_q + P;
    float* i_y = i_x + 4 * P;
    float* i_ox = i_y + 4 * P;
    float* i_oy = i_ox + 4 * P;
    float* i_q = i_oy + 4 * P;
    const int D = 5 * M;
    float* d_x = i_q + 4 * P;
    float* d_y = d_x + D;
    float* d_px = d_y + D;
    float* d_py = d_px + D;

    const float* fp = fish_pos + b * N * 2;
    const bool walls = arena != nullptr;
    const float W = walls ? arena[b * 2] : 0.0f, H = walls ? arena[b * 2 + 1] : 0.0f;

    // 1a. poles and their images
    for (int k = threadIdx.x; k < P; k += blockDim.x) {
        const int j = k >> 1;
        const float sgn = (k & 1) ? -1.0f : 1.0f;
        float s, c;
        sincosf(heading[b * N + j], &s, &c);
        const float x = fp[2 * j], y = fp[2 * j + 1], ox = sgn * half * c, oy = sgn * half * s, q = sgn * eod[b * N + j];
        p_x[k] = x; p_y[k] = y; p_ox[k] = ox; p_oy[k] = oy; p_q[k] = q;
        if (walls) {
            for (int w = 0; w < 4; ++w) {
                const float sx = image_sign_x(w), sy = image_sign_y(w);
                i_x[w * P + k] = sx * x + image_shift_x(w, W);
                i_y[w * P + k] = sy * y + image_shift_y(w, H);
                i_ox[w * P + k] = sx * ox;
                i_oy[w * P + k] = sy * oy;
                i_q[w * P + k] = gamma * q;
            }
        }
    }
    __syncthreads();
    // 1b. induced dipoles (from the direct poles only) and their images
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
        const float cx = obj_pos[(b * M + m) * 2], cy = obj_pos[(b * M + m) * 2 + 1], st = strength[b * M + m];
        float ex = 0.0f, ey = 0.0f;
        for (int k = 0; k < P; ++k) pole_field_add((cx - p_x[k]) - p_ox[k], (cy - p_y[k]) - p_oy[k], p_q[k], eps, ex, ey);
        const float px = st * ex, py = st * ey;
        d_x[m] = cx; d_y[m] = cy; d_px[m] = px; d_py[m] = py;
        if (walls) {
            for (int w = 0; w < 4; ++w) {
                const float sx = image_sign_x(w), sy = image_sign_y(w);
                const int e = (w + 1) * M + m;
                d_x[e] = sx * cx + image_shift_x(w, W);
                d_y[e] = sy * cy + image_shift_y(w, H);
                d_px[e] = gamma * sx * px;
                d_py[e] = gamma * sy * py;
            }
        }
    }
    __syncthreads();

    // 2. one thread per (fish i, receptor r)
    const int n_img = walls ? 4 * P : 0;
    const int n_dip = walls ? 5 * M : M;
    for (int t = threadIdx.x; t < N * R; t += blockDim.x) {
        const int i = t / R, r = t - i * R;
        float s, c;
        sincosf(heading[b * N + i], &s, &c);
        const float rx = rec_pos[2 * r], ry = rec_pos[2 * r + 1], qx = rec_nrm[2 * r], qy = rec_nrm[2 * r + 1];
        const float ox = c * rx - s * ry, oy = s * rx + c * ry;
        const float nx = c * qx - s * qy, ny = s * qx + c * qy;
        const float xi = fp[2 * i], yi = fp[2 * i + 1];
        float acc = 0.0f;
        float* out = comm == nullptr ? nullptr : comm + ((b * N + i) * N) * R + r;
        for (int j = 0; j < N; ++j) {
            float v = 0.0f;
            if (j != i) {
                const float dx = xi - p_x[2 * j], dy = yi - p_y[2 * j];
                v = pole_signal((dx - p_ox[2 * j]) + ox, (dy - p_oy[2 * j]) + oy, nx, ny, p_q[2 * j], eps) +
                    pole_signal((dx - p_ox[2 * j + 1]) + ox, (dy - p_oy[2 * j + 1]) + oy, nx, ny, p_q[2 * j + 1], eps);
                acc += v;
            }
            if (out) out[j * R] = v;
        }
        for (int k = 0; k < n_img; ++k)
            acc += pole_signal(((xi - i_x[k]) - i_ox[k]) + ox, ((yi - i_y[k]) - i_oy[k]) + oy, nx, ny, i_q[k], eps);
        for (int k = 0; k < n_dip; ++k)
            acc += dipole_signal((xi - d_x[k]) + ox, (yi - d_y[k]) + oy, nx, ny, d_px[k], d_py[k], eps);
        active[(b * N + i) * R + r] = acc;
    }
}

}  // namespace

extern "C" int fm_efield_fwd(const float* fish_pos, const float* heading, const float* eod, const float* obj_pos,
                             const float* strength, const float* rec_pos, const float* rec_nrm, const float* arena,
                             float* active, float* comm, int B, int N, int M, int R, float pole_separation, float eps,
                             float image_strength, cudaStream_t stream) {
    if (B <= 0 || N <= 0 || R <= 0) return 0;
    const size_t smem = sizeof(float) * static_cast<size_t>(shared_floats(N, M));
    if (smem > 48 * 1024) {
        int device = 0, limit = 0;
        cudaGetDevice(&device);
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
        if (smem > static_cast<size_t>(limit)) return static_cast<int>(cudaErrorInvalidValue);
        cudaError_t err = cudaFuncSetAttribute(efield_fwd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
        if (err != cudaSuccess) return static_cast<int>(err);
    }
    int threads = ((N * R + 31) / 32) * 32;
    threads = threads > kMaxThreads ? kMaxThreads : threads;
    efield_fwd_kernel<<<B, threads, smem, stream>>>(fish_pos, heading, eod, obj_pos, strength, rec_pos, rec_nrm, arena,
                                                    active, comm, N, M, R, 0.5f * pole_separation, eps, image_strength);
    return static_cast<int>(cudaGetLastError());
}

extern "C" const char* fm_efield_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
