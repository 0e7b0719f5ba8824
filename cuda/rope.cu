// Rotary position embedding, rotate-half layout (src/ops/rope.rs).
//
// x [N, heads * hd], pos [N] i32, inv_freq [hd / 2] f32. For token n and pair i < hd / 2:
//   a = f32(pos[n]) * inv_freq[i]        (an f32 product, as Hugging Face and the CPU form it)
//   s = sin(a) * scale * (inverse ? -1 : 1),  c = cos(a) * scale   (in f64, then rounded to f32)
//   y[h, i]        = x1 c - x2 s
//   y[h, i + hd/2] = x2 c + x1 s            with x1 = x[h, i], x2 = x[h, i + hd/2]
// One thread per (token, pair) computes the angle once and rotates that pair in every head.

extern "C" __global__ void rope_kernel(const void* x, int dtx, const int* pos, const float* inv_freq, void* y, int dty,
                                       i64 N, int heads, int hd, int inverse, double scale) {
    int half = hd / 2;
    i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * half) return;
    i64 n = t / half;
    int i = (int)(t - n * half);
    float a = (float)pos[n] * inv_freq[i];
    double s, c;
    sincos((double)a, &s, &c);
    float sf = (float)((inverse ? -s : s) * scale), cf = (float)(c * scale);
    i64 row = n * (i64)heads * hd;
    for (int h = 0; h < heads; h++) {
        i64 o = row + (i64)h * hd + i;
        float x1 = ldf(x, dtx, o), x2 = ldf(x, dtx, o + half);
        stf(y, dty, o, __fsub_rn(__fmul_rn(x1, cf), __fmul_rn(x2, sf)));
        stf(y, dty, o + half, __fadd_rn(__fmul_rn(x2, cf), __fmul_rn(x1, sf)));
    }
}
