// Attention for any head dim up to 256 and any storage type: the general path (small test
// models, f32 graphs); bf16/f16 graphs with head dim 64, 96 or 128 use flash_attn.cu.
// src/ops/attention.rs has the CPU reference and the math.
//
// q [B*T, Hq*D], k, v [B*T, Hkv*D], seg [B*T] i32, o like q, lse [B, Hq, T]. Query head h
// reads kv head h / (Hq / Hkv). Key j is visible to query i (same row) when
// seg[i] == seg[j], j <= i if causal, and |i - j| < window if there is a window.
//
// One warp per (row b, head, token); lane l holds dims l, l + 32, ... (DC = ceil(D / 32)).
//   forward:  online softmax over the visible keys: s = scale q.k, m' = max(m, s),
//             l = l exp(m - m') + exp(s - m'), o = o exp(m - m') + exp(s - m') v;
//             o /= l, lse = m + log(l)
//   backward: Di = do_i . o_i (attn_bwd_dot), then P_ij = exp(scale q_i.k_j - lse_i),
//             dS_ij = P_ij (do_i . v_j - Di)
//             dq_i = scale sum_j dS_ij k_j                 (attn_bwd_dq, warp per query)
//             dk_j = scale sum_i dS_ij q_i, dv_j = sum_i P_ij do_i
//                                                          (attn_bwd_dkv, warp per key and kv
//                                                           head, over the group's q heads)
// No atomics: every output row is owned by one warp.

#define MAXDC 8

struct AttnDims {
    i64 B, T;
    int Hq, Hkv, D, causal, window;  // window 0: none
    float scale;
};

__device__ __forceinline__ void key_range(const AttnDims& a, i64 i, i64& lo, i64& hi) {
    lo = 0;
    hi = a.T - 1;
    if (a.causal) hi = i;
    if (a.window > 0) {
        lo = max((i64)0, i - a.window + 1);
        if (!a.causal) hi = min(hi, i + a.window - 1);
    }
}

__device__ __forceinline__ void query_range(const AttnDims& a, i64 j, i64& lo, i64& hi) {
    lo = 0;
    hi = a.T - 1;
    if (a.causal) lo = j;
    if (a.window > 0) {
        hi = min(hi, j + a.window - 1);
        if (!a.causal) lo = max(lo, j - a.window + 1);
    }
}

template <int DC>
__device__ __forceinline__ void load_row(const void* p, int dt, i64 off, int D, float* r) {
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < DC; c++) {
        int d = lane + 32 * c;
        r[c] = d < D ? ldf(p, dt, off + d) : 0.f;
    }
}

template <int DC>
__device__ __forceinline__ float dot_row(const float* a, const float* b) {
    float s = 0.f;
#pragma unroll
    for (int c = 0; c < DC; c++) s += a[c] * b[c];
    return warp_sum(s);
}

template <int DC>
__device__ void attn_fwd(const void* q, const void* k, const void* v, int dt, const int* seg, void* o, int dto, void* lse,
                         int dtl, AttnDims a) {
    i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= a.B * a.Hq * a.T) return;
    i64 i = w % a.T, h = (w / a.T) % a.Hq, b = w / (a.T * a.Hq);
    i64 kh = h / (a.Hq / a.Hkv);
    i64 qw = (i64)a.Hq * a.D, kw = (i64)a.Hkv * a.D;
    float qr[DC], acc[DC], kr[DC], vr[DC];
    load_row<DC>(q, dt, (b * a.T + i) * qw + h * a.D, a.D, qr);
#pragma unroll
    for (int c = 0; c < DC; c++) acc[c] = 0.f;
    int si = seg[b * a.T + i];
    float m = -__int_as_float(0x7f800000), l = 0.f;
    i64 lo, hi;
    key_range(a, i, lo, hi);
    for (i64 j = lo; j <= hi; j++) {
        if (seg[b * a.T + j] != si) continue;
        i64 kr_off = (b * a.T + j) * kw + kh * a.D;
        load_row<DC>(k, dt, kr_off, a.D, kr);
        float s = a.scale * dot_row<DC>(qr, kr);
        load_row<DC>(v, dt, kr_off, a.D, vr);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < DC; c++) acc[c] = acc[c] * corr + p * vr[c];
        m = mn;
    }
    int lane = threadIdx.x & 31;
    i64 orow = (b * a.T + i) * qw + h * a.D;
