// Gradients of both factors of a rank-r product P = alpha u b^T (u [n, r], b [f, r], P
// [n, f]) from one read of its output gradient dy [n, f] (src/ops/low_rank_grads.rs has
// the CPU reference):
//
//   du   = alpha dy b        [n, r]   written in dy's type (bf16 or f16)
//   acc += alpha dy^T u      [f, r]   f32, in place
//
// LoRA's backward needs both for every adapted linear layer; as two products each reads
// dy, the larger tensor by far, once. Here a block takes LG_ROWS rows of dy and walks all f
// columns in stages of 128 CG columns (CG column groups of 4 warps), staged in shared memory
// by cp.async, with the matching rows of b (f32, rounded to the activations' type as the
// products round it). In each group, warp w multiplies rows 16w.. of the group's columns by
// their rows of b on the tensor cores (mma.sync m16n8k16), keeping its du rows in registers
// across all stages; and columns 32w.. of the group, transposed by ldmatrix.trans, by the
// block's rows of u (held as B fragments in registers for the whole kernel), adding that
// part of acc with f32 atomics once per stage.
//
// Needs f % 8 == 0 (16-byte rows for cp.async), r in {16, 32}, 16-byte aligned dy and b
// (and 8-byte aligned acc).

// Rows of dy per block (four warps of 16 rows each per column group).
#define LG_ROWS 64

struct LowRankGradsParams {
    u64 dy, u, b, du, acc;
    i64 n, f;
    float alpha;
    int pad;
};

// CG column groups of 4 warps: a stage holds COLS = 128 CG columns, group c multiplies
// columns 128c .. 128c + 127 of it (its warps split the rows for du and the columns for acc),
// and the groups' du are summed at the end. Halves between staged dy rows: 16 bytes of
// padding make ldmatrix free of bank conflicts; BS floats between staged b rows (the fragment
// reads, rows 2q and columns g, hit 32 banks).
template <int R, int CG>
struct LgLayout {
    static constexpr int W = 4 * CG;
    static constexpr int COLS = 128 * CG;
    static constexpr int STAGES = 3;
    static constexpr int MT = 2;  // 16-column tiles of acc per warp per stage
    static constexpr int DYS = COLS + 8;
    static constexpr int BS = R + 4;
    static constexpr int DY_BYTES = LG_ROWS * DYS * 2;
    static constexpr int STAGE_BYTES = DY_BYTES + COLS * BS * 4;
};

// Stage step j, column tile (j + rot) % tiles: dy[r0 .. r0 + LG_ROWS, c0 .. c0 + COLS] and
// b[c0 .. c0 + COLS, :], zeros past n or f. Commits a group even when there is no tile
// left, so waits count evenly.
template <int R, int CG>
__device__ __forceinline__ void lg_load(const LowRankGradsParams& p, u32 smem, int j, int tiles, int rot, i64 r0) {
    typedef LgLayout<R, CG> L;
    if (j < tiles) {
        const u32 st = smem + (j % L::STAGES) * L::STAGE_BYTES;
        const i64 c0 = (i64)((j + rot) % tiles) * L::COLS;
        const u16* dy = (const u16*)p.dy;
        const float* b = (const float*)p.b;
        for (int c = threadIdx.x; c < LG_ROWS * L::COLS / 8; c += 32 * L::W) {
            const int row = c / (L::COLS / 8), cc = (c % (L::COLS / 8)) * 8;
            const i64 gr = r0 + row, gc = c0 + cc;
            const bool ok = gr < p.n && gc < p.f;
            cp_async16(st + (row * L::DYS + cc) * 2, dy + (ok ? gr * p.f + gc : 0), ok ? 16 : 0);
        }
        const u32 bst = st + L::DY_BYTES;
        for (int c = threadIdx.x; c < L::COLS * R / 4; c += 32 * L::W) {
            const int row = c / (R / 4), cc = (c % (R / 4)) * 4;
            const bool ok = c0 + row < p.f;
            cp_async16(bst + (row * L::BS + cc) * 4, b + (ok ? (c0 + row) * R + cc : 0), ok ? 16 : 0);
        }
    }
    cp_async_commit();
}

