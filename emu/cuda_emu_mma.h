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

#include <chrono>
#include <deque>
#include <map>

#include "cuda_emu_tma.h"

#define WRNC_MMA_EMU 1
#define __align__(n) __attribute__((aligned(n)))
#define __grid_constant__

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

inline void check_align(const void* p, const char* what) { wrnc_emu::check_align16(p, what); }

inline wrnc_emu::Barrier& warp_bar() {
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
// One per thread of the block (the threads are fibers of one host thread, see cuda_emu.h).
inline std::vector<AsyncState> g_async;
inline AsyncState& async_state() {
    if (g_async.size() < 1024) g_async.resize(1024);
    return g_async[wrnc_emu::tl_linear];
}

inline void perform(const std::vector<Copy>& g) {
    for (const Copy& c : g) {
        if (c.valid)
            std::memcpy(c.dst, c.src, 16);
        else
            std::memset(c.dst, 0, 16);
    }
}

// One warp-wide m16n8kK mma: every lane publishes its fragments, then computes its four
// accumulators D[g][2t..2t+1], D[g+8][2t..2t+1] (g = lane / 4, t = lane % 4) from C as
// sum over k of ab(slots, row, k, col), in k order, in f32.
template <unsigned int K, class AB>
inline void warp_mma(float* d, const unsigned int* a, const unsigned int* b, const float* c,
                     AB ab) {
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
        for (unsigned int k = 0; k < K; ++k) acc += ab(s, row, k, col);
        out[r] = acc;
    }
    warp_bar().arrive_and_wait();
    for (int r = 0; r < 4; ++r) d[r] = out[r];
}

// A register's tf32 value: the hardware reads only the tf32 bits (the low 13 are ignored).
inline float tf32_of(std::uint32_t bits) {
    bits &= 0xffffe000u;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

}  // namespace wrnc_emu_mma

inline void wrnc_mma_bf16_16816(float* d, const unsigned int* a, const unsigned int* b,
                                const float* c) {
    using namespace wrnc_emu_mma;
    warp_mma<16>(d, a, b, c, [](const Slot* s, unsigned int row, unsigned int k, unsigned int col) {
        return a_elem(s, row, k) * b_elem(s, k, col);
    });
}

// TF32 m16n8k8 (PTX ISA 9.7.14.5.7): A[row][k] is lane (row % 8) * 4 + k % 4, register
// row / 8 + 2 (k / 4); B[k][n] is lane n * 4 + k % 4, register k / 4. The products of two
// tf32 values are exact in f32.
inline void wrnc_mma_tf32_1688(float* d, const unsigned int* a, const unsigned int* b,
                               const float* c) {
    using namespace wrnc_emu_mma;
    warp_mma<8>(d, a, b, c, [](const Slot* s, unsigned int row, unsigned int k, unsigned int col) {
        return tf32_of(s[(row % 8) * 4 + k % 4].a[row / 8 + 2 * (k / 4)]) *
               tf32_of(s[col * 4 + k % 4].b[k / 4]);
    });
}

// cvt.rna.tf32.f32: to nearest, ties away from zero (add half an ulp of tf32 to the
// magnitude, then truncate); NaN stays NaN.
inline unsigned int wrnc_tf32(float x) {
    std::uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fffffffu;  // NaN
    if ((u & 0x7fffffffu) == 0x7f800000u) return u;          // inf
    return (u + 0x1000u) & 0xffffe000u;
}

