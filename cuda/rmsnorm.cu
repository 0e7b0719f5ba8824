// RMSNorm (src/ops/rmsnorm.rs), rows of H features, x [R, H], w [H].
//
// Forward, one block per row:  r = 1 / sqrt(mean(x^2) + eps),  y = (x r) w.
// Backward, with xh = x r and g = dy w:
//   dx = r (g - xh mean(g xh))                 per row (two block sums: sum x^2, sum g xh)
//   dw = sum_rows(dy xh)                       two stages: each block keeps its rows' partial
//                                              sums in registers and writes partial[block, H];
//                                              rmsnorm_dw_final adds the partials in f64.
//   With acc non-null, acc (x's shape) is added to dx; with partial null (a frozen weight)
//   no dw partials are kept.
// Each thread owns up to MAXC chunks of V consecutive features (V = 8: 16-byte loads when
// H % 8 == 0, else V = 1) and keeps its x (and dy) in registers, so every input is read once.
// The backward is also built for C < MAXC chunks (rmsnorm_bwd_v8_c1, _c2): rows of up to
// C x 8 x 512 features, with fewer registers, so more blocks run per SM.

#define MAXC 4

template <int V>
__device__ __forceinline__ void ldv(const void* p, int dt, i64 i, float* v) {
    if (V == 8) {
        ld8(p, dt, i, v);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) v[k] = ldf(p, dt, i + k);
    }
}

template <int V>
__device__ __forceinline__ void stv(void* p, int dt, i64 i, const float* v) {
    if (V == 8) {
        st8(p, dt, i, v);
    } else {
#pragma unroll
        for (int k = 0; k < V; k++) stf(p, dt, i + k, v[k]);
    }
}

template <int V>
__device__ void rmsnorm_fwd(const void* x, int dtx, const void* w, int dtw, void* y, int dty, int H, float eps) {
    __shared__ float red[32];
    const i64 base = (i64)blockIdx.x * H;
    float xv[MAXC][V];
    float ss = 0.f;
#pragma unroll
    for (int c = 0; c < MAXC; c++) {
        int col = (c * blockDim.x + threadIdx.x) * V;
        if (col < H) {
            ldv<V>(x, dtx, base + col, xv[c]);
#pragma unroll
            for (int k = 0; k < V; k++) ss += xv[c][k] * xv[c][k];
        }
    }
    ss = block_sum(ss, red);
    float r = 1.0f / sqrtf(ss / (float)H + eps);
#pragma unroll
    for (int c = 0; c < MAXC; c++) {
        int col = (c * blockDim.x + threadIdx.x) * V;
        if (col < H) {
            float wv[V];
            ldv<V>(w, dtw, col, wv);
#pragma unroll
            for (int k = 0; k < V; k++) xv[c][k] = __fmul_rn(__fmul_rn(xv[c][k], r), wv[k]);
            stv<V>(y, dty, base + col, xv[c]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(512) rmsnorm_fwd_v8(const void* x, int dtx, const void* w, int dtw, void* y,
                                                                 int dty, int H, float eps) {
    grid_dep_wait();
    rmsnorm_fwd<8>(x, dtx, w, dtw, y, dty, H, eps);
}
extern "C" __global__ void __launch_bounds__(512) rmsnorm_fwd_v1(const void* x, int dtx, const void* w, int dtw, void* y,
                                                                 int dty, int H, float eps) {
    grid_dep_wait();
    rmsnorm_fwd<1>(x, dtx, w, dtw, y, dty, H, eps);
}

template <int V, int C>
__device__ void rmsnorm_bwd(const void* x, int dtx, const void* w, int dtw, const void* dy, int dtd, const void* acc_in,
                            int dta, void* dx, int dtdx, float* partial, i64 R, int H, float eps) {
    __shared__ float red[32];
    float acc[C][V];
#pragma unroll
    for (int c = 0; c < C; c++)
#pragma unroll
        for (int k = 0; k < V; k++) acc[c][k] = 0.f;
    for (i64 row = blockIdx.x; row < R; row += gridDim.x) {
        const i64 base = row * H;
        float xv[C][V], dv[C][V];
        float ss = 0.f, gx = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) {
            int col = (c * blockDim.x + threadIdx.x) * V;
            if (col < H) {
                float wv[V];
                ldv<V>(x, dtx, base + col, xv[c]);
                ldv<V>(dy, dtd, base + col, dv[c]);
                ldv<V>(w, dtw, col, wv);
#pragma unroll
                for (int k = 0; k < V; k++) {
                    ss += xv[c][k] * xv[c][k];
                    gx += dv[c][k] * wv[k] * xv[c][k];
                }
            }
        }
        ss = block_sum(ss, red);
        gx = block_sum(gx, red);
        float r = 1.0f / sqrtf(ss / (float)H + eps);
        float dot = gx * r / (float)H;  // mean(g xh)
#pragma unroll
        for (int c = 0; c < C; c++) {
            int col = (c * blockDim.x + threadIdx.x) * V;
            if (col < H) {
                float wv[V], o[V], a[V];
                ldv<V>(w, dtw, col, wv);
                if (acc_in) {
                    ldv<V>(acc_in, dta, base + col, a);
                } else {
#pragma unroll
                    for (int k = 0; k < V; k++) a[k] = 0.f;
                }
#pragma unroll
                for (int k = 0; k < V; k++) {
                    float xh = xv[c][k] * r;
                    o[k] = r * (dv[c][k] * wv[k] - xh * dot) + a[k];
                    acc[c][k] += dv[c][k] * xh;
                }
                stv<V>(dx, dtdx, base + col, o);
            }
        }
    }
    if (!partial) return;
#pragma unroll
    for (int c = 0; c < C; c++) {
        int col = (c * blockDim.x + threadIdx.x) * V;
        if (col < H) {
#pragma unroll
            for (int k = 0; k < V; k++) partial[(i64)blockIdx.x * H + col + k] = acc[c][k];
        }
    }
}

#define RMSNORM_BWD_ENTRY(NAME, V, C)                                                                       \
    extern "C" __global__ void __launch_bounds__(512)                                                         \
        NAME(const void* x, int dtx, const void* w, int dtw, const void* dy, int dtd, const void* acc, int dta, \
             void* dx, int dtdx, float* partial, i64 R, int H, float eps) {                                     \
        grid_dep_wait();                                                                                        \
        rmsnorm_bwd<V, C>(x, dtx, w, dtw, dy, dtd, acc, dta, dx, dtdx, partial, R, H, eps);                     \
    }
RMSNORM_BWD_ENTRY(rmsnorm_bwd_v8, 8, MAXC)
RMSNORM_BWD_ENTRY(rmsnorm_bwd_v8_c1, 8, 1)
RMSNORM_BWD_ENTRY(rmsnorm_bwd_v8_c2, 8, 2)
RMSNORM_BWD_ENTRY(rmsnorm_bwd_v1, 1, MAXC)

// dw[j] = sum over blocks of partial[b, j], in f64.
extern "C" __global__ void rmsnorm_dw_final(const float* partial, int blocks, int H, void* dw, int dtw) {
    grid_dep_wait();
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= H) return;
    double s = 0.0;
    for (int b = 0; b < blocks; b++) s += (double)partial[(i64)b * H + j];
    stf(dw, dtw, j, (float)s);
}
