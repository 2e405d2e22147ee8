// cuda_emu.h: run the CUDA subset wrnc generates on the host, with g++ -std=c++20 -pthread.
//
// Model: a launch runs its blocks one after another; the threads of a block are fibers (one
// stack each, switched in user space) that the launching thread runs one at a time, each until
// it blocks: at __syncthreads, at a warp-collective operation (__syncwarp, the shuffles, and
// cuda_emu_mma.h's ldmatrix / mma), or in a wait that is not yet satisfied (an mbarrier's
// phase). So __syncthreads is a real barrier and the kernel's own code decides where threads
// interleave. The order is deterministic and alternates: the block's threads run in increasing
// linear id in even blocks and in decreasing id in odd ones, so a thread that reads shared
// memory another thread writes before the barrier that orders them reads the old contents in
// one of the two orders whichever thread comes first (with a grid of at least two blocks).
// When every unfinished thread of a block is waiting and none of them can go on (a barrier
// that some threads never reach, an mbarrier phase that never completes), the launch aborts
// and says so: on a GPU the kernel would hang.
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
// starting 16 bytes past a 1024-byte boundary (all a GPU guarantees: a wgmma ring rounds up
// with `wrnc_dyn_smem_1024()`), filled with 0xff bytes (NaN as f32 and bf16) before the launch so a read
// of a byte no thread wrote shows, and followed by 4 KiB of guard bytes that must be intact
// after the launch (a kernel that takes more than its launch gave it aborts); a kernel reaches it through `wrnc_dyn_smem()` (the CUDA
// twin is in compiler/src/codegen/mma.cuh: `extern __shared__`), not `extern __shared__`.
// Each thread has a 256 KiB stack (kept for later launches) whose lowest 1 KiB must be intact
// after the launch (a kernel that overflows its stack aborts). Launches from several host threads at once are not supported (the fake driver
// serialises them). Not supported: cooperative groups, textures, streams.
//
// A thread that returns early leaves the block's and its warp's barriers (arrive_and_drop), so
// guarded early returns before a __syncthreads that only the other threads reach still work.
#pragma once

#include <sys/mman.h>

#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
    unsigned int x, y, z;
    constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

// Defined for the generated code: under the emulation, vector loads and stores go through
// memcpy with an alignment check (wrnc_emu::check_align16) instead of CUDA's uint4.
#define WRNC_CUDA_EMU 1

namespace wrnc_emu {

// Aborts with a message when p is not 16-byte aligned (what a misaligned vector access or
// ldmatrix row would fault on in CUDA).
inline void check_align16(const void* p, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "cuda_emu: %s address %p is not 16-byte aligned\n", what, p);
        std::abort();
    }
}

// Bumped by everything that can let a waiting thread go on (an arrival at a barrier, a thread
// that finishes, an mbarrier's arrival or bytes): a whole round of a block's threads that
// leaves it unchanged, with every unfinished thread waiting, is a deadlock.
inline thread_local std::uint64_t tl_progress = 0;
inline void note_progress() { ++tl_progress; }

void yield();

// A barrier of the block's fibers (the block's, or one warp's): `expected` threads arrive per
// phase; a thread that leaves drops out of every later phase.
class Barrier {
public:
    explicit Barrier(unsigned int expected) : expected_(expected) {}
    void arrive_and_wait() {
        const std::uint64_t ph = phase_;
        arrive();
        while (phase_ == ph) yield();
    }
    void arrive_and_drop() {
        --expected_;
        note_progress();
        if (arrived_ != 0 && arrived_ >= expected_) complete();
    }

private:
    void arrive() {
        note_progress();
        if (++arrived_ >= expected_) complete();
    }
    void complete() {
        arrived_ = 0;
        ++phase_;
    }
    unsigned int expected_, arrived_ = 0;
    std::uint64_t phase_ = 0;
};

