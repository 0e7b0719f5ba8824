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

extern "C" __global__ void ce_fwd(const void* logits, int dtl, const int* labels, i64 V, int ignore, int vec, void* lse,
                                  int dtlse, float* row_loss, float* row_count) {
    grid_dep_wait();
    __shared__ float sm[32], ss[32];
    const i64 r = blockIdx.x;
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
        sm[warp] = m;
        ss[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < nw ? sm[lane] : -F_INF;
        s = lane < nw ? ss[lane] : 0.f;
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
        }
    }
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

extern "C" __global__ void ce_bwd(const void* logits, int dtl, const int* labels, const void* lse, int dtlse,
                                  const void* dloss, int dtdl, i64 V, int ignore, int vec, void* d, int dtd) {
    grid_dep_wait();
    const i64 r = blockIdx.x;
    const i64 base = r * V;
    int y = labels[r];
    bool counted = y != ignore && y >= 0 && y < V;
    float l = ldf(lse, dtlse, r), g = ldf(dloss, dtdl, 0);
    if (vec) {
        for (i64 j = (i64)threadIdx.x * 8; j < V; j += (i64)blockDim.x * 8) {
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
