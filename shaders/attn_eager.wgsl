// Eager attention's own ops (src/ops/attn_eager.rs); the score matmuls are ordinary matmuls.
//
//   split_heads:   y[b, hh, i, :] = x[b*T + i, (hh / r)*D ..]   x [B*T, H*D] -> y [B, H*r, T, D]
//   merge_heads:   y[b*T + i, h*D + e] = sum_c x[b, h*r + c, i, e]          (the adjoint)
//   masked_softmax: each score row of [B, H, T, T] (query i of head h of row b) as a
//                  softmax over the keys query i sees (shaders/attn_mask.wgsl), 0 elsewhere
//                  and everywhere in a row that sees no key
//   softmax_backward: ds = p * (dp - rowsum(p * dp)) over rows of `cols`
//
// split/merge: one invocation per pair of output elements (st2), each element from its own
//   source; u0 = output elements of this dispatch, u1 = T, u2 = H, u6 = r, u7 = D; the
//   dispatch covers whole batch rows.
// masked_softmax: one workgroup per score row; u0 = T, u1 = H, u2 = global index of the
//   dispatch's first row, u3..u5 the mask uniforms, u6 = rows of this dispatch. seg,
//   prefix and rs are bound whole, x and y by rows.
// softmax_backward: one workgroup per row; u0 = cols, u6 = rows of this dispatch.

var<workgroup> red: array<f32, 256>;

fn tree_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] = max(red[lid], red[lid + k]);
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn tree_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}

fn split_src(e: u32) -> u32 {
    let t = pu(1u);
    let h = pu(2u);
    let r = pu(6u);
    let d = pu(7u);
    let dd = e % d;
    let row = e / d;
    let i = row % t;
    let bh = row / t;
    let hh = bh % (h * r);
    let b = bh / (h * r);
    return (b * t + i) * h * d + (hh / r) * d + dd;
}

@compute @workgroup_size(256)
fn split_heads(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e0 = 2u * (group_index(wid, nwg) * WG + lid);
    let n = pu(0u);
    if (e0 >= n) {
        return;
    }
    let both = e0 + 1u < n;
    let v0 = ld_x(split_src(e0));
    var v1 = 0.0;
    if (both) {
        v1 = ld_x(split_src(e0 + 1u));
    }
    st2_y(e0, v0, v1, both);
}

fn merge_elem(e: u32) -> f32 {
    let t = pu(1u);
    let h = pu(2u);
    let r = pu(6u);
    let d = pu(7u);
    let dd = e % d;
    let rest = e / d;
    let hd = rest % h;
    let row = rest / h;
    let i = row % t;
    let b = row / t;
    var acc = 0.0;
    for (var c = 0u; c < r; c++) {
        acc += ld_x((((b * h + hd) * r + c) * t + i) * d + dd);
    }
    return acc;
}

@compute @workgroup_size(256)
fn merge_heads(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e0 = 2u * (group_index(wid, nwg) * WG + lid);
    let n = pu(0u);
    if (e0 >= n) {
        return;
    }
    let both = e0 + 1u < n;
    let v0 = merge_elem(e0);
    var v1 = 0.0;
    if (both) {
        v1 = merge_elem(e0 + 1u);
    }
    st2_y(e0, v0, v1, both);
}

@compute @workgroup_size(256)
fn masked_softmax(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= pu(6u)) {
        return;
    }
    let t = pu(0u);
    let h = pu(1u);
    let gr = pu(2u) + row;
    let b = gr / (h * t);
    let i = gr % t;
    let qi = b * t + i;
    let si = ldi_seg(qi);
    let pi = mask_prefix(qi);
    let ri = mask_rs(qi);
    let base = row * t;
    var m = NEG_BIG;
    for (var j = lid; j < t; j += WG) {
        let kj = b * t + j;
        if (visible(i, j, si, ldi_seg(kj), pi, mask_prefix(kj), ri, mask_rs(kj))) {
            m = max(m, ld_x(base + j));
        }
    }
    m = tree_max(lid, m);
    var l = 0.0;
    for (var j = lid; j < t; j += WG) {
        let kj = b * t + j;
        if (visible(i, j, si, ldi_seg(kj), pi, mask_prefix(kj), ri, mask_rs(kj))) {
            l += exp(ld_x(base + j) - m);
        }
    }
    l = tree_sum(lid, l);
    let inv = select(0.0, 1.0 / l, l > 0.0);
    for (var j = lid; j < t; j += WG) {
        let kj = b * t + j;
        var p = 0.0;
        if (visible(i, j, si, ldi_seg(kj), pi, mask_prefix(kj), ri, mask_rs(kj))) {
            p = exp(ld_x(base + j) - m) * inv;
        }
        st2_y(base + j, p, 0.0, false);
    }
}

@compute @workgroup_size(256)
fn softmax_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    if (row >= pu(6u)) {
        return;
    }
    let cols = pu(0u);
    let base = row * cols;
    var s = 0.0;
    for (var j = lid; j < cols; j += WG) {
        s += ld_p(base + j) * ld_dp(base + j);
    }
    s = tree_sum(lid, s);
    for (var j = lid; j < cols; j += WG) {
        let p = ld_p(base + j);
        st_ds(base + j, p * (ld_dp(base + j) - s));
    }
}
