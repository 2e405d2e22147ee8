// cuda_emu_mma.h: host emulation of the tensor-core helpers of compiler/src/codegen/mma.cuh
// (include after cuda_emu.h, before the generated kernels).
//
// Warp-collective operations work like cuda_emu.h's shuffles: each lane publishes its operands
// in a per-thread slot, waits at its warp's barrier, computes its own result from the other
// lanes' slots, and waits again before the slots are reused. Every lane of the warp must call
// them (blocks are whole warps).
//
// Fragment layouts are those of the PTX ISA (9.7.14.5.8, mma.m16n8k16 .bf16; 9.7.9.x ldmatrix),
// written out once in wrnc_emu_mma::a_elem / b_elem / the accumulator loop below.
// The mma multiplies bf16 values exactly and accumulates in f32 in k order, starting from C
// (the hardware's internal summation order within one mma is unspecified; the kernels are
// checked against references with a tolerance that covers any order).
//
// cp.async is emulated asynchronously: the destination is poisoned (NaN bytes) at issue, and
// the copy is queued on its thread's current group and performed only when a
// wrnc_cp_async_wait<N>() retires that group. So a kernel that reads a stage before waiting
// for it, or reads a slot's old contents after its refill was issued, sees NaN here; on the
// GPU it could see either. Addresses are checked for the 16-byte alignment the instructions
// require (abort otherwise).
#pragma once

#include <deque>

#define WRNC_MMA_EMU 1
#define __align__(n) __attribute__((aligned(n)))

namespace wrnc_emu_mma {

struct Slot {
    std::uint32_t a[4];
    std::uint32_t b[2];
    const unsigned short* addr;
};

// One slot per thread of the running block (blocks run one after another).
inline Slot g_slots[1024];

inline float bf(std::uint32_t reg, unsigned int half) {
    std::uint32_t bits = half ? (reg & 0xffff0000u) : (reg << 16);
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// A[row][k] of the warp whose lanes' slots start at `s` (row-major 16x16 fragment layout).
inline float a_elem(const Slot* s, unsigned int row, unsigned int k) {
    unsigned int lane = (row % 8) * 4 + (k % 8) / 2;
    unsigned int reg = (row / 8) + 2 * (k / 8);
    return bf(s[lane].a[reg], k & 1);
}

// B[k][n] (column-major 16x8 fragment layout).
inline float b_elem(const Slot* s, unsigned int k, unsigned int n) {
    unsigned int lane = n * 4 + (k % 8) / 2;
    return bf(s[lane].b[k / 8], k & 1);
}

inline void check_align(const void* p, const char* what) {
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) {
        std::fprintf(stderr, "cuda_emu_mma: %s address %p is not 16-byte aligned\n", what, p);
        std::abort();
    }
}

inline std::barrier<>& warp_bar() {
    return *wrnc_emu::tl_block->warp_bars[wrnc_emu::tl_linear / 32];
}

inline Slot* warp_slots() { return &g_slots[(wrnc_emu::tl_linear / 32) * 32]; }

inline void ldmatrix(unsigned int* r, const unsigned short* p, bool trans) {
    const unsigned int lin = wrnc_emu::tl_linear, lane = lin % 32;
    check_align(p, "ldmatrix row");
    g_slots[lin].addr = p;
    warp_bar().arrive_and_wait();
    const Slot* s = warp_slots();
    const unsigned int g = lane >> 2, t = lane & 3;
    std::uint32_t out[4];
    for (unsigned int i = 0; i < 4; ++i) {
        unsigned short lo, hi;
        if (!trans) {
            const unsigned short* row = s[8 * i + g].addr;
            lo = row[2 * t];
            hi = row[2 * t + 1];
        } else {
            lo = s[8 * i + 2 * t].addr[g];
            hi = s[8 * i + 2 * t + 1].addr[g];
        }
        out[i] = (std::uint32_t)lo | ((std::uint32_t)hi << 16);
    }
    warp_bar().arrive_and_wait();
    for (unsigned int i = 0; i < 4; ++i) r[i] = out[i];
}

struct Copy {
    unsigned short* dst;
    const unsigned short* src;
    bool valid;
};

struct AsyncState {
    std::vector<Copy> open;               // the group not yet committed
    std::deque<std::vector<Copy>> groups; // committed, oldest first
};
inline thread_local AsyncState tl_async;

inline void perform(const std::vector<Copy>& g) {
    for (const Copy& c : g) {
        if (c.valid)
            std::memcpy(c.dst, c.src, 16);
        else
            std::memset(c.dst, 0, 16);
    }
}

}  // namespace wrnc_emu_mma