struct Block {
    std::unique_ptr<Barrier> bar;
    std::vector<std::unique_ptr<Barrier>> warp_bars;
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

// ---- fibers ----

#if defined(__x86_64__)
// Saves the callee-saved registers and the stack pointer of the running context in `*from`,
// and resumes the context whose stack pointer is `to` (System V x86-64: rbx, rbp, r12-r15;
// the x87 and SSE control words are never changed by the kernels).
__attribute__((naked, noinline)) inline void fiber_swap(void** /* from: rdi */, void* /* to: rsi */) {
    asm volatile(
        "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
        "movq %rsp, (%rdi)\n\tmovq %rsi, %rsp\n\t"
        "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\tret\n\t");
}
#endif

struct Fiber {
    unsigned char* stack = nullptr;  // its lowest address
    unsigned int linear = 0;
    dim3 idx;
    bool done = false;
#if defined(__x86_64__)
    void* sp = nullptr;
#else
    ucontext_t ctx;
#endif
};

// Each thread's stack, and the bytes at its bottom that must still hold their pattern after
// a launch (a kernel that overflows its stack aborts).
inline constexpr std::size_t FIBER_STACK = 256 << 10, STACK_CANARY = 1024;
inline constexpr unsigned char CANARY_BYTE = 0x5c;

// The threads' stacks, one after another in one mapping (one per copy of this header, that
// is per emulated module), grown to the largest block launched and kept for later launches.
struct Stacks {
    unsigned char* base = nullptr;
    unsigned int count = 0;
    unsigned char* get(unsigned int n) {
        if (n > count) {
            if (base) munmap(base, count * FIBER_STACK);
            void* m = mmap(nullptr, n * FIBER_STACK, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) {
                std::fprintf(stderr, "cuda_emu: cannot map %u threads' stacks\n", n);
                std::abort();
            }
            base = static_cast<unsigned char*>(m);
            count = n;
            for (unsigned int t = 0; t < n; ++t) std::memset(base + t * FIBER_STACK, CANARY_BYTE, STACK_CANARY);
        }
        return base;
    }
    void check(unsigned int n) const {
        for (unsigned int t = 0; t < n; ++t)
            for (std::size_t i = 0; i < STACK_CANARY; ++i)
                if (base[t * FIBER_STACK + i] != CANARY_BYTE) {
                    std::fprintf(stderr, "cuda_emu: thread %u overflowed its %zu-byte stack\n", t, FIBER_STACK);
                    std::abort();
                }
    }
    ~Stacks() {
        if (base) munmap(base, count * FIBER_STACK);
    }
};
inline Stacks g_stacks;
inline std::atomic<bool> g_launching{false};

struct Sched {
    std::vector<Fiber> fibers;
    Fiber* cur = nullptr;
    std::function<void()> body;  // runs the kernel for the running fiber
#if defined(__x86_64__)
    void* host_sp = nullptr;
#else
    ucontext_t host;
#endif
};
inline thread_local Sched* tl_sched = nullptr;

// Back to the host's scheduling loop; it resumes this fiber on its next round.
inline void yield() {
    Sched* s = tl_sched;
    Fiber* f = s->cur;
#if defined(__x86_64__)
    fiber_swap(&f->sp, s->host_sp);
#else
    swapcontext(&f->ctx, &s->host);
#endif
    tl_linear = f->linear;
    tl_thread_idx = f->idx;
}

[[noreturn]] inline void fiber_main() {
    Sched* s = tl_sched;
    s->body();
    s->cur->done = true;
    note_progress();
    yield();
    std::fprintf(stderr, "cuda_emu: a finished thread was resumed\n");
    std::abort();
}

// Makes `f` start at fiber_main when next resumed.
inline void fiber_reset(Fiber& f) {
    f.done = false;
#if defined(__x86_64__)
    // fiber_swap pops six registers and returns: to fiber_main, with the stack as a call
    // leaves it (16-byte aligned before the call's return address).
    auto* top = reinterpret_cast<void**>(f.stack + FIBER_STACK);
    top[-1] = nullptr;  // fiber_main's return address: it never returns
    top[-2] = reinterpret_cast<void*>(&fiber_main);
    for (int i = 3; i <= 8; ++i) top[-i] = nullptr;
    f.sp = &top[-8];
#else
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack;
    f.ctx.uc_stack.ss_size = FIBER_STACK;
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())fiber_main, 0);
#endif
}

