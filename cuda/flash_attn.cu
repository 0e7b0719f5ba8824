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
// copied to shared memory once per block. Each block first flags every tile it may visit
// as hidden, partly visible or entirely visible (one byte per tile in shared memory, all
// threads together), so the main loop reads a flag instead of recomputing ranges; element
// masks (32-bit position spans and segment ids, no branches) apply only to partly visible
// tiles. Shared-memory addresses are 32-bit bases plus compile-time offsets and each thread
// copies a fixed 16-byte column of the tiles, which keeps integer work per tile small next to
// the tensor-core work (the loop was once issue-bound on address and mask arithmetic).
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
    if constexpr (NT % CPR == 0) {
        // Each thread copies one fixed chunk column of every (NT / CPR)-th row: the loop is
        // unrolled and its addresses are a base plus constants.
        constexpr int RPI = NT / CPR;
        const int cc = threadIdx.x % CPR, rr = threadIdx.x / CPR;
        const u16* src = g + (r0 + rr) * gs + cc * 8;
        const u32 dst = smem_addr(s + rr * S + cc * 8);
#pragma unroll
        for (int it = 0; it < (R + RPI - 1) / RPI; it++) {
            const int r = rr + it * RPI;
            if (R % RPI == 0 || r < R) {
                const bool ok = r0 + r < T;
                cp_async16(dst + it * RPI * S * 2, ok ? src + it * RPI * gs : g, ok ? 16 : 0);
            }
        }
    } else {
        for (int c = threadIdx.x; c < R * CPR; c += NT) {
            int r = c / CPR, cc = c - r * CPR;
            i64 row = r0 + r;
            bool ok = row < T;
            cp_async16(smem_addr(s + r * S + cc * 8), g + (ok ? row : 0) * gs + cc * 8, ok ? 16 : 0);
        }
    }
}

// Copies tiles of R rows x D 16-bit columns of a row-major matrix (row stride `gs`) into
// shared memory (row stride S elements) with NT threads. When NT is a multiple of the
// chunks per row, each thread always copies the same 16-byte chunk column of rows rr,
// rr + NT / CPR, ..., so every address is a per-thread base plus constants.
template <int R, int D, int S, int NT>
struct TileCopy {
    static constexpr int CPR = D / 8, RPI = NT / CPR, IT = (R + RPI - 1) / RPI;
    static constexpr bool FIXED = NT % CPR == 0;
    const u16* g;           // the matrix
    const u16* src[IT];     // this thread's chunk of rows rr + it RPI
    i64 gs;
    u32 dst;  // this thread's shared address in a tile at byte 0 (tile0 + chunk offset)
    u32 tile0;
    int rr;
    __device__ __forceinline__ TileCopy(const u16* g_, i64 gs_, u32 tile0_) : g(g_), gs(gs_), tile0(tile0_) {
        const int cc = FIXED ? threadIdx.x % CPR : 0;
        rr = FIXED ? threadIdx.x / CPR : 0;
#pragma unroll
        for (int it = 0; it < IT; it++) src[it] = g + (rr + it * RPI) * gs + cc * 8;
        dst = tile0 + (rr * S + cc * 8) * 2;
    }
    // Rows [r0, r0 + R) into the tile `off` bytes after tile0; rows at or past T are zeros
    // (a zero-size copy reads nothing, so their addresses need not be valid).
    __device__ __forceinline__ void copy(int r0, int T, u32 off) const {
        if constexpr (FIXED) {
            const i64 o = (i64)r0 * gs;
            const int left = T - r0 - rr;  // this thread's rows it * RPI < left exist
#pragma unroll
            for (int it = 0; it < IT; it++) {
                if (R % RPI == 0 || rr + it * RPI < R)
                    cp_async16(dst + off + it * RPI * S * 2, src[it] + o, it * RPI < left ? 16 : 0);
            }
        } else {
            for (int c = threadIdx.x; c < R * CPR; c += NT) {
                const int r = c / CPR, cc = c - r * CPR;
                const bool ok = r0 + r < T;
                cp_async16(tile0 + off + (r * S + cc * 8) * 2, g + (ok ? (i64)(r0 + r) : 0) * gs + cc * 8, ok ? 16 : 0);
            }
        }
    }
};

// The visible positions [lo, hi] of the other side for position i, by the causal and window
// rules and the row length T (empty when i >= T). For a query i these are keys; for a key j
// (the backward's rows) pass `keys = false` to get queries.
__device__ __forceinline__ void visible_span(const FlashParams& p, i64 i, bool keys, int& lo, int& hi) {
    const int T = (int)p.T, x = (int)i;
    if (i >= p.T) {
        lo = 1;
        hi = 0;
        return;
    }
    lo = 0;
    hi = T - 1;
    if (p.causal) {
        if (keys) hi = x;
        else lo = x;
    }
    if (p.window > 0) {
        lo = max(lo, x - p.window + 1);
        hi = min(hi, x + p.window - 1);
    }
}

// Tile flags: 0 nothing visible, 1 partly visible (element masks apply), 2 all visible.
#define TILE_HIDDEN 0
#define TILE_MASKED 1
#define TILE_FULL 2

// 4 bytes global -> shared; `bytes` 0 fills zeros.
__device__ __forceinline__ void cp_async4(u32 dst, const void* src, int bytes) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(dst), "l"(src), "r"(bytes));
}
// Waits until at most one committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