template <bool F16, int R, int CG>
__device__ void low_rank_grads(const LowRankGradsParams& p) {
    typedef LgLayout<R, CG> L;
    constexpr int NT = R / 8;  // n tiles of 8 ranks
    extern __shared__ __align__(16) unsigned char lg_smem[];
    const u32 smem = smem_addr(lg_smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rw = warp & 3, cg = warp >> 2;  // row tile, column group
    const int g = lane >> 2, q = lane & 3;
    const i64 r0 = (i64)blockIdx.x * LG_ROWS;
    const int tiles = (int)((p.f + L::COLS - 1) / L::COLS);
    // Blocks start at different column tiles, so that at any time they add into different
    // rows of acc (atomics on the same addresses serialize).
    const int rot = blockIdx.x % tiles;

    for (int s = 0; s < L::STAGES - 1; ++s) lg_load<R, CG>(p, smem, s, tiles, rot, r0);

    // u's rows of this block as the B operand of dy^T u: k = row, n = rank; zeros past n.
    u32 uf[LG_ROWS / 16][NT][2];
    const u16* u = (const u16*)p.u;
    for (int ks = 0; ks < LG_ROWS / 16; ++ks)
        for (int t = 0; t < NT; ++t)
            for (int h = 0; h < 2; ++h) {
                const i64 row = r0 + ks * 16 + h * 8 + 2 * q;
                const int col = t * 8 + g;
                const u32 lo = row < p.n ? u[row * R + col] : 0;
                const u32 hi = row + 1 < p.n ? u[(row + 1) * R + col] : 0;
                uf[ks][t][h] = lo | (hi << 16);
            }

    float dua[NT][4];
    for (int t = 0; t < NT; ++t) dua[t][0] = dua[t][1] = dua[t][2] = dua[t][3] = 0.f;
    float* acc = (float*)p.acc;

    for (int j = 0; j < tiles; ++j) {
        cp_async_wait<L::STAGES - 2>();
        __syncthreads();
        lg_load<R, CG>(p, smem, j + L::STAGES - 1, tiles, rot, r0);
        const u32 st = smem + (j % L::STAGES) * L::STAGE_BYTES;
        const float* bt = (const float*)(lg_smem + (j % L::STAGES) * L::STAGE_BYTES + L::DY_BYTES);
        const int cb = cg * 128;  // this group's first column in the stage

        // du[rows 16 rw ..] += dy[rows, group columns] b[group columns, :]
        for (int ks = 0; ks < 8; ++ks) {
            u32 a[4];
            const int row = rw * 16 + (lane & 15), col = cb + ks * 16 + (lane >> 4) * 8;
            ldsm_x4(st + (row * L::DYS + col) * 2, a[0], a[1], a[2], a[3]);
            const int k = cb + ks * 16 + 2 * q;
            for (int t = 0; t < NT; ++t) {
                const int n = t * 8 + g;
                const u32 b0 = pack2<F16>(bt[k * L::BS + n], bt[(k + 1) * L::BS + n]);
                const u32 b1 = pack2<F16>(bt[(k + 8) * L::BS + n], bt[(k + 9) * L::BS + n]);
                mma16816<F16>(dua[t], a, b0, b1);
            }
        }

        // acc[this warp's columns, :] += dy[rows, columns]^T u[rows, :]
        for (int mt = 0; mt < L::MT; ++mt) {
            const int m0 = cb + (rw * L::MT + mt) * 16;
            float dba[NT][4];
            for (int t = 0; t < NT; ++t) dba[t][0] = dba[t][1] = dba[t][2] = dba[t][3] = 0.f;
            for (int ks = 0; ks < LG_ROWS / 16; ++ks) {
                u32 a[4];
                const int row = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int col = m0 + ((lane >> 3) & 1) * 8;
                ldsm_x4_t(st + (row * L::DYS + col) * 2, a[0], a[1], a[2], a[3]);
                for (int t = 0; t < NT; ++t) mma16816<F16>(dba[t], a, uf[ks][t][0], uf[ks][t][1]);
            }
            const i64 m = (i64)((j + rot) % tiles) * L::COLS + m0 + g;
            for (int t = 0; t < NT; ++t) {
                const int n = t * 8 + 2 * q;
                if (m < p.f) red_add2(acc + m * R + n, p.alpha * dba[t][0], p.alpha * dba[t][1]);
                if (m + 8 < p.f) red_add2(acc + (m + 8) * R + n, p.alpha * dba[t][2], p.alpha * dba[t][3]);
            }
        }
    }
    cp_async_wait_all();

    // Column groups 1.. hand their du to group 0 through shared memory.
    if (CG > 1) {
        __syncthreads();
        float* red = (float*)lg_smem;
        const int slot = (rw * 32 + lane) * NT * 4;
        if (cg > 0)
            for (int t = 0; t < NT; ++t)
                for (int e = 0; e < 4; ++e) red[(cg - 1) * 128 * NT * 4 + slot + t * 4 + e] = dua[t][e];
        __syncthreads();
        if (cg > 0) return;
        for (int c = 1; c < CG; ++c)
            for (int t = 0; t < NT; ++t)
                for (int e = 0; e < 4; ++e) dua[t][e] += red[(c - 1) * 128 * NT * 4 + slot + t * 4 + e];
    }

    u32* du = (u32*)p.du;
    const i64 row = r0 + rw * 16 + g;
    for (int t = 0; t < NT; ++t) {
        const int n = t * 8 + 2 * q;
        if (row < p.n) du[(row * R + n) / 2] = pack2<F16>(p.alpha * dua[t][0], p.alpha * dua[t][1]);
        if (row + 8 < p.n) du[((row + 8) * R + n) / 2] = pack2<F16>(p.alpha * dua[t][2], p.alpha * dua[t][3]);
    }
}

#define LG_ENTRY(name, F16, R) \
    extern "C" __global__ void __launch_bounds__(256) name(LowRankGradsParams p) { low_rank_grads<F16, R, 2>(p); }
LG_ENTRY(low_rank_grads_bf16_r16, false, 16)
LG_ENTRY(low_rank_grads_bf16_r32, false, 32)
LG_ENTRY(low_rank_grads_f16_r16, true, 16)
LG_ENTRY(low_rank_grads_f16_r32, true, 32)

// ---------------------------------------------------------------------------------------
// Expanding a rank-r product (the CPU reference is the plain product, src/ops/matmul.rs):
//
//   out [n, f] = alpha u w (+ c)     u [n, r] 16-bit; w [f, r] (w_t: LoRA's B in the forward
//                                    product) or [r, f] (LoRA's A in the input gradient),
//                                    f32 or u's type; c and out in u's type
//
// Bound by writing out (and reading c): each output element is r multiply-adds. cuBLASLt's
// tiles for K = 16 leave much of DRAM's bandwidth unused at these shapes. A block takes
// LE_ROWS rows and LE_COLS columns: w's columns are rounded to u's type (as the product
// rounds them) into shared memory as [column][k]; each warp keeps its 16 rows of u as mma A
// fragments and makes LE_CHUNK columns at a time on the tensor cores (mma.sync m16n8k16),
// staged in shared memory so the stores (and c's loads) are 16 bytes wide.
//
// Needs f % 8 == 0, 16-byte aligned out and c, 4-byte aligned u and w.

#define LE_ROWS 128
#define LE_COLS 256
#define LE_CHUNK 32

struct LowRankExpandParams {
    u64 u, w, c, out;
    i64 n, f;
    float alpha;
    int w_t;    // 1: w is [f, r]; 0: [r, f]
    int w_f32;  // 1: w is f32; 0: u's type
    int add;    // 1: out = ... + c
};

// w[c0 .. c0 + LE_COLS, :] into ws as [column][k], rounded to u's type, zeros past f. Every
// thread issues all its loads before the first store, so the block waits for memory once.
template <bool F16, int R, bool WT, bool WF32>
__device__ __forceinline__ void le_fill(const LowRankExpandParams& p, u16* ws, i64 c0) {
    constexpr int WS = R + 8, PER = LE_COLS * R / 256;
    constexpr int dt = F16 ? DT_F16 : DT_BF16;
    float v[PER];
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int e = threadIdx.x + 256 * j;
        const int col = WT ? e / R : e % LE_COLS, k = WT ? e % R : e / LE_COLS;
        const i64 gc = c0 + col, idx = WT ? gc * R + k : (i64)k * p.f + gc;
        v[j] = gc >= p.f ? 0.f : WF32 ? ((const float*)p.w)[idx] : h16_to_f32(((const u16*)p.w)[idx], dt);
    }
#pragma unroll
    for (int j = 0; j < PER; ++j) {
        const int e = threadIdx.x + 256 * j;
        const int col = WT ? e / R : e % LE_COLS, k = WT ? e % R : e / LE_COLS;
        ws[col * WS + k] = f32_to_h16(v[j], dt);
    }
}

