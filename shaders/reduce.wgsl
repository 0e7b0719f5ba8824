// Deterministic sums (src/ops/elementwise.rs reduce_sum, optim.rs sum_squares): every sum
// is taken in a fixed order, so a run gives the same bits every time (no atomics).
//
//   colsum:    y[c] (+)= sum_r x[r * n + c]  for x [rows, n]: one invocation per column,
//              rows summed in blocks of 64 (the error grows with 64 + rows/64, not rows)
//   colsum_wg: the same with one workgroup per column (few columns, many rows): the 256
//              invocations take rows r = lid (mod 256), then a tree sum
//   partial:   part[base + w] = sum over the elements e = w*256 + lid (mod G*256) of this
//              dispatch's slice of x (squared when P.u[3] = 1), one workgroup w of G
//   final_sum: y[0] = sum_k part[k], one workgroup (tree sum)
//
// Uniforms: colsum/colsum_wg: u0 = n, u1 = rows, u2 = 1 to add to y (a later slice of x).
// partial: u0 = elements, u1 = G, u2 = base, u3 = square. final_sum: u0 = partial count.

var<workgroup> red: array<f32, 256>;

fn tree_sum(lid: u32) -> f32 {
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(256)
fn colsum(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = group_index(wid, nwg) * WG + lid;
    let n = pu(0u);
    let rows = pu(1u);
    if (c >= n) {
        return;
    }
    var total = 0.0;
    for (var r0 = 0u; r0 < rows; r0 += 64u) {
        var s = 0.0;
        let r1 = min(rows, r0 + 64u);
        for (var r = r0; r < r1; r++) {
            s += ld_x(r * n + c);
        }
        total += s;
    }
    if (pu(2u) == 1u) {
        total += ld_y(c);
    }
    st_y(c, total);
}

@compute @workgroup_size(256)
fn colsum_wg(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let c = group_index(wid, nwg);
    let n = pu(0u);
    let rows = pu(1u);
    if (c >= n) {
        return;
    }
    var s = 0.0;
    for (var r = lid; r < rows; r += WG) {
        s += ld_x(r * n + c);
    }
    red[lid] = s;
    workgroupBarrier();
    var total = tree_sum(lid);
    if (lid == 0u) {
        if (pu(2u) == 1u) {
            total += ld_y(c);
        }
        st_y(c, total);
    }
}

@compute @workgroup_size(256)
fn partial(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let w = group_index(wid, nwg);
    let n = pu(0u);
    let groups = pu(1u);
    if (w >= groups) {
        return;
    }
    let stride = groups * WG;
    var s = 0.0;
    for (var e = w * WG + lid; e < n; e += stride) {
        let v = ld_x(e);
        if (pu(3u) == 1u) {
            s += v * v;
        } else {
            s += v;
        }
    }
    red[lid] = s;
    workgroupBarrier();
    let total = tree_sum(lid);
    if (lid == 0u) {
        st_part(pu(2u) + w, total);
    }
}

@compute @workgroup_size(256)
fn final_sum(@builtin(local_invocation_index) lid: u32) {
    let n = pu(0u);
    var s = 0.0;
    for (var k = lid; k < n; k += WG) {
        s += ld_part(k);
    }
    red[lid] = s;
    workgroupBarrier();
    let total = tree_sum(lid);
    if (lid == 0u) {
        st_y(0u, total);
    }
}