// Min and max segment id of each GRAN tokens of each row: out[b * ngr + g].
extern "C" __global__ void flash_seg_ranges(const int* seg, i64 B, i64 T, int ngr, int2* out) {
    grid_dep_wait();
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

// Grid (tiles, heads, batch) walked tile-slowest: the hardware starts blocks roughly in
// linear order, so every head's tile 0 runs in the first wave, tile 1 next, and so on. Each
// kernel maps tile 0 to its longest causal work, so the last wave holds only short blocks
// (longest-processing-time-first scheduling) instead of one head's longest tile starting
// near the end and running alone.
struct BlockOrder {
    int tile, h, b;
};
__device__ __forceinline__ BlockOrder block_order(bool lpt) {
    if (!lpt) return BlockOrder{(int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z};
    const u32 hb = gridDim.y * gridDim.z;
    const u32 l = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const u32 r = l % hb;
    return BlockOrder{(int)(l / hb), (int)(r % gridDim.y), (int)(r / gridDim.y)};
}

// The backward walks the grid tile-slowest only up to this many blocks (measured on the
// H200: fewer blocks gain from the shorter tail; with more, one head's tiles running side by
// side share its queries in L2, which the tile-slowest order loses).
#ifndef FLASH_LPT_MAX
#define FLASH_LPT_MAX 4096
#endif

// Forward. MW m16 tiles per warp (BM = 64 MW query rows), key tiles of BN.
template <int D, int MW, int BN, bool F16>
__device__ void flash_fwd(const FlashParams& p) {
    constexpr int NW = 4, BM = 16 * MW * NW, S = D + 8, DK = D / 16, DN = D / 8, NT = BN / 8, NTH = NW * 32;
    // Q stays in registers for the whole block where the score accumulators leave room (with
    // two m-tiles, 128 keys and head dim 64 it would spill: measured 10% slower on the H200).
    constexpr bool QREG = MW == 1 || (D <= 64 && BN <= 64);
    extern __shared__ __align__(16) u16 smem[];
    u16* sQ = smem;                     // [BM][S]
    u16* sK = sQ + BM * S;              // [2][BN][S]
    u16* sV = sK + 2 * BN * S;          // [2][BN][S]
    int* sSeg = (int*)(sV + 2 * BN * S);  // [2][BN]
    int2* sRng = (int2*)(sSeg + 2 * BN);  // granule ranges
    u8* sFlag = (u8*)(sRng + p.ngr);      // per key tile: TILE_*
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const BlockOrder o = block_order(true);
    const i64 b = o.b, T = p.T;
    const int h = o.h, kh = h / (p.Hq / p.Hkv);
    const i64 q0 = (i64)(gridDim.x - 1 - o.tile) * BM;  // the last queries see the most keys
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
    const int wrow = warp * 16 * MW;
    // Which key tiles this block sees, and which of them need element masks: decided once,
    // by all threads together, so the loop below only reads a flag.
    for (int t = t_lo + tid; t < t_hi; t += NTH) {
        u8 f = TILE_HIDDEN;
        if (!pos_hidden(p, q0, nq, (i64)t * BN, BN)) {
            int a, c;
            srange(sRng, goff, (i64)t * BN, BN, T, a, c);
            if (c >= qs_lo && a <= qs_hi)
                f = pos_full(p, q0, BM, (i64)t * BN, BN) && a == c && qs_lo == qs_hi && a == qs_lo ? TILE_FULL
                                                                                                   : TILE_MASKED;
        }
        sFlag[t - t_lo] = f;
    }
    __syncthreads();
    auto next_tile = [&](int t) {
#pragma unroll 1
        while (t < t_hi && sFlag[t - t_lo] == TILE_HIDDEN) t++;
        return t;
    };
    // Shared addresses as a base plus constants (the tile loops are unrolled).
    const u32 sb = smem_addr(smem), sbK = sb + BM * S * 2, sbV = sbK + 2 * BN * S * 2, sbSeg = smem_addr(sSeg);
    const TileCopy<BN, D, S, NTH> kcopy(K, kw, sbK), vcopy(V, kw, sbV);
    const int Ti = (int)T;
    auto load_kv = [&](int t, int buf) {
        const int n0 = t * BN;
        kcopy.copy(n0, Ti, buf * BN * S * 2);
        vcopy.copy(n0, Ti, buf * BN * S * 2);
        for (int r = tid; r < BN; r += NTH) {
            bool ok = n0 + r < Ti;
            cp_async4(sbSeg + (buf * BN + r) * 4, seg + (ok ? n0 + r : 0), ok ? 4 : 0);
        }
    };
    // Per-lane parts of the ldmatrix addresses (elements): Q and K rows, V rows (transposed).
    const u32 aQ = sb + ((wrow + (lane & 15)) * S + (lane >> 4) * 8) * 2;
    const u32 aK = sbK + (((lane & 7) + ((lane >> 4) << 3)) * S + ((lane >> 3) & 1) * 8) * 2;
    const u32 aV = sbV + (((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8) * 2;

    // Thread rows: warp rows 16 MW w + 16 mi + g (+ 8 for the second half of a tile), each
    // with its segment id and the span of keys the position rules let it see.
    int segq[MW][2], jlo[MW][2], jhi[MW][2];
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int r = 0; r < 2; r++) {
            i64 i = q0 + wrow + mi * 16 + g + r * 8;
            segq[mi][r] = i < T ? seg[i] : 0;
            visible_span(p, i, true, jlo[mi][r], jhi[mi][r]);
        }

    float acc[MW][DN][4];
#pragma unroll
    for (int mi = 0; mi < MW; mi++)
#pragma unroll
        for (int i = 0; i < DN; i++) acc[mi][i][0] = acc[mi][i][1] = acc[mi][i][2] = acc[mi][i][3] = 0.f;
    // Running row maxima of the raw scores q.k, and partial row sums of 2^(scale log2(e) (s - m)).
    float mrow[MW][2], lrow[MW][2];
#pragma unroll
    for (int mi = 0; mi < MW; mi++) mrow[mi][0] = mrow[mi][1] = NEG_INF, lrow[mi][0] = lrow[mi][1] = 0.f;
    u32 qf[QREG ? MW : 1][QREG ? DK : 1][4];
    const float sl2 = p.scale_log2;

    int t = next_tile(t_lo);
    int tn = t < t_hi ? next_tile(t + 1) : t_hi;
    TileCopy<BM, D, S, NTH>(Q, qw, sb).copy((int)q0, Ti, 0);
    if (t < t_hi) load_kv(t, 0);
    cp_async_commit();
    if (tn < t_hi) load_kv(tn, 1);
    cp_async_commit();
    int buf = 0;
    bool first = true;
    while (t < t_hi) {
        const int n0 = t * BN;
        const u32 cK = aK + buf * BN * S * 2, cV = aV + buf * BN * S * 2;
        const int* cSeg = sSeg + buf * BN;
        const bool full = sFlag[t - t_lo] == TILE_FULL;
        cp_async_wait_1();
        __syncthreads();
        if (QREG && first) {
#pragma unroll
            for (int mi = 0; mi < (QREG ? MW : 1); mi++)
#pragma unroll
                for (int kc = 0; kc < (QREG ? DK : 1); kc++)
                    ldsm_x4(aQ + (mi * 16 * S + kc * 16) * 2, qf[mi][kc][0], qf[mi][kc][1], qf[mi][kc][2], qf[mi][kc][3]);
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
                    ldsm_x4(aQ + (mi * 16 * S + kc * 16) * 2, qa[mi][0], qa[mi][1], qa[mi][2], qa[mi][3]);
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                u32 b0, b1, b2, b3;
                ldsm_x4(cK + (np * 16 * S + kc * 16) * 2, b0, b1, b2, b3);
#pragma unroll
                for (int mi = 0; mi < MW; mi++) {
                    mma16816<F16>(s[mi][2 * np], qa[mi], b0, b1);
                    mma16816<F16>(s[mi][2 * np + 1], qa[mi], b2, b3);
                }
            }
        }
        if (!full) {
            // Element masks (tiles on the causal diagonal, window edges, segment borders).
#pragma unroll
            for (int mi = 0; mi < MW; mi++)
#pragma unroll
                for (int nt = 0; nt < NT; nt++)
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int jj = nt * 8 + 2 * tig + (e & 1), j = n0 + jj, r = e >> 1;
                        const bool ok = (j >= jlo[mi][r]) & (j <= jhi[mi][r]) & (cSeg[jj] == segq[mi][r]);
                        s[mi][nt][e] = ok ? s[mi][nt][e] : NEG_INF;
                    }
        }
#pragma unroll
        for (int mi = 0; mi < MW; mi++) {
            // Online softmax, per row; the four threads of a quad share a row. The scale is
            // applied inside the exponent: 2^(sl2 s - sl2 m) is one FMA and one ex2.
#pragma unroll
            for (int r = 0; r < 2; r++) {
                float mx = NEG_INF;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * r], s[mi][nt][2 * r + 1]));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mn = fmaxf(mrow[mi][r], mx);
                const float msc = mn == NEG_INF ? 0.f : mn * sl2;
                const float corr = ex2(fmaf(mrow[mi][r], sl2, -msc));
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    float a = ex2(fmaf(s[mi][nt][2 * r], sl2, -msc)), c = ex2(fmaf(s[mi][nt][2 * r + 1], sl2, -msc));
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
                ldsm_x4_t(cV + (kc * 16 * S + dp * 16) * 2, b0, b1, b2, b3);
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
                if (tig == 0) lse[row] = (mrow[mi][r] * sl2 + __log2f(l)) * LN2;
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
    u8* sFlag = (u8*)(sRng + p.ngr);         // per query tile: TILE_*
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const BlockOrder o = block_order(gridDim.x * gridDim.y * gridDim.z <= FLASH_LPT_MAX);
    const i64 b = o.b, T = p.T;
    const int Ti = (int)T;
    const int kh = o.h, group = p.Hq / p.Hkv;
    const i64 n0 = (i64)o.tile * BN;  // the first keys are seen by the most queries
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
    // Which query tiles see some key of this block, and which need element masks (the same
    // for every head of the group): decided once by all threads.
    for (int mt = mt_lo + tid; mt < mt_hi; mt += NTH) {
        const i64 m0 = (i64)mt * BM;
        u8 f = TILE_HIDDEN;
        if (!pos_hidden(p, m0, BM, n0, nk)) {
            int a, c;
            srange(sRng, goff, m0, BM, T, a, c);
            if (c >= ks_lo && a <= ks_hi)
                f = pos_full(p, m0, BM, n0, BN) && a == c && ks_lo == ks_hi && a == ks_lo ? TILE_FULL : TILE_MASKED;
        }
        sFlag[mt - mt_lo] = f;
    }
    __syncthreads();
    // Steps walk (head of the group, query tile) with the query tile fastest; `next` moves to
    // the next visible one (hh == group: done).
    struct Step {
        int hh, mt;
    };
    auto next = [&](Step st) {
#pragma unroll 1
        while (st.hh < group) {
            if (++st.mt == mt_hi) {
                st.mt = mt_lo;
                st.hh++;
            }
            if (st.hh < group && sFlag[st.mt - mt_lo] != TILE_HIDDEN) break;
        }
        return st;
    };
    auto first_step = [&]() {
        Step st{0, mt_lo - 1};
        return mt_lo < mt_hi ? next(st) : Step{group, mt_lo};
    };

    // Shared addresses as a base plus constants.
    const u32 sb = smem_addr(smem), sbV = sb + BN * S * 2, sbQ = sbV + BN * S * 2, sbdO = sbQ + 2 * BM * S * 2;
    const u32 sbdS = sbdO + 2 * BM * S * 2, sbL = smem_addr(sL), sbDi = smem_addr(sDi), sbSg = smem_addr(sSg);
    // Loads the query-side tiles of step st into buffer `buf`: Q, dO, lse, Di, segment ids.
    auto load_step = [&](Step st, int buf) {
        const int hh = kh * group + st.hh, m0 = st.mt * BM;
        TileCopy<BM, D, S, NTH>((const u16*)p.q + b * T * qw + hh * D, qw, sbQ).copy(m0, Ti, buf * BM * S * 2);
        TileCopy<BM, D, S, NTH>((const u16*)p.d_o + b * T * qw + hh * D, qw, sbdO).copy(m0, Ti, buf * BM * S * 2);
        const i64 lrow = (b * p.Hq + hh) * T;
        for (int r = tid; r < BM; r += NTH) {
            const int i = m0 + r, ok = i < Ti ? 4 : 0, ii = i < Ti ? i : 0;
            cp_async4(sbL + (buf * BM + r) * 4, (const float*)p.lse + lrow + ii, ok);
            cp_async4(sbDi + (buf * BM + r) * 4, (const float*)p.Di + lrow + ii, ok);
            cp_async4(sbSg + (buf * BM + r) * 4, seg + ii, ok);
        }
    };

    const i64 krow0 = n0 + warp * 16 + g;  // this thread's key rows: krow0, krow0 + 8
    int segk[2], ilo[2], ihi[2];  // their segment ids and the queries the position rules let see them
#pragma unroll
    for (int r = 0; r < 2; r++) {
        segk[r] = krow0 + 8 * r < T ? seg[krow0 + 8 * r] : 0;
        visible_span(p, krow0 + 8 * r, false, ilo[r], ihi[r]);
    }
    float dk[DN][4], dv[DN][4];
#pragma unroll
    for (int i = 0; i < DN; i++) dk[i][0] = dk[i][1] = dk[i][2] = dk[i][3] = dv[i][0] = dv[i][1] = dv[i][2] = dv[i][3] = 0.f;
    u32 kf[KVREG ? DK : 1][4], vf[KVREG ? DK : 1][4];
    // Per-lane parts of the ldmatrix addresses (bytes).
    const u32 aKV = ((warp * 16 + (lane & 15)) * S + (lane >> 4) * 8) * 2;                  // K, V rows (A operand)
    const u32 aQB = (((lane & 7) + ((lane >> 4) << 3)) * S + ((lane >> 3) & 1) * 8) * 2;     // Q, dO (B operand)
    const u32 aQT = (((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8) * 2;       // Q, dO transposed
    const u32 aDS = (((lane & 7) + ((lane >> 4) << 3)) * SS + ((lane >> 3) & 1) * 8) * 2;    // dS^T transposed
    const u32 aKT = aQT;                                                                       // K transposed

    TileCopy<BN, D, S, NTH>(K, kw, sb).copy((int)n0, Ti, 0);
    TileCopy<BN, D, S, NTH>(V, kw, sbV).copy((int)n0, Ti, 0);
    Step st = first_step();
    Step sn = st.hh < group ? next(st) : st;
    if (st.hh < group) load_step(st, 0);
    cp_async_commit();
    if (sn.hh < group) load_step(sn, 1);
    cp_async_commit();
    int buf = 0;
    bool first = true;
    const float sl2 = p.scale_log2;
    while (st.hh < group) {
        const int hh = kh * group + st.hh, m0 = st.mt * BM;
        const u32 cQ = sbQ + buf * BM * S * 2, cdO = sbdO + buf * BM * S * 2;
        const float* cL = sL + buf * BM;
        const float* cDi = sDi + buf * BM;
        const int* cSg = sSg + buf * BM;
        const bool full = sFlag[st.mt - mt_lo] == TILE_FULL;
        cp_async_wait_1();
        __syncthreads();
        if (KVREG && first) {
#pragma unroll
            for (int kc = 0; kc < (KVREG ? DK : 1); kc++) {
                ldsm_x4(sb + aKV + kc * 32, kf[kc][0], kf[kc][1], kf[kc][2], kf[kc][3]);
                ldsm_x4(sbV + aKV + kc * 32, vf[kc][0], vf[kc][1], vf[kc][2], vf[kc][3]);
            }
        }
        first = false;
        // S^T = K Q^T and dP^T = V dO^T for this warp's 16 keys.
        float st_[MT][4], dpt[MT][4];
#pragma unroll
        for (int i = 0; i < MT; i++)
            st_[i][0] = st_[i][1] = st_[i][2] = st_[i][3] = dpt[i][0] = dpt[i][1] = dpt[i][2] = dpt[i][3] = 0.f;
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
                ldsm_x4(sb + aKV + kc * 32, ka[0], ka[1], ka[2], ka[3]);
                ldsm_x4(sbV + aKV + kc * 32, va[0], va[1], va[2], va[3]);
            }
#pragma unroll
            for (int mp = 0; mp < MT / 2; mp++) {
                u32 b0, b1, b2, b3;
                const u32 off = aQB + (mp * 16 * S + kc * 16) * 2;
                ldsm_x4(cQ + off, b0, b1, b2, b3);
                mma16816<F16>(st_[2 * mp], ka, b0, b1);
                mma16816<F16>(st_[2 * mp + 1], ka, b2, b3);
                ldsm_x4(cdO + off, b0, b1, b2, b3);
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
                const int qc = mt * 8 + 2 * tig + (e & 1), r = e >> 1;
                float pv = ex2(fmaf(st_[mt][e], sl2, -cL[qc] * LOG2E));
                if (!full) {
                    const int i = m0 + qc;
                    const bool ok = (i >= ilo[r]) & (i <= ihi[r]) & (cSg[qc] == segk[r]);
                    pv = ok ? pv : 0.f;
                }
                st_[mt][e] = pv;
                dpt[mt][e] = pv * (dpt[mt][e] - cDi[qc]);
            }
        }
#pragma unroll
        for (int kc = 0; kc < BM / 16; kc++) {
            pa[kc][0] = pack2<F16>(st_[2 * kc][0], st_[2 * kc][1]);
            pa[kc][1] = pack2<F16>(st_[2 * kc][2], st_[2 * kc][3]);
            pa[kc][2] = pack2<F16>(st_[2 * kc + 1][0], st_[2 * kc + 1][1]);
            pa[kc][3] = pack2<F16>(st_[2 * kc + 1][2], st_[2 * kc + 1][3]);
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
                const u32 off = aQT + (kc * 16 * S + dp * 16) * 2;
                ldsm_x4_t(cdO + off, b0, b1, b2, b3);
                mma16816<F16>(dv[2 * dp], pa[kc], b0, b1);
                mma16816<F16>(dv[2 * dp + 1], pa[kc], b2, b3);
                ldsm_x4_t(cQ + off, b0, b1, b2, b3);
                mma16816<F16>(dk[2 * dp], da[kc], b0, b1);
                mma16816<F16>(dk[2 * dp + 1], da[kc], b2, b3);
            }
        }
        __syncthreads();  // dS^T is complete; buffer `buf` is free
        const Step snn = sn.hh < group ? next(sn) : sn;
        if (snn.hh < group) load_step(snn, buf);
        cp_async_commit();
        // dQ_acc[query tile mw, columns of group cg] += dS K over this block's BN keys.
        const int mw = warp % MK, cg = warp / MK;
        float dq[DNW][4];
#pragma unroll
        for (int i = 0; i < DNW; i++) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BN / 16; kc++) {
            u32 a[4];
            ldsm_x4_t(sbdS + aDS + (kc * 16 * SS + mw * 16) * 2, a[0], a[1], a[2], a[3]);
#pragma unroll
            for (int dp = 0; dp < DNW / 2; dp++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(sb + aKT + (kc * 16 * S + (cg * DNW + 2 * dp) * 8) * 2, b0, b1, b2, b3);
                mma16816<F16>(dq[2 * dp], a, b0, b1);
                mma16816<F16>(dq[2 * dp + 1], a, b2, b3);
            }
        }
        float* dqa = (float*)p.dq_acc + b * T * qw + hh * D;
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const int i = m0 + mw * 16 + g + r * 8;
            if (i < Ti) {
#pragma unroll
                for (int dt = 0; dt < DNW; dt++)
                    red_add2(dqa + i * qw + (cg * DNW + dt) * 8 + 2 * tig, dq[dt][2 * r], dq[dt][2 * r + 1]);
            }
        }
        st = sn;
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

