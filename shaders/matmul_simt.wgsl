// Tiled matrix multiply on ordinary (SIMT) invocations, f32 accumulation:
//
//   C[z][m, n] = alpha * sum_k op(A)[z][m, k] * op(B)[z][k, n]   (+ C[z][m, n] if accumulate)
//
// Stored layouts, row-major with a leading dimension (elements between rows):
//   A is [M, K] (lda), or [K, M] when TRANS_A;  B is [K, N] (ldb), or [N, K] when TRANS_B;
//   C is [M, N] (ldc). Batch z starts z * *_bstride elements after *_off.
//
// The host prepends: the tile sizes BM, BN, BK (workgroup tile and depth of one step),
// TM, TN (outputs per invocation), the bools TRANS_A, TRANS_B, VEC_A, VEC_B, and the
// bindings a_buf / b_buf with load_a1/load_a4/load_b1/load_b4 that widen f32, f16 or bf16
// storage to f32. VEC_* means the operand's contiguous extent, leading dimension and offsets
// are multiples of 4, so a group of 4 contiguous elements is either wholly inside or outside.
//
// Workgroup (x, y, z) computes rows [y*BM, y*BM+BM) and columns [x*BN, x*BN+BN) of batch z.
// This file holds the staging; matmul_simt_4x4.wgsl / matmul_simt_8x8.wgsl (appended to it)
// hold the entry point for TM = TN = 4 or 8, written out without indexed private arrays so
// the accumulators stay in registers on every compiler. Each step stages a BM x BK slice of op(A) and a BK x BN slice of op(B) in workgroup memory
// (both k-major, so an invocation reads its TM rows / TN columns as vec4s), zero-filled past
// the edges; every invocation then accumulates its TM x TN block in registers. This is the
// classic register-blocked GEMM (e.g. siboehm's "kernel 5/6", gpu.cpp's matmul v9).

struct Params {
    m: u32, n: u32, k: u32, _p0: u32,
    a_off: u32, lda: u32, a_bstride: u32, _p1: u32,
    b_off: u32, ldb: u32, b_bstride: u32, _p2: u32,
    c_off: u32, ldc: u32, c_bstride: u32, accumulate: u32,
    alpha: f32, _p3: u32, _p4: u32, _p5: u32,
}

@group(0) @binding(2) var<storage, read_write> c_buf: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const WG_X: u32 = BN / TN;
const WG_Y: u32 = BM / TM;
const THREADS: u32 = WG_X * WG_Y;

// a_tile[k][m] and b_tile[k][n], four consecutive m (or n) per vec4.
var<workgroup> a_tile: array<vec4<f32>, BK * BM / 4u>;
var<workgroup> b_tile: array<vec4<f32>, BK * BN / 4u>;

fn put_a(k: u32, m: u32, v: f32) {
    a_tile[(k * BM + m) >> 2u][m & 3u] = v;
}

fn put_b(k: u32, n: u32, v: f32) {
    b_tile[(k * BN + n) >> 2u][n & 3u] = v;
}