inline void resume(Sched& s, Fiber& f) {
    s.cur = &f;
    tl_linear = f.linear;
    tl_thread_idx = f.idx;
#if defined(__x86_64__)
    fiber_swap(&s.host_sp, f.sp);
#else
    swapcontext(&s.host, &f.ctx);
#endif
}

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
    if (tl_sched || g_launching.exchange(true)) {
        std::fprintf(stderr, "cuda_emu: a launch while another one runs (from a kernel or another host thread)\n");
        std::abort();
    }
    struct Free {
        void operator()(unsigned char* p) const { std::free(p); }
    };
    std::unique_ptr<unsigned char, Free> dyn;
    const std::size_t dyn_guard = 4096;
    // 16 bytes past a 1024-byte boundary: all a GPU guarantees (see wrnc_dyn_smem_1024)
    const std::size_t dyn_off = 16;
    if (shared != 0) {
        dyn.reset(static_cast<unsigned char*>(std::aligned_alloc(1024, (dyn_off + shared + dyn_guard + 1023) / 1024 * 1024)));
        std::memset(dyn.get() + dyn_off, 0xff, shared);
        std::memset(dyn.get() + dyn_off + shared, 0x5a, dyn_guard);
    }
    g_dyn_smem = shared != 0 ? dyn.get() + dyn_off : nullptr;
    const unsigned int nt = block.x * block.y * block.z;
    if (nt == 0 || nt > 1024) {
        std::fprintf(stderr, "cuda_emu: bad block size %u\n", nt);
        std::abort();
    }
    g_block_dim = block;
    g_grid_dim = grid;
    const unsigned int nblocks = grid.x * grid.y * grid.z;
    // The host thread runs every block's threads as fibers; the stacks serve the whole launch.
    Sched sched;
    sched.fibers.resize(nt);
    unsigned char* stacks = g_stacks.get(nt);
    for (unsigned int t = 0; t < nt; ++t) {
        sched.fibers[t].stack = stacks + t * FIBER_STACK;
        sched.fibers[t].linear = t;
        sched.fibers[t].idx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
    }
    sched.body = [&] { kernel(static_cast<P>(args)...); };
    tl_sched = &sched;
    for (unsigned int i = 0; i < nblocks; ++i) {
        Block blk;
        blk.nthreads = nt;
        blk.bar = std::make_unique<Barrier>(nt);
        for (unsigned int w = 0; w * 32 < nt; ++w) {
            unsigned int lanes = nt - w * 32 < 32 ? nt - w * 32 : 32;
            blk.warp_bars.push_back(std::make_unique<Barrier>(lanes));
        }
        blk.slots.assign(nt, 0);
        tl_block = &blk;
        tl_block_idx = dim3(i % grid.x, (i / grid.x) % grid.y, i / (grid.x * grid.y));
        for (Fiber& f : sched.fibers) fiber_reset(f);
        const bool reverse = i % 2 == 1;
        for (unsigned int left = nt; left > 0;) {
            const std::uint64_t before = tl_progress;
            for (unsigned int j = 0; j < nt; ++j) {
                Fiber& f = sched.fibers[reverse ? nt - 1 - j : j];
                if (f.done) continue;
                resume(sched, f);
                if (f.done) {
                    // leave the barriers of this block, as an early return does
                    blk.warp_bars[f.linear / 32]->arrive_and_drop();
                    blk.bar->arrive_and_drop();
                    --left;
                }
            }
            if (left > 0 && tl_progress == before) {
                std::fprintf(stderr,
                             "cuda_emu: deadlock in block (%u, %u, %u): all %u unfinished threads wait "
                             "(a barrier some threads never reach, or a wait that nothing completes)\n",
                             tl_block_idx.x, tl_block_idx.y, tl_block_idx.z, left);
                std::abort();
            }
        }
        tl_block = nullptr;
    }
    tl_sched = nullptr;
    g_stacks.check(nt);
    g_launching = false;
    g_dyn_smem = nullptr;
    for (std::size_t i = 0; shared != 0 && i < dyn_guard; ++i) {
        if (dyn.get()[dyn_off + shared + i] != 0x5a) {
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
// Rounded up to 1024 bytes, as the CUDA twin does (the emulation's dynamic shared memory starts
// 16 bytes past a 1024-byte boundary, all a GPU guarantees, so a wgmma ring that did not round
// fails its alignment check and one that rounds without its 1024 bytes of slack its guard).
inline unsigned char* wrnc_dyn_smem_1024() {
    const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(wrnc_emu::g_dyn_smem);
    return wrnc_emu::g_dyn_smem + ((1024u - (unsigned)(a & 1023u)) & 1023u);
}

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
