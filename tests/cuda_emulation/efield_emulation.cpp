// csrc/cuda/efield.cu's kernel, run on the CPU by the block emulation of cuda_emulation.h.
// Built and loaded with ctypes by tests/test_efield.py.
#include "cuda_emulation.h"

#include "../../csrc/cuda/efield.cu"

extern "C" void fm_efield_emulate(const float* fish_pos, const float* heading, const float* eod, const float* obj_pos,
                                  const float* obj_radius, const float* obj_contrast, const uint8_t* obj_mask,
                                  const float* rec_pos, const float* rec_nrm,
                                  const float* arena, float* active, float* comm, int B, int N, int M, int R,
                                  float pole_separation, float eps, float image_strength, int threads) {
    fm_emulation::launch(static_cast<int64_t>(B) * N, static_cast<unsigned>(threads), shared_bytes(N, M), [&] {
        efield_fwd_kernel(fish_pos, heading, eod, obj_pos, obj_radius, obj_contrast, obj_mask, rec_pos, rec_nrm, arena,
                          active, comm, N, M, R, 0.5f * pole_separation, eps, image_strength);
    });
}