inline void wrnc_mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b,
                                const float* c) {
    using namespace wrnc_emu_mma;
    const unsigned int lin = wrnc_emu::tl_linear, lane = lin % 32;
    for (int i = 0; i < 4; ++i) g_slots[lin].a[i] = a[i];
    for (int i = 0; i < 2; ++i) g_slots[lin].b[i] = b[i];
    warp_bar().arrive_and_wait();
    const Slot* s = warp_slots();
    const unsigned int g = lane >> 2, t = lane & 3;
    float out[4];
    for (unsigned int r = 0; r < 4; ++r) {
        const unsigned int row = g + (r >> 1) * 8, col = 2 * t + (r & 1);
        float acc = c[r];
        for (unsigned int k = 0; k < 16; ++k) acc += a_elem(s, row, k) * b_elem(s, k, col);
        out[r] = acc;
    }
    warp_bar().arrive_and_wait();
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}

inline void wrnc_ldmatrix_x4(unsigned int* r, const unsigned short* p) {
    wrnc_emu_mma::ldmatrix(r, p, false);
}
inline void wrnc_ldmatrix_x4_trans(unsigned int* r, const unsigned short* p) {
    wrnc_emu_mma::ldmatrix(r, p, true);
}

// 16-byte vector load / store: the hardware faults on a misaligned one, so the emulation aborts.
inline void wrnc_ld16(unsigned int* r, const unsigned short* p) {
    wrnc_emu_mma::check_align(p, "16-byte load");
    std::memcpy(r, p, 16);
}
inline void wrnc_st16(unsigned short* p, const unsigned int* r) {
    wrnc_emu_mma::check_align(p, "16-byte store");
    std::memcpy(p, r, 16);
}

inline void wrnc_cp_async16(unsigned short* dst, const unsigned short* src, bool valid) {
    wrnc_emu_mma::check_align(dst, "cp.async shared");
    if (valid) wrnc_emu_mma::check_align(src, "cp.async global");
    // Between issue and the wait that retires it, the destination's contents are undefined on
    // the GPU (the copy may land at any moment): poison them now (0xff: NaN in bf16), so a
    // read before the wait and a read of the old contents after the issue (a slot refilled
    // while a warp or an in-flight wgmma still reads it) both show.
    std::memset(dst, 0xff, 16);
    wrnc_emu_mma::tl_async.open.push_back({dst, src, valid});
}
inline void wrnc_cp_async_commit() {
    auto& st = wrnc_emu_mma::tl_async;
    st.groups.push_back(std::move(st.open));
    st.open.clear();
}
template <int N>
inline void wrnc_cp_async_wait() {
    auto& st = wrnc_emu_mma::tl_async;
    while (st.groups.size() > (std::size_t)N) {
        wrnc_emu_mma::perform(st.groups.front());
        st.groups.pop_front();
    }
}

