// Elementwise and shape ops (src/ops/elementwise.rs has the CPU reference).
//
//   binary:      y[i] = a[i] (+ or *) b[i % nb]   b is a's shape, a suffix of it, or one element
//   scale:       y[i] = x[i] * f                  f rounded to f32 first, as the CPU does
//   cast:        y[i] = x[i]                      widen to f32, round to nearest even on store
//   cast_multi:  the cast over a table of chunks of many tensors (block b: chunk b)
//   broadcast:   y[i] = x[i % nx]
//   reduce_sum:  y[c] = sum_r x[r * C + c]        x seen as [R, C]; two stages, f64 at the end
//   dropout:     y[i] = keep(i) ? x[i] * k : 0    k = 1 / (1 - p); keep from the counter hash
//   accumulate:  acc[i] += g[i]                   (in place)
//
// Every thread handles 8 consecutive elements: 16-byte loads when the 8 are in range, a
// scalar tail otherwise.

#define EPT 8

extern "C" __global__ void binary_kernel(const void* a, int dta, const void* b, int dtb, void* y, int dty, i64 n,
                                         i64 nb, int op) {
    grid_dep_wait();
    i64 i0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * EPT;
    if (i0 >= n) return;
    float va[EPT], vb[EPT];
    bool full = i0 + EPT <= n;
    if (full) {
        ld8(a, dta, i0, va);
    } else {
        for (int k = 0; k < EPT; k++) va[k] = i0 + k < n ? ldf(a, dta, i0 + k) : 0.f;
    }
    if (full && nb == n) {
        ld8(b, dtb, i0, vb);
    } else if (nb == 1) {
        float s = ldf(b, dtb, 0);
        for (int k = 0; k < EPT; k++) vb[k] = s;
    } else {
        for (int k = 0; k < EPT; k++) vb[k] = i0 + k < n ? ldf(b, dtb, (i0 + k) % nb) : 0.f;
    }
#pragma unroll
    for (int k = 0; k < EPT; k++) va[k] = op == 0 ? va[k] + vb[k] : va[k] * vb[k];
    if (full) {
        st8(y, dty, i0, va);
    } else {
        for (int k = 0; k < EPT && i0 + k < n; k++) stf(y, dty, i0 + k, va[k]);
    }
}

extern "C" __global__ void scale_kernel(const void* x, int dtx, void* y, int dty, i64 n, float f) {
    grid_dep_wait();
    i64 i0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * EPT;
    if (i0 >= n) return;
    float v[EPT];
    if (i0 + EPT <= n) {
        ld8(x, dtx, i0, v);
#pragma unroll
        for (int k = 0; k < EPT; k++) v[k] = __fmul_rn(v[k], f);
        st8(y, dty, i0, v);
    } else {
        for (i64 i = i0; i < n; i++) stf(y, dty, i, __fmul_rn(ldf(x, dtx, i), f));
    }
}

extern "C" __global__ void cast_kernel(const void* x, int dtx, void* y, int dty, i64 n) {
    grid_dep_wait();
    i64 i0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * EPT;
    if (i0 >= n) return;
    float v[EPT];
    if (i0 + EPT <= n) {
        ld8(x, dtx, i0, v);
        st8(y, dty, i0, v);
    } else {
        for (i64 i = i0; i < n; i++) stf(y, dty, i, ldf(x, dtx, i));
    }
}

struct CastChunk {
    u64 src, dst;
    i64 start, len, dts, dtd;
};

extern "C" __global__ void cast_multi(const CastChunk* chunks) {
    grid_dep_wait();
    CastChunk c = chunks[blockIdx.x];
    for (i64 i = c.start + threadIdx.x; i < c.start + c.len; i += blockDim.x)
        stf((void*)c.dst, (int)c.dtd, i, ldf((const void*)c.src, (int)c.dts, i));
}

extern "C" __global__ void broadcast_kernel(const void* x, int dtx, i64 nx, void* y, int dty, i64 n) {
    grid_dep_wait();
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) stf(y, dty, i, ldf(x, dtx, i % nx));
}

// Stage 1 of a column sum over x [R, C] with C > 1: block (bx, by) sums rows
// [by * rows_per_chunk, ...) of columns bx * 256 + tid into partial[by * C + col].
extern "C" __global__ void colsum_partial(const void* x, int dtx, i64 R, i64 C, i64 rows_per_chunk, float* partial) {
    grid_dep_wait();
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    i64 r0 = (i64)blockIdx.y * rows_per_chunk;
    i64 r1 = min(R, r0 + rows_per_chunk);
    float s = 0.f;
    for (i64 r = r0; r < r1; r++) s += ldf(x, dtx, r * C + c);
    partial[(i64)blockIdx.y * C + c] = s;
}

