// Second stage of every reduction: out[s] = sum over blocks b of partials[s * nblocks + b].
// Launched with one block per sum and HPCOPT_BLOCK threads.
#include "common.cuh"

extern "C" __global__ void reduce_partials(const double* __restrict__ partials, int nblocks, double* __restrict__ out) {
    __shared__ double scratch[HPCOPT_WARPS];
    const double* row = partials + (long long)blockIdx.x * nblocks;
    double acc = 0.0;
    for (int b = threadIdx.x; b < nblocks; b += blockDim.x) {
        acc += row[b];
    }
    const double total = hpcopt_block_sum(acc, scratch);
    if (threadIdx.x == 0) {
        out[blockIdx.x] = total;
    }
}
