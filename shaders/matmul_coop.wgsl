// Matrix multiply on cooperative matrices (tensor cores): f16 A and B, f32 accumulation,
// same contract and Params as matmul_simt.wgsl:
//
//   C[z][m, n] = alpha * sum_k op(A)[z][m, k] * op(B)[z][k, n]   (+ C[z][m, n] if accumulate)
//
// The host prepends `enable f16; enable wgpu_cooperative_matrix;` and:
//   BM, BN, BK   workgroup tile and depth of one step (BK a multiple of 16),
//   WM, WN       subgroups ("warps") along M and N; each owns a (16 FM) x (16 FN) block of
//                the tile (FM x FN accumulators of 16 x 16), so BM = 16*FM*WM, BN = 16*FN*WN,
//   SG           the adapter's subgroup size; THREADS = WM*WN*SG,
//   TRANS_A, TRANS_B, VEC (A and B groups of 8 halves are aligned and wholly in or out),
//   A_ROWS, A_COLS, A_LD, A_STAGE (and B_*): the staged tile in its stored orientation
//     (A: BM x BK, or BK x BM when TRANS_A; B: BK x BN, or BN x BK when TRANS_B), its padded
//     row stride in workgroup memory (+8 halves: 16-byte aligned rows and no bank conflicts
//     for the 8 rows a fragment load touches), and the elements per stage,
//   bindings a_buf / b_buf with load_a8/load_a1 (and b): groups of 8 halves as vec4<u32>
//     (held so in registers and widened on the way to workgroup memory, which measured
//     faster than vec4<f16> or mat2x4<f16> loads; naga cannot bitcast them to halves),
//   the entry point `main` (matmul.rs `coop_entry`), written out for its FM x FN
//     accumulators: a larger block per subgroup reuses each fragment load for more
//     multiplies (FM + FN loads for FM * FN products per 16-deep step).
//
// Tiles are staged in workgroup memory exactly as stored, so a transposed operand is the
// same copy followed by a column-major fragment load (coopLoad) instead of a row-major one
// (coopLoadT). Strides of every fragment load/store are constants (naga 30 requires it).
// Two stages: while the subgroups multiply stage s, each invocation already holds the next
// tile's global loads in registers and writes them to stage s^1; one barrier per step.
// Out-of-range rows/columns are staged as zeros, so any M, N, K works. Results go through a
// per-subgroup 16 x 16 f32 scratch so the final writes can be bounds-checked and scaled.

struct Params {
    m: u32, n: u32, k: u32, _p0: u32,
    a_off: u32, lda: u32, a_bstride: u32, _p1: u32,
    b_off: u32, ldb: u32, b_bstride: u32, _p2: u32,
    c_off: u32, ldc: u32, c_bstride: u32, accumulate: u32,
    alpha: f32, _p3: u32, _p4: u32, _p5: u32,
}

@group(0) @binding(2) var<storage, read_write> c_buf: array<f32>;
@group(0) @binding(3) var<uniform> p: Params;

const THREADS: u32 = WM * WN * SG;
const A_GROUPS: u32 = A_ROWS * A_COLS / 8u;
const B_GROUPS: u32 = B_ROWS * B_COLS / 8u;
const A_PER_T: u32 = (A_GROUPS + THREADS - 1u) / THREADS;
const B_PER_T: u32 = (B_GROUPS + THREADS - 1u) / THREADS;

// Staged tiles as vec4<f16>: two 8-byte stores per group of 8 halves; fragment loads take a
// vec4<f16> pointer, so their strides count vec4s.
var<workgroup> a_sh: array<vec4<f16>, 2u * A_STAGE / 4u>;
var<workgroup> b_sh: array<vec4<f16>, 2u * B_STAGE / 4u>;
var<workgroup> c_sh: array<f32, WM * WN * 256u>;

// Eight halves of a stored row starting at column c (a multiple of 8), zeros past the edges.
fn fetch_a(g: u32, base: u32, row0: u32, k0: u32) -> vec4<u32> {
    let r = g / (A_COLS / 8u);
    let c = (g % (A_COLS / 8u)) * 8u;
    var gr: u32;
    var gc: u32;
    var rows: u32;
    var cols: u32;
    if TRANS_A {
        gr = k0 + r; gc = row0 + c; rows = p.k; cols = p.m;
    } else {
        gr = row0 + r; gc = k0 + c; rows = p.m; cols = p.k;
    }
    var out = vec4<u32>(0u);
    if gr < rows && gc < cols {
        let i = base + gr * p.lda + gc;
        if VEC {
            out = load_a8(i);
        } else {
            var h: array<f32, 8>;
            for (var e = 0u; e < 8u; e++) {
                h[e] = 0.0;
                if gc + e < cols {
                    h[e] = f32(load_a1(i + e));
                }
            }
            out = vec4<u32>(pack2x16float(vec2<f32>(h[0], h[1])), pack2x16float(vec2<f32>(h[2], h[3])),
                            pack2x16float(vec2<f32>(h[4], h[5])), pack2x16float(vec2<f32>(h[6], h[7])));
        }
    }
    return out;
}