inline void wrnc_ldmatrix_x4(unsigned int* r, const unsigned short* p) {
    wrnc_emu_mma::ldmatrix(r, p, false);
}
// On 32-bit elements (the TF32 fragments of an f32 tile): the same 16-byte rows.
inline void wrnc_ldmatrix_x4(unsigned int* r, const float* p) {
    wrnc_emu_mma::ldmatrix(r, reinterpret_cast<const unsigned short*>(p), false);
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
    wrnc_emu_mma::async_state().open.push_back({dst, src, valid});
}
// The same 16 bytes as four floats (0xff bytes poison them as NaN too).
inline void wrnc_cp_async16(float* dst, const float* src, bool valid) {
    wrnc_cp_async16(reinterpret_cast<unsigned short*>(dst),
                    reinterpret_cast<const unsigned short*>(src), valid);
}
inline void wrnc_cp_async_commit() {
    auto& st = wrnc_emu_mma::async_state();
    st.groups.push_back(std::move(st.open));
    st.open.clear();
}
template <int N>
inline void wrnc_cp_async_wait() {
    auto& st = wrnc_emu_mma::async_state();
    while (st.groups.size() > (std::size_t)N) {
        wrnc_emu_mma::perform(st.groups.front());
        st.groups.pop_front();
    }
}