// Warpgroup MMA (wgmma, sm_90a; contracts in compiler/src/codegen/cuda.rs, wgmma_cuh).
// A descriptor's start address is the byte offset from the block's shared array `base` that the
// kernel passes along; its fields are packed and unpacked exactly as on the GPU (bits 0-13
// address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4, 62-63 swizzle,
// which must be 0: none). Like cp.async, an mma is only queued when issued: it reads shared
// memory and updates the accumulators when a wrnc_wgmma_wait<N>() retires its group, so a
// kernel that overwrites an operand stage or reads an accumulator too early gets wrong values
// here too. Each thread computes its own fragment (rows 16 (warp % 4) + lane / 4 (+ 8),
// columns 8 i + 2 (lane % 4) (+ 1)), multiplying bf16 exactly and summing in f32 in k order.
namespace wrnc_emu_mma {

struct Wgmma {
    float* d;
    const unsigned char* base;
    std::uint64_t da, db;
    unsigned int n;
};

struct WgmmaState {
    std::vector<Wgmma> open;
    std::deque<std::vector<Wgmma>> groups;
};
inline thread_local WgmmaState tl_wgmma;

inline const unsigned short* wg_elem(const unsigned char* base, std::uint64_t desc, unsigned int row,
                                     unsigned int k) {
    if ((desc >> 62) != 0) {
        std::fprintf(stderr, "cuda_emu_mma: wgmma descriptor with a swizzle mode\n");
        std::abort();
    }
    const std::uint64_t start = (desc & 0x3FFF) << 4, lbo = ((desc >> 16) & 0x3FFF) << 4,
                        sbo = ((desc >> 32) & 0x3FFF) << 4;
    const std::uint64_t off = start + (row / 8) * sbo + (k / 8) * lbo + (row % 8) * 16 + (k % 8) * 2;
    return reinterpret_cast<const unsigned short*>(base + off);
}

inline float bf_bits(unsigned short h) {
    std::uint32_t bits = (std::uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

inline void wg_perform(const Wgmma& m) {
    const unsigned int lin = wrnc_emu::tl_linear, lane = lin % 32, w4 = (lin / 32) % 4;
    for (unsigned int i = 0; i < m.n / 8; ++i)
        for (unsigned int v = 0; v < 4; ++v) {
            const unsigned int row = 16 * w4 + lane / 4 + 8 * (v >> 1);
            const unsigned int col = 8 * i + 2 * (lane % 4) + (v & 1);
            float acc = m.d[4 * i + v];
            for (unsigned int k = 0; k < 16; ++k)
                acc += bf_bits(*wg_elem(m.base, m.da, row, k)) * bf_bits(*wg_elem(m.base, m.db, col, k));
            m.d[4 * i + v] = acc;
        }
}

}  // namespace wrnc_emu_mma

inline unsigned long long wrnc_wgmma_desc(const void* base, const void* p) {
    const std::ptrdiff_t off = (const unsigned char*)p - (const unsigned char*)base;
    if (off < 0 || off % 16 != 0 || off >= (1 << 18)) {
        std::fprintf(stderr, "cuda_emu_mma: wgmma operand at offset %td of shared memory\n", off);
        std::abort();
    }
    return ((unsigned long long)off >> 4) | ((128ull >> 4) << 16) | ((512ull >> 4) << 32);
}
inline void wrnc_wgmma_fence() {}
inline void wrnc_fence_proxy_async() {}
inline void wrnc_wgmma_commit() {
    auto& st = wrnc_emu_mma::tl_wgmma;
    st.groups.push_back(std::move(st.open));
    st.open.clear();
}
template <int N>
inline void wrnc_wgmma_wait() {
    auto& st = wrnc_emu_mma::tl_wgmma;
    while (st.groups.size() > (std::size_t)N) {
        for (const auto& m : st.groups.front()) wrnc_emu_mma::wg_perform(m);
        st.groups.pop_front();
    }
}
#define WRNC_EMU_WGMMA(N)                                                                     \
    inline void wrnc_wgmma_m64n##N##k16(float* d, const void* base, unsigned long long da,     \
                                        unsigned long long db) {                              \
        wrnc_emu_mma::tl_wgmma.open.push_back(                                                \
            {d, (const unsigned char*)base, (std::uint64_t)da, (std::uint64_t)db, N});        \
    }                                                                                         \
    inline void wrnc_wgmma_fence_acc##N(float*) {}
WRNC_EMU_WGMMA(16)
WRNC_EMU_WGMMA(32)
WRNC_EMU_WGMMA(64)
WRNC_EMU_WGMMA(128)
#undef WRNC_EMU_WGMMA