// Backward, warp-pair layout: fewer shared-memory reads per mma than flash_bwd, whose warps
// each re-read the whole query tile for 16 keys. NW warps form NW / 2 pairs; pair w / 2 owns
// keys 32 (w / 2) .. 32 (w / 2) + 31 (BN = 16 NW keys per block, as in flash_bwd). Per query
// tile of BM rows:
//   S^T, dP^T for the pair's 32 keys and query half w % 2 (BM / 2 queries, in chunks of at
//     most 32 so that BM = 128 costs no more registers than 64): each Q or dO fragment read
//     from shared memory feeds both of the warp's key m-tiles;
//   P^T, dS^T -> shared memory, each warp its own 32 x BM / 2 quarter;
//   dV += P^T dO, dK += dS^T Q for the pair's 32 keys and column half w % 2 (D / 2) over all
//     BM queries: the warp's own query half from registers (chunk by chunk), its partner's
//     from shared memory (a 64-thread named barrier per pair orders the two);
//   dQ_acc += dS K with the warps splitting the queries (32 each) and D, as in flash_bwd.
// K and V stay in registers as A fragments up to this head dim with 64 queries per step
// (above it, or with 128 queries, they are read from shared memory each step: with 128 they
// would spill, measured 1.2% slower at head dim 64 on the H200).
#ifndef FLASH_PAIRS_KVREG_D
#define FLASH_PAIRS_KVREG_D 64
#endif
template <int D, int NW, int BM, bool F16>
__device__ void flash_bwd_pairs(const FlashParams& p) {
    constexpr int BN = 16 * NW, S = D + 8, SS = BM + 8, DK = D / 16, NTH = NW * 32;
    constexpr int QH = BM / 2, QC = QH < 32 ? QH : 32, NC = QH / QC;       // S phase: QH queries per warp in NC chunks
    constexpr int NQ = QC / 8, KQ = QC / 16;
    constexpr int DH = D / 2, ND = DH / 8;                                 // dK/dV phase: columns per warp
    constexpr int MQ = BM / 32, CW = NW / MQ, DQC = D / CW, NDQ = DQC / 8;  // dQ phase
    static_assert(NW % 2 == 0 && BM % 32 == 0 && NW % MQ == 0 && D % CW == 0 && DQC % 16 == 0 && DH % 16 == 0,
                  "unsupported backward tiling");
    constexpr bool KVREG = D <= FLASH_PAIRS_KVREG_D && BM <= 64;
    // Query-side buffers: two (the next step loads while this one runs) but for 128 queries
    // above head dim 64, where two do not fit in shared memory; with one, the next step's
    // load overlaps this step's dQ phase only (which reads dS^T and K, not Q or dO).
    constexpr int QB = BM == 128 && D > 64 ? 1 : 2;
    extern __shared__ __align__(16) u16 smem[];
    u16* sK = smem;                          // [BN][S]
    u16* sV = sK + BN * S;                   // [BN][S]
    u16* sQ = sV + BN * S;                   // [QB][BM][S]
    u16* sdO = sQ + QB * BM * S;             // [QB][BM][S]
    u16* sP = sdO + QB * BM * S;             // [BN][SS] P^T
    u16* sdS = sP + BN * SS;                 // [BN][SS] dS^T
    float* sL = (float*)(sdS + BN * SS);     // [QB][BM] lse
    float* sDi = sL + QB * BM;               // [QB][BM]
    int* sSg = (int*)(sDi + QB * BM);        // [QB][BM] segment ids of the queries
    int2* sRng = (int2*)(sSg + QB * BM);     // granule ranges
    u8* sFlag = (u8*)(sRng + p.ngr);         // per query tile: TILE_*
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, tig = lane & 3;
    const int pair = warp >> 1, half = warp & 1;
    const BlockOrder o = block_order(gridDim.x * gridDim.y * gridDim.z <= FLASH_LPT_MAX);
    const i64 b = o.b, T = p.T;
    const int Ti = (int)T;
    const int kh = o.h, group = p.Hq / p.Hkv;
    const i64 n0 = (i64)o.tile * BN;  // the first keys are seen by the most queries
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
    for (int mt = mt_lo + tid; mt < mt_hi; mt += NTH) {
        const i64 m0 = (i64)mt * BM;
        u8 f = TILE_HIDDEN;
        if (!pos_hidden(p, m0, BM, n0, nk)) {
            int a, c;
            srange(sRng, goff, m0, BM, T, a, c);
            if (c >= ks_lo && a <= ks_hi)
                f = pos_full(p, m0, BM, n0, BN) && a == c && ks_lo == ks_hi && a == ks_lo ? TILE_FULL : TILE_MASKED;
        }
        sFlag[mt - mt_lo] = f;
    }
    __syncthreads();
    struct Step {
        int hh, mt;
    };
    auto next = [&](Step st) {
#pragma unroll 1
        while (st.hh < group) {
            if (++st.mt == mt_hi) {
                st.mt = mt_lo;
                st.hh++;
            }
            if (st.hh < group && sFlag[st.mt - mt_lo] != TILE_HIDDEN) break;
        }
        return st;
    };
    auto first_step = [&]() {
        Step st{0, mt_lo - 1};
        return mt_lo < mt_hi ? next(st) : Step{group, mt_lo};
    };

    const u32 sb = smem_addr(smem), sbV = sb + BN * S * 2, sbQ = sbV + BN * S * 2, sbdO = sbQ + QB * BM * S * 2;
    const u32 sbP = sbdO + QB * BM * S * 2, sbdS = sbP + BN * SS * 2;
    const u32 sbL = smem_addr(sL), sbDi = smem_addr(sDi), sbSg = smem_addr(sSg);
    auto load_step = [&](Step st, int buf) {
        const int hh = kh * group + st.hh, m0 = st.mt * BM;
        TileCopy<BM, D, S, NTH>((const u16*)p.q + b * T * qw + hh * D, qw, sbQ).copy(m0, Ti, buf * BM * S * 2);
        TileCopy<BM, D, S, NTH>((const u16*)p.d_o + b * T * qw + hh * D, qw, sbdO).copy(m0, Ti, buf * BM * S * 2);
        const i64 lrow = (b * p.Hq + hh) * T;
        for (int r = tid; r < BM; r += NTH) {
            const int i = m0 + r, ok = i < Ti ? 4 : 0, ii = i < Ti ? i : 0;
            cp_async4(sbL + (buf * BM + r) * 4, (const float*)p.lse + lrow + ii, ok);
            cp_async4(sbDi + (buf * BM + r) * 4, (const float*)p.Di + lrow + ii, ok);
            cp_async4(sbSg + (buf * BM + r) * 4, seg + ii, ok);
        }
    };

    const i64 krow0 = n0 + pair * 32 + g;  // this thread's key rows: krow0 + 16 mi + 8 r
    int segk[2][2], ilo[2][2], ihi[2][2];
#pragma unroll
    for (int mi = 0; mi < 2; mi++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const i64 j = krow0 + 16 * mi + 8 * r;
            segk[mi][r] = j < T ? seg[j] : 0;
            visible_span(p, j, false, ilo[mi][r], ihi[mi][r]);
        }
    }
    float dk[2][ND][4], dv[2][ND][4];
