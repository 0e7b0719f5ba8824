// Cross-entropy over the vocabulary with an ignore index (src/ops/cross_entropy.rs).
// logits [N, V], labels [N] i32; a row counts when its label != ignore and 0 <= label < V.
//
// Forward, one block per row, one pass over the logits with an online log-sum-exp: each
// thread keeps (m, s) = (running max, sum of exp(x - m)); on a new max m' the sum rescales by
// exp(m - m'). Pairs combine as m = max(m1, m2), s = s1 exp(m1 - m) + s2 exp(m2 - m).
//   lse[r] = m + log(s),  row_loss[r] = counted ? lse[r] - x[r, label] : 0
// The row losses and counts are then summed in f64 by one block (deterministic).
//
// Backward, one block per row, logits read once and dlogits written once:
//   dlogits[r, j] = counted ? (exp(x[r, j] - lse[r]) - [j == label]) * dloss : 0
// ce_with_grad does both per row, in place (Op::CrossEntropyWithGrad).

__device__ __forceinline__ void lse_push(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;
        m = x;
    } else {
        s += expf(x - m);
    }
}

__device__ __forceinline__ void lse_merge(float& m, float& s, float m2, float s2) {
    if (m2 == -F_INF) return;
    if (m == -F_INF) {
        m = m2;
        s = s2;
        return;
    }
    float mm = fmaxf(m, m2);
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// The log-sum-exp of row r over the block, in every thread (`red` holds 65 floats); lane 0
// of warp 0 also writes lse[r], row_loss[r] and row_count[r] (reading the label's logit).
__device__ float ce_row_lse(const void* logits, int dtl, const int* labels, i64 V, int ignore, int vec, void* lse,
                            int dtlse, float* row_loss, float* row_count, i64 r, float* red) {
    const i64 base = r * V;
    float m = -F_INF, s = 0.f;
    if (vec) {
        for (i64 j = (i64)threadIdx.x * 8; j < V; j += (i64)blockDim.x * 8) {
            float v[8];
            ld8(logits, dtl, base + j, v);
#pragma unroll
            for (int k = 0; k < 8; k++) lse_push(m, s, v[k]);
        }
    } else {
        for (i64 j = threadIdx.x; j < V; j += blockDim.x) lse_push(m, s, ldf(logits, dtl, base + j));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        lse_merge(m, s, m2, s2);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    if (lane == 0) {
        red[warp] = m;
        red[32 + warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? red[lane] : -F_INF;
        s = lane < nw ? red[32 + lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            lse_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            float l = m + logf(s);
            stf(lse, dtlse, r, l);
            int y = labels[r];
            bool counted = y != ignore && y >= 0 && y < V;
            row_loss[r] = counted ? l - ldf(logits, dtl, base + y) : 0.f;
            row_count[r] = counted ? 1.f : 0.f;
            red[64] = l;
        }
    }
    __syncthreads();
    float l = red[64];
    __syncthreads();  // red is reused by the next row
    return l;
}

extern "C" __global__ void ce_fwd(const void* logits, int dtl, const int* labels, i64 V, int ignore, int vec, void* lse,
                                  int dtlse, float* row_loss, float* row_count) {
    grid_dep_wait();
    __shared__ float red[65];
    ce_row_lse(logits, dtl, labels, V, ignore, vec, lse, dtlse, row_loss, row_count, blockIdx.x, red);
}

// One block: loss_sum = sum(row_loss), count = sum(row_count), in f64.
extern "C" __global__ void ce_sum(const float* row_loss, const float* row_count, i64 N, void* loss, int dtloss,
                                  void* count, int dtcount) {
    grid_dep_wait();
    __shared__ double red[32];
    double a = 0.0, b = 0.0;
    for (i64 i = threadIdx.x; i < N; i += blockDim.x) {
        a += (double)row_loss[i];
        b += (double)row_count[i];
    }
    a = block_sum_d(a, red);
    b = block_sum_d(b, red);
    if (threadIdx.x == 0) {
        stf(loss, dtloss, 0, (float)a);
        stf(count, dtcount, 0, (float)b);
    }
}

// dlogits of row r (log-sum-exp l, scaled by g) into d; the chunks are taken last first
// when `reverse`, so a row just read is reread from the end that is likeliest still in L2.
// Each thread reads an element before it writes the same one, so d may be logits.
__device__ void ce_row_grad(const void* logits, int dtl, int y, bool counted, float l, float g, i64 V, int vec, void* d,
                            int dtd, i64 r, bool reverse) {
    const i64 base = r * V;
    if (vec) {
        const i64 chunks = V / 8, step = blockDim.x;
        const i64 mine = threadIdx.x < chunks ? (chunks - 1 - threadIdx.x) / step + 1 : 0;
        for (i64 t = 0; t < mine; t++) {
            const i64 j = ((i64)threadIdx.x + (reverse ? mine - 1 - t : t) * step) * 8;
            float v[8];
            if (counted) {
                ld8(logits, dtl, base + j, v);
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = (expf(v[k] - l) - (j + k == y ? 1.f : 0.f)) * g;
            } else {
#pragma unroll
                for (int k = 0; k < 8; k++) v[k] = 0.f;
            }
            st8(d, dtd, base + j, v);
        }
    } else {
        for (i64 j = threadIdx.x; j < V; j += blockDim.x) {
            float v = counted ? (expf(ldf(logits, dtl, base + j) - l) - (j == y ? 1.f : 0.f)) * g : 0.f;
            stf(d, dtd, base + j, v);
        }
    }
}

extern "C" __global__ void ce_bwd(const void* logits, int dtl, const int* labels, const void* lse, int dtlse,
                                  const void* dloss, int dtdl, i64 V, int ignore, int vec, void* d, int dtd) {
    grid_dep_wait();
    const i64 r = blockIdx.x;
    int y = labels[r];
    bool counted = y != ignore && y >= 0 && y < V;
    ce_row_grad(logits, dtl, y, counted, ldf(lse, dtlse, r), ldf(dloss, dtdl, 0), V, vec, d, dtd, r, false);
}

// Forward and backward in one pass per row, the gradient written over the logits: rows are
// shared out among the blocks (one block per SM), so each row is reread while it is still in
// L2 and the logits cross DRAM twice (read, write) instead of three times.
extern "C" __global__ void __launch_bounds__(1024) ce_with_grad(void* logits, int dtl, const int* labels, i64 N, i64 V, int ignore, int vec,
                                        void* lse, int dtlse, float* row_loss, float* row_count, const void* dloss,
                                        int dtdl) {
    grid_dep_wait();
    __shared__ float red[65];
    const float g = ldf(dloss, dtdl, 0);
    for (i64 r = blockIdx.x; r < N; r += gridDim.x) {
        float l = ce_row_lse(logits, dtl, labels, V, ignore, vec, lse, dtlse, row_loss, row_count, r, red);
        int y = labels[r];
        bool counted = y != ignore && y >= 0 && y < V;
        ce_row_grad(logits, dtl, y, counted, l, g, V, vec, logits, dtl, r, true);
        __syncthreads();
    }
}
