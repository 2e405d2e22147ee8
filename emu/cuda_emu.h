// cuda_emu.h: run the CUDA subset wrnc generates on the host, with g++ -std=c++20 -pthread.
//
// Model: a launch runs its blocks one after another; the threads of a block run concurrently,
// one std::thread each (the same threads serve every block of a launch), so __syncthreads is a
// real std::barrier and the kernel's own code decides the interleaving (races in a kernel show
// up here as they would on a GPU).
//
// Supported: threadIdx / blockIdx / blockDim / gridDim, __global__ / __device__ /
// __forceinline__ / __launch_bounds__, static __shared__ arrays declared in the kernel body
// (`__shared__` is `static`: one instance, shared by the block; blocks never overlap),
// __syncthreads, __syncwarp, __shfl_sync / __shfl_down_sync / __shfl_xor_sync (32-lane warps
// of consecutive linear thread ids; every lane of the warp that is still running must call
// them, as on sm_70+ with a full mask), atomicAdd on float / int / unsigned, rsqrtf,
// __uint_as_float / __float_as_uint / __int_as_float, and
//   wrnc_emu::launch(kernel, grid, block, shared_bytes, args...).
// Dynamic shared memory: `shared` bytes per launch (at most 227 KiB, sm_90's opt-in limit),
// 1024-byte aligned, filled with 0xff bytes (NaN as f32 and bf16) before the launch so a read
// of a byte no thread wrote shows, and followed by 4 KiB of guard bytes that must be intact
// after the launch (a kernel that takes more than its launch gave it aborts); a kernel reaches it through `wrnc_dyn_smem()` (the CUDA
// twin is in compiler/src/codegen/mma.cuh: `extern __shared__`), not `extern __shared__`.
// Not supported: cooperative groups, textures, streams.
//
// A thread that returns early leaves the block's and its warp's barriers (arrive_and_drop), so
// guarded early returns before a __syncthreads that only the other threads reach still work.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

