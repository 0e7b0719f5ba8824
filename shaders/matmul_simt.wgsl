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
// the accumulators stay in registers on every compiler. Each step stages a BM x BK slice of
// op(A) and a BK x BN slice of op(B) in workgroup memory (both k-major, so an invocation
// reads its TM rows / TN columns as vec4s), zero-filled past the edges; every invocation
// then accumulates its TM x TN block in registers. This is the classic register-blocked
// GEMM (e.g. siboehm's "kernel 5/6", gpu.cpp's matmul v9), with the next step prefetched
// into registers while the current one is multiplied (double buffering).

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

// Two stages of a_tile[k][m] and b_tile[k][n], four consecutive m (or n) per vec4. While
// the invocations multiply stage s, each already holds the next step's global loads in
// registers (fetch_*) and writes them to stage s^1 afterwards (put_*): one barrier per step,
// and the loads' latency hides behind the arithmetic.
const A_STAGE: u32 = BK * BM / 4u;
const B_STAGE: u32 = BK * BN / 4u;
var<workgroup> a_tile: array<vec4<f32>, 2u * A_STAGE>;
var<workgroup> b_tile: array<vec4<f32>, 2u * B_STAGE>;

// A step stages op(A)[row0 .. row0+BM, k0 .. k0+BK] and op(B)[k0 .. k0+BK, col0 .. col0+BN]
// as groups of 4 elements contiguous in storage (A_GROUPS and B_GROUPS of them), zero past
// the edges; each invocation moves A_PER_T and B_PER_T groups.
const A_GROUPS: u32 = BM * BK / 4u;
const B_GROUPS: u32 = BK * BN / 4u;
const A_PER_T: u32 = (A_GROUPS + THREADS - 1u) / THREADS;
const B_PER_T: u32 = (B_GROUPS + THREADS - 1u) / THREADS;

// Four elements from i on, zero from column `cols` on (gc: the column of i) or if the row
// is outside; VEC_* groups are wholly in or out.
fn fetch4_a(i: u32, row_ok: bool, gc: u32, cols: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if row_ok && gc < cols {
        if VEC_A {
            v = load_a4(i);
        } else {
            for (var e = 0u; e < 4u; e++) {
                if gc + e < cols {
                    v[e] = load_a1(i + e);
                }
            }
        }
    }
    return v;
}

fn fetch4_b(i: u32, row_ok: bool, gc: u32, cols: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if row_ok && gc < cols {
        if VEC_B {
            v = load_b4(i);
        } else {
            for (var e = 0u; e < 4u; e++) {
                if gc + e < cols {
                    v[e] = load_b1(i + e);
                }
            }
        }
    }
    return v;
}

// Group g of op(A)'s step at k0: stored [K, M] (TRANS_A) it runs along m, else along k.
fn fetch_a(g: u32, base: u32, row0: u32, k0: u32) -> vec4<f32> {
    if TRANS_A {
        let r = g / (BM / 4u);
        let c = (g % (BM / 4u)) * 4u;
        return fetch4_a(base + (k0 + r) * p.lda + row0 + c, k0 + r < p.k, row0 + c, p.m);
    }
    let r = g / (BK / 4u);
    let c = (g % (BK / 4u)) * 4u;
    return fetch4_a(base + (row0 + r) * p.lda + k0 + c, row0 + r < p.m, k0 + c, p.k);
}

fn put_a(s: u32, g: u32, v: vec4<f32>) {
    let o = s * A_STAGE;
    if TRANS_A {
        a_tile[o + g] = v;  // (k, m .. m+4) is already a vec4 of a_tile[k]
    } else {
        let m = g / (BK / 4u);
        let k = (g % (BK / 4u)) * 4u;
        let q = o + (k * BM + m) / 4u;
        a_tile[q][m & 3u] = v.x;
        a_tile[q + BM / 4u][m & 3u] = v.y;
        a_tile[q + BM / 2u][m & 3u] = v.z;
        a_tile[q + 3u * BM / 4u][m & 3u] = v.w;
    }
}

// Group g of op(B)'s step at k0: stored [N, K] (TRANS_B) it runs along k, else along n.
fn fetch_b(g: u32, base: u32, col0: u32, k0: u32) -> vec4<f32> {
    if TRANS_B {
        let r = g / (BK / 4u);
        let c = (g % (BK / 4u)) * 4u;
        return fetch4_b(base + (col0 + r) * p.ldb + k0 + c, col0 + r < p.n, k0 + c, p.k);
    }
    let r = g / (BN / 4u);
    let c = (g % (BN / 4u)) * 4u;
    return fetch4_b(base + (k0 + r) * p.ldb + col0 + c, k0 + r < p.k, col0 + c, p.n);
}

fn put_b(s: u32, g: u32, v: vec4<f32>) {
    let o = s * B_STAGE;
    if TRANS_B {
        let n = g / (BK / 4u);
        let k = (g % (BK / 4u)) * 4u;
        let q = o + (k * BN + n) / 4u;
        b_tile[q][n & 3u] = v.x;
        b_tile[q + BN / 4u][n & 3u] = v.y;
        b_tile[q + BN / 2u][n & 3u] = v.z;
        b_tile[q + 3u * BN / 4u][n & 3u] = v.w;
    } else {
        b_tile[o + g] = v;
    }
}

// This invocation's groups of the step at k0, held in registers until put_step.
struct Step {
    a: array<vec4<f32>, A_PER_T>,
    b: array<vec4<f32>, B_PER_T>,
}

fn fetch_step(t: u32, a_base: u32, b_base: u32, row0: u32, col0: u32, k0: u32) -> Step {
    var st: Step;
    for (var i = 0u; i < A_PER_T; i++) {
        let g = t + i * THREADS;
        if g < A_GROUPS { st.a[i] = fetch_a(g, a_base, row0, k0); }
    }
    for (var i = 0u; i < B_PER_T; i++) {
        let g = t + i * THREADS;
        if g < B_GROUPS { st.b[i] = fetch_b(g, b_base, col0, k0); }
    }
    return st;
}

fn put_step(s: u32, t: u32, st: Step) {
    for (var i = 0u; i < A_PER_T; i++) {
        let g = t + i * THREADS;
        if g < A_GROUPS { put_a(s, g, st.a[i]); }
    }
    for (var i = 0u; i < B_PER_T; i++) {
        let g = t + i * THREADS;
        if g < B_GROUPS { put_b(s, g, st.b[i]); }
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