// Stage 2: y[c] = sum over chunks of partial[chunk * C + c], summed in f64.
extern "C" __global__ void colsum_final(const float* partial, i64 chunks, i64 C, void* y, int dty) {
    grid_dep_wait();
    i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    double s = 0.0;
    for (i64 k = 0; k < chunks; k++) s += (double)partial[k * C + c];
    stf(y, dty, c, (float)s);
}

// Full sum, stage 1: each block sums a grid-strided share of x into partial[blockIdx.x].
extern "C" __global__ void sum_partial(const void* x, int dtx, i64 n, float* partial) {
    grid_dep_wait();
    __shared__ float red[32];
    float s = 0.f;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (i64)gridDim.x * blockDim.x)
        s += ldf(x, dtx, i);
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

// Full sum, stage 2 (one block): y[0] = sum of the partials, in f64.
extern "C" __global__ void sum_final(const float* partial, int count, void* y, int dty) {
    grid_dep_wait();
    __shared__ double red[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += (double)partial[i];
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) stf(y, dty, 0, (float)s);
}

// Wellons' lowbias32, as hash32 in src/ops/elementwise.rs.
__device__ __forceinline__ u32 hash32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

// seed and p are read from device memory (they change every step; a captured graph replays
// the launch with the same pointers).
extern "C" __global__ void dropout_kernel(const void* x, int dtx, const u32* seed, const float* pp, u32 salt, void* y,
                                          int dty, i64 n) {
    grid_dep_wait();
    i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float p = pp[0];
    u32 key = hash32(seed[0] + salt * 0x9e3779b9u);
    float k = p < 1.f ? (float)(1.0 / (1.0 - (double)p)) : 0.f;
    float u = (float)(hash32(key ^ (u32)i) >> 8) * (1.0f / 16777216.0f);
    stf(y, dty, i, u >= p ? __fmul_rn(ldf(x, dtx, i), k) : 0.f);
}

extern "C" __global__ void accumulate_kernel(void* acc, int dta, const void* g, int dtg, i64 n) {
    grid_dep_wait();
    i64 i0 = ((i64)blockIdx.x * blockDim.x + threadIdx.x) * EPT;
    if (i0 >= n) return;
    float va[EPT], vg[EPT];
    if (i0 + EPT <= n) {
        ld8(acc, dta, i0, va);
        ld8(g, dtg, i0, vg);
#pragma unroll
        for (int k = 0; k < EPT; k++) va[k] = __fadd_rn(va[k], vg[k]);
        st8(acc, dta, i0, va);
    } else {
        for (i64 i = i0; i < n; i++) stf(acc, dta, i, __fadd_rn(ldf(acc, dta, i), ldf(g, dtg, i)));
    }
}

// Embedding gather (src/ops/embedding.rs): y[i, :] = table[ids[i], :], zeros for an id out of
// range. One thread per output element.
extern "C" __global__ void embedding_kernel(const void* table, int dtt, const int* ids, void* y, int dty, i64 N, i64 H,
                                            i64 V) {
    grid_dep_wait();
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= N * H) return;
    i64 i = e / H, h = e - i * H;
    int id = ids[i];
    float v = (id >= 0 && id < V) ? ldf(table, dtt, (i64)id * H + h) : 0.f;
    stf(y, dty, e, v);
}

// Embedding backward: dtable[ids[i], :] += dy[i, :] into a zeroed f32 accumulator.
extern "C" __global__ void embedding_backward_kernel(const void* dy, int dtd, const int* ids, float* acc, i64 N, i64 H,
                                                     i64 V) {
    grid_dep_wait();
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= N * H) return;
    i64 i = e / H, h = e - i * H;
    int id = ids[i];
    if (id >= 0 && id < V) atomicAdd(acc + (i64)id * H + h, ldf(dy, dtd, e));
}

// KV cache write: row i of x [N, W] goes to row slot[i] of cache [B*T, W]; negative or
// out-of-range slots are skipped (src/ops/attention.rs cpu_cache_write).
extern "C" __global__ void cache_write_kernel(void* cache, int dtc, i64 rows, const void* x, int dtx, const int* slot,
                                              i64 N, i64 W) {
    grid_dep_wait();
    i64 e = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= N * W) return;
    i64 i = e / W, c = e % W;
    int s = slot[i];
    if (s < 0 || (i64)s >= rows) return;
    stf(cache, dtc, (i64)s * W + c, ldf(x, dtx, e));
}
