// Cross-entropy over the vocabulary with an ignore index (src/ops/cross_entropy.rs).
// logits [N, V], labels [N] i32; a row counts when its label is not the ignore index and
// lies in [0, V).
//   lse_r = m_r + ln sum_j exp(x_rj - m_r),  m_r = max_j x_rj
//   loss = sum over counted rows of (lse_r - x_r,label),  count = number of counted rows
//   dlogits_rj = (exp(x_rj - lse_r) - [j == label_r]) * dloss on counted rows, else 0
//
// ce_rows:  one workgroup per row: tree max, tree sum of exponentials, lse.
// ce_total: one workgroup sums the rows of this dispatch in a fixed order into loss and
//           count (P.u[3] = 1 adds to the values of an earlier slice of rows).
// ce_bwd:   elementwise over the n = rows * V elements of this dispatch, two per
//           invocation (whole words of an f16/bf16 output).
// Uniforms: u0 = V (ce_bwd: elements), u1 = rows (ce_bwd: V), u2 = ignore index (i32 bits).

var<workgroup> red: array<f32, 256>;
var<workgroup> red2: array<vec2<f32>, 256>;

@compute @workgroup_size(256)
fn ce_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    let v = pu(0u);
    if (row >= pu(1u)) {
        return;
    }
    let base = row * v;
    var m = NEG_BIG;
    for (var j = lid; j < v; j += WG) {
        m = max(m, ld_logits(base + j));
    }
    red[lid] = m;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] = max(red[lid], red[lid + k]);
        }
        workgroupBarrier();
    }
    let mx = red[0];
    workgroupBarrier();
    var s = 0.0;
    for (var j = lid; j < v; j += WG) {
        s += exp(ld_logits(base + j) - mx);
    }
    red[lid] = s;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        st_lse(row, mx + log(red[0]));
    }
}

fn counted(label: i32, v: u32) -> bool {
    return label != bitcast<i32>(pu(2u)) && label >= 0 && u32(label) < v;
}

@compute @workgroup_size(256)
fn ce_total(@builtin(local_invocation_index) lid: u32) {
    let v = pu(0u);
    let rows = pu(1u);
    var acc = vec2<f32>(0.0, 0.0);
    for (var r = lid; r < rows; r += WG) {
        let label = ldi_labels(r);
        if (counted(label, v)) {
            acc += vec2<f32>(ld_lse(r) - ld_logits(r * v + u32(label)), 1.0);
        }
    }
    red2[lid] = acc;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red2[lid] += red2[lid + k];
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        var total = red2[0];
        if (pu(3u) == 1u) {
            total += vec2<f32>(ld_loss(0u), ld_count(0u));
        }
        st_loss(0u, total.x);
        st_count(0u, total.y);
    }
}

fn ce_grad(e: u32, v: u32, dloss: f32) -> f32 {
    let r = e / v;
    let j = e % v;
    let label = ldi_labels(r);
    if (!counted(label, v)) {
        return 0.0;
    }
    let p = exp(ld_logits(e) - ld_lse(r));
    return (p - select(0.0, 1.0, u32(label) == j)) * dloss;
}

@compute @workgroup_size(256)
fn ce_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = 2u * (group_index(wid, nwg) * WG + lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let v = pu(1u);
    let dloss = ld_dloss(0u);
    let both = i + 1u < n;
    let v0 = ce_grad(i, v, dloss);
    var v1 = 0.0;
    if (both) {
        v1 = ce_grad(i + 1u, v, dloss);
    }
    st2_dlogits(i, v0, v1, both);
}