template <bool F16, int R>
__device__ __forceinline__ void low_rank_expand(const LowRankExpandParams& p) {
    constexpr int WS = R + 8;         // halves between staged columns of w: the B fragment
                                      // reads (columns g, words q) hit 32 banks
    constexpr int SS = LE_CHUNK + 4;  // floats between staged output rows
    constexpr int dt = F16 ? DT_F16 : DT_BF16;
    constexpr int PL = 16 * LE_CHUNK / 8 / 32;  // 8-column pieces of a chunk per lane
    __shared__ __align__(16) u16 ws[LE_COLS * WS];
    __shared__ __align__(16) float stage[8][16 * SS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, q = lane & 3;
    const i64 r0 = (i64)blockIdx.x * LE_ROWS + warp * 16;
    const i64 c0 = (i64)blockIdx.y * LE_COLS;

    // This warp's rows of u as A fragments (rows past n are zeros), loads issued first.
    const u32* u = (const u32*)p.u;
    u32 a[R / 16][4];
#pragma unroll
    for (int ks = 0; ks < R / 16; ++ks) {
        const int k = ks * 16 + 2 * q;
        const i64 ra = r0 + g, rb = r0 + g + 8;
        a[ks][0] = ra < p.n ? u[(ra * R + k) / 2] : 0u;
        a[ks][1] = rb < p.n ? u[(rb * R + k) / 2] : 0u;
        a[ks][2] = ra < p.n ? u[(ra * R + k + 8) / 2] : 0u;
        a[ks][3] = rb < p.n ? u[(rb * R + k + 8) / 2] : 0u;
    }
    if (p.w_t) {
        if (p.w_f32) le_fill<F16, R, true, true>(p, ws, c0);
        else le_fill<F16, R, true, false>(p, ws, c0);
    } else {
        if (p.w_f32) le_fill<F16, R, false, true>(p, ws, c0);
        else le_fill<F16, R, false, false>(p, ws, c0);
    }
    __syncthreads();
    if (r0 >= p.n) return;

    float* st = stage[warp];
    for (int cc = 0; cc < LE_COLS && c0 + cc < p.f; cc += LE_CHUNK) {
        // This lane's pieces: row rr, columns c8 .. c8 + 7 of the chunk; c's loads go first.
        uint4 cv[PL];
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int e = lane + 32 * j, rr = e / (LE_CHUNK / 8), c8 = (e % (LE_CHUNK / 8)) * 8;
            const i64 row = r0 + rr, col = c0 + cc + c8;
            cv[j] = make_uint4(0, 0, 0, 0);
            if (p.add && row < p.n && col < p.f) cv[j] = *(const uint4*)((const u16*)p.c + row * p.f + col);
        }
        float acc[LE_CHUNK / 8][4];
#pragma unroll
        for (int t = 0; t < LE_CHUNK / 8; ++t) {
            acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
#pragma unroll
            for (int ks = 0; ks < R / 16; ++ks) {
                const u16* wp = ws + (cc + t * 8 + g) * WS + ks * 16 + 2 * q;
                mma16816<F16>(acc[t], a[ks], *(const u32*)wp, *(const u32*)(wp + 8));
            }
            // c0, c1: row g, columns 2q, 2q + 1; c2, c3: row g + 8.
            *(float2*)(st + g * SS + t * 8 + 2 * q) = make_float2(p.alpha * acc[t][0], p.alpha * acc[t][1]);
            *(float2*)(st + (g + 8) * SS + t * 8 + 2 * q) = make_float2(p.alpha * acc[t][2], p.alpha * acc[t][3]);
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < PL; ++j) {
            const int e = lane + 32 * j, rr = e / (LE_CHUNK / 8), c8 = (e % (LE_CHUNK / 8)) * 8;
            const i64 row = r0 + rr, col = c0 + cc + c8;
            if (row < p.n && col < p.f) {
                const float4 lo = *(const float4*)(st + rr * SS + c8), hi = *(const float4*)(st + rr * SS + c8 + 4);
                float v[8] = {lo.x, lo.y, lo.z, lo.w, hi.x, hi.y, hi.z, hi.w};
                if (p.add) {
                    float c[8];
                    unpack8(cv[j], dt, c);
#pragma unroll
                    for (int i = 0; i < 8; ++i) v[i] += c[i];
                }
                // Hardware rounding of pairs (cvt.rn, one instruction per two values): the
                // kernel is bound by issuing instructions, and this is most of them.
                *(uint4*)((u16*)p.out + row * p.f + col) =
                    make_uint4(pack2<F16>(v[0], v[1]), pack2<F16>(v[2], v[3]), pack2<F16>(v[4], v[5]), pack2<F16>(v[6], v[7]));
            }
        }
        __syncwarp();
    }
}

