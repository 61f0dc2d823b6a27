// csrc/cuda/jacobi_svd.cu's kernel, run on the CPU by the block emulation of cuda_emulation.h.
// Built and loaded with ctypes by tests/test_rsvd_kernels.py.
#include "cuda_emulation.h"

#include "../../csrc/cuda/jacobi_svd.cu"

// use_shared = 1: G, Vacc, S in the block's (emulated) shared memory; 0: in `work`, as the host
// launcher does when they exceed the shared-memory limit.
extern "C" void fm_jacobi_svd_emulate(const float* B, float* U, float* S, float* V, double* work, int batch, int r,
                                      int c, double tol, int max_sweeps, int use_shared) {
    const int k = r < c ? r : c, L = r < c ? c : r;
    const size_t shmem = ((size_t)k * L + (size_t)k * k + k) * sizeof(double);
    fm_emulation::launch(batch, kThreads, use_shared ? shmem : 0, [&] {
        jacobi_svd_kernel(B, U, S, V, work, r, c, tol, max_sweeps, use_shared);
    });
}
