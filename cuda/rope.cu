// Rotary position embedding, rotate-half layout (src/ops/rope.rs).
//
// x [N, heads * hd], pos [N] i32, inv_freq [hd / 2] f32. For token n and pair i < hd / 2:
//   a = f32(pos[n]) * inv_freq[i]        (an f32 product, as Hugging Face and the CPU form it)
//   s = sin(a) * scale * (inverse ? -1 : 1),  c = cos(a) * scale   (in f64, then rounded to f32)
//   y[h, i]        = x1 c - x2 s
//   y[h, i + hd/2] = x2 c + x1 s            with x1 = x[h, i], x2 = x[h, i + hd/2]
// One thread per (token, group of P consecutive pairs, group of up to HPT heads) computes the
// P angles once and rotates those pairs in each of its heads; P = 8 (16-byte loads) when
// hd / 2 is a multiple of 8, else 1. Reads and writes each element once, so x may be y.

#define ROPE_HPT 4

template <int P>
__device__ void rope(const void* x, int dtx, const int* pos, const float* inv_freq, void* y, int dty, i64 N, int heads,
                     int hd, int inverse, double scale) {
    const int half = hd / 2, groups = half / P, hgroups = (heads + ROPE_HPT - 1) / ROPE_HPT;
    i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= N * groups * hgroups) return;
    const int g = (int)(t % groups);
    const int hg = (int)((t / groups) % hgroups);
    const i64 n = t / ((i64)groups * hgroups);
    float sf[P], cf[P];
#pragma unroll
    for (int k = 0; k < P; k++) {
        float a = (float)pos[n] * inv_freq[g * P + k];
        double s, c;
        sincos((double)a, &s, &c);
        sf[k] = (float)((inverse ? -s : s) * scale);
        cf[k] = (float)(c * scale);
    }
    const int h1 = min(heads, (hg + 1) * ROPE_HPT);
    for (int h = hg * ROPE_HPT; h < h1; h++) {
        const i64 o = (n * heads + h) * (i64)hd + g * P;
        float x1[P], x2[P], y1[P], y2[P];
        if (P == 8) {
            ld8(x, dtx, o, x1);
            ld8(x, dtx, o + half, x2);
        } else {
#pragma unroll
            for (int k = 0; k < P; k++) {
                x1[k] = ldf(x, dtx, o + k);
                x2[k] = ldf(x, dtx, o + half + k);
            }
        }
#pragma unroll
        for (int k = 0; k < P; k++) {
            y1[k] = __fsub_rn(__fmul_rn(x1[k], cf[k]), __fmul_rn(x2[k], sf[k]));
            y2[k] = __fadd_rn(__fmul_rn(x2[k], cf[k]), __fmul_rn(x1[k], sf[k]));
        }
        if (P == 8) {
            st8(y, dty, o, y1);
            st8(y, dty, o + half, y2);
        } else {
#pragma unroll
            for (int k = 0; k < P; k++) {
                stf(y, dty, o + k, y1[k]);
                stf(y, dty, o + half + k, y2[k]);
            }
        }
    }
}

extern "C" __global__ void rope_v8(const void* x, int dtx, const int* pos, const float* inv_freq, void* y, int dty,
                                   i64 N, int heads, int hd, int inverse, double scale) {
    grid_dep_wait();
    rope<8>(x, dtx, pos, inv_freq, y, dty, N, heads, hd, inverse, scale);
}
extern "C" __global__ void rope_v1(const void* x, int dtx, const int* pos, const float* inv_freq, void* y, int dty,
                                   i64 N, int heads, int hd, int inverse, double scale) {
    grid_dep_wait();
    rope<1>(x, dtx, pos, inv_freq, y, dty, N, heads, hd, inverse, scale);
}
