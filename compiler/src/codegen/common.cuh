// wrnc common device helpers (included verbatim by the generator).
// Only the CUDA subset emu/cuda_emu.h emulates: no system headers, no dynamic shared memory.

// f32 -> bf16 bits, rounded to nearest even. A NaN stays a quiet NaN of its sign: the rounding
// add alone carries CUDA's NaN (0x7fffffff) into 0x8000, -0.0, and a diverging run would
// silently train on zeros.
__device__ __forceinline__ unsigned short wrnc_bf16_bits(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}

#ifdef WRNC_BF16
typedef unsigned short act_t;
// bf16 storage, fp32 arithmetic: round to nearest even on store.
__device__ __forceinline__ float wrnc_ld(const act_t* p, int i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
__device__ __forceinline__ void wrnc_st(act_t* p, int i, float v) { p[i] = wrnc_bf16_bits(v); }
// The value wrnc_st stores, as a float.
__device__ __forceinline__ float wrnc_stored(float v) {
    return __uint_as_float(((unsigned int)wrnc_bf16_bits(v)) << 16);
}
#else
typedef float act_t;
__device__ __forceinline__ float wrnc_ld(const act_t* p, int i) { return p[i]; }
__device__ __forceinline__ void wrnc_st(act_t* p, int i, float v) { p[i] = v; }
__device__ __forceinline__ float wrnc_stored(float v) { return v; }
#endif

// 16 bytes of activations (16 / sizeof(act_t) consecutive elements) as one vector load or
// store at p + i, which must be 16-byte aligned (wrnc_aligned16): the vector path of the
// memory-bound kernels. Elements are read and written through v.e with wrnc_ld / wrnc_st.
#define WRNC_V16 (16 / (int)sizeof(act_t))
__device__ __forceinline__ bool wrnc_aligned16(const void* p) {
    return ((unsigned long long)p & 15ull) == 0;
}
#ifndef WRNC_CUDA_EMU
union wrnc_v16 {
    uint4 u;
    act_t e[WRNC_V16];
};
__device__ __forceinline__ void wrnc_ld_v16(wrnc_v16& v, const act_t* p, int i) {
    v.u = *reinterpret_cast<const uint4*>(p + i);
}
__device__ __forceinline__ void wrnc_st_v16(act_t* p, int i, const wrnc_v16& v) {
    *reinterpret_cast<uint4*>(p + i) = v.u;
}
#else
union wrnc_v16 {
    unsigned char b[16];
    act_t e[WRNC_V16];
};
inline void wrnc_ld_v16(wrnc_v16& v, const act_t* p, int i) {
    wrnc_emu::check_align16(p + i, "16-byte vector load");
    __builtin_memcpy(v.b, p + i, 16);
}
inline void wrnc_st_v16(act_t* p, int i, const wrnc_v16& v) {
    wrnc_emu::check_align16(p + i, "16-byte vector store");
    __builtin_memcpy(p + i, v.b, 16);
}
#endif

// The NCHW flat index of element i of an NHWC activation with C channels and HW pixels per
// image: the index a dropout mask is drawn at in either layout.
__device__ __forceinline__ int nchw_index(int i, int C, int HW) {
    const int c = i % C, t = i / C;
    return ((t / HW) * C + c) * HW + t % HW;
}

// Sum over a warp; every lane of the warp must call it. Lane 0 holds the result.
__device__ __forceinline__ float wrnc_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024, blockDim.y == 1); every thread
// must call it. Thread 0 holds the result. `sh` is a 32-float __shared__ array.
__device__ __forceinline__ float wrnc_block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = wrnc_warp_sum(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (int)threadIdx.x < nw ? sh[lane] : 0.0f;
    if (wid == 0) v = wrnc_warp_sum(v);
    return v;
}

// The same in double: reductions whose result may be far smaller than their terms (a channel
// sum of a zero-mean tensor, BN's gradient sums) accumulate in double, so the rounded result is
// accurate relative to itself. `sh` is a 32-double __shared__ array.
__device__ __forceinline__ double wrnc_warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double wrnc_block_sum_d(double v, double* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    v = wrnc_warp_sum_d(v);
    __syncthreads();
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = (int)threadIdx.x < nw ? sh[lane] : 0.0;
    if (wid == 0) v = wrnc_warp_sum_d(v);
    return v;
}

// Adds `v` to the compensated sum `*hi + *lo` atomically: `hi` takes fl(v) with atomicAdd, and
// since atomicAdd returns the value it added to, TwoSum recovers that addition's exact rounding
// error, which goes (with v's own rounding to float) into `lo`. Whatever order the blocks come
// in, `hi + lo` is the sum to about 2^-48 of its terms. No multiplies: nothing to contract.
__device__ __forceinline__ void wrnc_atomic_add_comp(float* hi, float* lo, double v) {
    const float vf = (float)v;
    const float old = atomicAdd(hi, vf);
    const float s = old + vf;
    const float bv = s - old;
    const float err = (old - (s - bv)) + (vf - bv);
    atomicAdd(lo, err + (float)(v - (double)vf));
}

// Inverted dropout of one element: kept with probability 1 - p, scaled by 1 / (1 - p).
__device__ __forceinline__ float wrnc_drop(float v, unsigned int seed, unsigned int stream,
                                           unsigned int step, unsigned int index, float p) {
    float keep = 1.0f - p;
    return wrnc_keep(seed, stream, step, index, keep) ? v * (1.0f / keep) : 0.0f;
}