#pragma unroll
    for (int c = 0; c < DC; c++) {
        int d = lane + 32 * c;
        if (d < a.D) stf(o, dto, orow + d, acc[c] / l);
    }
    if (lane == 0) stf(lse, dtl, (b * a.Hq + h) * a.T + i, m + logf(l));
}

// Di = sum_d do[i, d] o[i, d] into f32 [B, Hq, T].
template <int DC>
__device__ void attn_bwd_dot(const void* o, int dto, const void* d_o, int dtdo, float* Di, AttnDims a) {
    i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= a.B * a.Hq * a.T) return;
    i64 i = w % a.T, h = (w / a.T) % a.Hq, b = w / (a.T * a.Hq);
    i64 off = (b * a.T + i) * (i64)a.Hq * a.D + h * a.D;
    float x[DC], y[DC];
    load_row<DC>(o, dto, off, a.D, x);
    load_row<DC>(d_o, dtdo, off, a.D, y);
    float s = dot_row<DC>(x, y);
    if ((threadIdx.x & 31) == 0) Di[(b * a.Hq + h) * a.T + i] = s;
}

template <int DC>
__device__ void attn_bwd_dq(const void* q, const void* k, const void* v, int dt, const int* seg, const void* lse, int dtl,
                            const void* d_o, int dtdo, const float* Di, void* dq, int dtq, AttnDims a) {
    i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= a.B * a.Hq * a.T) return;
    i64 i = w % a.T, h = (w / a.T) % a.Hq, b = w / (a.T * a.Hq);
    i64 kh = h / (a.Hq / a.Hkv);
    i64 qw = (i64)a.Hq * a.D, kw = (i64)a.Hkv * a.D;
    i64 qoff = (b * a.T + i) * qw + h * a.D;
    float qr[DC], dor[DC], acc[DC], kr[DC], vr[DC];
    load_row<DC>(q, dt, qoff, a.D, qr);
    load_row<DC>(d_o, dtdo, qoff, a.D, dor);
#pragma unroll
    for (int c = 0; c < DC; c++) acc[c] = 0.f;
    i64 li = (b * a.Hq + h) * a.T + i;
    float L = ldf(lse, dtl, li), Dv = Di[li];
    int si = seg[b * a.T + i];
    i64 lo, hi;
    key_range(a, i, lo, hi);
    for (i64 j = lo; j <= hi; j++) {
        if (seg[b * a.T + j] != si) continue;
        i64 off = (b * a.T + j) * kw + kh * a.D;
        load_row<DC>(k, dt, off, a.D, kr);
        load_row<DC>(v, dt, off, a.D, vr);
        float p = expf(a.scale * dot_row<DC>(qr, kr) - L);
        float ds = p * (dot_row<DC>(dor, vr) - Dv);
#pragma unroll
        for (int c = 0; c < DC; c++) acc[c] += ds * kr[c];
    }
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < DC; c++) {
        int d = lane + 32 * c;
        if (d < a.D) stf(dq, dtq, qoff + d, a.scale * acc[c]);
    }
}

template <int DC>
__device__ void attn_bwd_dkv(const void* q, const void* k, const void* v, int dt, const int* seg, const void* lse,
                             int dtl, const void* d_o, int dtdo, const float* Di, void* dk, int dtk, void* dv, int dtv,
                             AttnDims a) {
    i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= a.B * a.Hkv * a.T) return;
    i64 j = w % a.T, kh = (w / a.T) % a.Hkv, b = w / (a.T * a.Hkv);
    int group = a.Hq / a.Hkv;
    i64 qw = (i64)a.Hq * a.D, kw = (i64)a.Hkv * a.D;
    i64 koff = (b * a.T + j) * kw + kh * a.D;
    float kr[DC], vr[DC], gk[DC], gv[DC], qr[DC], dor[DC];
    load_row<DC>(k, dt, koff, a.D, kr);
    load_row<DC>(v, dt, koff, a.D, vr);