#define LE_ENTRY(name, F16, R) \
    extern "C" __global__ void __launch_bounds__(256) name(LowRankExpandParams p) { low_rank_expand<F16, R>(p); }
LE_ENTRY(low_rank_expand_bf16_r16, false, 16)
LE_ENTRY(low_rank_expand_bf16_r32, false, 32)
LE_ENTRY(low_rank_expand_f16_r16, true, 16)
LE_ENTRY(low_rank_expand_f16_r32, true, 32)

// ---------------------------------------------------------------------------------------
// low_rank_grads on Hopper, with fewer atomics (same contract as low_rank_grads above).
//
// There, a block takes 64 rows of dy across all f columns, and every 64 rows add their part
// of acc with f32 atomics: the atomics move half as many bytes as dy. Here a block takes
// L2_ROWS = 256 rows and a quarter of the column tiles, so acc gets one atomic per 256 rows;
// the four blocks of a row range form a thread-block cluster, and sum their partial du in
// each other's shared memory (distributed shared memory) at the end, so du needs neither
// atomics nor another launch. Stages of L2_SC columns of dy (and the matching rows of b)
// are staged by cp.async; the block's rows of u are staged once. Per stage, warp w:
//   du[rows 32w .. 32w + 31, :] += dy[those rows, stage] b[stage, :]    (registers, all stages)
//   acc[stage column tile w % 4, rank half w / 4] += dy[256 rows, tile]^T u[256 rows, half]
// the second added to acc with f32 vector atomics after each stage.
#if __CUDA_ARCH__ >= 900

