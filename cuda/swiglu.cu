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
// stored: on the tensor cores, a warp owns LR_COLS columns and walks 16-row tiles, LR_TILES
// m16n8k16 tiles per term, r in steps of 16 (zeros past r), the first step's B fragments held
// in registers for all its rows; the corrections go through shared memory, and each lane then
// finishes eight neighbouring elements of a row.
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
    // An even r, an even k and a 4-byte aligned matrix: the pair is one aligned word.
    if ((r & 1) == 0 && k + 1 < r && ((unsigned long long)m & 3) == 0) return *(const u32*)(m + row * r + k);
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

// Warps per block (src/backend/cuda/swiglu_low_rank.rs launches 32 * LR_WARPS threads), the
// 8-column mma tiles of a warp (LR_TILES * 8 columns, 8 per lane in the epilogue), 16-row tiles per
// block (the B fragments are loaded once for all of them), and the row stride of the staged
// corrections (the warp's columns + 4: aligned 16-byte reads).
#define LR_WARPS 4
#define LR_TILES 4
#define LR_COLS (8 * LR_TILES)
#define LR_ROW_TILES 8
#define LR_STRIDE (LR_COLS + 4)
// Lanes per row and rows per pass of the epilogue.
#define LR_LPR (LR_COLS / 8)
#define LR_RPP (32 / LR_LPR)

// The B operand of the warp's LR_TILES m16n8k16 tiles for k in [k0, k0 + 16): columns c0 + 8 j + g.
template <bool F16>
__device__ __forceinline__ void lr_b_frags(const void* b, const SwigluLr& p, i64 c0, i64 k0, u32 (*bf)[2]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < LR_TILES; j++) {
        const i64 col = c0 + 8 * j + g;
        bf[j][0] = lr_pair_b<F16>(b, p.dtb, p.f, p.r, col, k0 + 2 * t);
        bf[j][1] = lr_pair_b<F16>(b, p.dtb, p.f, p.r, col, k0 + 2 * t + 8);
    }
}

// acc[j][0..3]: the correction u b^T of the warp's 16 x LR_COLS block at rows r0, tile j (unscaled).
// bk: the B fragments of the first k-step, loaded once per block; later k-steps (r > 16) load
// theirs here.
template <bool F16>
__device__ __forceinline__ void lr_correction(const u16* u, const void* b, const u32 (*bk)[2], const SwigluLr& p,
                                              i64 r0, i64 c0, float (*acc)[4]) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int j = 0; j < LR_TILES; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
    for (i64 k0 = 0; k0 < p.r; k0 += 16) {
        u32 a[4] = {lr_pair16(u, p.n, p.r, r0 + g, k0 + 2 * t), lr_pair16(u, p.n, p.r, r0 + g + 8, k0 + 2 * t),
                    lr_pair16(u, p.n, p.r, r0 + g, k0 + 2 * t + 8), lr_pair16(u, p.n, p.r, r0 + g + 8, k0 + 2 * t + 8)};
        if (k0 == 0) {
#pragma unroll
            for (int j = 0; j < LR_TILES; j++) mma16816<F16>(acc[j], a, bk[j][0], bk[j][1]);
        } else {
            u32 bf[LR_TILES][2];
            lr_b_frags<F16>(b, p, c0, k0, bf);
#pragma unroll
            for (int j = 0; j < LR_TILES; j++) mma16816<F16>(acc[j], a, bf[j][0], bf[j][1]);
        }
    }
}

