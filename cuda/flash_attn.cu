// FlashAttention-2 (Dao 2023) on tensor cores for bf16 (or f16) q, k, v with head dim
// D = 64, 96 or 128; src/ops/attention.rs has the CPU reference and the math.
//
// Shapes: q, o [B*T, Hq*D]; k, v [B*T, Hkv*D]; seg [B*T] i32; lse [B, Hq, T] f32. Query head
// h reads kv head h / (Hq / Hkv) in place (GQA without copies). Key j is visible to query i
// (same row) when seg[i] == seg[j], j <= i if causal, |i - j| < window if windowed.
//
// Every matrix product is mma.sync m16n8k16 (bf16 or f16 operands, f32 accumulators). Tiles
// are staged in shared memory by cp.async, two buffers deep (the next tile streams in while
// this one is computed), rows padded by 16 bytes so ldmatrix is free of bank conflicts. A
// tile pair that the causal/window masks hide, or whose segment-id ranges do not meet, is
// skipped; the ranges come from flash_seg_ranges (min and max segment id per 32 tokens),
// copied to shared memory once per block. Element masks apply only to tiles that are not
// entirely visible.
//
// Forward, block = 4 warps; warp w owns MW m16 tiles = 16 MW query rows (BM = 64 MW). Scores
// are kept in log2 units (s2 = scale log2(e) q.k) for ex2:
//   for each visible key tile (BN keys):
//     S = Q K^T                          K from shared memory (Q fragments in registers when
//                                        they fit)
//     m' = max(m, rowmax S), P = 2^(S - m'), l = l 2^(m - m') + rowsum P, O = O 2^(m - m')
//     O += P V                           P re-used from the accumulator registers as the A
//                                        operand (the m16n8 C layout of two n-tiles is the
//                                        m16k16 A layout), V through ldmatrix.trans
//   o = O / l, lse = ln 2 (m + log2 l)
//
// Backward, block = NW warps = BN = 16 NW keys of one kv head; warp w owns keys
// 16w..16w+15 and keeps dK, dV for them in registers across every query tile (BM queries) of
// every q head of its group. Per query tile, with Di = rowsum(dO o O) precomputed:
//   S^T = K Q^T, P^T = 2^(S^T - lse2[query])          (recomputed from the saved lse)
//   dP^T = V dO^T, dS^T = P^T (dP^T - Di[query])
//   dV += P^T dO, dK += dS^T Q                         (P^T, dS^T re-used as A operands)
//   dS^T -> shared memory; dQ_acc[query] += dS K       (the warps split queries and columns;
//                                                      f32 atomics; another launch scales
//                                                      and casts dQ_acc)
//   dK *= scale at the end.

struct FlashParams {
    u64 q, k, v, o, lse, seg;
    u64 d_o, Di, dq_acc, dk, dv;
    u64 rng;  // int2 [B, ngr]: min and max segment id of each 32 tokens
    i64 B, T;
    int Hq, Hkv, causal, window;  // window 0: none
    float scale, scale_log2;
    int ngr, pad;
};

#define GRAN 32

#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f
#define NEG_INF __int_as_float(0xff800000u)

__device__ __forceinline__ u32 smem_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared; `bytes` 0 fills zeros (rows past the end).
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

