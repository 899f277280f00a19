// Pack [scale * vector; scalars] into the one buffer a single allreduce moves, and
// unpack it again (vector <- scale * buffer[:n], scalars <- buffer[n:n+k]).
// The scale folds the rank weight |B_r|/|B| (or an average's 1/P) into the copy.
#include "common.cuh"

template <typename T>
__device__ void pack(T* __restrict__ out, const T* __restrict__ vector, T scale, long long n,
                     const T* __restrict__ scalars, int k) {
    HPCOPT_GRID_STRIDE(i, n + k) {
        out[i] = (i < n) ? scale * vector[i] : scalars[i - n];
    }
}

template <typename T>
__device__ void unpack(const T* __restrict__ buffer, T* __restrict__ vector, T scale, long long n,
                       T* __restrict__ scalars, int k) {
    HPCOPT_GRID_STRIDE(i, n + k) {
        if (i < n) {
            vector[i] = scale * buffer[i];
        } else {
            scalars[i - n] = buffer[i];
        }
    }
}

#define HPCOPT_PACK(T, suffix)                                                                                \
    extern "C" __global__ void pack_##suffix(T* out, const T* vector, T scale, long long n, const T* scalars, \
                                             int k) {                                                         \
        pack<T>(out, vector, scale, n, scalars, k);                                                           \
    }                                                                                                         \
    extern "C" __global__ void unpack_##suffix(const T* buffer, T* vector, T scale, long long n, T* scalars,  \
                                               int k) {                                                       \
        unpack<T>(buffer, vector, scale, n, scalars, k);                                                      \
    }

HPCOPT_PACK(float, f32)
HPCOPT_PACK(double, f64)