template <bool F16, bool BWD>
__device__ __forceinline__ void swiglu_lr(const SwigluLr& p) {
    const int dt = F16 ? DT_F16 : DT_BF16;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const i64 c0 = ((i64)blockIdx.y * LR_WARPS + warp) * LR_COLS;
    if (c0 >= p.f) return;
    u32 bk[2][LR_TILES][2];
    lr_b_frags<F16>(p.bg, p, c0, 0, bk[0]);
    lr_b_frags<F16>(p.bu, p, c0, 0, bk[1]);
    // The scaled corrections of the warp's block, staged so the epilogue reads the base tensors
    // with coalesced 16-byte loads (eight features per lane) instead of the fragments' pairs.
    __shared__ __align__(16) float corr[LR_WARPS][2][16 * LR_STRIDE];
    const bool vec = (p.f & 7) == 0;
    const int cl = 8 * (lane % LR_LPR);
    const i64 col = c0 + cl;
    for (int rt = 0; rt < LR_ROW_TILES; rt++) {
        const i64 r0 = ((i64)blockIdx.x * LR_ROW_TILES + rt) * 16;
        if (r0 >= p.n) break;
        {
            float acc[LR_TILES][4];
#pragma unroll
            for (int which = 0; which < 2; which++) {
                lr_correction<F16>(which ? p.uu : p.ug, which ? p.bu : p.bg, bk[which], p, r0, c0, acc);
                const float a = which ? p.au : p.ag;
                float* c = corr[warp][which];
#pragma unroll
                for (int j = 0; j < LR_TILES; j++) {
                    *(float2*)&c[g * LR_STRIDE + 8 * j + 2 * t] = make_float2(a * acc[j][0], a * acc[j][1]);
                    *(float2*)&c[(g + 8) * LR_STRIDE + 8 * j + 2 * t] = make_float2(a * acc[j][2], a * acc[j][3]);
                }
            }
        }
        __syncwarp();
        // Lane l: row LR_RPP it + l / LR_LPR of the tile, features 8 (l % LR_LPR) .. + 7.
#pragma unroll
        for (int it = 0; it < 16 / LR_RPP; it++) {
            const int rl = LR_RPP * it + lane / LR_LPR;
            const i64 row = r0 + rl;
            if (row >= p.n || col >= p.f) continue;
            const i64 i = row * p.f + col;
            const int m = (int)min((i64)8, p.f - col);
            float gv[8], uv[8], dv[8], o0[8], o1[8];
            if (vec) {
                ld8(p.gate, dt, i, gv);
                ld8(p.up, dt, i, uv);
                if (BWD) ld8(p.dy, dt, i, dv);
            } else {
                for (int e = 0; e < 8; e++) {
                    gv[e] = e < m ? ldf(p.gate, dt, i + e) : 0.0f;
                    uv[e] = e < m ? ldf(p.up, dt, i + e) : 0.0f;
                    dv[e] = BWD && e < m ? ldf(p.dy, dt, i + e) : 0.0f;
                }
            }
            const float* cgp = &corr[warp][0][rl * LR_STRIDE + cl];
            const float* cup = &corr[warp][1][rl * LR_STRIDE + cl];
#pragma unroll
            for (int e = 0; e < 8; e++) {
                float gc = gv[e] + cgp[e], uc = uv[e] + cup[e];
                if (BWD) {
                    swiglu_grad(gc, uc, dv[e], &o0[e], &o1[e]);
                } else {
                    o0[e] = __fmul_rn(gc * sigmoidf_(gc), uc);
                }
            }
            if (vec) {
                st8(p.out0, dt, i, o0);
                if (BWD) st8(p.out1, dt, i, o1);
            } else {
                for (int e = 0; e < m; e++) {
                    stf(p.out0, dt, i + e, o0[e]);
                    if (BWD) stf(p.out1, dt, i + e, o1[e]);
                }
            }
        }
        // The next tile's fragment stores overwrite what this tile's epilogue read.
        __syncwarp();
    }
}

extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_fwd_bf16(SwigluLr p) { swiglu_lr<false, false>(p); }
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_bwd_bf16(SwigluLr p) { swiglu_lr<false, true>(p); }
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_fwd_f16(SwigluLr p) { swiglu_lr<true, false>(p); }
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_bwd_f16(SwigluLr p) { swiglu_lr<true, true>(p); }
