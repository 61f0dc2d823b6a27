// Electric images, CUDA C++ backend (fp32). One block per (environment b, fish i); its threads own
// fish i's receptors.
//   1. The block stages in shared memory what fish i sees:
//      - every fish's centre, heading (cos, sin) and EOD amplitude;
//      - the induced dipoles P_m = chi a^3 E_eod(c_m) of the environment's live objects (mask set
//        and strength chi a^3 != 0, formed here: masked objects contribute exactly nothing and are
//        compacted away, in order)
//        and, with walls, their four images, each as (fish i's centre - dipole centre, moment);
//      - with walls, the four images of every EOD pole, as ((fish i's centre - image anchor) -
//        image offset, charge).
//      Storing sources relative to fish i leaves two additions per source in the inner loops (the
//      receptor offset); every thread reads the same source at once (a shared-memory broadcast).
//   2. Each thread sums every source's signal at its receptor(s): 11 fp32 instructions per pole,
//      17 per dipole, plus one MUFU.SQRT and one MUFU.RCP each (csrc/include/efield_math.h).
// The formulas are those of csrc/include/efield_math.h, shared with the C++ CPU kernel. Nothing is
// ever subtracted from a total field: fish i's own direct poles are just not summed into active.
// The induced dipoles are recomputed by each of an environment's N blocks (2 N M pole evaluations,
// about 2% of the block's R (N + M) x 5 source-receptor pairs at the benchmark's shape).
//
// Host entry points (extern "C", raw device pointers, fp32, contiguous): fm_efield_fwd returns a
// cudaError_t as int (0 = success); fm_efield_shared_bytes gives the shared memory one block needs.
// Loaded with ctypes by fastmodels/ops/efield.py.
//
// With FM_CUDA_EMULATION defined, only the kernel is compiled, as plain C++ against the threaded
// block emulation of tests/cuda_emulation/ (CI runs its logic on the CPU that way).
#ifndef FM_CUDA_EMULATION
#include <cuda_runtime.h>
#define FM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include <cstddef>
#include <cstdint>

#include "efield_math.h"

using namespace fastmodels::efield;