template <bool F16>
__device__ __forceinline__ void mma16816(float* c, const u32* a, u32 b0, u32 b1) {
    if (F16) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two floats -> one register of two 16-bit values, `lo` in the low half.
template <bool F16>
__device__ __forceinline__ u32 pack2(float lo, float hi) {
    u32 r;
    if (F16) {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
}

__device__ __forceinline__ float ex2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// Rows [r0, r0 + R) of a row-major matrix (row stride `gs` elements, D used columns) into
// shared memory with row stride S; rows at or past T read as zeros.
template <int R, int D, int S, int NT>
__device__ __forceinline__ void load_tile(u16* s, const u16* g, i64 gs, i64 r0, i64 T) {
    constexpr int CPR = D / 8;  // 16-byte chunks per row
    for (int c = threadIdx.x; c < R * CPR; c += NT) {
        int r = c / CPR, cc = c - r * CPR;
        i64 row = r0 + r;
        bool ok = row < T;
        cp_async16(smem_addr(s + r * S + cc * 8), g + (ok ? row : 0) * gs + cc * 8, ok ? 16 : 0);
    }
}

// 4 bytes global -> shared; `bytes` 0 fills zeros.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Min and max segment id of each GRAN tokens of each row: out[b * ngr + g].
extern "C" __global__ void flash_seg_ranges(const int* seg, i64 B, i64 T, int ngr, int2* out) {
    i64 k = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (k >= B * ngr) return;
    i64 b = k / ngr, g = k - b * ngr;
    int lo = 0x7fffffff, hi = -0x7fffffff - 1;
    for (i64 i = g * GRAN; i < min(T, (g + 1) * GRAN); i++) {
        int s = seg[b * T + i];
        lo = min(lo, s);
        hi = max(hi, s);
    }
    out[k] = make_int2(lo, hi);
}

// Copies the granule ranges covering tokens [r0, r1) of row b into shared memory
// (sr[i] = granule g_off + i) and returns g_off. Every thread of the block calls it.
__device__ __forceinline__ int stage_ranges(const FlashParams& p, i64 b, i64 r0, i64 r1, int2* sr, int nth) {
    int g0 = (int)(r0 / GRAN), g1 = (int)((min(r1, p.T) + GRAN - 1) / GRAN);
    const int2* src = (const int2*)p.rng + b * p.ngr;
    for (int g = g0 + threadIdx.x; g < g1; g += nth) sr[g - g0] = src[g];
    return g0;
}

// Min and max segment id over tokens [r0, r0 + n) within T, from staged granules.
__device__ __forceinline__ void srange(const int2* sr, int g_off, i64 r0, int n, i64 T, int& lo, int& hi) {
    i64 r1 = min(r0 + n, T) - 1;
    lo = 0x7fffffff;
    hi = -0x7fffffff - 1;
    for (i64 g = r0 / GRAN; g <= r1 / GRAN; g++) {
        int2 v = sr[g - g_off];
        lo = min(lo, v.x);
        hi = max(hi, v.y);
    }
}

// Whether every (query in [q0, q0+nq), key in [k0, k0+nk)) pair within T is masked by the
// causal / window rules alone.
__device__ __forceinline__ bool pos_hidden(const FlashParams& p, i64 q0, int nq, i64 k0, int nk) {
    i64 q1 = q0 + nq - 1, k1 = k0 + nk - 1;
    if (p.causal && k0 > q1) return true;
    if (p.window > 0 && (q0 - k1 >= p.window || k0 - q1 >= p.window)) return true;
    return false;
}

// Whether every pair is visible by position (no causal cut, all inside the window, all < T).
__device__ __forceinline__ bool pos_full(const FlashParams& p, i64 q0, int nq, i64 k0, int nk) {
    i64 q1 = q0 + nq - 1, k1 = k0 + nk - 1;
    if (k1 >= p.T || q1 >= p.T) return false;
    if (p.causal && k1 > q0) return false;
    if (p.window > 0 && (q1 - k0 >= p.window || k1 - q0 >= p.window)) return false;
    return true;
}

__device__ __forceinline__ bool visible(const FlashParams& p, i64 i, i64 j, int si, int sj) {
    if (i >= p.T || j >= p.T || si != sj) return false;
    if (p.causal && j > i) return false;
    if (p.window > 0 && (i - j >= p.window || j - i >= p.window)) return false;
    return true;
}

// f32 atomic adds of two neighbours (one vector reduction on sm_90).
__device__ __forceinline__ void red_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

// Forward. MW m16 tiles per warp (BM = 64 MW query rows), key tiles of BN.
template <int D, int MW, int BN, bool F16>
__device__ void flash_fwd(const FlashParams& p) {
    constexpr int NW = 4, BM = 16 * MW * NW, S = D + 8, DK = D / 16, DN = D / 8, NT = BN / 8, NTH = NW * 32;
    constexpr bool QREG = MW == 1 || D <= 64;
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;                     // [BM][S]
    u16* sK = sQ + BM * S;              // [2][BN][S]
    u16* sV = sK + 2 * BN * S;          // [2][BN][S]
    int* sSeg = (int*)(sV + 2 * BN * S);  // [2][BN]
    int2* sRng = (int2*)(sSeg + 2 * BN);  // granule ranges
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const i64 b = blockIdx.z, T = p.T;
    const int h = blockIdx.y, kh = h / (p.Hq / p.Hkv);
    const i64 q0 = (i64)(gridDim.x - 1 - blockIdx.x) * BM;  // longest (causal) tiles first
    const i64 qw = (i64)p.Hq * D, kw = (i64)p.Hkv * D;
    const u16* Q = (const u16*)p.q + b * T * qw + h * D;
    const u16* K = (const u16*)p.k + b * T * kw + kh * D;
    const u16* V = (const u16*)p.v + b * T * kw + kh * D;
    const int* seg = (const int*)p.seg + b * T;

    i64 kv_lo = 0, kv_hi = T;
    if (p.causal) kv_hi = min(T, q0 + BM);
    if (p.window > 0) {
        kv_lo = max((i64)0, q0 - p.window + 1);
        if (!p.causal) kv_hi = min(T, q0 + BM - 1 + p.window);
    }
    const int t_lo = (int)(kv_lo / BN), t_hi = (int)((kv_hi + BN - 1) / BN);
    const int goff = stage_ranges(p, b, min((i64)t_lo * BN, q0), max((i64)t_hi * BN, q0 + BM), sRng, NTH);
    __syncthreads();
    int qs_lo, qs_hi;
    srange(sRng, goff, q0, BM, T, qs_lo, qs_hi);
    const int nq = (int)min((i64)BM, T - q0);
    // The next tile at or after t that some query of this block can see.
    auto next_tile = [&](int t) {
        for (; t < t_hi; t++) {
            if (pos_hidden(p, q0, nq, (i64)t * BN, BN)) continue;
            int a, c;
            srange(sRng, goff, (i64)t * BN, BN, T, a, c);
            if (c >= qs_lo && a <= qs_hi) break;
        }
        return t;
    };
    auto load_kv = [&](int t, int buf) {
        const i64 n0 = (i64)t * BN;
        load_tile<BN, D, S, NTH>(sK + buf * BN * S, K, kw, n0, T);
        load_tile<BN, D, S, NTH>(sV + buf * BN * S, V, kw, n0, T);
        for (int r = tid; r < BN; r += NTH) {
            bool ok = n0 + r < T;
            cp_async4(smem_addr(sSeg + buf * BN + r), seg + (ok ? n0 + r : 0), ok ? 4 : 0);
        }
    };

    // Thread rows: warp rows 16 MW w + 16 mi + g (+ 8 for the second half of a tile).
    const int wrow = warp * 16 * MW;
    int segq[MW][2];
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            i64 i = q0 + wrow + mi * 16 + g + r * 8;
            segq[mi][r] = i < T ? seg[i] : 0;
        }

    float acc[MW][DN][4];
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int i = 0; i < DN; i++) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
    float mrow[MW][2], lrow[MW][2];
#pragma unroll
    for (int mi = 0; mi < MW; mi++) mrow[mi][0] = mrow[mi][1] = NEG_INF, lrow[mi][0] = lrow[mi][1] = 0.f;
    u32 qf[QREG ? MW : 1][QREG ? DK : 1][4];

    int t = next_tile(t_lo);
    int tn = t < t_hi ? next_tile(t + 1) : t_hi;
    load_tile<BM, D, S, NTH>(sQ, Q, qw, q0, T);
    if (t < t_hi) load_kv(t, 0);
    cp_async_commit();
    if (tn < t_hi) load_kv(tn, 1);
    cp_async_commit();
    int buf = 0;
    bool first = true;
    while (t < t_hi) {
        const i64 n0 = (i64)t * BN;
        const u16* cK = sK + buf * BN * S;
        const u16* cV = sV + buf * BN * S;
        const int* cSeg = sSeg + buf * BN;
        cp_async_wait_1();
        __syncthreads();
        if (QREG && first) {
#pragma unroll
            for (int mi = 0; mi < (QREG ? MW : 1); mi++)
#pragma unroll
                for (int kc = 0; kc < (QREG ? DK : 1); kc++)
                    ldsm_x4(smem_addr(sQ + (wrow + mi * 16 + (lane & 15)) * S + kc * 16 + (lane >> 4) * 8), qf[mi][kc][0],
                            qf[mi][kc][1], qf[mi][kc][2], qf[mi][kc][3]);
        }
        first = false;

        float s[MW][NT][4];
#pragma unroll
        for (int mi = 0; mi < MW; mi++)
#pragma unroll
            for (int i = 0; i < NT; i++) s[mi][i][0] = s[mi][i][1] = s[mi][i][2] = s[mi][i][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < DK; kc++) {
            u32 qa[MW][4];
#pragma unroll
            for (int mi = 0; mi < MW; mi++) {
                if (QREG) {
#pragma unroll
                    for (int e = 0; e < 4; e++) qa[mi][e] = qf[QREG ? mi : 0][QREG ? kc : 0][e];
                } else {
                    ldsm_x4(smem_addr(sQ + (wrow + mi * 16 + (lane & 15)) * S + kc * 16 + (lane >> 4) * 8), qa[mi][0],
                            qa[mi][1], qa[mi][2], qa[mi][3]);
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(smem_addr(cK + (np * 16 + (lane & 7) + ((lane >> 4) << 3)) * S + kc * 16 + ((lane >> 3) & 1) * 8),
                        b0, b1, b2, b3);
#pragma unroll
                for (int mi = 0; mi < MW; mi++) {
                    mma16816<F16>(s[mi][2 * np], qa[mi], b0, b1);
                    mma16816<F16>(s[mi][2 * np + 1], qa[mi], b2, b3);
                }
            }
        }
        bool full = pos_full(p, q0, BM, n0, BN);
        if (full) {
            int a, c;
            srange(sRng, goff, n0, BN, T, a, c);
            full = a == c && qs_lo == qs_hi && a == qs_lo;
        }
#pragma unroll
        for (int mi = 0; mi < MW; mi++) {
#pragma unroll
            for (int nt = 0; nt < NT; nt++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    float v = s[mi][nt][e] * p.scale_log2;
                    if (!full) {
                        int jj = nt * 8 + 2 * tig + (e & 1);
                        i64 i = q0 + wrow + mi * 16 + g + (e >> 1) * 8;
                        if (!visible(p, i, n0 + jj, segq[mi][e >> 1], cSeg[jj])) v = NEG_INF;
                    }
                    s[mi][nt][e] = v;
                }
            }
            // Online softmax, per row; the four threads of a quad share a row.
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * r], s[mi][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                float mn = fmaxf(mrow[mi][r], mx);
                float mref = mn == NEG_INF ? 0.f : mn;
                float corr = ex2(mrow[mi][r] - mref);
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    float a = ex2(s[mi][nt][2 * r] - mref), c = ex2(s[mi][nt][2 * r + 1] - mref);
                    s[mi][nt][2 * r] = a;
                    s[mi][nt][2 * r + 1] = c;
                    sum += a + c;
                }
                lrow[mi][r] = lrow[mi][r] * corr + sum;
                mrow[mi][r] = mn;
#pragma unroll
                for (int dt = 0; dt < DN; dt++) {
                    acc[mi][dt][2 * r] *= corr;
                    acc[mi][dt][2 * r + 1] *= corr;
                }
            }
        }
