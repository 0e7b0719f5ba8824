// Optimizer ops over many tensors in one launch (src/ops/optim.rs has the CPU reference).
//
// Multi-tensor launches read a table of chunks (at most CHUNK elements of one tensor each),
// built by src/backend/cuda/multi.rs; block b handles chunk b.
//
//   sumsq_partial: partial[b] = sum of x^2 over chunk b        (f32 per block)
//   sumsq_final:   out = sum_b partial[b]                       (f64, one block: deterministic)
//   clip_coef:     norm = sqrt(sumsq), coef = min(1, max_norm / (norm + 1e-6))
//   adamw (torch.optim.AdamW, per element, all in f32 like the CPU reference):
//     g' = g coef;  p = p (1 - lr wd);  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g' g'
//     p = p - (lr / bc1) m / (sqrt(v) / sqrt(bc2) + eps);  g = 0
//   with hyper = [lr, bc1, sqrt(bc2)] and coef read from device memory, so a captured
//   graph replays with each step's values. Explicit _rn operations keep the compiler from
//   contracting into FMAs, so the update rounds like the CPU's.

struct SqChunk {
    u64 ptr;
    i64 start, len, dt;
};

extern "C" __global__ void sumsq_partial(const SqChunk* chunks, float* partial) {
    grid_dep_wait();
    __shared__ float red[32];
    SqChunk c = chunks[blockIdx.x];
    float s = 0.f;
    for (i64 i = c.start + threadIdx.x; i < c.start + c.len; i += blockDim.x) {
        float v = ldf((const void*)c.ptr, (int)c.dt, i);
        s += v * v;
    }
    s = block_sum(s, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

extern "C" __global__ void sumsq_final(const float* partial, int count, void* out, int dto) {
    grid_dep_wait();
    __shared__ double red[32];
    double s = 0.0;
    for (int i = threadIdx.x; i < count; i += blockDim.x) s += (double)partial[i];
    s = block_sum_d(s, red);
    if (threadIdx.x == 0) stf(out, dto, 0, (float)s);
}

extern "C" __global__ void clip_coef_kernel(const void* sumsq, int dts, double max_norm, void* norm, int dtn, void* coef,
                                            int dtc) {
    grid_dep_wait();
    if (threadIdx.x != 0 || blockIdx.x != 0) return;
    double n = sqrt((double)ldf(sumsq, dts, 0));
    double c = max_norm / (n + 1e-6);
    // NaN marks an overflowed gradient: AdamW then skips the step (src/ops/optim.rs).
    // (|n| <= DBL_MAX is false for inf and NaN.)
    if (!(fabs(n) <= 1.7976931348623157e308)) c = __longlong_as_double(0x7ff8000000000000ll);
    stf(norm, dtn, 0, (float)n);
    stf(coef, dtc, 0, (float)(c < 1.0 || c != c ? c : 1.0));
}

struct AdamChunk {
    u64 p, g, m, v, hyper, coef;
    i64 start, len;
    double b1, b2, eps, wd;
    i64 coef_dt;
};

__device__ __forceinline__ void adam_one(float& p, float& g, float& m, float& v, float coef, float decay, float b1,
                                         float b2, float omb1, float omb2, float step, float bc2s, float eps) {
    float gv = __fmul_rn(g, coef);
    p = __fmul_rn(p, decay);
    m = __fadd_rn(__fmul_rn(b1, m), __fmul_rn(omb1, gv));
    v = __fadd_rn(__fmul_rn(b2, v), __fmul_rn(__fmul_rn(omb2, gv), gv));
    p = __fsub_rn(p, __fdiv_rn(__fmul_rn(step, m), __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2s), eps)));
    g = 0.f;
}

extern "C" __global__ void adamw_kernel(const AdamChunk* chunks) {
    grid_dep_wait();
    const AdamChunk c = chunks[blockIdx.x];
    const float* h = (const float*)c.hyper;
    float lr = h[0], bc1 = h[1], bc2s = h[2];
    float coef = ldf((const void*)c.coef, (int)c.coef_dt, 0);
    float decay = (float)(1.0 - (double)lr * c.wd);
    float step = (float)((double)lr / (double)bc1);
    float b1 = (float)c.b1, b2 = (float)c.b2, eps = (float)c.eps;
    float omb1 = __fsub_rn(1.f, b1), omb2 = __fsub_rn(1.f, b2);
    float* P = (float*)c.p;
    float* G = (float*)c.g;
    float* M = (float*)c.m;
    float* Vv = (float*)c.v;
    const i64 end = c.start + c.len;
    if (!(fabsf(coef) <= 3.40282347e38f)) {
        // A non-finite gradient norm: weights and moments stay, the gradient is cleared.
        for (i64 i = c.start + threadIdx.x; i < end; i += blockDim.x) G[i] = 0.f;
        return;
    }
    // start is a multiple of 4 and the tensors are 256-byte aligned: float4 accesses.
    for (i64 i = c.start + (i64)threadIdx.x * 4; i < end; i += (i64)blockDim.x * 4) {
        if (i + 4 <= end) {
            float4 p4 = *(float4*)(P + i), g4 = *(float4*)(G + i), m4 = *(float4*)(M + i), v4 = *(float4*)(Vv + i);
            adam_one(p4.x, g4.x, m4.x, v4.x, coef, decay, b1, b2, omb1, omb2, step, bc2s, eps);
            adam_one(p4.y, g4.y, m4.y, v4.y, coef, decay, b1, b2, omb1, omb2, step, bc2s, eps);
            adam_one(p4.z, g4.z, m4.z, v4.z, coef, decay, b1, b2, omb1, omb2, step, bc2s, eps);
            adam_one(p4.w, g4.w, m4.w, v4.w, coef, decay, b1, b2, omb1, omb2, step, bc2s, eps);
            *(float4*)(P + i) = p4;
            *(float4*)(G + i) = g4;
            *(float4*)(M + i) = m4;
            *(float4*)(Vv + i) = v4;
        } else {
            for (i64 j = i; j < end; j++)
                adam_one(P[j], G[j], M[j], Vv[j], coef, decay, b1, b2, omb1, omb2, step, bc2s, eps);
        }
    }
}
