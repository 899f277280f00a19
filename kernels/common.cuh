// Shared device helpers of hpcopt's kernels (included by every .cu file).
//
// Reductions are deterministic: each block writes its partial sums to
// partials[sum * gridDim.x + blockIdx.x] and reduce_partials (reduce.cu) adds them
// in a fixed order, so the same inputs and launch shape give the same bits on
// every run -- no floating-point atomics.  Partial sums are accumulated in double
// for float and double data alike.
#pragma once

#define HPCOPT_BLOCK 256
#define HPCOPT_WARPS (HPCOPT_BLOCK / 32)

// Sum of `value` over the block; the result is valid in thread 0 only.
__device__ __forceinline__ double hpcopt_block_sum(double value, double* scratch) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        value += __shfl_down_sync(0xffffffffu, value, offset);
    }
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    if (lane == 0) {
        scratch[warp] = value;
    }
    __syncthreads();
    value = (threadIdx.x < HPCOPT_WARPS) ? scratch[threadIdx.x] : 0.0;
    if (warp == 0) {
        for (int offset = 16; offset > 0; offset >>= 1) {
            value += __shfl_down_sync(0xffffffffu, value, offset);
        }
    }
    __syncthreads();  // scratch may be reused by the next call
    return value;
}

// Writes one block's partial sum number `which` (of several) to `partials`.
__device__ __forceinline__ void hpcopt_store_partial(double value, int which, double* partials, double* scratch) {
    const double total = hpcopt_block_sum(value, scratch);
    if (threadIdx.x == 0) {
        partials[which * gridDim.x + blockIdx.x] = total;
    }
}

#define HPCOPT_GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)blockDim.x * gridDim.x)