#pragma unroll
    for (int c = 0; c < DC; c++) gk[c] = gv[c] = 0.f;
    int sj = seg[b * a.T + j];
    i64 lo, hi;
    query_range(a, j, lo, hi);
    for (int hg = 0; hg < group; hg++) {
        i64 h = kh * group + hg;
        for (i64 i = lo; i <= hi; i++) {
            if (seg[b * a.T + i] != sj) continue;
            i64 qoff = (b * a.T + i) * qw + h * a.D;
            i64 li = (b * a.Hq + h) * a.T + i;
            load_row<DC>(q, dt, qoff, a.D, qr);
            load_row<DC>(d_o, dtdo, qoff, a.D, dor);
            float p = expf(a.scale * dot_row<DC>(qr, kr) - ldf(lse, dtl, li));
            float ds = p * (dot_row<DC>(dor, vr) - Di[li]);
#pragma unroll
            for (int c = 0; c < DC; c++) {
                gv[c] += p * dor[c];
                gk[c] += ds * qr[c];
            }
        }
    }
    int lane = threadIdx.x & 31;
#pragma unroll
    for (int c = 0; c < DC; c++) {
        int d = lane + 32 * c;
        if (d < a.D) {
            stf(dk, dtk, koff + d, a.scale * gk[c]);
            stf(dv, dtv, koff + d, gv[c]);
        }
    }
}

// Attention of new queries over a KV cache (generation): q [B*Tq, Hq*D], caches
// [B, L, Hkv*D], pos [B*Tq]. The query at position p sees cache rows lo..=min(p, L-1), lo =
// p + 1 - window with a window (src/ops/attention.rs cpu_cached); p < 0 writes zeros.
// a.T is Tq, a.window the raw window (0: none). One warp per (query row, head).
template <int DC>
__device__ void attn_cached(const void* q, const void* kc, const void* vc, int dt, const int* pos, void* o, int dto,
                            i64 L, AttnDims a) {
    i64 w = (i64)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (w >= a.B * a.T * a.Hq) return;
    i64 row = w / a.Hq, h = w % a.Hq, b = row / a.T;
    i64 kh = h / (a.Hq / a.Hkv);
    i64 qw = (i64)a.Hq * a.D, kw = (i64)a.Hkv * a.D;
    int lane = threadIdx.x & 31;
    i64 orow = row * qw + h * a.D;
    i64 p = pos[row];
    if (p < 0) {
#pragma unroll
        for (int c = 0; c < DC; c++) {
            int d = lane + 32 * c;
            if (d < a.D) stf(o, dto, orow + d, 0.f);
        }
        return;
    }
    float qr[DC], acc[DC], kr[DC], vr[DC];
    load_row<DC>(q, dt, orow, a.D, qr);
#pragma unroll
    for (int c = 0; c < DC; c++) acc[c] = 0.f;
    float m = -__int_as_float(0x7f800000), l = 0.f;
    i64 lo = a.window > 0 ? max((i64)0, p + 1 - a.window) : 0;
    i64 hi = min(p, L - 1);
    for (i64 j = lo; j <= hi; j++) {
        i64 off = (b * L + j) * kw + kh * a.D;
        load_row<DC>(kc, dt, off, a.D, kr);
        float s = a.scale * dot_row<DC>(qr, kr);
        load_row<DC>(vc, dt, off, a.D, vr);
        float mn = fmaxf(m, s);
        float corr = expf(m - mn), e = expf(s - mn);
        l = l * corr + e;
#pragma unroll
        for (int c = 0; c < DC; c++) acc[c] = acc[c] * corr + e * vr[c];
        m = mn;
    }
#pragma unroll
    for (int c = 0; c < DC; c++) {
        int d = lane + 32 * c;
        if (d < a.D) stf(o, dto, orow + d, acc[c] / l);
    }
}

