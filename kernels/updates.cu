// Fused elementwise updates of optimizer state (ALGORITHMS.md §5, §6, trust region).
//
// nlcg_dots:         partial sums of y's and s'diag(h)s, with y = g - g_prev.
// nlcg_precondition: if `update`, h <- |h - (h s)^2 / shs + y^2 / ys|;  z <- r / (h + eps)
//                    with r = -g, in place over the previous z; partial sums of r'z (new z)
//                    and r'z_prev (old z, for Polak-Ribiere).
// nlcg_step:         d <- z + beta d;  s <- step_size d;  theta <- theta + s;  partial sums of s's.
// sq_distance:       partial sums of ||w - v||^2 (Neumann's displacement norm).
// neumann_update:    d = g + coef (w - v);  m <- mu m - eta d;  w <- w + mu m - eta d;
//                    v <- w + gamma (v - w)  (coef from ||w - v||, computed by the caller);
//                    partial sums of ||w_new - w||^2 (the step norm the optimizer logs).
// tr_trial:          trial <- theta + s;  partial sums of s's.
#include "common.cuh"

template <typename T>
__device__ void nlcg_dots(const T* __restrict__ s, const T* __restrict__ g, const T* __restrict__ g_prev,
                          const T* __restrict__ h, long long n, double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double ys = 0.0;
    double shs = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        const double si = (double)s[i];
        const double yi = (double)(g[i] - g_prev[i]);
        ys += yi * si;
        shs += (double)h[i] * si * si;
    }
    hpcopt_store_partial(ys, 0, partials, scratch);
    hpcopt_store_partial(shs, 1, partials, scratch);
}

template <typename T>
__device__ void nlcg_precondition(T* __restrict__ h, T* __restrict__ z, const T* __restrict__ g,
                                  const T* __restrict__ g_prev, const T* __restrict__ s, T ys, T shs, T eps,
                                  int update, long long n, double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double rz = 0.0;
    double rz_prev = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        T hi = h[i];
        if (update) {
            const T hs = hi * s[i];
            const T yi = g[i] - g_prev[i];
            hi = fabs(hi - hs * hs / shs + yi * yi / ys);
            h[i] = hi;
        }
        const T r = -g[i];
        const T z_new = r / (hi + eps);
        rz_prev += (double)r * (double)z[i];
        z[i] = z_new;
        rz += (double)r * (double)z_new;
    }
    hpcopt_store_partial(rz, 0, partials, scratch);
    hpcopt_store_partial(rz_prev, 1, partials, scratch);
}

template <typename T>
__device__ void nlcg_step(T* __restrict__ theta, T* __restrict__ d, T* __restrict__ s, const T* __restrict__ z,
                          T beta, T step_size, long long n, double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double ss = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        const T d_new = z[i] + beta * d[i];
        const T s_new = step_size * d_new;
        d[i] = d_new;
        s[i] = s_new;
        theta[i] = theta[i] + s_new;
        ss += (double)s_new * (double)s_new;
    }
    hpcopt_store_partial(ss, 0, partials, scratch);
}

template <typename T>
__device__ void sq_distance(const T* __restrict__ w, const T* __restrict__ v, long long n,
                            double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double dd = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        const double diff = (double)(w[i] - v[i]);
        dd += diff * diff;
    }
    hpcopt_store_partial(dd, 0, partials, scratch);
}

template <typename T>
__device__ void neumann_update(T* __restrict__ w, T* __restrict__ v, T* __restrict__ m, const T* __restrict__ g,
                               T coef, T eta, T mu, T gamma, long long n, double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double dww = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        const T wi = w[i];
        const T vi = v[i];
        const T d = g[i] + coef * (wi - vi);
        const T m_new = mu * m[i] - eta * d;
        const T w_new = wi + mu * m_new - eta * d;
        m[i] = m_new;
        w[i] = w_new;
        v[i] = w_new + gamma * (vi - w_new);
        const double step = (double)w_new - (double)wi;
        dww += step * step;
    }
    hpcopt_store_partial(dww, 0, partials, scratch);
}

template <typename T>
__device__ void tr_trial(T* __restrict__ trial, const T* __restrict__ theta, const T* __restrict__ s, long long n,
                         double* __restrict__ partials) {
    __shared__ double scratch[HPCOPT_WARPS];
    double ss = 0.0;
    HPCOPT_GRID_STRIDE(i, n) {
        const T si = s[i];
        trial[i] = theta[i] + si;
        ss += (double)si * (double)si;
    }
    hpcopt_store_partial(ss, 0, partials, scratch);
}

#define HPCOPT_UPDATES(T, suffix)                                                                              \
    extern "C" __global__ void nlcg_dots_##suffix(const T* s, const T* g, const T* g_prev, const T* h,          \
                                                  long long n, double* partials) {                             \
        nlcg_dots<T>(s, g, g_prev, h, n, partials);                                                            \
    }                                                                                                          \
    extern "C" __global__ void nlcg_precondition_##suffix(T* h, T* z, const T* g, const T* g_prev, const T* s, \
                                                          T ys, T shs, T eps, int update, long long n,         \
                                                          double* partials) {                                  \
        nlcg_precondition<T>(h, z, g, g_prev, s, ys, shs, eps, update, n, partials);                           \
    }                                                                                                          \
    extern "C" __global__ void nlcg_step_##suffix(T* theta, T* d, T* s, const T* z, T beta, T step_size,       \
                                                  long long n, double* partials) {                             \
        nlcg_step<T>(theta, d, s, z, beta, step_size, n, partials);                                            \
    }                                                                                                          \
    extern "C" __global__ void sq_distance_##suffix(const T* w, const T* v, long long n, double* partials) {    \
        sq_distance<T>(w, v, n, partials);                                                                     \
    }                                                                                                          \
    extern "C" __global__ void neumann_update_##suffix(T* w, T* v, T* m, const T* g, T coef, T eta, T mu,      \
                                                       T gamma, long long n, double* partials) {               \
        neumann_update<T>(w, v, m, g, coef, eta, mu, gamma, n, partials);                                      \
    }                                                                                                          \
    extern "C" __global__ void tr_trial_##suffix(T* trial, const T* theta, const T* s, long long n,            \
                                                 double* partials) {                                           \
        tr_trial<T>(trial, theta, s, n, partials);                                                             \
    }

HPCOPT_UPDATES(float, f32)
HPCOPT_UPDATES(double, f64)