// Stage op(A)[row0 .. row0+BM, k0 .. k0+BK] into a_tile.
fn load_a_tile(t: u32, base: u32, row0: u32, k0: u32) {
    if TRANS_A {
        // Stored [K, M]: rows are k, contiguous along m.
        if VEC_A {
            for (var i = t; i < BK * BM / 4u; i += THREADS) {
                let r = i / (BM / 4u);
                let c = (i % (BM / 4u)) * 4u;
                var v = vec4<f32>(0.0);
                if k0 + r < p.k && row0 + c < p.m {
                    v = load_a4(base + (k0 + r) * p.lda + row0 + c);
                }
                a_tile[(r * BM + c) >> 2u] = v;
            }
        } else {
            for (var i = t; i < BK * BM; i += THREADS) {
                let r = i / BM;
                let c = i % BM;
                var v = 0.0;
                if k0 + r < p.k && row0 + c < p.m {
                    v = load_a1(base + (k0 + r) * p.lda + row0 + c);
                }
                put_a(r, c, v);
            }
        }
    } else {
        // Stored [M, K]: rows are m, contiguous along k.
        if VEC_A {
            for (var i = t; i < BM * BK / 4u; i += THREADS) {
                let r = i / (BK / 4u);
                let c = (i % (BK / 4u)) * 4u;
                var v = vec4<f32>(0.0);
                if row0 + r < p.m && k0 + c < p.k {
                    v = load_a4(base + (row0 + r) * p.lda + k0 + c);
                }
                put_a(c, r, v.x);
                put_a(c + 1u, r, v.y);
                put_a(c + 2u, r, v.z);
                put_a(c + 3u, r, v.w);
            }
        } else {
            for (var i = t; i < BM * BK; i += THREADS) {
                let r = i / BK;
                let c = i % BK;
                var v = 0.0;
                if row0 + r < p.m && k0 + c < p.k {
                    v = load_a1(base + (row0 + r) * p.lda + k0 + c);
                }
                put_a(c, r, v);
            }
        }
    }
}

// Stage op(B)[k0 .. k0+BK, col0 .. col0+BN] into b_tile.
fn load_b_tile(t: u32, base: u32, col0: u32, k0: u32) {
    if TRANS_B {
        // Stored [N, K]: rows are n, contiguous along k.
        if VEC_B {
            for (var i = t; i < BN * BK / 4u; i += THREADS) {
                let r = i / (BK / 4u);
                let c = (i % (BK / 4u)) * 4u;
                var v = vec4<f32>(0.0);
                if col0 + r < p.n && k0 + c < p.k {
                    v = load_b4(base + (col0 + r) * p.ldb + k0 + c);
                }
                put_b(c, r, v.x);
                put_b(c + 1u, r, v.y);
                put_b(c + 2u, r, v.z);
                put_b(c + 3u, r, v.w);
            }
        } else {
            for (var i = t; i < BN * BK; i += THREADS) {
                let r = i / BK;
                let c = i % BK;
                var v = 0.0;
                if col0 + r < p.n && k0 + c < p.k {
                    v = load_b1(base + (col0 + r) * p.ldb + k0 + c);
                }
                put_b(c, r, v);
            }
        }
    } else {
        // Stored [K, N]: rows are k, contiguous along n.
        if VEC_B {
            for (var i = t; i < BK * BN / 4u; i += THREADS) {
                let r = i / (BN / 4u);
                let c = (i % (BN / 4u)) * 4u;
                var v = vec4<f32>(0.0);
                if k0 + r < p.k && col0 + c < p.n {
                    v = load_b4(base + (k0 + r) * p.ldb + col0 + c);
                }
                b_tile[(r * BN + c) >> 2u] = v;
            }
        } else {
            for (var i = t; i < BK * BN; i += THREADS) {
                let r = i / BN;
                let c = i % BN;
                var v = 0.0;
                if k0 + r < p.k && col0 + c < p.n {
                    v = load_b1(base + (k0 + r) * p.ldb + col0 + c);
                }
                put_b(r, c, v);
            }
        }
    }
}

// C[idx] = v (+ C[idx]) if column col is inside C.
fn store_c(idx: u32, col: u32, v: f32) {
    if col < p.n {
        var x = v;
        if p.accumulate != 0u {
            x += c_buf[idx];
        }
        c_buf[idx] = x;
    }
}

// Row `row` of C, four columns from `col`, scaled by alpha.
fn store4(c_base: u32, row: u32, col: u32, v: vec4<f32>) {
    if row < p.m {
        let idx = c_base + row * p.ldc + col;
        let w = p.alpha * v;
        store_c(idx, col, w.x);
        store_c(idx + 1u, col + 1u, w.y);
        store_c(idx + 2u, col + 2u, w.z);
        store_c(idx + 3u, col + 3u, w.w);
    }
}