#pragma unroll
        for (int kc = 0; kc < BN / 16; kc++) {
            u32 pf[MW][4];
#pragma unroll
            for (int mi = 0; mi < MW; mi++) {
                pf[mi][0] = pack2<F16>(s[mi][2 * kc][0], s[mi][2 * kc][1]);
                pf[mi][1] = pack2<F16>(s[mi][2 * kc][2], s[mi][2 * kc][3]);
                pf[mi][2] = pack2<F16>(s[mi][2 * kc + 1][0], s[mi][2 * kc + 1][1]);
                pf[mi][3] = pack2<F16>(s[mi][2 * kc + 1][2], s[mi][2 * kc + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DN / 2; dp++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(smem_addr(cV + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + dp * 16 + (lane >> 4) * 8),
                          b0, b1, b2, b3);
#pragma unroll
                for (int mi = 0; mi < MW; mi++) {
                    mma16816<F16>(acc[mi][2 * dp], pf[mi], b0, b1);
                    mma16816<F16>(acc[mi][2 * dp + 1], pf[mi], b2, b3);
                }
            }
        }
        __syncthreads();  // every warp is done with buffer `buf`
        int tnn = tn < t_hi ? next_tile(tn + 1) : t_hi;
        if (tnn < t_hi) load_kv(tnn, buf);
        cp_async_commit();
        t = tn;
        tn = tnn;
        buf ^= 1;
    }
    cp_async_wait_all();

    u16* O = (u16*)p.o + b * T * qw + h * D;
    float* lse = (float*)p.lse + (b * p.Hq + h) * T;
#pragma unroll
    for (int mi = 0; mi < MW; mi++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            float l = lrow[mi][r];
            l += __shfl_xor_sync(0xffffffffu, l, 1);
            l += __shfl_xor_sync(0xffffffffu, l, 2);
            i64 row = q0 + wrow + mi * 16 + g + r * 8;
            if (row < T) {
                float inv = 1.f / l;
#pragma unroll
                for (int dt = 0; dt < DN; dt++)
                    *(u32*)(O + row * qw + dt * 8 + 2 * tig) =
                        pack2<F16>(acc[mi][dt][2 * r] * inv, acc[mi][dt][2 * r + 1] * inv);
                if (tig == 0) lse[row] = (mrow[mi][r] + __log2f(l)) * LN2;
            }
        }
    }
}

