// Self-test of cuda_emu.h: each check prints "name ok" or "name FAIL ..." and the process exits
// non-zero on any failure. Run by tests/emu_header.rs.
#include "../cuda_emu.h"
#include "cuda_emu_mma.h"  // from emu/ (the -I of the test's compile)
#include <cstdio>
#include <cstring>
#include <vector>

#include "rng_source.cuh"  // wrnc_compiler::rng::CUDA_SOURCE, written by the test

static int failures = 0;
static void check(bool ok, const char* name) {
    std::printf("%s %s\n", name, ok ? "ok" : "FAIL");
    if (!ok) ++failures;
}

// block reduction: warp shuffles, then shared memory across warps, then one atomic per block
__global__ void block_sum(const float* x, float* total, int n) {
    __shared__ float sh[32];
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float w = threadIdx.x < blockDim.x / 32 ? sh[threadIdx.x] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_down_sync(0xffffffffu, w, o);
        if (threadIdx.x == 0) atomicAdd(total, w);
    }
}

// shared memory + __syncthreads: reverse each block's slice in place
__global__ void reverse(float* x) {
    __shared__ float t[128];
    t[threadIdx.x] = x[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    x[blockIdx.x * blockDim.x + threadIdx.x] = t[blockDim.x - 1 - threadIdx.x];
}

// butterfly all-reduce with xor shuffles: every lane ends with the warp's sum
__global__ void xor_allreduce(const int* x, int* y) {
    int v = x[threadIdx.x];
    for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
    y[threadIdx.x] = v;
}

// early return of some threads, then a barrier the others reach
__global__ void early_exit(float* y, int n) {
    int i = threadIdx.x;
    if (i >= n) return;
    __shared__ float t[64];
    t[i] = (float)i;
    __syncthreads();
    y[i] = t[n - 1 - i];
}

// 2-D block indices
__global__ void index2d(int* y) {
    int lin = (blockIdx.y * gridDim.x + blockIdx.x) * (blockDim.x * blockDim.y) + threadIdx.y * blockDim.x + threadIdx.x;
    atomicAdd(&y[lin], 1);
}

// A race: each thread reads its neighbour's shared slot with no barrier between the write
// and the read. The block's threads run in increasing id in block 0 and in decreasing id in
// block 1, so each block misses the write of the neighbour on one side.
// (Thread i writes slot i + 1 with 100 (block + 1) + i + 1.)
__global__ void missing_barrier(int* y) {
    __shared__ int t[34];
    const int i = threadIdx.x, b = blockIdx.x;
    t[i + 1] = 100 * (b + 1) + i + 1;
    y[b * 64 + i] = t[i];            // the left neighbour's value
    y[b * 64 + 32 + i] = t[i + 2];  // the right neighbour's
}

// An mbarrier phase that expects two arrivals and gets one: a GPU hangs; the emulation says so.
__global__ void stuck_mbarrier(int* y) {
    __shared__ unsigned long long bar;
    if (threadIdx.x == 0) wrnc_mbar_init(&bar, 2);
    __syncthreads();
    if (threadIdx.x == 0) wrnc_mbar_expect_tx(&bar, 0);
    wrnc_mbar_wait(&bar, 0);
    y[threadIdx.x] = 1;
}

__global__ void rng_bits(unsigned int* y) {
    unsigned int i = threadIdx.x;
    y[i] = wrnc_bits(7u, 0x1234u, 3u, i);
}

int main(int argc, char** argv) {
    if (argc > 1 && std::strcmp(argv[1], "deadlock") == 0) {
        std::vector<int> y(64);
        wrnc_emu::launch(stuck_mbarrier, dim3(1), dim3(64), 0, y.data());
        std::printf("deadlock not detected\n");
        return 0;
    }
    {
        const int n = 1000;
        std::vector<float> x(n);
        for (int i = 0; i < n; ++i) x[i] = (float)(i + 1);
        float total = 0.0f;
        wrnc_emu::launch(block_sum, dim3(4), dim3(256), 0, x.data(), &total, n);
        check(total == 500500.0f, "shuffle_block_reduction_atomics");
    }
    {
        std::vector<float> x(256);
        for (int i = 0; i < 256; ++i) x[i] = (float)i;
        wrnc_emu::launch(reverse, dim3(2), dim3(128), 0, x.data());
        check(x[0] == 127.0f && x[127] == 0.0f && x[128] == 255.0f && x[255] == 128.0f, "shared_syncthreads");
    }
    {
        std::vector<int> x(64), y(64);
        for (int i = 0; i < 64; ++i) x[i] = i;
        wrnc_emu::launch(xor_allreduce, dim3(1), dim3(64), 0, x.data(), y.data());
        check(y[0] == 496 && y[31] == 496 && y[32] == 1520 && y[63] == 1520, "xor_shuffle");
    }
    {
        std::vector<float> y(64, -1.0f);
        wrnc_emu::launch(early_exit, dim3(1), dim3(64), 0, y.data(), 40);
        check(y[0] == 39.0f && y[39] == 0.0f && y[40] == -1.0f, "early_return");
    }
    {
        std::vector<int> y(3 * 2 * 8 * 4, 0);
        wrnc_emu::launch(index2d, dim3(3, 2), dim3(8, 4), 0, y.data());
        bool ok = true;
        for (int v : y) ok = ok && v == 1;
        check(ok, "indices_2d");
    }
    {
        // block 0 (increasing ids) sees its left neighbours' writes but not its right ones';
        // block 1 (decreasing ids) the other way round
        std::vector<int> y(128, -1);
        wrnc_emu::launch(missing_barrier, dim3(2), dim3(32), 0, y.data());
        bool b0_left = true, b0_right_missed = false, b1_right = true, b1_left_missed = false;
        for (int i = 1; i < 31; ++i) {
            b0_left = b0_left && y[i] == 100 + i;
            b0_right_missed = b0_right_missed || y[32 + i] != 100 + i + 2;
            b1_right = b1_right && y[64 + 32 + i] == 200 + i + 2;
            b1_left_missed = b1_left_missed || y[64 + i] != 200 + i;
        }
        check(b0_left && b0_right_missed && b1_right && b1_left_missed, "race_shows_in_one_order");
    }
    {
        std::vector<unsigned int> y(8);
        wrnc_emu::launch(rng_bits, dim3(1), dim3(8), 0, y.data());
        for (unsigned int v : y) std::printf("rng %u\n", v);
    }
    return failures ? 1 : 0;
}
