// wrnc tensor-core helpers (sm_80+): bf16 mma.sync, ldmatrix, cp.async, behind small inline
// functions. Included verbatim by codegen::mma kernels and by schedules with tensor-core convs.
//
// On the GPU these are single PTX instructions. emu/cuda_emu_mma.h defines WRNC_MMA_EMU and
// replaces them with host emulations that follow the PTX ISA's per-lane fragment layouts
// exactly, executed warp-synchronously, so the same kernel text runs in the CPU emulation.
//
// Contracts (both implementations):
// - wrnc_mma_bf16_16816(d, a, b, c): the warp's D (16x8, f32) = A (16x16, bf16, row) *
//   B (16x8, bf16, col) + C. Every lane of the warp calls it. Fragments (PTX ISA 9.7.14.5.8;
//   g = lane >> 2, t = lane & 3; a register holds two bf16, the lower-indexed one in the low
//   16 bits): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..],
//   a[3] = A[g+8][2t+8..]; b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g];
//   c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]. d may alias c.
// - wrnc_mma_tf32_1688(d, a, b, c): the warp's D (16x8, f32) = A (16x8, tf32, row) *
//   B (8x8, tf32, col) + C (PTX ISA 9.7.14.5.7, .tf32 m16n8k8; a register holds one tf32 in
//   an f32's bits, low 13 bits zero): a[0] = A[g][t], a[1] = A[g+8][t], a[2] = A[g][t+4],
//   a[3] = A[g+8][t+4]; b[0] = B[t][g], b[1] = B[t+4][g]; c and d as for bf16.
// - wrnc_tf32(x): cvt.rna.tf32.f32, x rounded to 10 mantissa bits, to nearest, ties away
//   from zero; the f32 bits of the result.
// - wrnc_ldmatrix_x4(r, p): four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give
//   the 16-byte-aligned addresses of rows 0..7 of matrix i; r[i] = matrix i's
//   [lane >> 2][2 (lane & 3) .. +1]. The _trans form gives r[i] = matrix i's
//   ([2 (lane & 3)][lane >> 2], [2 (lane & 3) + 1][lane >> 2]).
// - wrnc_cp_async16(dst, src, valid): copies 16 bytes global -> shared asynchronously (both
//   16-byte aligned), or writes 16 zero bytes when !valid (src is then not read but must be a
//   valid pointer). The copy lands only after a later wrnc_cp_async_wait<N>() that retires its
//   group: wrnc_cp_async_commit() closes the current group, wrnc_cp_async_wait<N>() waits
//   until at most N of this thread's committed groups are still in flight.
// - wrnc_ld16(r, p) / wrnc_st16(p, r): eight consecutive bf16 at p (global or shared memory,
//   16-byte aligned) in one 16-byte load / store; r[i] holds elements 2i (low 16 bits) and
//   2i + 1 (high), the same packing as the fragments.

#ifndef WRNC_MMA_CUH
#define WRNC_MMA_CUH

#ifndef WRNC_MMA_EMU
// The block's dynamic shared memory (the launch's `sharedMemBytes`, 1024-byte aligned, as the
// wgmma engine's swizzled stages need).
__device__ __forceinline__ unsigned char* wrnc_dyn_smem() {
    extern __shared__ __align__(1024) unsigned char wrnc_dsmem_[];
    return wrnc_dsmem_;
}
// The same rounded up to a 1024-byte boundary (the launch gives 1024 bytes of slack): CUDA
// does not document that dynamic shared memory after a kernel's static arrays honours the
// declared alignment. The address goes through an opaque asm, or NVVM would trust the
// declaration and fold the rounding away.
__device__ __forceinline__ unsigned char* wrnc_dyn_smem_1024() {
    unsigned char* p = wrnc_dyn_smem();
    unsigned long long a;
    asm volatile("cvta.to.shared.u64 %0, %1;\n" : "=l"(a) : "l"(p));
    return p + ((1024u - (unsigned int)(a & 1023ull)) & 1023u);
}

__device__ __forceinline__ unsigned int wrnc_smem_addr(const void* p) {
    return (unsigned int)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void wrnc_mma_bf16_16816(float* d, const unsigned int* a,
                                                    const unsigned int* b, const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void wrnc_mma_tf32_1688(float* d, const unsigned int* a,
                                                   const unsigned int* b, const float* c) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]),
          "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ unsigned int wrnc_tf32(float x) {
    unsigned int r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void wrnc_ldmatrix_x4(unsigned int* r, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(wrnc_smem_addr(p))
                 : "memory");
}

__device__ __forceinline__ void wrnc_ldmatrix_x4_trans(unsigned int* r, const unsigned short* p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(wrnc_smem_addr(p))
                 : "memory");
}

__device__ __forceinline__ void wrnc_cp_async16(unsigned short* dst, const unsigned short* src,
                                                bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(wrnc_smem_addr(dst)),
                 "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
}

// ldmatrix on a tile of 32-bit elements (the TF32 engines' f32 tiles, K-contiguous rows): an
// 8x8 b16 matrix is then 8 rows of 4 floats, and lane i receives float i % 4 of row i / 4,
// which is the m16n8k8 .tf32 fragment layout (the bits are moved, not converted).
__device__ __forceinline__ void wrnc_ldmatrix_x4(unsigned int* r, const float* p) {
    wrnc_ldmatrix_x4(r, reinterpret_cast<const unsigned short*>(p));
}

// The same 16 bytes as four floats (a run of the TF32 engines' f32 operands).
__device__ __forceinline__ void wrnc_cp_async16(float* dst, const float* src, bool valid) {
    wrnc_cp_async16(reinterpret_cast<unsigned short*>(dst),
                    reinterpret_cast<const unsigned short*>(src), valid);
}

__device__ __forceinline__ void wrnc_cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}

template <int N>
__device__ __forceinline__ void wrnc_cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void wrnc_ld16(unsigned int* r, const unsigned short* p) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    r[0] = u.x;
    r[1] = u.y;
    r[2] = u.z;
    r[3] = u.w;
}

__device__ __forceinline__ void wrnc_st16(unsigned short* p, const unsigned int* r) {
    *reinterpret_cast<uint4*>(p) = make_uint4(r[0], r[1], r[2], r[3]);
}
#endif  // WRNC_MMA_EMU

// bf16 <-> f32 (bf16 stored as unsigned short; round to nearest even, like common.cuh).
__device__ __forceinline__ float wrnc_bf16_f32(unsigned short h) {
    return __uint_as_float(((unsigned int)h) << 16);
}
__device__ __forceinline__ unsigned short wrnc_f32_bf16(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#endif  // WRNC_MMA_CUH