// Backward. NW warps own BN = 16 NW keys; query tiles have BM rows. In the dQ phase the
// warps split the BM queries into m-tiles and D into column groups (NW / (BM / 16) of them).
// With D = 64 the K and V fragments stay in registers for the whole block.
template <int D, int NW, int BM, bool F16>
__device__ void flash_bwd(const FlashParams& p) {
    constexpr int BN = 16 * NW, S = D + 8, SS = BM + 8, DK = D / 16, DN = D / 8, MT = BM / 8, NTH = NW * 32;
    constexpr int MK = BM / 16, CW = NW / MK, DNW = DN / CW;  // dQ phase: m-tiles, column groups, n-tiles each
    static_assert(NW % MK == 0 && DN % CW == 0 && DNW % 2 == 0, "unsupported backward tiling");
    constexpr bool KVREG = D <= 64;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;                          // [BN][S]
    u16* sV = sK + BN * S;                   // [BN][S]
    u16* sQ = sV + BN * S;                   // [2][BM][S]
    u16* sdO = sQ + 2 * BM * S;              // [2][BM][S]
    u16* sdS = sdO + 2 * BM * S;             // [BN][SS]
    float* sL = (float*)(sdS + BN * SS);     // [2][BM] lse
    float* sDi = sL + 2 * BM;                // [2][BM]
    int* sSg = (int*)(sDi + 2 * BM);         // [2][BM] segment ids of the queries
    int2* sRng = (int2*)(sSg + 2 * BM);      // granule ranges
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const i64 b = blockIdx.z, T = p.T;
    const int kh = blockIdx.y, group = p.Hq / p.Hkv;
    const i64 n0 = (i64)blockIdx.x * BN;
    const i64 qw = (i64)p.Hq * D, kw = (i64)p.Hkv * D;
    const u16* K = (const u16*)p.k + b * T * kw + kh * D;
    const u16* V = (const u16*)p.v + b * T * kw + kh * D;
    const int* seg = (const int*)p.seg + b * T;

    i64 q_lo = 0, q_hi = T;
    if (p.causal) q_lo = n0;
    if (p.window > 0) {
        q_hi = min(T, n0 + BN - 1 + p.window);
        if (!p.causal) q_lo = max((i64)0, n0 - p.window + 1);
    }
    const int mt_lo = (int)(q_lo / BM), mt_hi = (int)((q_hi + BM - 1) / BM);
    const int goff = stage_ranges(p, b, min((i64)mt_lo * BM, n0), max((i64)mt_hi * BM, n0 + BN), sRng, NTH);
    __syncthreads();
    int ks_lo, ks_hi;
    srange(sRng, goff, n0, BN, T, ks_lo, ks_hi);
    const int nk = (int)min((i64)BN, T - n0);
    const int steps = group * (mt_hi - mt_lo);
    // The next (head, query tile) step at or after s that sees some key of this block.
    auto next_step = [&](int s) {
        for (; s < steps; s++) {
            i64 m0 = (i64)(mt_lo + s % (mt_hi - mt_lo)) * BM;
            if (pos_hidden(p, m0, BM, n0, nk)) continue;
            int a, c;
            srange(sRng, goff, m0, BM, T, a, c);
            if (c >= ks_lo && a <= ks_hi) break;
        }
        return s;
    };
    // Loads the query-side tiles of step s into buffer `buf`: Q, dO, lse, Di, segment ids.
    auto load_step = [&](int s, int buf) {
        int hh = kh * group + s / (mt_hi - mt_lo);
        i64 m0 = (i64)(mt_lo + s % (mt_hi - mt_lo)) * BM;
        load_tile<BM, D, S, NTH>(sQ + buf * BM * S, (const u16*)p.q + b * T * qw + hh * D, qw, m0, T);
        load_tile<BM, D, S, NTH>(sdO + buf * BM * S, (const u16*)p.d_o + b * T * qw + hh * D, qw, m0, T);
        const i64 lrow = (b * p.Hq + hh) * T;
        for (int r = tid; r < BM; r += NTH) {
            i64 i = m0 + r;
            int ok = i < T ? 4 : 0;
            i64 ii = i < T ? i : 0;
            cp_async4(smem_addr(sL + buf * BM + r), (const float*)p.lse + lrow + ii, ok);
            cp_async4(smem_addr(sDi + buf * BM + r), (const float*)p.Di + lrow + ii, ok);
            cp_async4(smem_addr(sSg + buf * BM + r), seg + ii, ok);
        }
    };

    const i64 krow0 = n0 + warp * 16 + g;  // this thread's key rows: krow0, krow0 + 8
    int segk[2];
    segk[0] = krow0 < T ? seg[krow0] : 0;
    segk[1] = krow0 + 8 < T ? seg[krow0 + 8] : 0;
    float dk[DN][4], dv[DN][4];
#pragma unroll
    for (int i = 0; i < DN; i++) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
    u32 kf[KVREG ? DK : 1][4], vf[KVREG ? DK : 1][4];

    load_tile<BN, D, S, NTH>(sK, K, kw, n0, T);
    load_tile<BN, D, S, NTH>(sV, V, kw, n0, T);
    int s = next_step(0);
    int sn = s < steps ? next_step(s + 1) : steps;
    if (s < steps) load_step(s, 0);
    cp_async_commit();
    if (sn < steps) load_step(sn, 1);
    cp_async_commit();
    int buf = 0;
    bool first = true;
    while (s < steps) {
        const int hh = kh * group + s / (mt_hi - mt_lo);
        const i64 m0 = (i64)(mt_lo + s % (mt_hi - mt_lo)) * BM;
        const u16* cQ = sQ + buf * BM * S;
        const u16* cdO = sdO + buf * BM * S;
        const float* cL = sL + buf * BM;
        const float* cDi = sDi + buf * BM;
        const int* cSg = sSg + buf * BM;
        cp_async_wait_1();
        __syncthreads();
        if (KVREG && first) {
#pragma unroll
            for (int kc = 0; kc < (KVREG ? DK : 1); kc++) {
                int off = (warp * 16 + (lane & 15)) * S + kc * 16 + (lane >> 4) * 8;
                ldsm_x4(smem_addr(sK + off), kf[kc][0], kf[kc][1], kf[kc][2], kf[kc][3]);
                ldsm_x4(smem_addr(sV + off), vf[kc][0], vf[kc][1], vf[kc][2], vf[kc][3]);
            }
        }
        first = false;
        bool full = pos_full(p, m0, BM, n0, BN);
        if (full) {
            int a, c;
            srange(sRng, goff, m0, BM, T, a, c);
            full = a == c && ks_lo == ks_hi && a == ks_lo;
        }
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
        float st[MT][4], dpt[MT][4];
#pragma unroll
        for (int i = 0; i < MT; i++)
            st[i][0] = st[i][1] = st[i][2] = st[i][3] = dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < DK; kc++) {
            u32 ka[4], va[4];
            if (KVREG) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    ka[e] = kf[KVREG ? kc : 0][e];
                    va[e] = vf[KVREG ? kc : 0][e];
                }
            } else {
                int off = (warp * 16 + (lane & 15)) * S + kc * 16 + (lane >> 4) * 8;
                ldsm_x4(smem_addr(sK + off), ka[0], ka[1], ka[2], ka[3]);
                ldsm_x4(smem_addr(sV + off), va[0], va[1], va[2], va[3]);
            }