// Entry points by DC (1, 2, 4, 8 dim chunks per lane: head dims up to 32, 64, 128, 256).
#define ATTN_ENTRIES(DC)                                                                                            \
    extern "C" __global__ void attn_fwd_##DC(const void* q, const void* k, const void* v, int dt, const int* seg,     \
                                             void* o, int dto, void* lse, int dtl, AttnDims a) {                      \
        grid_dep_wait();                                                                                              \
        attn_fwd<DC>(q, k, v, dt, seg, o, dto, lse, dtl, a);                                                          \
    }                                                                                                                 \
    extern "C" __global__ void attn_bwd_dot_##DC(const void* o, int dto, const void* d_o, int dtdo, float* Di,        \
                                                 AttnDims a) {                                                        \
        grid_dep_wait();                                                                                              \
        attn_bwd_dot<DC>(o, dto, d_o, dtdo, Di, a);                                                                   \
    }                                                                                                                 \
    extern "C" __global__ void attn_bwd_dq_##DC(const void* q, const void* k, const void* v, int dt, const int* seg,  \
                                                const void* lse, int dtl, const void* d_o, int dtdo, const float* Di, \
                                                void* dq, int dtq, AttnDims a) {                                      \
        grid_dep_wait();                                                                                              \
        attn_bwd_dq<DC>(q, k, v, dt, seg, lse, dtl, d_o, dtdo, Di, dq, dtq, a);                                       \
    }                                                                                                                 \
    extern "C" __global__ void attn_bwd_dkv_##DC(const void* q, const void* k, const void* v, int dt, const int* seg, \
                                                 const void* lse, int dtl, const void* d_o, int dtdo, const float* Di,\
                                                 void* dk, int dtk, void* dv, int dtv, AttnDims a) {                  \
        grid_dep_wait();                                                                                              \
        attn_bwd_dkv<DC>(q, k, v, dt, seg, lse, dtl, d_o, dtdo, Di, dk, dtk, dv, dtv, a);                             \
    }                                                                                                                 \
    extern "C" __global__ void attn_cached_##DC(const void* q, const void* kc, const void* vc, int dt, const int* pos, \
                                                void* o, int dto, i64 L, AttnDims a) {                                \
        grid_dep_wait();                                                                                              \
        attn_cached<DC>(q, kc, vc, dt, pos, o, dto, L, a);                                                            \
    }

ATTN_ENTRIES(1)
ATTN_ENTRIES(2)
ATTN_ENTRIES(4)
ATTN_ENTRIES(8)

// Eager attention's own ops (src/ops/attn_eager.rs has the CPU reference); its score
// products are ordinary matmuls.
//   split_heads:      y[b, hh, i, :] = x[b*T + i, (hh / r)*D ..]   [B*T, H*D] -> [B, H*r, T, D]
//   merge_heads:      y[b*T + i, h*D + e] = sum_c x[b, h*r + c, i, e]           (the adjoint)
//   masked_softmax:   each score row (b, h, i) of [B, H, T, T] as a softmax over the keys
//                     query i sees (the rule above), 0 elsewhere and in a row that sees none
//   softmax_backward: ds = p * (dp - rowsum(p * dp)) over rows of `cols`
// split/merge: one thread per output element. softmax: one block per row.