// Warpgroup MMA (wgmma, sm_90a; contracts in compiler/src/codegen/cuda.rs, wgmma_cuh).
// A descriptor's start address is the byte offset from the block's shared array `base` that the
// kernel passes along; its fields are packed and unpacked exactly as on the GPU (bits 0-13
// address >> 4, 16-29 leading byte offset >> 4, 32-45 stride byte offset >> 4, 62-63 swizzle:
// 0 none, 1 128 bytes, 2 64 bytes, 3 32 bytes). Without swizzle an operand is 8x8 core matrices
// (8 rows of 16 contiguous bytes), the leading byte offset apart along K and the stride byte
// offset along M/N. In a swizzle mode of W bytes (K-major, as the PTX ISA's canonical layouts
// and CUTLASS's Swizzle<b,4,3> have it) row `r` of an 8-row atom is W bytes on from the
// previous one, atoms are the stride byte offset apart, the leading byte offset is unused, and
// the byte address `a = start + (r / 8) * sbo + (r % 8) * W + 2 k` is read at
// `a ^ (((a >> 7) & (W / 16 - 1)) << 4)`: its 16-byte chunk XORed with address bits 7 and up.
// The address is the offset from `base`, which the kernel checks to be 1024-byte aligned
// (wrnc_smem_align_check), so its low bits are the GPU's. An operand's K (16 elements) must
// not run past its row's W bytes. Like cp.async, an mma is only queued when issued: it reads shared
// memory and updates the accumulators when a wrnc_wgmma_wait<N>() retires its group, so a
// kernel that overwrites an operand stage or reads an accumulator too early gets wrong values
// here too. Each thread computes its own fragment (rows 16 (warp % 4) + lane / 4 (+ 8),
// columns 8 i + 2 (lane % 4) (+ 1)), multiplying bf16 exactly and summing in f32 in k order.
// The TF32 form (wrnc_wgmma_tf32_m64n<N>k8) reads 8 f32 elements of K from the same 32 bytes
// of a row and aborts on an element that is not a TF32 value (13 low mantissa bits set): the
// kernels round operands in shared memory first, so the hardware's treatment of those bits
// never matters.
namespace wrnc_emu_mma {

struct Wgmma {
    float* d;
    const unsigned char* base;
    std::uint64_t da, db;
    unsigned int n;
    bool tf32;  // f32 elements, K = 8 (else bf16, K = 16)
};

struct WgmmaState {
    std::vector<Wgmma> open;
    std::deque<std::vector<Wgmma>> groups;
};
inline std::vector<WgmmaState> g_wgmma;  // one per thread of the block
inline WgmmaState& wgmma_state() {
    if (g_wgmma.size() < 1024) g_wgmma.resize(1024);
    return g_wgmma[wrnc_emu::tl_linear];
}

// A wgmma operand's descriptor, unpacked (and checked) once per mma.
struct WgOperand {
    const unsigned char* base;
    std::uint64_t start, lbo, sbo, w;  // w: the swizzle's row in bytes (0: no swizzle)
};

inline WgOperand wg_operand(const unsigned char* base, std::uint64_t desc) {
    const std::uint64_t mode = desc >> 62;
    const WgOperand o{base, (desc & 0x3FFF) << 4, ((desc >> 16) & 0x3FFF) << 4, ((desc >> 32) & 0x3FFF) << 4,
                      mode == 0 ? 0u : mode == 1 ? 128u : mode == 2 ? 64u : 32u};
    if (((desc >> 49) & 7) != 0) {
        std::fprintf(stderr, "cuda_emu_mma: wgmma descriptor with a matrix base offset\n");
        std::abort();
    }
    if (o.w != 0 && o.start % o.w + 2 * 16 > o.w) {
        std::fprintf(stderr, "cuda_emu_mma: wgmma operand's K runs past its %llu-byte swizzle row\n",
                     (unsigned long long)o.w);
        std::abort();
    }
    return o;
}

inline float bf_bits(unsigned short h) {
    std::uint32_t bits = (std::uint32_t)h << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}

// The K elements (16 bf16, or 8 TF32) of row `row` (of M for A, of N for B) of an operand,
// as floats.
inline void wg_row(const WgOperand& o, unsigned int row, float* out, bool tf32) {
    if (tf32) {
        for (unsigned int k = 0; k < 8; ++k) {
            const std::uint64_t a = o.start + (row / 8) * o.sbo + (row % 8) * o.w + 4 * k;
            const std::uint64_t off = o.w == 0 ? a : a ^ (((a >> 7) & (o.w / 16 - 1)) << 4);
            std::uint32_t bits;
            std::memcpy(&bits, o.base + off, 4);
            if ((bits & 0x1fffu) != 0 && (bits & 0x7f800000u) != 0x7f800000u) {
                std::fprintf(stderr, "cuda_emu_mma: a TF32 wgmma operand 0x%08x is not rounded to TF32\n", bits);
                std::abort();
            }
            std::memcpy(&out[k], &bits, 4);
        }
        return;
    }
    for (unsigned int k = 0; k < 16; ++k) {
        std::uint64_t off;
        if (o.w == 0) {
            off = o.start + (row / 8) * o.sbo + (k / 8) * o.lbo + (row % 8) * 16 + (k % 8) * 2;
        } else {
            const std::uint64_t a = o.start + (row / 8) * o.sbo + (row % 8) * o.w + 2 * k;
            off = a ^ (((a >> 7) & (o.w / 16 - 1)) << 4);
        }
        unsigned short h;
        std::memcpy(&h, o.base + off, 2);
        out[k] = bf_bits(h);
    }
}

inline void wg_perform(const Wgmma& m) {
    const unsigned int lin = wrnc_emu::tl_linear, lane = lin % 32, w4 = (lin / 32) % 4;
    const WgOperand a = wg_operand(m.base, m.da), b = wg_operand(m.base, m.db);
    const unsigned int kn = m.tf32 ? 8 : 16;
    float av[2][16], bv[2][16];  // this thread's two rows of A; two columns of B at a time
    for (unsigned int h = 0; h < 2; ++h) wg_row(a, 16 * w4 + lane / 4 + 8 * h, av[h], m.tf32);
    for (unsigned int i = 0; i < m.n / 8; ++i) {
        for (unsigned int c = 0; c < 2; ++c) wg_row(b, 8 * i + 2 * (lane % 4) + c, bv[c], m.tf32);
        for (unsigned int v = 0; v < 4; ++v) {
            float acc = m.d[4 * i + v];
            for (unsigned int k = 0; k < kn; ++k) acc += av[v >> 1][k] * bv[v & 1][k];
            m.d[4 * i + v] = acc;
        }
    }
}

}  // namespace wrnc_emu_mma