#define L2_ROWS 256
#define L2_SC 64
#define L2_CLUSTER 4
#define L2_STAGES 3

template <int R>
struct L2Layout {
    static constexpr int DYS = L2_SC + 8;  // halves between staged dy rows (ldmatrix: no conflicts)
    static constexpr int BS = R + 4;       // floats between staged b rows
    static constexpr int US = R + 8;       // halves between staged u rows (ldmatrix: no conflicts)
    static constexpr int DY_BYTES = L2_ROWS * DYS * 2;
    static constexpr int STAGE_BYTES = DY_BYTES + L2_SC * BS * 4;
    static constexpr int U_BYTES = L2_ROWS * US * 2;
    static constexpr int SMEM = L2_STAGES * STAGE_BYTES + U_BYTES;
};

__device__ __forceinline__ u32 cluster_rank() {
    u32 r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The address of shared-memory address `a` in the block of cluster rank `rank`.
__device__ __forceinline__ u32 cluster_addr(u32 a, u32 rank) {
    u32 r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(rank));
    return r;
}
__device__ __forceinline__ float4 ld_cluster4(u32 a) {
    float4 v;
    asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(a));
    return v;
}

// Stage step j of this block (column tile t0 + (j + rot) % nt): dy[r0 .. r0 + L2_ROWS, tile]
// and b[tile, :], zeros past n or f; commits a group even past the last tile.
template <int R>
__device__ __forceinline__ void l2_load(const LowRankGradsParams& p, u32 smem, int j, int nt, int t0, int rot, i64 r0) {
    typedef L2Layout<R> L;
    if (j < nt) {
        const u32 st = smem + (j % L2_STAGES) * L::STAGE_BYTES;
        const i64 c0 = (i64)(t0 + (j + rot) % nt) * L2_SC;
        const u16* dy = (const u16*)p.dy;
        const float* b = (const float*)p.b;
#pragma unroll
        for (int c = threadIdx.x; c < L2_ROWS * L2_SC / 8; c += 256) {
            const int row = c / (L2_SC / 8), cc = (c % (L2_SC / 8)) * 8;
            const i64 gr = r0 + row, gc = c0 + cc;
            const bool ok = gr < p.n && gc < p.f;
            cp_async16(st + (row * L::DYS + cc) * 2, dy + (ok ? gr * p.f + gc : 0), ok ? 16 : 0);
        }
        const u32 bst = st + L::DY_BYTES;
        for (int c = threadIdx.x; c < L2_SC * R / 4; c += 256) {
            const int row = c / (R / 4), cc = (c % (R / 4)) * 4;
            const bool ok = c0 + row < p.f;
            cp_async16(bst + (row * L::BS + cc) * 4, b + (ok ? (c0 + row) * R + cc : 0), ok ? 16 : 0);
        }
    }
    cp_async_commit();
}