#pragma unroll
    for (int mi = 0; mi < 2; mi++)
#pragma unroll
        for (int i = 0; i < ND; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) dk[mi][i][e] = dv[mi][i][e] = 0.f;
    u32 kf[KVREG ? 2 : 1][KVREG ? DK : 1][4], vf[KVREG ? 2 : 1][KVREG ? DK : 1][4];
    // Per-lane parts of the ldmatrix addresses (bytes).
    const u32 aKV = ((pair * 32 + (lane & 15)) * S + (lane >> 4) * 8) * 2;                   // K, V rows (A)
    const u32 aPS = ((pair * 32 + (lane & 15)) * SS + (lane >> 4) * 8) * 2;                  // P^T, dS^T rows (A)
    const u32 aQB = (((lane & 7) + ((lane >> 4) << 3)) * S + ((lane >> 3) & 1) * 8) * 2;  // Q, dO (B)
    const u32 aQT = (((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8 + half * DH) * 2;     // Q, dO^T
    const u32 aDS = (((lane & 7) + ((lane >> 4) << 3)) * SS + ((lane >> 3) & 1) * 8) * 2;    // dS (A, transposed)
    const u32 aKT = (((lane & 7) + ((lane >> 3) & 1) * 8) * S + (lane >> 4) * 8) * 2;        // K (B, transposed)
    const u32 barrier = 1 + pair;  // named barrier of this pair (0 is __syncthreads)

    TileCopy<BN, D, S, NTH>(K, kw, sb).copy((int)n0, Ti, 0);
    TileCopy<BN, D, S, NTH>(V, kw, sbV).copy((int)n0, Ti, 0);
    Step st = first_step();
    Step sn = st.hh < group ? next(st) : st;
    if (st.hh < group) load_step(st, 0);
    cp_async_commit();
    if (QB == 2 && sn.hh < group) load_step(sn, 1);
    cp_async_commit();
    int buf = 0;
    bool first = true;
    const float sl2 = p.scale_log2;
    while (st.hh < group) {
        const int hh = kh * group + st.hh, m0 = st.mt * BM;
        const u32 cQ = sbQ + buf * BM * S * 2, cdO = sbdO + buf * BM * S * 2;
        const float* cL = sL + buf * BM;
        const float* cDi = sDi + buf * BM;
        const int* cSg = sSg + buf * BM;
        const bool full = sFlag[st.mt - mt_lo] == TILE_FULL;
        if (QB == 2) cp_async_wait_1();
        else cp_async_wait_all();
        __syncthreads();
        if (KVREG && first) {
#pragma unroll
            for (int mi = 0; mi < (KVREG ? 2 : 1); mi++)
#pragma unroll
                for (int kc = 0; kc < (KVREG ? DK : 1); kc++) {
                    const u32 off = aKV + (mi * 16 * S + kc * 16) * 2;
                    ldsm_x4(sb + off, kf[mi][kc][0], kf[mi][kc][1], kf[mi][kc][2], kf[mi][kc][3]);
                    ldsm_x4(sbV + off, vf[mi][kc][0], vf[mi][kc][1], vf[mi][kc][2], vf[mi][kc][3]);
                }
        }
        first = false;
        // The warp's query half in chunks of QC (registers bound the S accumulators).
#pragma unroll
        for (int ch = 0; ch < NC; ch++) {
            const int q0c = half * QH + QC * ch;
            // S^T = K Q^T and dP^T = V dO^T: the pair's 32 keys, this warp's query chunk.
            float st_[2][NQ][4], dpt[2][NQ][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
#pragma unroll
                for (int i = 0; i < NQ; i++)
#pragma unroll
                    for (int e = 0; e < 4; e++) st_[mi][i][e] = dpt[mi][i][e] = 0.f;
#pragma unroll
            for (int kc = 0; kc < DK; kc++) {
                u32 ka[2][4], va[2][4];
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    if (KVREG) {
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            ka[mi][e] = kf[KVREG ? mi : 0][KVREG ? kc : 0][e];
                            va[mi][e] = vf[KVREG ? mi : 0][KVREG ? kc : 0][e];
                        }
                    } else {
                        const u32 off = aKV + (mi * 16 * S + kc * 16) * 2;
                        ldsm_x4(sb + off, ka[mi][0], ka[mi][1], ka[mi][2], ka[mi][3]);
                        ldsm_x4(sbV + off, va[mi][0], va[mi][1], va[mi][2], va[mi][3]);
                    }
                }
#pragma unroll
                for (int mp = 0; mp < NQ / 2; mp++) {
                    u32 b0, b1, b2, b3;
                    const u32 off = aQB + ((q0c + mp * 16) * S + kc * 16) * 2;
                    ldsm_x4(cQ + off, b0, b1, b2, b3);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma16816<F16>(st_[mi][2 * mp], ka[mi], b0, b1);
                        mma16816<F16>(st_[mi][2 * mp + 1], ka[mi], b2, b3);
                    }
                    ldsm_x4(cdO + off, b0, b1, b2, b3);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma16816<F16>(dpt[mi][2 * mp], va[mi], b0, b1);
                        mma16816<F16>(dpt[mi][2 * mp + 1], va[mi], b2, b3);
                    }
                }
            }
            // P^T and dS^T. Element e of n-tile nt is query q0c + 8 nt + 2 tig + (e & 1) and
            // key row 16 mi + g + 8 (e >> 1) of the pair.
#pragma unroll
            for (int nt = 0; nt < NQ; nt++) {
                const int qc = q0c + nt * 8 + 2 * tig;
                const float2 lq = *(const float2*)(cL + qc), dq2 = *(const float2*)(cDi + qc);
                const int2 sq = full ? make_int2(0, 0) : *(const int2*)(cSg + qc);
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
#pragma unroll
                    for (int e = 0; e < 4; e++) {
                        const int c = e & 1, r = e >> 1;
                        float pv = ex2(fmaf(st_[mi][nt][e], sl2, -(c ? lq.y : lq.x) * LOG2E));
                        if (!full) {
                            const int i = m0 + qc + c;
                            const bool ok = (i >= ilo[mi][r]) & (i <= ihi[mi][r]) & ((c ? sq.y : sq.x) == segk[mi][r]);
                            pv = ok ? pv : 0.f;
                        }
                        st_[mi][nt][e] = pv;
                        dpt[mi][nt][e] = pv * (dpt[mi][nt][e] - (c ? dq2.y : dq2.x));
                    }
                }
            }
            // Packed as A operands (m = keys, k = queries) and stored for the partner and dQ.
            u32 pa[2][KQ][4], da[2][KQ][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
#pragma unroll
                for (int kc = 0; kc < KQ; kc++) {
                    pa[mi][kc][0] = pack2<F16>(st_[mi][2 * kc][0], st_[mi][2 * kc][1]);
                    pa[mi][kc][1] = pack2<F16>(st_[mi][2 * kc][2], st_[mi][2 * kc][3]);
                    pa[mi][kc][2] = pack2<F16>(st_[mi][2 * kc + 1][0], st_[mi][2 * kc + 1][1]);
                    pa[mi][kc][3] = pack2<F16>(st_[mi][2 * kc + 1][2], st_[mi][2 * kc + 1][3]);
                    da[mi][kc][0] = pack2<F16>(dpt[mi][2 * kc][0], dpt[mi][2 * kc][1]);
                    da[mi][kc][1] = pack2<F16>(dpt[mi][2 * kc][2], dpt[mi][2 * kc][3]);
                    da[mi][kc][2] = pack2<F16>(dpt[mi][2 * kc + 1][0], dpt[mi][2 * kc + 1][1]);
                    da[mi][kc][3] = pack2<F16>(dpt[mi][2 * kc + 1][2], dpt[mi][2 * kc + 1][3]);
                    const int r = pair * 32 + mi * 16 + g, c = q0c + kc * 16 + 2 * tig;
                    *(u32*)(sP + r * SS + c) = pa[mi][kc][0];
                    *(u32*)(sP + (r + 8) * SS + c) = pa[mi][kc][1];
                    *(u32*)(sP + r * SS + c + 8) = pa[mi][kc][2];
                    *(u32*)(sP + (r + 8) * SS + c + 8) = pa[mi][kc][3];
                    *(u32*)(sdS + r * SS + c) = da[mi][kc][0];
                    *(u32*)(sdS + (r + 8) * SS + c) = da[mi][kc][1];
                    *(u32*)(sdS + r * SS + c + 8) = da[mi][kc][2];
                    *(u32*)(sdS + (r + 8) * SS + c + 8) = da[mi][kc][3];
                }
            }
            // dV += P^T dO, dK += dS^T Q over this chunk (A from registers) ...
