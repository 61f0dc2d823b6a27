// A CPU emulation of the CUDA features the fastmodels kernels use, so that a kernel's own source
// (block structure, shared-memory layout, indexing, warp reductions, barriers) can be run and
// checked against the reference on a machine without a GPU. Not a simulator of the hardware: each
// CUDA thread of a block is a std::thread, __syncthreads is a std::barrier over the block, and a
// warp-level exchange (__shfl_xor_sync, __ballot_sync) is two phases of a barrier over the warp (the
// kernels call them with every lane of the warp active, as the full masks they pass require).
// Device intrinsics that the kernels wrap for speed (efield_math.h) take their host branches here;
// the GPU tests cover the device branches. Blocks run one after another.
#pragma once

#include <barrier>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#define FM_CUDA_EMULATION 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __shared__ static  // one block at a time: a function-level static is the block's shared variable

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
    std::vector<std::unique_ptr<std::barrier<>>>* warp_barriers = nullptr;
    std::vector<uint64_t>* exchange = nullptr;  // one slot per thread
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

namespace fm_emulation {
// Publish `v`, wait for the warp, return lane `src`'s value, wait again (the slots are reused).
template <typename T>
T warp_exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "exchange slot is 8 bytes");
    auto& slots = *block.exchange;
    const unsigned t = threadIdx.x, first = t & ~31u;
    std::barrier<>& wb = *(*block.warp_barriers)[t >> 5];
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    slots[t] = bits;
    wb.arrive_and_wait();
    T out;
    std::memcpy(&out, &slots[first + src_lane], sizeof(T));
    wb.arrive_and_wait();
    return out;
}
}  // namespace fm_emulation

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return fm_emulation::warp_exchange(v, (threadIdx.x & 31u) ^ static_cast<unsigned>(lane_mask));
}

inline unsigned __ballot_sync(unsigned mask, bool pred) {
    auto& slots = *fm_emulation::block.exchange;
    const unsigned t = threadIdx.x, first = t & ~31u;
    std::barrier<>& wb = *(*fm_emulation::block.warp_barriers)[t >> 5];
    slots[t] = pred ? 1u : 0u;
    wb.arrive_and_wait();
    unsigned out = 0;
    for (unsigned l = 0; l < 32 && first + l < slots.size(); ++l) out |= static_cast<unsigned>(slots[first + l]) << l;
    wb.arrive_and_wait();
    return out & mask;
}

inline int __popc(unsigned v) { return __builtin_popcount(v); }

inline void sincos(double x, double* s, double* c) {
    *s = std::sin(x);
    *c = std::cos(x);
}

namespace fm_emulation {
// Run `kernel()` for every block index in [0, blocks) with `threads` threads per block and
// `shared_bytes` of dynamic shared memory, filled with 0xff bytes before each block (NaN as float
// and as double).
inline void launch(int64_t blocks, unsigned threads, size_t shared_bytes, const std::function<void()>& kernel) {
    std::vector<uint64_t> shared(shared_bytes / 8 + 2);
    std::vector<uint64_t> exchange(threads);
    for (int64_t b = 0; b < blocks; ++b) {
        for (auto& v : shared) v = ~uint64_t{0};
        std::barrier<> barrier(threads);
        std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
        for (unsigned w = 0; w * 32 < threads; ++w)
            warp_barriers.push_back(std::make_unique<std::barrier<>>(std::min(32u, threads - w * 32)));
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t) {
            pool.emplace_back([&, t] {
                block = Block{&barrier, &warp_barriers, &exchange, shared.data()};
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