namespace wrnc_emu_mma {
// A K-major swizzled operand's descriptor: `sbo` bytes between 8-row atoms, swizzle field `mode`.
inline unsigned long long desc(const void* base, const void* p, unsigned long long sbo, unsigned long long mode) {
    const std::ptrdiff_t off = (const unsigned char*)p - (const unsigned char*)base;
    if (off < 0 || off % 16 != 0 || off >= (1 << 18)) {
        std::fprintf(stderr, "cuda_emu_mma: wgmma operand at offset %td of shared memory\n", off);
        std::abort();
    }
    return ((unsigned long long)off >> 4) | (1ull << 16) | ((sbo >> 4) << 32) | (mode << 62);
}
}  // namespace wrnc_emu_mma
// the 64-byte swizzle (field 2, 512-byte atoms) and the 128-byte one (field 1, 1024-byte atoms)
inline unsigned long long wrnc_wgmma_desc(const void* base, const void* p) {
    return wrnc_emu_mma::desc(base, p, 512, 2);
}
inline unsigned long long wrnc_wgmma_desc128(const void* base, const void* p) {
    return wrnc_emu_mma::desc(base, p, 1024, 1);
}
inline void wrnc_smem_align_check(const void* base) {
    if (reinterpret_cast<std::uintptr_t>(base) % 1024 != 0) {
        std::fprintf(stderr, "cuda_emu_mma: shared array %p of a wgmma kernel is not 1024-byte aligned\n", base);
        std::abort();
    }
}
inline void wrnc_wgmma_fence() {}
inline void wrnc_fence_proxy_async() {}
inline void wrnc_wgmma_commit() {
    auto& st = wrnc_emu_mma::wgmma_state();
    st.groups.push_back(std::move(st.open));
    st.open.clear();
}
template <int N>
inline void wrnc_wgmma_wait() {
    auto& st = wrnc_emu_mma::wgmma_state();
    while (st.groups.size() > (std::size_t)N) {
        for (const auto& m : st.groups.front()) wrnc_emu_mma::wg_perform(m);
        st.groups.pop_front();
    }
}
#define WRNC_EMU_WGMMA(N)                                                                     \
    inline void wrnc_wgmma_m64n##N##k16(float* d, const void* base, unsigned long long da,     \
                                        unsigned long long db) {                              \
        wrnc_emu_mma::wgmma_state().open.push_back(                                                \
            {d, (const unsigned char*)base, (std::uint64_t)da, (std::uint64_t)db, N, false}); \
    }                                                                                         \
    inline void wrnc_wgmma_tf32_m64n##N##k8(float* d, const void* base, unsigned long long da, \
                                            unsigned long long db) {                          \
        wrnc_emu_mma::wgmma_state().open.push_back(                                                \
            {d, (const unsigned char*)base, (std::uint64_t)da, (std::uint64_t)db, N, true});  \
    }                                                                                         \
    inline void wrnc_wgmma_fence_acc##N(float*) {}
WRNC_EMU_WGMMA(16)
WRNC_EMU_WGMMA(32)
WRNC_EMU_WGMMA(64)
WRNC_EMU_WGMMA(128)
#undef WRNC_EMU_WGMMA