#pragma unroll
            for (int kc = 0; kc < KQ; kc++) {
#pragma unroll
                for (int dp = 0; dp < ND / 2; dp++) {
                    u32 b0, b1, b2, b3;
                    const u32 off = aQT + ((q0c + kc * 16) * S + dp * 16) * 2;
                    ldsm_x4_t(cdO + off, b0, b1, b2, b3);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma16816<F16>(dv[mi][2 * dp], pa[mi][kc], b0, b1);
                        mma16816<F16>(dv[mi][2 * dp + 1], pa[mi][kc], b2, b3);
                    }
                    ldsm_x4_t(cQ + off, b0, b1, b2, b3);
#pragma unroll
                    for (int mi = 0; mi < 2; mi++) {
                        mma16816<F16>(dk[mi][2 * dp], da[mi][kc], b0, b1);
                        mma16816<F16>(dk[mi][2 * dp + 1], da[mi][kc], b2, b3);
                    }
                }
            }
        }
        // ... and over the partner's (A from shared memory, once the partner has stored it).
        asm volatile("bar.sync %0, 64;" ::"r"(barrier) : "memory");
#pragma unroll
        for (int kc = 0; kc < QH / 16; kc++) {
            const int q0 = (half ^ 1) * QH + kc * 16;
            u32 pb[2][4], db[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++) {
                const u32 off = aPS + (mi * 16 * SS + q0) * 2;
                ldsm_x4(sbP + off, pb[mi][0], pb[mi][1], pb[mi][2], pb[mi][3]);
                ldsm_x4(sbdS + off, db[mi][0], db[mi][1], db[mi][2], db[mi][3]);
            }
#pragma unroll
            for (int dp = 0; dp < ND / 2; dp++) {
                u32 b0, b1, b2, b3;
                const u32 off = aQT + (q0 * S + dp * 16) * 2;
                ldsm_x4_t(cdO + off, b0, b1, b2, b3);
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    mma16816<F16>(dv[mi][2 * dp], pb[mi], b0, b1);
                    mma16816<F16>(dv[mi][2 * dp + 1], pb[mi], b2, b3);
                }
                ldsm_x4_t(cQ + off, b0, b1, b2, b3);
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    mma16816<F16>(dk[mi][2 * dp], db[mi], b0, b1);
                    mma16816<F16>(dk[mi][2 * dp + 1], db[mi], b2, b3);
                }
            }
        }
        __syncthreads();  // dS^T is complete; buffer `buf` is free
        const Step snn = sn.hh < group ? next(sn) : sn;
        if (QB == 2 && snn.hh < group) load_step(snn, buf);
        if (QB == 1 && sn.hh < group) load_step(sn, 0);
        cp_async_commit();
        // dQ_acc[queries 32 qg.., columns of group cg] += dS K over this block's BN keys.
        const int qg = warp % MQ, cg = warp / MQ;
        float dq[2][NDQ][4];