#pragma unroll
            for (int mp = 0; mp < MT / 2; mp++) {
                u32 b0, b1, b2, b3;
                int off = (mp * 16 + (lane & 7) + ((lane >> 4) << 3)) * S + kc * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(smem_addr(cQ + off), b0, b1, b2, b3);
                mma16816<F16>(st[2 * mp], ka, b0, b1);
                mma16816<F16>(st[2 * mp + 1], ka, b2, b3);
                ldsm_x4(smem_addr(cdO + off), b0, b1, b2, b3);
                mma16816<F16>(dpt[2 * mp], va, b0, b1);
                mma16816<F16>(dpt[2 * mp + 1], va, b2, b3);
            }
        }
        // P^T and dS^T; packed as A operands (k = queries).
        u32 pa[BM / 16][4], da[BM / 16][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qc = mt * 8 + 2 * tig + (e & 1);
                float pv = ex2(st[mt][e] * p.scale_log2 - cL[qc] * LOG2E);
                if (!full) {
                    i64 i = m0 + qc, j = krow0 + (e >> 1) * 8;
                    if (!visible(p, i, j, cSg[qc], segk[e >> 1])) pv = 0.f;
                }
                st[mt][e] = pv;
                dpt[mt][e] = pv * (dpt[mt][e] - cDi[qc]);
            }
        }
