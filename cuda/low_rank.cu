// Gradients of both factors of a rank-r product P = alpha u b^T (u [n, r], b [f, r], P
// [n, f]) from one read of its output gradient dy [n, f] (src/ops/low_rank_grads.rs has
// the CPU reference):
//
//   du   = alpha dy b        [n, r]   written in dy's type (bf16 or f16)
//   acc += alpha dy^T u      [f, r]   f32, in place
//
// LoRA's backward needs both for every adapted linear layer; as two products each reads
// dy, the larger tensor by far, once. Here a block of W warps takes 16 W rows of dy and walks all f
// columns in tiles of LG_COLS, staged in shared memory by cp.async LG_STAGES deep, with the
// matching rows of b (f32, rounded to the activations' type as the products round it). Warp
// w multiplies rows 16w.. of the tile by the tile's rows of b on the tensor cores (mma.sync
// m16n8k16), keeping its du rows in registers across all tiles; and the tile's columns
// 16w.. (MT tiles of 16), transposed by ldmatrix.trans, by the block's rows of u (held
// as B fragments in registers for the whole kernel), adding that part of acc with f32
// atomics once per tile.
//
// Needs f % 8 == 0 (16-byte rows for cp.async), r in {16, 32}, 16-byte aligned dy and b
// (and 8-byte aligned acc).

#define LG_COLS 128
#define LG_STAGES 4
// Halves between staged dy rows: 16 bytes of padding make ldmatrix free of bank conflicts.
#define LG_DY_STRIDE (LG_COLS + 8)

struct LowRankGradsParams {
    u64 dy, u, b, du, acc;
    i64 n, f;
    float alpha;
    int pad;
};

// W warps per block, 16 W rows; BS floats between staged b rows (the fragment reads, rows
// 2q and columns g, hit 32 banks).
template <int R, int W>
struct LgLayout {
    static constexpr int ROWS = 16 * W;
    static constexpr int MT = LG_COLS / 16 / W;
    static constexpr int BS = R + 4;
    static constexpr int DY_BYTES = ROWS * LG_DY_STRIDE * 2;
    static constexpr int STAGE_BYTES = DY_BYTES + LG_COLS * BS * 4;
};

// Stage step j, column tile (j + rot) % tiles: dy[r0 .. r0 + ROWS, c0 .. c0 + LG_COLS] and
// b[c0 .. c0 + LG_COLS, :], zeros past n or f. Commits a group even when there is no tile
// left, so waits count evenly.
template <int R, int W>
__device__ __forceinline__ void lg_load(const LowRankGradsParams& p, u32 smem, int j, int tiles, int rot, i64 r0) {
    typedef LgLayout<R, W> L;
    if (j < tiles) {
        const u32 st = smem + (j % LG_STAGES) * L::STAGE_BYTES;
        const i64 c0 = (i64)((j + rot) % tiles) * LG_COLS;
        const u16* dy = (const u16*)p.dy;
        const float* b = (const float*)p.b;
        for (int c = threadIdx.x; c < L::ROWS * LG_COLS / 8; c += 32 * W) {
            const int row = c / (LG_COLS / 8), cc = (c % (LG_COLS / 8)) * 8;
            const i64 gr = r0 + row, gc = c0 + cc;
            const bool ok = gr < p.n && gc < p.f;
            cp_async16(st + (row * LG_DY_STRIDE + cc) * 2, dy + (ok ? gr * p.f + gc : 0), ok ? 16 : 0);
        }
        const u32 bst = st + L::DY_BYTES;
        for (int c = threadIdx.x; c < LG_COLS * R / 4; c += 32 * W) {
            const int row = c / (R / 4), cc = (c % (R / 4)) * 4;
            const bool ok = c0 + row < p.f;
            cp_async16(bst + (row * L::BS + cc) * 4, b + (ok ? (c0 + row) * R + cc : 0), ok ? 16 : 0);
        }
    }
    cp_async_commit();
}

// p[0] += a, p[1] += b (8-byte aligned): one vector reduction on sm_90, two before it. The
// atomics are a large part of the kernel's memory traffic (the block's rows share each one).
__device__ __forceinline__ void lg_add2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

