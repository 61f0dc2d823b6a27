// Batched one-sided Jacobi (Hestenes) SVD of small fp32 matrices (r, c <= 512), one matrix per
// thread block. The algorithm is documented in fastmodels/ops/_jacobi.py, whose _jacobi_reference is
// a line-by-line PyTorch port of this kernel (tested on CPU); keep the two in sync.
//
//   G [k][L]  columns to orthogonalize (columns of B if r >= c, rows of B otherwise), fp64
//   Vacc [k][k] accumulated rotations, fp64, starts at I
//   sweeps of a round-robin tournament; one warp per column pair of a round; a sweep without a
//   rotation ends the iteration; then S_j = |g_j|, stable descending sort, sign normalization.
//
// G, Vacc and S live in dynamic shared memory when they fit (opt-in limit, 227 KB on Hopper), else
// in the caller's fp64 global workspace `work` ([batch][k*L + k*k + k]).
//
// With FM_CUDA_EMULATION defined, only the kernel is compiled, as plain C++ against the threaded
// block emulation of tests/cuda_emulation/ (CI runs this source on the CPU that way).

#ifndef FM_CUDA_EMULATION
#include <cuda_runtime.h>
#define FM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

#include <climits>
#include <cstddef>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Column at position `pos` of round `t` (circle method: position 0 fixed, the others rotate).
__device__ __forceinline__ int rr_column(int pos, int t, int n2) {
  return pos == 0 ? 0 : 1 + ((pos - 1 + t) % (n2 - 1));
}

__device__ __forceinline__ double warp_sum(double v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ int warp_sum_int(int v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kThreads) jacobi_svd_kernel(const float* __restrict__ B, float* __restrict__ U,
                                                              float* __restrict__ S, float* __restrict__ V,
                                                              double* __restrict__ work, int r, int c, double tol,
                                                              int max_sweeps, int use_shared) {
  FM_DYNAMIC_SHARED(double, smem);
  __shared__ int s_rotated;

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const size_t mat = blockIdx.x;
  const bool transposed = r < c;
  const int L = transposed ? c : r;
  const int k = transposed ? r : c;
  const size_t kL = (size_t)k * L;

  double* G = use_shared ? smem : work + mat * (kL + (size_t)k * k + k);
  double* Vacc = G + kL;
  double* Sv = Vacc + (size_t)k * k;
  const float* Bm = B + mat * (size_t)r * c;

  // 1. G[j][i] = column j of B (r >= c) or of B^T (r < c); Vacc = I.
  for (size_t idx = tid; idx < kL; idx += kThreads) {
    const size_t j = idx / L, i = idx % L;
    G[idx] = transposed ? (double)Bm[j * c + i] : (double)Bm[i * c + j];
  }
  for (size_t idx = tid; idx < (size_t)k * k; idx += kThreads) Vacc[idx] = (idx / k == idx % k) ? 1.0 : 0.0;
  __syncthreads();

  // 2. Sweeps.
  const int n2 = k + (k & 1);
  const int npairs = n2 / 2;
  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    if (tid == 0) s_rotated = 0;
    __syncthreads();
    for (int t = 0; t < n2 - 1; ++t) {
      for (int pi = warp; pi < npairs; pi += kWarps) {
        const int a = rr_column(pi, t, n2), b = rr_column(n2 - 1 - pi, t, n2);
        const int p = a < b ? a : b, q = a < b ? b : a;
        if (q >= k) continue;  // the dummy column of an odd k
        double* gp = G + (size_t)p * L;
        double* gq = G + (size_t)q * L;
        double alpha = 0.0, beta = 0.0, gamma = 0.0;
        for (int i = lane; i < L; i += 32) {
          const double x = gp[i], y = gq[i];
          alpha += x * x;
          beta += y * y;
          gamma += x * y;
        }
        alpha = warp_sum(alpha);
        beta = warp_sum(beta);
        gamma = warp_sum(gamma);
        if (fabs(gamma) > tol * sqrt(alpha * beta)) {  // uniform across the warp
          const double zeta = (beta - alpha) / (2.0 * gamma);
          const double tt = (zeta >= 0.0 ? 1.0 : -1.0) / (fabs(zeta) + sqrt(1.0 + zeta * zeta));
          const double cs = 1.0 / sqrt(1.0 + tt * tt);
          const double sn = cs * tt;
          for (int i = lane; i < L; i += 32) {
            const double x = gp[i], y = gq[i];
            gp[i] = cs * x - sn * y;
            gq[i] = sn * x + cs * y;
          }
          double* vp = Vacc + (size_t)p * k;
          double* vq = Vacc + (size_t)q * k;
          for (int i = lane; i < k; i += 32) {
            const double x = vp[i], y = vq[i];
            vp[i] = cs * x - sn * y;
            vq[i] = sn * x + cs * y;
          }
          if (lane == 0) s_rotated = 1;
        }
      }
      __syncthreads();  // pairs of the next round touch other columns
    }
    const int rotated = s_rotated;
    __syncthreads();  // everyone has read the flag before it is reset
    if (!rotated) break;
  }

  // 3. Singular values.
  for (int j = warp; j < k; j += kWarps) {
    const double* gj = G + (size_t)j * L;
    double s = 0.0;
    for (int i = lane; i < L; i += 32) s += gj[i] * gj[i];
    s = warp_sum(s);
    if (lane == 0) Sv[j] = sqrt(s);
  }
  __syncthreads();

  // 4. Stable descending sort (rank of column j), sign normalization, write U, S, V.
  float* Um = U + mat * (size_t)r * k;
  float* Vm = V + mat * (size_t)c * k;
  for (int j = warp; j < k; j += kWarps) {
    const double sj = Sv[j];
    int rank = 0;
    for (int i = lane; i < k; i += 32) {
      const double si = Sv[i];
      rank += (si > sj || (si == sj && i < j)) ? 1 : 0;
    }
    rank = warp_sum_int(rank);
    const double inv = sj > 0.0 ? 1.0 / sj : 0.0;
    const double* gj = G + (size_t)j * L;  // long side, normalized by inv
    const double* vj = Vacc + (size_t)j * k;  // short side
    // U column = short side if transposed (length r = k), else long side (length r = L).
    double best = -1.0;
    int best_i = INT_MAX;
    for (int i = lane; i < r; i += 32) {
      const double u = transposed ? vj[i] : gj[i] * inv;
      const double au = fabs(u);
      if (au > best) {  // i increases within a lane: the first maximum wins
        best = au;
        best_i = i;
      }
    }
    for (int o = 16; o > 0; o >>= 1) {
      const double ob = __shfl_xor_sync(0xffffffffu, best, o);
      const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
      if (ob > best || (ob == best && oi < best_i)) {
        best = ob;
        best_i = oi;
      }
    }
    const double upick = transposed ? vj[best_i] : gj[best_i] * inv;
    const double sign = upick < 0.0 ? -1.0 : 1.0;
    for (int i = lane; i < r; i += 32) {
      const double u = transposed ? vj[i] : gj[i] * inv;
      Um[(size_t)i * k + rank] = (float)(sign * u);
    }
    for (int i = lane; i < c; i += 32) {
      const double v = transposed ? gj[i] * inv : vj[i];
      Vm[(size_t)i * k + rank] = (float)(sign * v);
    }
    if (lane == 0) S[mat * (size_t)k + rank] = (float)sj;
  }
}

}  // namespace

