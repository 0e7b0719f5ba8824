// SwiGLU gate (src/ops/swiglu.rs), elementwise over gate g and up u of one shape:
//   y  = silu(g) u,                 silu(g) = g sigmoid(g)
//   dg = dy u s (1 + g (1 - s)),    s = sigmoid(g)
//   du = dy silu(g)
// Eight elements per thread with 16-byte loads; a scalar tail.

__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_fwd(const void* g, int dtg, const void* u, int dtu, void* y, int dty, i64 n) {
    grid_dep_wait();
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
    grid_dep_wait();
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

extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_fwd_bf16(SwigluLr p) { grid_dep_wait(); swiglu_lr<false, false>(p); }
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_bwd_bf16(SwigluLr p) { grid_dep_wait(); swiglu_lr<false, true>(p); }
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_fwd_f16(SwigluLr p) { grid_dep_wait(); swiglu_lr<true, false>(p); }
extern "C" __global__ void __launch_bounds__(32 * LR_WARPS, 8) swiglu_lr_bwd_f16(SwigluLr p) { grid_dep_wait(); swiglu_lr<true, true>(p); }

// The same, for f % 8 == 0 and r <= 16 KS: a block takes S2_ROWS rows and S2_COLS columns;
// both B factors' columns are rounded to the activations' type into shared memory once per
// block, as [column][k] (zeros past r); each warp keeps its 16 rows of ug and uu as mma A
// fragments in registers and finishes S2_CHUNK columns at a time: the gate correction is
// staged in shared memory and read back in row order (eight features a lane), then the up
// correction, so the base tensors are read and the outputs written with 16-byte accesses
// (the general kernel above reloads B fragments and reads the staged values one by one).
#define S2_ROWS 128
#define S2_COLS 128
#define S2_CHUNK 32
// Floats between staged rows of corrections (S2_CHUNK + 4: 16-byte aligned row reads).
#define S2_SS (S2_CHUNK + 4)

// b[c0 .. c0 + S2_COLS, :] ([f, r]) into ws as [column][k], rounded to DT; zeros past f or r.
template <bool F16, int KS>
__device__ __forceinline__ void s2_fill(const void* b, int dtb, i64 f, i64 r, u16* ws, i64 c0) {
    constexpr int K = 16 * KS, WS = K + 8, PER = S2_COLS * K / 256;
    constexpr int dt = F16 ? DT_F16 : DT_BF16;
    float v[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int e = threadIdx.x + 256 * j, col = e / K, k = e % K;
        const i64 gc = c0 + col;
        v[j] = gc >= f || k >= r ? 0.f
               : dtb == DT_F32  ? ((const float*)b)[gc * r + k]
                                : h16_to_f32(((const u16*)b)[gc * r + k], dt);
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int e = threadIdx.x + 256 * j, col = e / K, k = e % K;
        ws[col * WS + k] = f32_to_h16(v[j], dt);
    }
}

// alpha u b^T for the warp's 16 rows and chunk columns cc .. cc + S2_CHUNK, staged in st as
// [row][column] (stride S2_SS floats).
template <bool F16, int KS>
__device__ __forceinline__ void s2_correction(const u32 (*a)[4], const u16* ws, int cc, float alpha, float* st) {
    constexpr int WS = 16 * KS + 8, SS = S2_SS;
    const int lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
#pragma unroll
    for (int t = 0; t < S2_CHUNK / 8; ++t) {
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int ks = 0; ks < KS; ++ks) {
            const u16* wp = ws + (cc + t * 8 + g) * WS + ks * 16 + 2 * q;
            mma16816<F16>(acc, a[ks], *(const u32*)wp, *(const u32*)(wp + 8));
        }
        *(float2*)(st + g * SS + t * 8 + 2 * q) = make_float2(alpha * acc[0], alpha * acc[1]);
        *(float2*)(st + (g + 8) * SS + t * 8 + 2 * q) = make_float2(alpha * acc[2], alpha * acc[3]);
    }
}

// The eight staged values of piece e (row e / 4 of the warp's 16, features 8 (e % 4) ..).
__device__ __forceinline__ void s2_staged(const float* st, int e, float* v) {
    constexpr int SS = S2_SS;
    const int rr = e / (S2_CHUNK / 8), c8 = (e % (S2_CHUNK / 8)) * 8;
    const float4 lo = *(const float4*)(st + rr * SS + c8), hi = *(const float4*)(st + rr * SS + c8 + 4);
    v[0] = lo.x; v[1] = lo.y; v[2] = lo.z; v[3] = lo.w;
    v[4] = hi.x; v[5] = hi.y; v[6] = hi.z; v[7] = hi.w;
}