#pragma unroll
        for (int mi = 0; mi < 2; mi++)
#pragma unroll
            for (int i = 0; i < NDQ; i++)
#pragma unroll
                for (int e = 0; e < 4; e++) dq[mi][i][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BN / 16; kc++) {
            u32 a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; mi++)
                ldsm_x4_t(sbdS + aDS + (kc * 16 * SS + qg * 32 + mi * 16) * 2, a[mi][0], a[mi][1], a[mi][2], a[mi][3]);
#pragma unroll
            for (int dp = 0; dp < NDQ / 2; dp++) {
                u32 b0, b1, b2, b3;
                ldsm_x4_t(sb + aKT + (kc * 16 * S + cg * DQC + dp * 16) * 2, b0, b1, b2, b3);
#pragma unroll
                for (int mi = 0; mi < 2; mi++) {
                    mma16816<F16>(dq[mi][2 * dp], a[mi], b0, b1);
                    mma16816<F16>(dq[mi][2 * dp + 1], a[mi], b2, b3);
                }
            }
        }
        float* dqa = (float*)p.dq_acc + b * T * qw + hh * D;
#pragma unroll
        for (int mi = 0; mi < 2; mi++) {
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int i = m0 + qg * 32 + mi * 16 + g + r * 8;
                if (i < Ti) {
#pragma unroll
                    for (int dt = 0; dt < NDQ; dt++)
                        red_add2(dqa + i * qw + cg * DQC + dt * 8 + 2 * tig, dq[mi][dt][2 * r], dq[mi][dt][2 * r + 1]);
                }
            }
        }
        st = sn;
        sn = snn;
        buf ^= QB - 1;
    }
    cp_async_wait_all();

    u16* dK = (u16*)p.dk + b * T * kw + kh * D;
    u16* dV = (u16*)p.dv + b * T * kw + kh * D;
