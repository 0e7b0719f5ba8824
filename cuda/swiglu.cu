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

// SwiGLU over LoRA-corrected gate and up (src/ops/swiglu_low_rank.rs):
//   g = G + ag ug bg^T,  p = U + au uu bu^T,  then y = silu(g) p, or (dg, dp) from dy as above.
// G, U, dy, y, dg, dp: [n, f] in one 16-bit type DT; ug, uu: [n, r] in DT; bg, bu: [f, r] in DT or
// f32 (rounded to DT, as the products round them). The corrections are recomputed here, never
// stored: on the tensor cores, a warp owns 16 rows x 64 columns as eight m16n8k16 tiles per term,
// r in steps of 16 (zeros past r); then each lane finishes the elements its accumulators hold:
// rows lane/4 and lane/4 + 8, columns 8j + 2 (lane % 4) and the next.
struct SwigluLr {
    const void *gate, *up, *dy;
    const u16 *ug, *uu;
    const void *bg, *bu;
    void *out0, *out1;
    int dtb;
    i64 n, f, r;
    float ag, au;
};

// Elements (row, k) and (row, k + 1) of a [rows, r] 16-bit matrix as one register; zero outside.
__device__ __forceinline__ u32 lr_pair16(const u16* m, i64 rows, i64 r, i64 row, i64 k) {
    if (row >= rows) return 0;
    u32 lo = k < r ? m[row * r + k] : 0, hi = k + 1 < r ? m[row * r + k + 1] : 0;
    return lo | (hi << 16);
}

template <bool F16>
__device__ __forceinline__ u32 lr_pair_b(const void* b, int dtb, i64 f, i64 r, i64 col, i64 k) {
    if (dtb != DT_F32) return lr_pair16((const u16*)b, f, r, col, k);
    if (col >= f) return 0;
    const float* m = (const float*)b + col * r;
    return pack2<F16>(k < r ? m[k] : 0.0f, k + 1 < r ? m[k + 1] : 0.0f);
}

// acc[j][0..3]: the correction u b^T of the warp's 16 x 64 block, tile j (unscaled).
template <bool F16>
__device__ __forceinline__ void lr_correction(const u16* u, const void* b, const SwigluLr& p, i64 r0, i64 c0,
                                              float (*acc)[4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < 8; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (i64 k0 = 0; k0 < p.r; k0 += 16) {
        u32 a[4] = {lr_pair16(u, p.n, p.r, r0 + g, k0 + 2 * t), lr_pair16(u, p.n, p.r, r0 + g + 8, k0 + 2 * t),
                    lr_pair16(u, p.n, p.r, r0 + g, k0 + 2 * t + 8), lr_pair16(u, p.n, p.r, r0 + g + 8, k0 + 2 * t + 8)};
#pragma unroll
        for (int j = 0; j < 8; j++) {
            i64 col = c0 + 8 * j + g;
            u32 b0 = lr_pair_b<F16>(b, p.dtb, p.f, p.r, col, k0 + 2 * t);
            u32 b1 = lr_pair_b<F16>(b, p.dtb, p.f, p.r, col, k0 + 2 * t + 8);
            mma16816<F16>(acc[j], a, b0, b1);
        }
    }
}

template <bool F16, bool BWD>
__device__ __forceinline__ void swiglu_lr(const SwigluLr& p) {
    const int dt = F16 ? DT_F16 : DT_BF16;
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const i64 r0 = (i64)blockIdx.x * 16;
    const i64 c0 = ((i64)blockIdx.y * (blockDim.x >> 5) + (threadIdx.x >> 5)) * 64;
    if (c0 >= p.f) return;
    float cg[8][4], cu[8][4];
    lr_correction<F16>(p.ug, p.bg, p, r0, c0, cg);
    lr_correction<F16>(p.uu, p.bu, p, r0, c0, cu);
    // With f even, each lane's two neighbouring elements are one aligned 4-byte word.
    const bool pairs = (p.f & 1) == 0;
#pragma unroll
    for (int j = 0; j < 8; j++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            i64 row = r0 + g + 8 * h, col = c0 + 8 * j + 2 * t;
            if (row >= p.n || col >= p.f) continue;
            i64 i = row * p.f + col;
            int m = col + 1 < p.f ? 2 : 1;
            float gv[2] = {0.0f, 0.0f}, uv[2] = {0.0f, 0.0f}, dv[2] = {0.0f, 0.0f}, o0[2], o1[2];
            if (pairs && m == 2) {
                u32 wg = ((const u32*)p.gate)[i >> 1], wu = ((const u32*)p.up)[i >> 1];
                gv[0] = h16_to_f32((u16)wg, dt), gv[1] = h16_to_f32((u16)(wg >> 16), dt);
                uv[0] = h16_to_f32((u16)wu, dt), uv[1] = h16_to_f32((u16)(wu >> 16), dt);
                if (BWD) {
                    u32 wd = ((const u32*)p.dy)[i >> 1];
                    dv[0] = h16_to_f32((u16)wd, dt), dv[1] = h16_to_f32((u16)(wd >> 16), dt);
                }
            } else {
                for (int e = 0; e < m; e++) {
                    gv[e] = ldf(p.gate, dt, i + e), uv[e] = ldf(p.up, dt, i + e);
                    if (BWD) dv[e] = ldf(p.dy, dt, i + e);
                }
            }
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float gc = gv[e] + p.ag * cg[j][2 * h + e], uc = uv[e] + p.au * cu[j][2 * h + e];
                if (BWD) {
                    swiglu_grad(gc, uc, dv[e], &o0[e], &o1[e]);
                } else {
                    o0[e] = __fmul_rn(gc * sigmoidf_(gc), uc);
                }
            }
            if (pairs && m == 2) {
                ((u32*)p.out0)[i >> 1] = f32_to_h16(o0[0], dt) | ((u32)f32_to_h16(o0[1], dt) << 16);
                if (BWD) ((u32*)p.out1)[i >> 1] = f32_to_h16(o1[0], dt) | ((u32)f32_to_h16(o1[1], dt) << 16);
            } else {
                for (int e = 0; e < m; e++) {
                    stf(p.out0, dt, i + e, o0[e]);
                    if (BWD) stf(p.out1, dt, i + e, o1[e]);
                }
            }
        }
    }
}

extern "C" __global__ void swiglu_lr_fwd_bf16(SwigluLr p) { swiglu_lr<false, false>(p); }
extern "C" __global__ void swiglu_lr_bwd_bf16(SwigluLr p) { swiglu_lr<false, true>(p); }
extern "C" __global__ void swiglu_lr_fwd_f16(SwigluLr p) { swiglu_lr<true, false>(p); }
extern "C" __global__ void swiglu_lr_bwd_f16(SwigluLr p) { swiglu_lr<true, true>(p); }