template <bool F16, int KS, bool BWD>
__device__ __forceinline__ void swiglu_lr2(const SwigluLr& p) {
    constexpr int WS = 16 * KS + 8, SS = S2_SS;
    constexpr int PL = 16 * S2_CHUNK / 8 / 32;  // 8-feature pieces of a chunk per lane
    constexpr int dt = F16 ? DT_F16 : DT_BF16;
    __shared__ __align__(16) u16 wsg[S2_COLS * WS];
    __shared__ __align__(16) u16 wsu[S2_COLS * WS];
    __shared__ __align__(16) float stage[8][16 * SS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const i64 r0 = (i64)blockIdx.x * S2_ROWS + warp * 16;
    const i64 c0 = (i64)blockIdx.y * S2_COLS;

    // This warp's rows of ug and uu as A fragments (zeros past n or r), loads issued first.
    u32 ag[KS][4], au[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const i64 k = ks * 16 + 2 * q;
        ag[ks][0] = lr_pair16(p.ug, p.n, p.r, r0 + g, k);
        ag[ks][1] = lr_pair16(p.ug, p.n, p.r, r0 + g + 8, k);
        ag[ks][2] = lr_pair16(p.ug, p.n, p.r, r0 + g, k + 8);
        ag[ks][3] = lr_pair16(p.ug, p.n, p.r, r0 + g + 8, k + 8);
        au[ks][0] = lr_pair16(p.uu, p.n, p.r, r0 + g, k);
        au[ks][1] = lr_pair16(p.uu, p.n, p.r, r0 + g + 8, k);
        au[ks][2] = lr_pair16(p.uu, p.n, p.r, r0 + g, k + 8);
        au[ks][3] = lr_pair16(p.uu, p.n, p.r, r0 + g + 8, k + 8);
    }
    s2_fill<F16, KS>(p.bg, p.dtb, p.f, p.r, wsg, c0);
    s2_fill<F16, KS>(p.bu, p.dtb, p.f, p.r, wsu, c0);
    __syncthreads();
    if (r0 >= p.n) return;

    float* st = stage[warp];
    for (int cc = 0; cc < S2_COLS && c0 + cc < p.f; cc += S2_CHUNK) {
        // Lane pieces: row rr of the warp's 16, features c8 .. c8 + 7 of the chunk. The base
        // tensors' loads go first, so they are in flight during the corrections.
        uint4 gv[PL], uv[PL], dv[PL];
        bool ok[PL];
        i64 at[PL];
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int e = lane + 32 * j, rr = e / (S2_CHUNK / 8), c8 = (e % (S2_CHUNK / 8)) * 8;
            const i64 row = r0 + rr, col = c0 + cc + c8;
            ok[j] = row < p.n && col < p.f;
            at[j] = row * p.f + col;
            gv[j] = uv[j] = dv[j] = make_uint4(0, 0, 0, 0);
            if (ok[j]) {
                gv[j] = *(const uint4*)((const u16*)p.gate + at[j]);
                uv[j] = *(const uint4*)((const u16*)p.up + at[j]);
                if (BWD) dv[j] = *(const uint4*)((const u16*)p.dy + at[j]);
            }
        }
        float gc[PL][8];
        s2_correction<F16, KS>(ag, wsg, cc, p.ag, st);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            float c[8];
            s2_staged(st, lane + 32 * j, c);
            unpack8(gv[j], dt, gc[j]);
#pragma unroll
            for (int i = 0; i < 8; ++i) gc[j][i] += c[i];
        }
        __syncwarp();
        s2_correction<F16, KS>(au, wsu, cc, p.au, st);
        __syncwarp();
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            float cu[8], uvf[8], dvf[8], o0[8], o1[8];
            s2_staged(st, lane + 32 * j, cu);
            unpack8(uv[j], dt, uvf);
            if (BWD) unpack8(dv[j], dt, dvf);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float uc = uvf[i] + cu[i];
                if (BWD) {
                    swiglu_grad(gc[j][i], uc, dvf[i], &o0[i], &o1[i]);
                } else {
                    o0[i] = __fmul_rn(gc[j][i] * sigmoidf_(gc[j][i]), uc);
                }
            }
            if (ok[j]) {
                *(uint4*)((u16*)p.out0 + at[j]) = make_uint4(pack2<F16>(o0[0], o0[1]), pack2<F16>(o0[2], o0[3]),
                                                             pack2<F16>(o0[4], o0[5]), pack2<F16>(o0[6], o0[7]));
                if (BWD)
                    *(uint4*)((u16*)p.out1 + at[j]) = make_uint4(pack2<F16>(o1[0], o1[1]), pack2<F16>(o1[2], o1[3]),
                                                                 pack2<F16>(o1[4], o1[5]), pack2<F16>(o1[6], o1[7]));
            }
        }
        // The next chunk's corrections overwrite what this chunk's epilogue read.
        __syncwarp();
    }
}

#define S2_ENTRY(name, F16, KS, BWD) \
    extern "C" __global__ void __launch_bounds__(256) name(SwigluLr p) { grid_dep_wait(); swiglu_lr2<F16, KS, BWD>(p); }
S2_ENTRY(swiglu_lr2_fwd_bf16_k1, false, 1, false)
S2_ENTRY(swiglu_lr2_fwd_bf16_k2, false, 2, false)
S2_ENTRY(swiglu_lr2_bwd_bf16_k1, false, 1, true)
S2_ENTRY(swiglu_lr2_bwd_bf16_k2, false, 2, true)
S2_ENTRY(swiglu_lr2_fwd_f16_k1, true, 1, false)
S2_ENTRY(swiglu_lr2_fwd_f16_k2, true, 2, false)
S2_ENTRY(swiglu_lr2_bwd_f16_k1, true, 1, true)
S2_ENTRY(swiglu_lr2_bwd_f16_k2, true, 2, true)