#pragma unroll
        for (int kc = 0; kc < BM / 16; kc++) {
            pa[kc][0] = pack2<F16>(st[2 * kc][0], st[2 * kc][1]);
            pa[kc][1] = pack2<F16>(st[2 * kc][2], st[2 * kc][3]);
            pa[kc][2] = pack2<F16>(st[2 * kc + 1][0], st[2 * kc + 1][1]);
            pa[kc][3] = pack2<F16>(st[2 * kc + 1][2], st[2 * kc + 1][3]);
            da[kc][0] = pack2<F16>(dpt[2 * kc][0], dpt[2 * kc][1]);
            da[kc][1] = pack2<F16>(dpt[2 * kc][2], dpt[2 * kc][3]);
            da[kc][2] = pack2<F16>(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]);
            da[kc][3] = pack2<F16>(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3]);
        }
        // dS^T -> shared memory ([key][query]) first, so its stores overlap the mma below.
#pragma unroll
        for (int kc = 0; kc < BM / 16; kc++) {
            int r = warp * 16 + g, c = kc * 16 + 2 * tig;
            *(u32*)(sdS + r * SS + c) = da[kc][0];
            *(u32*)(sdS + (r + 8) * SS + c) = da[kc][1];
            *(u32*)(sdS + r * SS + c + 8) = da[kc][2];
            *(u32*)(sdS + (r + 8) * SS + c + 8) = da[kc][3];
        }
        // dV += P^T dO, dK += dS^T Q.