namespace {

constexpr int kMaxThreads = 128;
constexpr int kMaxWarps = kMaxThreads / 32;

// sin and cos of a heading at full precision (the hardware __sincosf has an absolute error of ~1e-6,
// more outside [-pi, pi], which moves receptors by 1e-6 cm, visible next to an object). Computed once
// per fish per block.
__device__ __forceinline__ void heading_sincos(float theta, float& s, float& c) {
    double sd, cd;
    sincos(static_cast<double>(theta), &sd, &cd);
    s = static_cast<float>(sd);
    c = static_cast<float>(cd);
}

// Shared-memory layout of one block (float4 first, so every source is one 16-byte load):
//   dip    float4 [5 M]  segment w (0 = the dipoles themselves, 1..4 = their wall images) at w * M:
//                        (x_i - centre x, y_i - centre y, moment x, moment y) of the K live objects
//   img    float4 [8 N]  wall images of the 2 N poles: (rel x, rel y, charge, unused)
//   fish   float4 [N]    (x, y, cos heading, sin heading) of every fish
//   fish_q float  [N]    EOD amplitudes
//   counts int    [kMaxWarps + 1]  live objects per warp during the compaction, then K
__host__ __device__ inline size_t shared_bytes(int N, int M) {
    return 16 * (5 * static_cast<size_t>(M) + 9 * static_cast<size_t>(N)) + 4 * static_cast<size_t>(N) +
           4 * (kMaxWarps + 1);
}

__global__ void efield_fwd_kernel(const float* __restrict__ fish_pos, const float* __restrict__ heading,
                                  const float* __restrict__ eod, const float* __restrict__ obj_pos,
                                  const float* __restrict__ obj_radius, const float* __restrict__ obj_contrast,
                                  const uint8_t* __restrict__ obj_mask, const float* __restrict__ rec_pos,
                                  const float* __restrict__ rec_nrm, const float* __restrict__ arena,
                                  float* __restrict__ active, float* __restrict__ comm, int N, int M, int R,
                                  float half, float eps, float gamma) {
    FM_DYNAMIC_SHARED(float4, smem4);
    const int64_t bi = blockIdx.x;  // b * N + i
    const int64_t b = bi / N;
    const int i = static_cast<int>(bi - b * N);
    float4* dip = smem4;
    float4* img = dip + 5 * M;
    float4* fish = img + 8 * N;
    float* fish_q = reinterpret_cast<float*>(fish + N);
    int* counts = reinterpret_cast<int*>(fish_q + N);

    const float* fp = fish_pos + b * N * 2;
    const bool walls = arena != nullptr;
    const float W = walls ? arena[b * 2] : 0.0f, H = walls ? arena[b * 2 + 1] : 0.0f;
    const float xi = fp[2 * i], yi = fp[2 * i + 1];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, n_warps = (blockDim.x + 31) >> 5;

    // 1a. fish
    for (int j = tid; j < N; j += blockDim.x) {
        float s, c;
        heading_sincos(heading[b * N + j], s, c);
        fish[j] = make_float4(fp[2 * j], fp[2 * j + 1], c, s);
        fish_q[j] = eod[b * N + j];
    }
    __syncthreads();

    // 1b. live objects, compacted in order; their dipoles (from the direct poles only) and images.
    // Every thread runs the same number of rounds, so the ballots and barriers are uniform.
    int K = 0;
    for (int base = 0; base < M; base += blockDim.x) {
        const int m = base + tid;
        const float st =
            m < M && obj_mask[b * M + m] ? object_strength(obj_radius[b * M + m], obj_contrast[b * M + m]) : 0.0f;
        const bool live = st != 0.0f;
        const unsigned ballot = __ballot_sync(0xffffffffu, live);
        if (lane == 0) counts[warp] = __popc(ballot);
        __syncthreads();
        int slot = K + __popc(ballot & ((1u << lane) - 1u)), round_total = 0;
        for (int w = 0; w < n_warps; ++w) {
            slot += w < warp ? counts[w] : 0;
            round_total += counts[w];
        }
        if (live) {
            const float cx = obj_pos[(b * M + m) * 2], cy = obj_pos[(b * M + m) * 2 + 1];
            float ex = 0.0f, ey = 0.0f;
            for (int j = 0; j < N; ++j) {
                const float4 f = fish[j];
                const float ux = half * f.z, uy = half * f.w, dx = cx - f.x, dy = cy - f.y;
                pole_field_add(dx - ux, dy - uy, fish_q[j], eps, ex, ey);
                pole_field_add(dx + ux, dy + uy, -fish_q[j], eps, ex, ey);
            }
            const float px = st * ex, py = st * ey;
            dip[slot] = make_float4(xi - cx, yi - cy, px, py);
            if (walls) {
                for (int w = 0; w < 4; ++w) {
                    const float sx = image_sign_x(w), sy = image_sign_y(w);
                    dip[(w + 1) * M + slot] = make_float4(xi - (sx * cx + image_shift_x(w, W)),
                                                          yi - (sy * cy + image_shift_y(w, H)),
                                                          gamma * sx * px, gamma * sy * py);
                }
            }
        }
        K += round_total;
        __syncthreads();  // counts is rewritten by the next round
    }

    // 1c. wall images of every pole (fish i's own included): ((x_i - anchor) - offset, charge)
    const int P = 2 * N;
    if (walls) {
        for (int k = tid; k < 4 * P; k += blockDim.x) {
            const int w = k / P, p = k - w * P, j = p >> 1;
            const float sgn = (p & 1) ? -1.0f : 1.0f;
            const float4 f = fish[j];
            const float sx = image_sign_x(w), sy = image_sign_y(w);
            img[k] = make_float4((xi - (sx * f.x + image_shift_x(w, W))) - sx * (sgn * half * f.z),
                                 (yi - (sy * f.y + image_shift_y(w, H))) - sy * (sgn * half * f.w),
                                 gamma * sgn * fish_q[j], 0.0f);
        }
    }
    __syncthreads();

    // 2. one thread per receptor r of fish i
    const float4 me = fish[i];
    const int n_img = walls ? 4 * P : 0;
    const int n_seg = walls ? 5 : 1;
    for (int r = tid; r < R; r += blockDim.x) {
        const float rx = rec_pos[2 * r], ry = rec_pos[2 * r + 1], qx = rec_nrm[2 * r], qy = rec_nrm[2 * r + 1];
        const float ox = me.z * rx - me.w * ry, oy = me.w * rx + me.z * ry;
        const float nx = me.z * qx - me.w * qy, ny = me.w * qx + me.z * qy;
        const float n3x = 3.0f * nx, n3y = 3.0f * ny;
        float acc = 0.0f;
        float* out = comm == nullptr ? nullptr : comm + (bi * N) * R + r;
        for (int j = 0; j < N; ++j) {
            float v = 0.0f;
            if (j != i) {
                const float4 f = fish[j];
                const float ux = half * f.z, uy = half * f.w;
                const float dx = xi - f.x, dy = yi - f.y;  // fish i - fish j: both poles share the anchor
                v = pole_signal((dx - ux) + ox, (dy - uy) + oy, nx, ny, fish_q[j], eps) +
                    pole_signal((dx + ux) + ox, (dy + uy) + oy, nx, ny, -fish_q[j], eps);
                acc += v;
            }
            if (out) out[j * R] = v;
        }
#pragma unroll 4
        for (int k = 0; k < n_img; ++k) {
            const float4 p = img[k];
            acc += pole_signal(p.x + ox, p.y + oy, nx, ny, p.z, eps);
        }
        for (int w = 0; w < n_seg; ++w) {
            const float4* seg = dip + w * M;
#pragma unroll 4
            for (int k = 0; k < K; ++k) {
                const float4 d = seg[k];
                acc += dipole_signal(d.x + ox, d.y + oy, nx, ny, n3x, n3y, d.z, d.w, eps);
            }
        }
        active[bi * R + r] = acc;
    }
}

}  // namespace

#ifndef FM_CUDA_EMULATION
extern "C" size_t fm_efield_shared_bytes(int N, int M) { return shared_bytes(N, M); }

extern "C" int fm_efield_fwd(const float* fish_pos, const float* heading, const float* eod, const float* obj_pos,
                             const float* obj_radius, const float* obj_contrast, const uint8_t* obj_mask,
                             const float* rec_pos, const float* rec_nrm, const float* arena,
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
    int threads = ((R + 31) / 32) * 32;
    threads = threads > kMaxThreads ? kMaxThreads : threads;
    const int64_t blocks = static_cast<int64_t>(B) * N;
    efield_fwd_kernel<<<static_cast<unsigned>(blocks), threads, smem, stream>>>(
        fish_pos, heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, rec_pos, rec_nrm, arena, active, comm,
        N, M, R, 0.5f * pole_separation, eps, image_strength);
    return static_cast<int>(cudaGetLastError());
}

extern "C" const char* fm_efield_error_string(int err) { return cudaGetErrorString(static_cast<cudaError_t>(err)); }
#endif
