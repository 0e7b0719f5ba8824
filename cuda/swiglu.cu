// SwiGLU gate (src/ops/swiglu.rs), elementwise over gate g and up u of one shape:
//   y  = silu(g) u,                 silu(g) = g sigmoid(g)
//   dg = dy u s (1 + g (1 - s)),    s = sigmoid(g)
//   du = dy silu(g)
// Eight elements per thread with 16-byte loads; a scalar tail.

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_fwd(const void* g, int dtg, const void* u, int dtu, void* y, int dty, i64 n) {
    i64 i0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 >= n) return;
    if (i0 + 8 <= n) {
        float gv[8], uv[8];
        ld8(g, dtg, i0, gv);
        ld8(u, dtu, i0, uv);
#pragma unroll
        for (int k = 0; k < 8; k++) gv[k] = __fmul_rn(gv[k] * sigmoidf_(gv[k]), uv[k]);
        st8(y, dty, i0, gv);
    } else {
        for (i64 i = i0; i < n; i++) {
            float gv = ldf(g, dtg, i);
            stf(y, dty, i, __fmul_rn(gv * sigmoidf_(gv), ldf(u, dtu, i)));
        }
    }
}

__device__ __forceinline__ void swiglu_grad(float g, float u, float d, float* dg, float* du) {
    float s = sigmoidf_(g);
    *dg = d * u * s * (1.0f + g * (1.0f - s));
    *du = d * g * s;
}

extern "C" __global__ void swiglu_bwd(const void* g, int dtg, const void* u, int dtu, const void* dy, int dtd, void* dg,
                                      int dtdg, void* du, int dtdu, i64 n) {
    i64 i0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (i0 >= n) return;
    if (i0 + 8 <= n) {
        float gv[8], uv[8], dv[8], a[8], b[8];
        ld8(g, dtg, i0, gv);
        ld8(u, dtu, i0, uv);
        ld8(dy, dtd, i0, dv);
#pragma unroll
        for (int k = 0; k < 8; k++) swiglu_grad(gv[k], uv[k], dv[k], &a[k], &b[k]);
        st8(dg, dtdg, i0, a);
        st8(du, dtdu, i0, b);
    } else {
        for (i64 i = i0; i < n; i++) {
            float a, b;
            swiglu_grad(ldf(g, dtg, i), ldf(u, dtu, i), ldf(dy, dtd, i), &a, &b);
            stf(dg, dtdg, i, a);
            stf(du, dtdu, i, b);
        }
    }
}