// The tensor memory accelerator (cp.async.bulk.tensor) and mbarriers (sm_90; contracts in
// compiler/src/codegen/cuda.rs, wgmma_cuh). An mbarrier's state lives in a table keyed by its
// address (its 8 bytes are not used). A TMA copy is asynchronous here too: its destination is
// poisoned (0xff bytes) at issue and the box is copied only when a thread waits on the copy's
// mbarrier, which then counts its bytes; a phase completes when its arrivals and its expected
// bytes are all in. So a kernel that reads a slot before waiting for its phase, waits on the
// wrong parity, expects the wrong byte count, or refills a slot an in-flight wgmma still
// reads, sees NaN or never completes (when every thread of the block waits and nothing can
// complete a phase, cuda_emu.h's scheduler reports a deadlock and aborts; a wait that has not
// completed after 60 s aborts too).
// The box lands densely, innermost dimension first, in the map's swizzle mode (the byte at
// shared address `a` moved to `a ^ (((a >> 7) & (W / 16 - 1)) << 4)` for W = 32, 64, 128 bytes,
// the pattern wgmma's descriptors read; host addresses of the emulation's shared memory are
// 1024-byte aligned, so their low bits are the GPU's); elements outside the tensor are zeros.
namespace wrnc_emu_mma {

struct TmaCopy {
    unsigned char* dst;
    wrnc_tmap map;
    int c[4];
};

struct Mbar {
    std::uint64_t phase = 0;  // phases completed
    unsigned expected = 0, pending = 0;
    long long tx = 0;  // bytes expected and not yet arrived in this phase
    std::vector<TmaCopy> copies;
};

inline std::map<const void*, Mbar> g_mbars;

inline void tma_perform(const TmaCopy& cp) {
    const wrnc_tmap& t = cp.map;
    const std::uint64_t elem = t.w[3];
    const std::uint64_t b[4] = {t.w[11], t.w[12], t.w[13], t.w[14]};
    const unsigned char* g = reinterpret_cast<const unsigned char*>(t.w[1]);
    auto inside = [&](unsigned d, long long x) { return x >= 0 && (std::uint64_t)x < t.w[4 + d]; };
    unsigned char* dst = cp.dst;  // box element (i0, i1, i2, i3), innermost first, densely
    for (std::uint64_t i3 = 0; i3 < b[3]; ++i3)
        for (std::uint64_t i2 = 0; i2 < b[2]; ++i2)
            for (std::uint64_t i1 = 0; i1 < b[1]; ++i1) {
                const long long x1 = cp.c[1] + (long long)i1, x2 = cp.c[2] + (long long)i2,
                                x3 = cp.c[3] + (long long)i3;
                const bool row_in = inside(1, x1) && inside(2, x2) && inside(3, x3);
                const unsigned char* row =
                    row_in ? g + (std::uint64_t)x1 * t.w[8] + (std::uint64_t)x2 * t.w[9] + (std::uint64_t)x3 * t.w[10]
                           : nullptr;
                for (std::uint64_t i0 = 0; i0 < b[0]; ++i0, dst += elem) {
                    const long long x0 = cp.c[0] + (long long)i0;
                    unsigned char* to = wrnc_emu_tma::swizzled(t, dst);
                    if (row_in && inside(0, x0))
                        std::memcpy(to, row + (std::uint64_t)x0 * elem, elem);
                    else
                        std::memset(to, 0, elem);
                }
            }
}

// Lands the barrier's queued copies and completes its phase when due.
inline void mbar_progress(Mbar& m) {
    for (const TmaCopy& cp : m.copies) {
        tma_perform(cp);
        m.tx -= (long long)wrnc_emu_tma::box_bytes(cp.map);
        wrnc_emu::note_progress();
    }
    m.copies.clear();
    if (m.pending == 0 && m.tx == 0) {
        ++m.phase;
        m.pending = m.expected;
        wrnc_emu::note_progress();
    }
}

inline Mbar& mbar(const void* bar, const char* what) {
    auto it = g_mbars.find(bar);
    if (it == g_mbars.end() || it->second.expected == 0) {
        std::fprintf(stderr, "cuda_emu_mma: %s on an mbarrier that was never initialised\n", what);
        std::abort();
    }
    return it->second;
}

}  // namespace wrnc_emu_mma