#pragma unroll
    for (int mi = 0; mi < 2; mi++) {
#pragma unroll
        for (int r = 0; r < 2; r++) {
            const i64 j = krow0 + 16 * mi + 8 * r;
            if (j < T) {
#pragma unroll
                for (int dt = 0; dt < ND; dt++) {
                    const int c = half * DH + dt * 8 + 2 * tig;
                    *(u32*)(dK + j * kw + c) = pack2<F16>(dk[mi][dt][2 * r] * p.scale, dk[mi][dt][2 * r + 1] * p.scale);
                    *(u32*)(dV + j * kw + c) = pack2<F16>(dv[mi][dt][2 * r], dv[mi][dt][2 * r + 1]);
                }
            }
        }
    }
}

// Shared memory bytes (src/backend/cuda/attention.rs computes the same), with G the granules
// per row (ceil(T / 32); also at least the tiles per row, one flag byte each):
//   forward:  (BM + 4 BN) (D + 8) 2 + 2 BN 4 + 9 G                      BM = 64 MW
//   backward: (2 BN + 2 QB BM) (D + 8) 2 + X BN (BM + 8) 2 + 3 QB BM 4 + 9 G   BN = 16 NW
// with X = 1 (dS^T) for flash_bwd and 2 (P^T, dS^T) for flash_bwd_pairs (PAIRS = 1), and QB
// query-side buffers: 1 for flash_bwd_pairs with BM = 128 above head dim 64, else 2.
#define FLASH_FWD_ENTRY_(D, MW, BN, F16, NAME)                                                         \
    extern "C" __global__ void __launch_bounds__(128) flash_fwd_##NAME##_##D##_m##MW##_n##BN(FlashParams p) { \
        grid_dep_wait();                                                                                      \
        flash_fwd<D, MW, BN, F16>(p);                                                                  \
    }