#pragma unroll
        for (int kc = 0; kc < BM / 16; kc++) {
#pragma unroll
            for (int dp = 0; dp < DN / 2; dp++) {
                u32 b0, b1, b2, b3;
                int off = (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + dp * 16 + (lane >> 4) * 8;
                ldsm_x4_t(smem_addr(cdO + off), b0, b1, b2, b3);
                mma16816<F16>(dv[2 * dp], pa[kc], b0, b1);
                mma16816<F16>(dv[2 * dp + 1], pa[kc], b2, b3);
                ldsm_x4_t(smem_addr(cQ + off), b0, b1, b2, b3);
                mma16816<F16>(dk[2 * dp], da[kc], b0, b1);
                mma16816<F16>(dk[2 * dp + 1], da[kc], b2, b3);
            }
        }
        __syncthreads();  // dS^T is complete; buffer `buf` is free
        int snn = sn < steps ? next_step(sn + 1) : steps;
        if (snn < steps) load_step(snn, buf);
        cp_async_commit();
        // dQ_acc[query tile mw, columns of group cg] += dS K over this block's BN keys.
        const int mw = warp % MK, cg = warp / MK;
        float dq[DNW][4];
#pragma unroll
        for (int i = 0; i < DNW; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BN / 16; kc++) {
            u32 a[4];
            ldsm_x4_t(smem_addr(sdS + (kc * 16 + (lane & 7) + ((lane >> 4) << 3)) * SS + mw * 16 + ((lane >> 3) & 1) * 8), a[0],
                      a[1], a[2], a[3]);
#pragma unroll
            for (int dp = 0; dp < DNW / 2; dp++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(smem_addr(sK + (kc * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * S + (cg * DNW + 2 * dp) * 8 +
                                    (lane >> 4) * 8),
                          b0, b1, b2, b3);
                mma16816<F16>(dq[2 * dp], a, b0, b1);
                mma16816<F16>(dq[2 * dp + 1], a, b2, b3);
            }
        }
        float* dqa = (float*)p.dq_acc + b * T * qw + hh * D;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            i64 i = m0 + mw * 16 + g + r * 8;
            if (i < T) {
#pragma unroll
                for (int dt = 0; dt < DNW; dt++)
                    red_add2(dqa + i * qw + (cg * DNW + dt) * 8 + 2 * tig, dq[dt][2 * r], dq[dt][2 * r + 1]);
            }
        }
        s = sn;
        sn = snn;
        buf ^= 1;
    }
    cp_async_wait_all();

    u16* dK = (u16*)p.dk + b * T * kw + kh * D;
    u16* dV = (u16*)p.dv + b * T * kw + kh * D;
