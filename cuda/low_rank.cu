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
    extern "C" __global__ void __launch_bounds__(256) name(LowRankGradsParams p) { grid_dep_wait(); low_rank_grads<F16, R, 2>(p); }
LG_ENTRY(low_rank_grads_bf16_r16, false, 16)
LG_ENTRY(low_rank_grads_bf16_r32, false, 32)
LG_ENTRY(low_rank_grads_f16_r16, true, 16)
LG_ENTRY(low_rank_grads_f16_r32, true, 32)