#ifndef FM_CUDA_EMULATION
// B [batch, r, c], U [batch, r, k], S [batch, k], V [batch, c, k] (fp32, contiguous, device
// pointers), work: fp64 [batch, k*L + k*k + k] with k = min(r, c), L = max(r, c).
// Returns 0 or a cudaError_t code.
extern "C" int fastmodels_jacobi_svd_f32(const float* B, float* U, float* S, float* V, double* work, int batch, int r,
                                         int c, double tol, int max_sweeps, cudaStream_t stream) {
  if (batch < 0 || r < 0 || c < 0 || r > 512 || c > 512 || max_sweeps < 1) return (int)cudaErrorInvalidValue;
  const int k = r < c ? r : c;
  const int L = r < c ? c : r;
  if (batch == 0 || k == 0) return 0;
  const size_t shmem = ((size_t)k * L + (size_t)k * k + k) * sizeof(double);
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  int max_optin = 0;
  err = cudaDeviceGetAttribute(&max_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  if (err != cudaSuccess) return (int)err;
  const int use_shared = shmem + 1024 <= (size_t)max_optin ? 1 : 0;  // 1 KB margin for static shared memory
  if (use_shared && shmem > 48 * 1024) {
    err = cudaFuncSetAttribute(jacobi_svd_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shmem);
    if (err != cudaSuccess) return (int)err;
  }
  jacobi_svd_kernel<<<batch, kThreads, use_shared ? shmem : 0, stream>>>(B, U, S, V, work, r, c, tol, max_sweeps,
                                                                         use_shared);
  return (int)cudaGetLastError();
}
#endif