#pragma unroll
    for (int r = 0; r < 2; r++) {
        i64 j = krow0 + r * 8;
        if (j < T) {
#pragma unroll
            for (int dt = 0; dt < DN; dt++) {
                *(u32*)(dK + j * kw + dt * 8 + 2 * tig) = pack2<F16>(dk[dt][2 * r] * p.scale, dk[dt][2 * r + 1] * p.scale);
                *(u32*)(dV + j * kw + dt * 8 + 2 * tig) = pack2<F16>(dv[dt][2 * r], dv[dt][2 * r + 1]);
            }
        }
    }
}

// Shared memory bytes (src/backend/cuda/attention.rs computes the same), with G the granules
// per row (ceil(T / 32)):
//   forward:  (BM + 4 BN) (D + 8) 2 + 2 BN 4 + 8 G                      BM = 64 MW
//   backward: (2 BN + 4 BM) (D + 8) 2 + BN (BM + 8) 2 + 6 BM 4 + 8 G     BN = 16 NW
#define FLASH_ENTRIES_(D, MW, BN, NW, BM, F16, NAME)                                                   \
    extern "C" __global__ void __launch_bounds__(128) flash_fwd_##NAME##_##D##_m##MW##_n##BN(FlashParams p) { \
        flash_fwd<D, MW, BN, F16>(p);                                                                  \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                              \
        flash_bwd_##NAME##_##D##_w##NW##_m##BM(FlashParams p) {                                        \
        flash_bwd<D, NW, BM, F16>(p);                                                                  \
    }
#define FLASH_ENTRIES(D, MW, BN, NW, BM, F16, NAME) FLASH_ENTRIES_(D, MW, BN, NW, BM, F16, NAME)

// The backend compiles one variant at a time (-DFLASH_D=.. -DFLASH_MW=.. -DFLASH_BN=..
// -DFLASH_NW=.. -DFLASH_BM=.. -DFLASH_F16=.. -DFLASH_NAME=..); without them a set of
// variants is compiled (a check of the whole file).
#ifdef FLASH_D
FLASH_ENTRIES(FLASH_D, FLASH_MW, FLASH_BN, FLASH_NW, FLASH_BM, FLASH_F16, FLASH_NAME)
#else
FLASH_ENTRIES(64, 1, 64, 8, 64, false, bf16)
FLASH_ENTRIES(96, 2, 64, 8, 64, false, bf16)
FLASH_ENTRIES(128, 2, 64, 8, 64, false, bf16)
FLASH_ENTRIES(64, 1, 64, 8, 64, true, f16)
FLASH_ENTRIES(96, 2, 64, 8, 64, true, f16)
FLASH_ENTRIES(128, 2, 64, 8, 64, true, f16)
FLASH_ENTRIES(64, 2, 32, 4, 32, false, bf16)
FLASH_ENTRIES(128, 2, 32, 4, 64, false, bf16)
#endif