namespace wrnc_emu {

struct Block {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
    std::vector<std::uint64_t> slots;  // one shuffle slot per thread
    unsigned int nthreads = 0;
};

inline thread_local dim3 tl_thread_idx;
inline thread_local dim3 tl_block_idx;
inline thread_local unsigned int tl_linear = 0;
inline thread_local Block* tl_block = nullptr;
inline dim3 g_block_dim;
inline dim3 g_grid_dim;
// The running launch's dynamic shared memory (null when it has none).
inline unsigned char* g_dyn_smem = nullptr;

template <class T>
inline T shfl(T v, unsigned int (*src_of)(unsigned int lane, unsigned int arg), unsigned int arg, unsigned int width) {
    static_assert(sizeof(T) <= 8, "shuffle of values wider than 8 bytes");
    Block* b = tl_block;
    const unsigned int lin = tl_linear, w = lin / 32, lane = lin % 32;
    std::uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    b->slots[lin] = bits;
    b->warp_bars[w]->arrive_and_wait();
    const unsigned int base = lane - lane % width;
    unsigned int src = src_of(lane % width, arg);
    T r = v;
    if (src < width) {
        unsigned int s = w * 32 + base + src;
        if (s < b->nthreads) std::memcpy(&r, &b->slots[s], sizeof(T));
    }
    b->warp_bars[w]->arrive_and_wait();
    return r;
}

inline unsigned int src_down(unsigned int lane, unsigned int d) { return lane + d; }
inline unsigned int src_xor(unsigned int lane, unsigned int m) { return lane ^ m; }
inline unsigned int src_idx(unsigned int, unsigned int s) { return s; }

/// Runs `kernel(args...)` over `grid` x `block` threads with `shared` bytes of dynamic shared
/// memory (shared by the block; blocks run one after another, so one buffer serves them all).
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, std::size_t shared, A... args) {
    if (shared > 227 * 1024) {
        std::fprintf(stderr, "cuda_emu: %zu bytes of dynamic shared memory (> 227 KiB)\n", shared);
        std::abort();
    }
    struct Free {
        void operator()(unsigned char* p) const { std::free(p); }
    };
    std::unique_ptr<unsigned char, Free> dyn;
    const std::size_t dyn_guard = 4096;
    if (shared != 0) {
        const std::size_t bytes = (shared + 127) / 128 * 128;
        dyn.reset(static_cast<unsigned char*>(std::aligned_alloc(1024, (shared + dyn_guard + 1023) / 1024 * 1024)));
        std::memset(dyn.get(), 0xff, bytes);
        std::memset(dyn.get() + shared, 0x5a, dyn_guard);
    }
    g_dyn_smem = dyn.get();
    const unsigned int nt = block.x * block.y * block.z;
    if (nt == 0 || nt > 1024) {
        std::fprintf(stderr, "cuda_emu: bad block size %u\n", nt);
        std::abort();
    }
    g_block_dim = block;
    g_grid_dim = grid;
    const unsigned int nblocks = grid.x * grid.y * grid.z;
    // One OS thread per block thread for the whole launch (creating threads per block costs far
    // more than the kernels at test sizes). The host prepares block i's barriers, opens the
    // gate, and waits at `done` until every thread has finished block i; so blocks still run
    // one after another, each with fresh barriers.
    std::unique_ptr<Block> cur;
    std::barrier<> gate(nt + 1), done(nt + 1);
    std::vector<std::thread> threads;
    threads.reserve(nt);
    for (unsigned int t = 0; t < nt; ++t) {
        threads.emplace_back([&, t] {
            tl_linear = t;
            tl_thread_idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            for (unsigned int i = 0; i < nblocks; ++i) {
                gate.arrive_and_wait();
                Block* blk = cur.get();
                tl_block = blk;
                tl_block_idx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
                kernel(static_cast<P>(args)...);
                blk->warp_bars[t / 32]->arrive_and_drop();
                blk->bar->arrive_and_drop();
                done.arrive_and_wait();
            }
        });
    }
    for (unsigned int i = 0; i < nblocks; ++i) {
        auto blk = std::make_unique<Block>();
        blk->nthreads = nt;
        blk->bar = std::make_unique<std::barrier<>>(nt);
        for (unsigned int w = 0; w * 32 < nt; ++w) {
            unsigned int lanes = nt - w * 32 < 32 ? nt - w * 32 : 32;
            blk->warp_bars.push_back(std::make_unique<std::barrier<>>(lanes));
        }
        blk->slots.assign(nt, 0);
        cur = std::move(blk);
        gate.arrive_and_wait();
        done.arrive_and_wait();
    }
    for (auto& th : threads) th.join();
    g_dyn_smem = nullptr;
    for (std::size_t i = 0; shared != 0 && i < dyn_guard; ++i) {
        if (dyn.get()[shared + i] != 0x5a) {
            std::fprintf(stderr, "cuda_emu: a kernel used more than its %zu bytes of dynamic shared memory\n", shared);
            std::abort();
        }
    }
}

}  // namespace wrnc_emu

#define threadIdx (wrnc_emu::tl_thread_idx)
#define blockIdx (wrnc_emu::tl_block_idx)
#define blockDim (wrnc_emu::g_block_dim)
#define gridDim (wrnc_emu::g_grid_dim)
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

inline unsigned char* wrnc_dyn_smem() { return wrnc_emu::g_dyn_smem; }

inline void __syncthreads() { wrnc_emu::tl_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned int = 0xffffffffu) {
    wrnc_emu::tl_block->warp_bars[wrnc_emu::tl_linear / 32]->arrive_and_wait();
}
template <class T>
inline T __shfl_down_sync(unsigned int, T v, unsigned int delta, int width = 32) {
    return wrnc_emu::shfl(v, wrnc_emu::src_down, delta, (unsigned int)width);
}
template <class T>
inline T __shfl_xor_sync(unsigned int, T v, int mask, int width = 32) {
    return wrnc_emu::shfl(v, wrnc_emu::src_xor, (unsigned int)mask, (unsigned int)width);
}
template <class T>
inline T __shfl_sync(unsigned int, T v, int src, int width = 32) {
    return wrnc_emu::shfl(v, wrnc_emu::src_idx, (unsigned int)src, (unsigned int)width);
}

inline float atomicAdd(float* p, float v) { return std::atomic_ref<float>(*p).fetch_add(v); }
inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned int>(*p).fetch_add(v); }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
// expf, logf, sqrtf: the C library's, from <math.h> via <cmath>.
