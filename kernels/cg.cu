// Fused vector updates of conjugate gradients.
//
// cg_step:      x <- x + alpha p;  r <- r - alpha Ap;  partial sums of r'r (new r).
// cg_direction: p <- z + beta p;   partial sums of p'p and w'p (new p).
//
// One pass over memory each: the unfused torch sequence reads x, p, r, Ap and
// writes x, r in two kernels, then reads r again for the norm.
#include "common.cuh"

template <typename T>
__device__ void cg_step(T* __restrict__ x, T* __restrict__ r, const T* __restrict__ p, const T* __restrict__ ap,
                        T alpha, long long n, double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double rr = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        x[i] = x[i] + alpha * p[i];
        const T r_new = r[i] - alpha * ap[i];
        r[i] = r_new;
        rr += (double)r_new * (double)r_new;
    }
    hpcopt_store_partial(rr, 0, partials, scratch);
}

template <typename T>
__device__ void cg_direction(T* __restrict__ p, const T* __restrict__ z, const T* __restrict__ w, T beta,
                             long long n, double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double pp = 0.0;
    double wp = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        const T p_new = z[i] + beta * p[i];
        p[i] = p_new;
        pp += (double)p_new * (double)p_new;
        wp += (double)w[i] * (double)p_new;
    }
    hpcopt_store_partial(pp, 0, partials, scratch);
    hpcopt_store_partial(wp, 1, partials, scratch);
}

#define HPCOPT_CG(T, suffix)                                                                                  \
    extern "C" __global__ void cg_step_##suffix(T* x, T* r, const T* p, const T* ap, T alpha, long long n,    \
                                                double* partials) {                                           \
        cg_step<T>(x, r, p, ap, alpha, n, partials);                                                          \
    }                                                                                                         \
    extern "C" __global__ void cg_direction_##suffix(T* p, const T* z, const T* w, T beta, long long n,       \
                                                     double* partials) {                                      \
        cg_direction<T>(p, z, w, beta, n, partials);                                                          \
    }

HPCOPT_CG(float, f32)
HPCOPT_CG(double, f64)
