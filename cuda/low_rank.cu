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