template <bool F16, int R>
__device__ void low_rank_grads2(const LowRankGradsParams& p) {
    typedef L2Layout<R> L;
    constexpr int NT = R / 8;      // n tiles of 8 ranks
    constexpr int NH = NT / 2;     // n tiles of a warp's half of the ranks in acc
    extern __shared__ __align__(16) unsigned char l2_smem[];
    const u32 smem = smem_addr(l2_smem);
    const u32 us = smem + L2_STAGES * L::STAGE_BYTES;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const u32 rank = cluster_rank();
    const i64 r0 = (i64)blockIdx.x * L2_ROWS;
    // This block's column tiles: the rank-th quarter of them, walked from a tile that
    // depends on the row range (blocks adding into the same rows of acc at the same time
    // would serialize on the atomics).
    const int tiles = (int)((p.f + L2_SC - 1) / L2_SC);
    const int t0 = (int)((i64)tiles * rank / L2_CLUSTER), nt = (int)((i64)tiles * (rank + 1) / L2_CLUSTER) - t0;
    const int rot = nt > 0 ? (int)(blockIdx.x % nt) : 0;

    // u's rows: with the first stage's group.
    {
        const u16* u = (const u16*)p.u;
        for (int c = threadIdx.x; c < L2_ROWS * R / 8; c += 256) {
            const int row = c / (R / 8), cc = (c % (R / 8)) * 8;
            const bool ok = r0 + row < p.n;
            cp_async16(us + (row * L::US + cc) * 2, u + (ok ? (r0 + row) * R + cc : 0), ok ? 16 : 0);
        }
    }
    for (int s = 0; s < L2_STAGES - 1; ++s) l2_load<R>(p, smem, s, nt, t0, rot, r0);

    float dua[2][NT][4];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int t = 0; t < NT; ++t) dua[m][t][0] = dua[m][t][1] = dua[m][t][2] = dua[m][t][3] = 0.f;
    const int mt = warp & 3, nh = warp >> 2;  // acc: column tile of the stage, half of the ranks
    float* acc = (float*)p.acc;

    for (int j = 0; j < nt; ++j) {
        cp_async_wait<L2_STAGES - 2>();
        __syncthreads();
        l2_load<R>(p, smem, j + L2_STAGES - 1, nt, t0, rot, r0);
        const u32 st = smem + (j % L2_STAGES) * L::STAGE_BYTES;
        const float* bt = (const float*)(l2_smem + (j % L2_STAGES) * L::STAGE_BYTES + L::DY_BYTES);

        // du[rows 32 warp ..] += dy[rows, stage] b[stage, :]
#pragma unroll
        for (int ks = 0; ks < L2_SC / 16; ++ks) {
            u32 bf[NT][2];
            const int k = ks * 16 + 2 * q;
#pragma unroll
            for (int t = 0; t < NT; ++t) {
                const int n = t * 8 + g;
                bf[t][0] = pack2<F16>(bt[k * L::BS + n], bt[(k + 1) * L::BS + n]);
                bf[t][1] = pack2<F16>(bt[(k + 8) * L::BS + n], bt[(k + 9) * L::BS + n]);
            }
#pragma unroll
            for (int m = 0; m < 2; ++m) {
                u32 a[4];
                const int row = warp * 32 + m * 16 + (lane & 15), col = ks * 16 + (lane >> 4) * 8;
                ldsm_x4(st + (row * L::DYS + col) * 2, a[0], a[1], a[2], a[3]);
#pragma unroll
                for (int t = 0; t < NT; ++t) mma16816<F16>(dua[m][t], a, bf[t][0], bf[t][1]);
            }
        }

        // acc[stage columns 16 mt .., ranks of half nh] += dy[all rows, those columns]^T u
        float dba[NH][4];
#pragma unroll
        for (int t = 0; t < NH; ++t) dba[t][0] = dba[t][1] = dba[t][2] = dba[t][3] = 0.f;
#pragma unroll 4
        for (int ks = 0; ks < L2_ROWS / 16; ++ks) {
            u32 a[4];
            const int row = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
            const int col = mt * 16 + ((lane >> 3) & 1) * 8;
            ldsm_x4_t(st + (row * L::DYS + col) * 2, a[0], a[1], a[2], a[3]);
            // B fragments of u (k = row, n = rank) by ldmatrix.trans: matrices (rows 0-7,
            // ranks n0..), (rows 8-15, n0..), then the same for ranks n0 + 8.
#pragma unroll
            for (int t2 = 0; t2 < NH; t2 += 2) {
                const int n0 = (nh * NH + t2) * 8;
                const int urow = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, ucol = n0 + (lane >> 4) * 8;
                u32 b[4];
                if (NH >= 2) {
                    ldsm_x4_t(us + (urow * L::US + ucol) * 2, b[0], b[1], b[2], b[3]);
                    mma16816<F16>(dba[t2], a, b[0], b[1]);
                    mma16816<F16>(dba[t2 + 1], a, b[2], b[3]);
                } else {
                    // One n tile: lanes 16-31 repeat the addresses of lanes 0-15.
                    const int urow1 = ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
                    ldsm_x4_t(us + (urow1 * L::US + n0) * 2, b[0], b[1], b[2], b[3]);
                    mma16816<F16>(dba[t2], a, b[0], b[1]);
                }
            }
        }
        const i64 m = (i64)(t0 + (j + rot) % nt) * L2_SC + mt * 16 + g;
#pragma unroll
        for (int t = 0; t < NH; ++t) {
            const int n = (nh * NH + t) * 8 + 2 * q;
            if (m < p.f) red_add2(acc + m * R + n, p.alpha * dba[t][0], p.alpha * dba[t][1]);
            if (m + 8 < p.f) red_add2(acc + (m + 8) * R + n, p.alpha * dba[t][2], p.alpha * dba[t][3]);
        }
    }
    cp_async_wait_all();
    __syncthreads();

    // Partial du of this block into its shared memory as [row][rank] f32, then each block
    // of the cluster sums a quarter of the rows over all four and writes them.
    float* part = (float*)l2_smem;