template <bool F16, int R, int W>
__device__ void low_rank_grads(const LowRankGradsParams& p) {
    typedef LgLayout<R, W> L;
    constexpr int NT = R / 8;  // n tiles of 8 ranks
    extern __shared__ __align__(16) unsigned char lg_smem[];
    const u32 smem = smem_addr(lg_smem);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, q = lane & 3;
    const i64 r0 = (i64)blockIdx.x * L::ROWS;
    const int tiles = (int)((p.f + LG_COLS - 1) / LG_COLS);
    // Blocks start at different column tiles, so that at any time they add into different
    // rows of acc (atomics on the same addresses serialize).
    const int rot = blockIdx.x % tiles;

    for (int s = 0; s < LG_STAGES - 1; ++s) lg_load<R, W>(p, smem, s, tiles, rot, r0);

    // u's rows of this block as the B operand of dy^T u: k = row, n = rank; zeros past n.
    u32 uf[L::ROWS / 16][NT][2];
    const u16* u = (const u16*)p.u;
    for (int ks = 0; ks < L::ROWS / 16; ++ks)
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
        cp_async_wait<LG_STAGES - 2>();
        __syncthreads();
        lg_load<R, W>(p, smem, j + LG_STAGES - 1, tiles, rot, r0);
        const u32 st = smem + (j % LG_STAGES) * L::STAGE_BYTES;
        const float* bt = (const float*)(lg_smem + (j % LG_STAGES) * L::STAGE_BYTES + L::DY_BYTES);

        // du[rows 16w ..] += dy[rows, tile] b[tile, :]
        for (int ks = 0; ks < LG_COLS / 16; ++ks) {
            u32 a[4];
            const int row = warp * 16 + (lane & 15), col = ks * 16 + (lane >> 4) * 8;
            ldsm_x4(st + (row * LG_DY_STRIDE + col) * 2, a[0], a[1], a[2], a[3]);
            const int k = ks * 16 + 2 * q;
            for (int t = 0; t < NT; ++t) {
                const int n = t * 8 + g;
                const u32 b0 = pack2<F16>(bt[k * L::BS + n], bt[(k + 1) * L::BS + n]);
                const u32 b1 = pack2<F16>(bt[(k + 8) * L::BS + n], bt[(k + 9) * L::BS + n]);
                mma16816<F16>(dua[t], a, b0, b1);
            }
        }

        // acc[tile columns of this warp, :] += dy[rows, columns]^T u[rows, :]
        for (int mt = 0; mt < L::MT; ++mt) {
            const int m0 = (warp * L::MT + mt) * 16;
            float dba[NT][4];
            for (int t = 0; t < NT; ++t) dba[t][0] = dba[t][1] = dba[t][2] = dba[t][3] = 0.f;
            for (int ks = 0; ks < L::ROWS / 16; ++ks) {
                u32 a[4];
                const int row = ks * 16 + (lane & 7) + ((lane >> 4) << 3);
                const int col = m0 + ((lane >> 3) & 1) * 8;
                ldsm_x4_t(st + (row * LG_DY_STRIDE + col) * 2, a[0], a[1], a[2], a[3]);
                for (int t = 0; t < NT; ++t) mma16816<F16>(dba[t], a, uf[ks][t][0], uf[ks][t][1]);
            }
            const i64 m = (i64)((j + rot) % tiles) * LG_COLS + m0 + g;
            for (int t = 0; t < NT; ++t) {
                const int n = t * 8 + 2 * q;
                if (m < p.f) lg_add2(acc + m * R + n, p.alpha * dba[t][0], p.alpha * dba[t][1]);
                if (m + 8 < p.f) lg_add2(acc + (m + 8) * R + n, p.alpha * dba[t][2], p.alpha * dba[t][3]);
            }
        }
    }
    cp_async_wait_all();

    u32* du = (u32*)p.du;
    const i64 row = r0 + warp * 16 + g;
    for (int t = 0; t < NT; ++t) {
        const int n = t * 8 + 2 * q;
        if (row < p.n) du[(row * R + n) / 2] = pack2<F16>(p.alpha * dua[t][0], p.alpha * dua[t][1]);
        if (row + 8 < p.n) du[((row + 8) * R + n) / 2] = pack2<F16>(p.alpha * dua[t][2], p.alpha * dua[t][3]);
    }
}

#define LG_ENTRY(name, F16, R, W) \
    extern "C" __global__ void __launch_bounds__(32 * W) name(LowRankGradsParams p) { low_rank_grads<F16, R, W>(p); }
LG_ENTRY(low_rank_grads_bf16_r16_w4, false, 16, 4)
LG_ENTRY(low_rank_grads_bf16_r32_w4, false, 32, 4)
LG_ENTRY(low_rank_grads_f16_r16_w4, true, 16, 4)
LG_ENTRY(low_rank_grads_f16_r32_w4, true, 32, 4)
LG_ENTRY(low_rank_grads_bf16_r16_w8, false, 16, 8)
LG_ENTRY(low_rank_grads_bf16_r32_w8, false, 32, 8)
LG_ENTRY(low_rank_grads_f16_r16_w8, true, 16, 8)
LG_ENTRY(low_rank_grads_f16_r32_w8, true, 32, 8)
