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

// sin and cos of a heading at full precision: the build uses --use_fast_math, whose __sincosf
// has an absolute error of ~1e-6 (more outside [-pi, pi]) that moves receptors by 1e-6 cm, visible
// next to an object. Two double-precision calls per thread cost nothing here.
__device__ __forceinline__ void heading_sincos(float theta, float& s, float& c) {
    double sd, cd;
    sincos(static_cast<double>(theta), &sd, &cd);
    s = static_cast<float>(sd);
    c = static_cast<float>(cd);
}

// Shared-memory layout of one environment (float4 first, so every source is one 16-byte load):
//   dip   float4 [5M]  (centre x, centre y, moment x, moment y) of the M dipoles, then of their images
//   img   float4 [8N]  (anchor x, anchor y, offset x, offset y) of the 4 wall images of every pole
//   pole  float4 [2N]  the same for the direct poles (anchor = fish centre, offset = +-l/2 u)
//   img_q float  [8N], pole_q float [2N]: charges (gamma folded into the images')
__host__ __device__ inline size_t shared_bytes(int N, int M) {
    return 16 * (5 * static_cast<size_t>(M) + 10 * static_cast<size_t>(N)) + 4 * 10 * static_cast<size_t>(N);
}

__global__ void efield_fwd_kernel(const float* __restrict__ fish_pos, const float* __restrict__ heading,
                                  const float* __restrict__ eod, const float* __restrict__ obj_pos,
                                  const float* __restrict__ strength, const float* __restrict__ rec_pos,
                                  const float* __restrict__ rec_nrm, const float* __restrict__ arena,
                                  float* __restrict__ active, float* __restrict__ comm, int N, int M, int R,
                                  float half, float eps, float gamma) {
    extern __shared__ float4 smem4[];
    const int64_t b = blockIdx.x;
    const int P = 2 * N;
    float4* dip = smem4;
    float4* img = dip + 5 * M;
    float4* pole = img + 4 * P;
    float* img_q = reinterpret_cast<float*>(pole + P);
    float* pole_q = img_q + 4 * P;

    const float* fp = fish_pos + b * N * 2;
    const bool walls = arena != nullptr;
    const float W = walls ? arena[b * 2] : 0.0f, H = walls ? arena[b * 2 + 1] : 0.0f;

    // 1a. poles and their images
    for (int k = threadIdx.x; k < P; k += blockDim.x) {
        const int j = k >> 1;
        const float sgn = (k & 1) ? -1.0f : 1.0f;
        float s, c;
        heading_sincos(heading[b * N + j], s, c);
        const float x = fp[2 * j], y = fp[2 * j + 1], ox = sgn * half * c, oy = sgn * half * s, q = sgn * eod[b * N + j];
        pole[k] = make_float4(x, y, ox, oy);
        pole_q[k] = q;
        if (walls) {
            for (int w = 0; w < 4; ++w) {
                const float sx = image_sign_x(w), sy = image_sign_y(w);
                img[w * P + k] = make_float4(sx * x + image_shift_x(w, W), sy * y + image_shift_y(w, H), sx * ox, sy * oy);
                img_q[w * P + k] = gamma * q;
            }
        }
    }
    __syncthreads();
    // 1b. induced dipoles (from the direct poles only) and their images
    for (int m = threadIdx.x; m < M; m += blockDim.x) {
        const float cx = obj_pos[(b * M + m) * 2], cy = obj_pos[(b * M + m) * 2 + 1], st = strength[b * M + m];
        float ex = 0.0f, ey = 0.0f;
        for (int k = 0; k < P; ++k) {
            const float4 p = pole[k];
            pole_field_add((cx - p.x) - p.z, (cy - p.y) - p.w, pole_q[k], eps, ex, ey);
        }
        const float px = st * ex, py = st * ey;
        dip[m] = make_float4(cx, cy, px, py);
        if (walls) {
            for (int w = 0; w < 4; ++w) {
                const float sx = image_sign_x(w), sy = image_sign_y(w);
                dip[(w + 1) * M + m] = make_float4(sx * cx + image_shift_x(w, W), sy * cy + image_shift_y(w, H),
                                                   gamma * sx * px, gamma * sy * py);
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
        heading_sincos(heading[b * N + i], s, c);
        const float rx = rec_pos[2 * r], ry = rec_pos[2 * r + 1], qx = rec_nrm[2 * r], qy = rec_nrm[2 * r + 1];
        const float ox = c * rx - s * ry, oy = s * rx + c * ry;
        const float nx = c * qx - s * qy, ny = s * qx + c * qy;
        const float xi = fp[2 * i], yi = fp[2 * i + 1];
        float acc = 0.0f;
        float* out = comm == nullptr ? nullptr : comm + ((b * N + i) * N) * R + r;
        for (int j = 0; j < N; ++j) {
            float v = 0.0f;
            if (j != i) {
                const float4 a = pole[2 * j], e = pole[2 * j + 1];
                const float dx = xi - a.x, dy = yi - a.y;  // fish i - fish j: both poles share the anchor
                v = pole_signal((dx - a.z) + ox, (dy - a.w) + oy, nx, ny, pole_q[2 * j], eps) +
                    pole_signal((dx - e.z) + ox, (dy - e.w) + oy, nx, ny, pole_q[2 * j + 1], eps);
                acc += v;
            }
            if (out) out[j * R] = v;
        }
#pragma unroll 4
        for (int k = 0; k < n_img; ++k) {
            const float4 p = img[k];
            acc += pole_signal(((xi - p.x) - p.z) + ox, ((yi - p.y) - p.w) + oy, nx, ny, img_q[k], eps);
        }
#pragma unroll 4
        for (int k = 0; k < n_dip; ++k) {
            const float4 d = dip[k];
            acc += dipole_signal((xi - d.x) + ox, (yi - d.y) + oy, nx, ny, d.z, d.w, eps);
        }
        active[(b * N + i) * R + r] = acc;
    }
}

}  // namespace

extern "C" int fm_efield_fwd(const float* fish_pos, const float* heading, const float* eod, const float* obj_pos,
                             const float* strength, const float* rec_pos, const float* rec_nrm, const float* arena,
                             float* active, float* comm, int B, int N, int M, int R, float pole_separation, float eps,
                             float image_strength, cudaStream_t stream) {
    if (B <= 0 || N <= 0 || R <= 0) return 0;
    const size_t smem = shared_bytes(N, M);
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