#pragma unroll
    for (int mm = 0; mm < 2; ++mm)
#pragma unroll
        for (int t = 0; t < NT; ++t) {
            const int row = warp * 32 + mm * 16 + g, n = t * 8 + 2 * q;
            *(float2*)(part + row * R + n) = make_float2(dua[mm][t][0], dua[mm][t][1]);
            *(float2*)(part + (row + 8) * R + n) = make_float2(dua[mm][t][2], dua[mm][t][3]);
        }
    cluster_sync();
    constexpr int QROWS = L2_ROWS / L2_CLUSTER;
    u32* du = (u32*)p.du;
    for (int e = threadIdx.x; e < QROWS * R / 4; e += 256) {
        const int row = rank * QROWS + e / (R / 4), n = (e % (R / 4)) * 4;
        const u32 off = smem + (row * R + n) * 4;
        float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
        for (u32 c = 0; c < L2_CLUSTER; ++c) {
            const float4 v = ld_cluster4(cluster_addr(off, c));
            s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
        }
        const i64 gr = r0 + row;
        if (gr < p.n) {
            du[(gr * R + n) / 2] = pack2<F16>(p.alpha * s.x, p.alpha * s.y);
            du[(gr * R + n) / 2 + 1] = pack2<F16>(p.alpha * s.z, p.alpha * s.w);
        }
    }
    // No block leaves while another may still read its shared memory.
    cluster_sync();
}

#define L2_ENTRY(name, F16, R) \
    extern "C" __global__ void __cluster_dims__(1, L2_CLUSTER, 1) __launch_bounds__(256) name(LowRankGradsParams p) { low_rank_grads2<F16, R>(p); }
L2_ENTRY(low_rank_grads2_bf16_r16, false, 16)
L2_ENTRY(low_rank_grads2_bf16_r32, false, 32)
L2_ENTRY(low_rank_grads2_f16_r16, true, 16)
L2_ENTRY(low_rank_grads2_f16_r32, true, 32)

#endif