// Before the flash backward: Di = sum_d do[i, d] o[i, d] for every (token, head), and the
// f32 dQ accumulator zeroed, in one pass. Each thread takes 8 consecutive features (16-byte
// loads; D % 8 == 0), D / 8 threads per head row, summed with shuffles.
extern "C" __global__ void attn_bwd_prep(const void* o, int dto, const void* d_o, int dtdo, float* Di, float* dq_acc,
                                         i64 B, i64 T, int Hq, int D) {
    grid_dep_wait();
    const int per = D / 8;  // threads per (token, head); a power of two dividing 32
    i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 row = t / per;  // (b, i, h) in the layout of o: [B, T, Hq, D]
    bool live = row < B * T * Hq;
    float s = 0.f;
    if (live) {
        i64 e = t * 8;
        float x[8], y[8];
        ld8(o, dto, e, x);
        ld8(d_o, dtdo, e, y);
#pragma unroll
        for (int k = 0; k < 8; k++) s += x[k] * y[k];
        float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
        float4* q = (float4*)(dq_acc + e);
        q[0] = z;
        q[1] = z;
    }
    for (int m = per / 2; m > 0; m >>= 1) s += __shfl_xor_sync(0xffffffffu, s, m);
    if (live && (t % per) == 0) {
        i64 h = row % Hq, bi = row / Hq;  // bi = b * T + i
        i64 b = bi / T, i = bi % T;
        Di[(b * Hq + h) * T + i] = s;
    }
}

extern "C" __global__ void split_heads(const void* x, int dtx, void* y, int dty, i64 n, i64 T, int H, int r, int D) {
    grid_dep_wait();
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    i64 dd = e % D, row = e / D, i = row % T, bh = row / T;
    i64 hh = bh % ((i64)H * r), b = bh / ((i64)H * r);
    stf(y, dty, e, ldf(x, dtx, (b * T + i) * H * D + (hh / r) * D + dd));
}

extern "C" __global__ void merge_heads(const void* x, int dtx, void* y, int dty, i64 n, i64 T, int H, int r, int D) {
    grid_dep_wait();
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    i64 dd = e % D, rest = e / D, hd = rest % H, row = rest / H, i = row % T, b = row / T;
    float acc = 0.f;
    for (int c = 0; c < r; c++) acc += ldf(x, dtx, (((b * H + hd) * r + c) * T + i) * D + dd);
    stf(y, dty, e, acc);
}

__device__ __forceinline__ float block_max(float v, float* red) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : -F_INF;
    return warp_max(v);
}

extern "C" __global__ void masked_softmax(const void* x, int dtx, const int* seg, void* y, int dty, i64 T, int H,
                                          int causal, int window) {
    grid_dep_wait();
    __shared__ float red[32];
    i64 row = blockIdx.x, b = row / ((i64)H * T), i = row % T, base = row * T;
    int si = seg[b * T + i];
    const int* sk = seg + b * T;
#define VISIBLE(j) (sk[j] == si && (!causal || (j) <= i) && (window == 0 || llabs(i - (j)) < window))
    float m = -F_INF;
    for (i64 j = threadIdx.x; j < T; j += blockDim.x)
        if (VISIBLE(j)) m = fmaxf(m, ldf(x, dtx, base + j));
    m = block_max(m, red);
    float l = 0.f;
    for (i64 j = threadIdx.x; j < T; j += blockDim.x)
        if (VISIBLE(j)) l += __expf(ldf(x, dtx, base + j) - m);
    l = block_sum(l, red);
    float inv = l > 0.f ? 1.f / l : 0.f;
    for (i64 j = threadIdx.x; j < T; j += blockDim.x)
        stf(y, dty, base + j, VISIBLE(j) ? __expf(ldf(x, dtx, base + j) - m) * inv : 0.f);
#undef VISIBLE
}

extern "C" __global__ void softmax_backward(const void* p, int dtp, const void* dp, int dtdp, void* ds, int dts,
                                            i64 cols) {
    grid_dep_wait();
    __shared__ float red[32];
    i64 base = (i64)blockIdx.x * cols;
    float dot = 0.f;
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x) dot += ldf(p, dtp, base + j) * ldf(dp, dtdp, base + j);
    dot = block_sum(dot, red);
    for (i64 j = threadIdx.x; j < cols; j += blockDim.x)
        stf(ds, dts, base + j, ldf(p, dtp, base + j) * (ldf(dp, dtdp, base + j) - dot));
}
