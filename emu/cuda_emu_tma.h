// cuda_emu_tma.h: the emulation's tensor maps (Hopper TMA), shared by cuda_emu_mma.h (the
// kernels' side: cp.async.bulk.tensor) and fakecuda.cpp (the host's side:
// cuTensorMapEncodeTiled), so the two agree on the 128 opaque bytes.
//
// A real CUtensorMap is opaque; ours holds, in 64-bit words: [0] a magic number, [1] the
// global address, [2] the rank (1 to 4), [3] the element size in bytes, [4..7] the elements
// per dimension (innermost first), [8..10] the byte strides of dimensions 1 to 3, [11..14] the
// box (elements per dimension), [15] the swizzle's row in bytes (0: none; 32, 64 or 128); a
// dimension past the rank has 1 element. Only
// what wrnc uses is supported: no interleave, element strides 1, zero fill outside the tensor.
#pragma once

#include <cstdint>
#include <cstring>

struct wrnc_tmap {
    unsigned long long w[16];
};

namespace wrnc_emu_tma {

inline constexpr std::uint64_t MAGIC = 0x414d545f434e5257ull;  // "WRNC_TMA"

// Fills `t` as cuTensorMapEncodeTiled would describe the tensor; returns null, or what breaks a
// requirement of the driver API (the real driver returns CUDA_ERROR_INVALID_VALUE for it).
inline const char* encode(wrnc_tmap* t, const void* addr, unsigned rank, unsigned elem,
                          const std::uint64_t* dims, const std::uint64_t* strides,
                          const std::uint32_t* box, std::uint32_t swizzle) {
    if (rank < 1 || rank > 4) return "rank outside 1..4 (the emulation's limit)";
    if (reinterpret_cast<std::uintptr_t>(addr) % 16 != 0) return "global address not 16-byte aligned";
    for (unsigned i = 0; i < rank; ++i) {
        if (dims[i] == 0 || dims[i] > (1ull << 32)) return "a dimension outside 1..2^32";
        if (box[i] == 0 || box[i] > 256) return "a box dimension outside 1..256";
        // the driver API documents only the 256; CUDA faults on the copies otherwise
        // (pytorch/helion#2555), so the emulation refuses it here
        if (box[i] > dims[i]) return "a box dimension larger than the tensor's";
        if (i > 0 && (strides[i - 1] % 16 != 0 || strides[i - 1] >= (1ull << 40)))
            return "a stride not a multiple of 16 bytes below 2^40";
    }
    if (box[0] * elem % 16 != 0) return "the box's inner dimension not a multiple of 16 bytes";
    if (swizzle != 0 && swizzle != 32 && swizzle != 64 && swizzle != 128) return "a swizzle other than 32, 64 or 128 bytes";
    // the driver takes narrower boxes too; how they land is not emulated
    if (swizzle != 0 && box[0] * elem != swizzle) return "a swizzled box's inner dimension other than the swizzle's row (the emulation's limit)";
    std::memset(t, 0, sizeof *t);
    t->w[0] = MAGIC;
    t->w[1] = reinterpret_cast<std::uintptr_t>(addr);
    t->w[2] = rank;
    t->w[3] = elem;
    for (unsigned i = 0; i < 4; ++i) {
        t->w[4 + i] = i < rank ? dims[i] : 1;
        t->w[11 + i] = i < rank ? box[i] : 1;
    }
    for (unsigned i = 1; i < 4; ++i) t->w[7 + i] = i < rank ? strides[i - 1] : 0;
    t->w[15] = swizzle;
    return nullptr;
}

// Where the byte a box puts at shared address `p` lands in `t`'s swizzle mode: its 16-byte chunk
// XORed with address bits 7 and up (as many bits as the swizzle's row has chunks beyond one).
template <class T>
inline T* swizzled(const wrnc_tmap& t, T* p) {
    if (t.w[15] == 0) return p;
    const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(p);
    return reinterpret_cast<T*>(a ^ (((a >> 7) & (t.w[15] / 16 - 1)) << 4));
}

// The bytes one copy of `t`'s box moves.
inline std::uint64_t box_bytes(const wrnc_tmap& t) { return t.w[3] * t.w[11] * t.w[12] * t.w[13] * t.w[14]; }

// The highest byte address (exclusive) the tensor of `t` reaches.
inline std::uint64_t extent(const wrnc_tmap& t) {
    std::uint64_t last = (t.w[4] - 1) * t.w[3];
    for (unsigned i = 1; i < 4; ++i) last += (t.w[4 + i] - 1) * t.w[7 + i];
    return t.w[1] + last + t.w[3];
}

}  // namespace wrnc_emu_tma