#define FLASH_BWD_ENTRY_(D, NW, BM, F16, NAME, PAIRS)                                                  \
    extern "C" __global__ void __launch_bounds__(NW * 32)                                              \
        flash_bwd_##NAME##_##D##_w##NW##_m##BM##_p##PAIRS(FlashParams p) {                             \
        grid_dep_wait();                                                                               \
        if constexpr (PAIRS) flash_bwd_pairs<D, NW, BM, F16>(p);                                       \
        else flash_bwd<D, NW, BM, F16>(p);                                                             \
    }
#define FLASH_FWD_ENTRY(D, MW, BN, F16, NAME) FLASH_FWD_ENTRY_(D, MW, BN, F16, NAME)
#define FLASH_BWD_ENTRY(D, NW, BM, F16, NAME, PAIRS) FLASH_BWD_ENTRY_(D, NW, BM, F16, NAME, PAIRS)

// The backend compiles one variant at a time (-DFLASH_D=.. -DFLASH_MW=.. -DFLASH_BN=..
// -DFLASH_NW=.. -DFLASH_BM=.. -DFLASH_F16=.. -DFLASH_NAME=.. -DFLASH_PAIRS=..); without them
// a set of variants is compiled (a check of the whole file).
#ifdef FLASH_D
FLASH_FWD_ENTRY(FLASH_D, FLASH_MW, FLASH_BN, FLASH_F16, FLASH_NAME)
FLASH_BWD_ENTRY(FLASH_D, FLASH_NW, FLASH_BM, FLASH_F16, FLASH_NAME, FLASH_PAIRS)
#else
FLASH_FWD_ENTRY(64, 1, 64, false, bf16)
FLASH_FWD_ENTRY(64, 2, 128, false, bf16)
FLASH_FWD_ENTRY(96, 2, 64, false, bf16)
FLASH_FWD_ENTRY(128, 2, 64, false, bf16)
FLASH_FWD_ENTRY(64, 2, 128, true, f16)
FLASH_FWD_ENTRY(128, 2, 64, true, f16)
FLASH_FWD_ENTRY(96, 2, 64, true, f16)
FLASH_FWD_ENTRY(64, 2, 32, false, bf16)
FLASH_BWD_ENTRY(64, 8, 64, false, bf16, 0)
FLASH_BWD_ENTRY(96, 8, 64, false, bf16, 0)
FLASH_BWD_ENTRY(96, 8, 64, true, f16, 0)
FLASH_BWD_ENTRY(64, 4, 32, false, bf16, 0)
FLASH_BWD_ENTRY(64, 4, 64, false, bf16, 1)
FLASH_BWD_ENTRY(64, 8, 128, false, bf16, 1)
FLASH_BWD_ENTRY(64, 8, 128, true, f16, 1)
FLASH_BWD_ENTRY(128, 8, 64, false, bf16, 1)
FLASH_BWD_ENTRY(128, 8, 64, true, f16, 1)
FLASH_BWD_ENTRY(128, 8, 128, false, bf16, 1)
FLASH_BWD_ENTRY(96, 8, 128, false, bf16, 1)
FLASH_BWD_ENTRY(128, 8, 128, true, f16, 1)
FLASH_BWD_ENTRY(96, 8, 128, true, f16, 1)
FLASH_BWD_ENTRY(64, 4, 32, false, bf16, 1)
#endif
