// A CPU emulation of the CUDA features the fastmodels kernels use, so that a kernel's own source
// (block structure, shared-memory layout, indexing, compaction, barriers) can be run and checked
// against the reference on a machine without a GPU. Not a simulator of the hardware: each CUDA
// thread of a block is a std::thread, __syncthreads is a std::barrier over the block, and a warp
// vote is two barrier phases over the block (the kernels call votes uniformly, every thread at the
// same point). Device intrinsics that the kernels wrap for speed (efield_math.h) take their host
// branches here; the GPU tests cover the device branches.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

#define FM_EFIELD_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

struct float4 {
    float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

struct FmDim3 {
    unsigned x = 0;
};

namespace fm_emulation {
struct Block {
    std::barrier<>* barrier = nullptr;
    std::vector<unsigned>* votes = nullptr;
    void* shared = nullptr;
};
inline thread_local Block block;
inline thread_local FmDim3 thread_idx, block_idx, block_dim;
}  // namespace fm_emulation

#define threadIdx (fm_emulation::thread_idx)
#define blockIdx (fm_emulation::block_idx)
#define blockDim (fm_emulation::block_dim)
#define FM_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(fm_emulation::block.shared)

inline void __syncthreads() { fm_emulation::block.barrier->arrive_and_wait(); }

// Every thread of the block publishes its predicate, then each reads its warp's 32.
inline unsigned __ballot_sync(unsigned mask, bool pred) {
    auto& votes = *fm_emulation::block.votes;
    const unsigned t = threadIdx.x;
    votes[t] = pred ? 1u : 0u;
    __syncthreads();
    unsigned out = 0;
    const unsigned first = t & ~31u;
    for (unsigned l = 0; l < 32 && first + l < votes.size(); ++l) out |= votes[first + l] << l;
    __syncthreads();
    return out & mask;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }

inline void sincos(double x, double* s, double* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}

namespace fm_emulation {
// Run `kernel()` for every block index in [0, blocks) with `threads` threads per block and
// `shared_bytes` of dynamic shared memory, poisoned with NaN before each block.
inline void launch(int64_t blocks, unsigned threads, size_t shared_bytes, const std::function<void()>& kernel) {
    std::vector<float> shared((shared_bytes + 3) / 4 + 4);
    std::vector<unsigned> votes(threads);
    for (int64_t b = 0; b < blocks; ++b) {
        for (auto& v : shared) v = std::nanf("");
        std::barrier<> barrier(threads);
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                block = Block{&barrier, &votes, shared.data()};
                thread_idx.x = t;
                block_idx.x = static_cast<unsigned>(b);
                block_dim.x = threads;
                kernel();
            });
        }
        for (auto& th : pool) th.join();
    }
}
}  // namespace fm_emulation