inline void wrnc_mbar_init(unsigned long long* bar, unsigned count) {
    if (reinterpret_cast<std::uintptr_t>(bar) % 8 != 0 || count == 0) {
        std::fprintf(stderr, "cuda_emu_mma: mbarrier.init of a misaligned barrier or 0 arrivals\n");
        std::abort();
    }
    wrnc_emu_mma::Mbar& m = wrnc_emu_mma::g_mbars[bar];
    m = wrnc_emu_mma::Mbar{};
    m.expected = m.pending = count;
    wrnc_emu::note_progress();
}
inline void wrnc_mbar_fence_init() {}
inline void wrnc_mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    wrnc_emu_mma::Mbar& m = wrnc_emu_mma::mbar(bar, "mbarrier.arrive.expect_tx");
    if (m.pending == 0) {
        std::fprintf(stderr, "cuda_emu_mma: more arrivals on an mbarrier than its phase expects\n");
        std::abort();
    }
    m.tx += bytes;
    --m.pending;
    wrnc_emu::note_progress();
}
inline void wrnc_mbar_wait(unsigned long long* bar, unsigned parity) {
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
        {
            wrnc_emu_mma::Mbar& m = wrnc_emu_mma::mbar(bar, "mbarrier.try_wait");
            if ((m.phase & 1) != (parity & 1)) return;
            wrnc_emu_mma::mbar_progress(m);
            if ((m.phase & 1) != (parity & 1)) return;
            if (std::chrono::steady_clock::now() - start > std::chrono::seconds(60)) {
                std::fprintf(stderr,
                             "cuda_emu_mma: an mbarrier wait for parity %u never completed (phase %llu, "
                             "%u arrivals and %lld bytes outstanding)\n",
                             parity, (unsigned long long)m.phase, m.pending, m.tx);
                std::abort();
            }
        }
        wrnc_emu::yield();
    }
}
inline void wrnc_tma_load_4d(void* dst, const wrnc_tmap* map, int c0, int c1, int c2, int c3, unsigned long long* bar) {
    if (map->w[0] != wrnc_emu_tma::MAGIC) {
        std::fprintf(stderr, "cuda_emu_mma: cp.async.bulk.tensor with a tensor map that was never encoded\n");
        std::abort();
    }
    if (map->w[2] != 4) {
        std::fprintf(stderr, "cuda_emu_mma: cp.async.bulk.tensor.4d with a tensor map of rank %llu\n",
                     (unsigned long long)map->w[2]);
        std::abort();
    }
    const std::uint64_t align = map->w[15] ? map->w[15] * 8 : 128;
    if (reinterpret_cast<std::uintptr_t>(dst) % align != 0) {
        std::fprintf(stderr, "cuda_emu_mma: cp.async.bulk.tensor destination %p is not %llu-byte aligned\n", dst,
                     (unsigned long long)align);
        std::abort();
    }
    std::memset(dst, 0xff, wrnc_emu_tma::box_bytes(*map));
    wrnc_emu_mma::Mbar& m = wrnc_emu_mma::mbar(bar, "cp.async.bulk.tensor");
    m.copies.push_back({static_cast<unsigned char*>(dst), *map, {c0, c1, c2, c3}});
    wrnc_emu::note_progress();
}

// The emulation driver's (compiler/src/codegen/emu.rs) tensor-map argument: a dense bf16
// tensor of 4 dimensions at `p`, swizzled in rows of `swizzle` bytes (0: none) (aborts where
// cuTensorMapEncodeTiled would refuse it).
inline wrnc_tmap wrnc_emu_tmap(const unsigned short* p, std::uint64_t d0, std::uint64_t d1, std::uint64_t d2,
                               std::uint64_t d3, std::uint32_t b0, std::uint32_t b1, std::uint32_t b2,
                               std::uint32_t b3, std::uint32_t swizzle) {
    const std::uint64_t dims[4] = {d0, d1, d2, d3}, strides[3] = {d0 * 2, d0 * d1 * 2, d0 * d1 * d2 * 2};
    const std::uint32_t box[4] = {b0, b1, b2, b3};
    wrnc_tmap t;
    if (const char* e = wrnc_emu_tma::encode(&t, p, 4, 2, dims, strides, box, swizzle)) {
        std::fprintf(stderr, "cuda_emu_mma: tensor map: %s\n", e);
        std::abort();
    }
    return t;
}