fn fetch_b(g: u32, base: u32, col0: u32, k0: u32) -> vec4<u32> {
    let r = g / (B_COLS / 8u);
    let c = (g % (B_COLS / 8u)) * 8u;
    var gr: u32;
    var gc: u32;
    var rows: u32;
    var cols: u32;
    if TRANS_B {
        gr = col0 + r; gc = k0 + c; rows = p.n; cols = p.k;
    } else {
        gr = k0 + r; gc = col0 + c; rows = p.k; cols = p.n;
    }
    var out = vec4<u32>(0u);
    if gr < rows && gc < cols {
        let i = base + gr * p.ldb + gc;
        if VEC {
            out = load_b8(i);
        } else {
            var h: array<f32, 8>;
            for (var e = 0u; e < 8u; e++) {
                h[e] = 0.0;
                if gc + e < cols {
                    h[e] = f32(load_b1(i + e));
                }
            }
            out = vec4<u32>(pack2x16float(vec2<f32>(h[0], h[1])), pack2x16float(vec2<f32>(h[2], h[3])),
                            pack2x16float(vec2<f32>(h[4], h[5])), pack2x16float(vec2<f32>(h[6], h[7])));
        }
    }
    return out;
}

fn put_a(s: u32, g: u32, v: vec4<u32>) {
    let r = g / (A_COLS / 8u);
    let c = (g % (A_COLS / 8u)) * 8u;
    let o = (s * A_STAGE + r * A_LD + c) / 4u;
    a_sh[o] = vec4<f16>(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)));
    a_sh[o + 1u] = vec4<f16>(vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)));
}

fn put_b(s: u32, g: u32, v: vec4<u32>) {
    let r = g / (B_COLS / 8u);
    let c = (g % (B_COLS / 8u)) * 8u;
    let o = (s * B_STAGE + r * B_LD + c) / 4u;
    b_sh[o] = vec4<f16>(vec4<f32>(unpack2x16float(v.x), unpack2x16float(v.y)));
    b_sh[o + 1u] = vec4<f16>(vec4<f32>(unpack2x16float(v.z), unpack2x16float(v.w)));
}

// Fragment of op(A): rows m .. m+16, columns kk .. kk+16 of the staged tile in stage s.
fn frag_a(s: u32, m: u32, kk: u32) -> coop_mat16x16<f16, A> {
    if TRANS_A {
        return coopLoad<coop_mat16x16<f16, A>>(&a_sh[(s * A_STAGE + kk * A_LD + m) / 4u], A_LD / 4u);
    } else {
        return coopLoadT<coop_mat16x16<f16, A>>(&a_sh[(s * A_STAGE + m * A_LD + kk) / 4u], A_LD / 4u);
    }
}

// Fragment of op(B): rows kk .. kk+16, columns n .. n+16.
fn frag_b(s: u32, kk: u32, n: u32) -> coop_mat16x16<f16, B> {
    if TRANS_B {
        return coopLoad<coop_mat16x16<f16, B>>(&b_sh[(s * B_STAGE + n * B_LD + kk) / 4u], B_LD / 4u);
    } else {
        return coopLoadT<coop_mat16x16<f16, B>>(&b_sh[(s * B_STAGE + kk * B_LD + n) / 4u], B_LD / 4u);
    }
}

// Write one 16 x 16 accumulator at (row, col) of C through this subgroup's scratch.
fn store_frag(acc: coop_mat16x16<f32, C>, warp: u32, lane: u32, c_base: u32, row: u32, col: u32) {
    coopStoreT(acc, &c_sh[warp * 256u], 16u);
    workgroupBarrier();
    for (var e = lane; e < 256u; e += SG) {
        let r = row + e / 16u;
        let c = col + e % 16u;
        if r < p.m && c < p.n {
            let idx = c_base + r * p.ldc + c;
            var v = p.alpha * c_sh[warp * 256u + e];
            if p.accumulate != 0u {
                v += c_buf[idx];
            }
            c_buf[idx] = v;
        }
    }
    workgroupBarrier();
}
