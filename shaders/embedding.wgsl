// Embedding gather and its scatter-add backward (src/ops/embedding.rs).
//   forward:  y[i, c] = table[ids[i], c], or 0 when ids[i] is outside [0, V)
//   backward: dtable[r, c] = sum over i with ids[i] == r (in order of i) of dy[i, c]
// A table larger than one storage binding is bound in row windows, one dispatch per
// window (and per window of y / dy); ids are always bound whole.
//
// emb_fwd: one invocation per element of the bound rows of y. Uniforms: u0 = elements,
//   u1 = H, u2 = first row of y bound, u3/u4 = first/count of the table rows bound, u5 = V,
//   u6 = 1 when this dispatch writes the zero rows of out-of-range ids.
// emb_bwd: deterministic without atomics: one workgroup per token i; the token that is the
//   first occurrence of its id owns that table row. It collects the later tokens with the
//   same id in order (a workgroup prefix sum compacts each tile of 256 ids) and sums their
//   dy rows; rows no token names stay as zero-filled before. Uniforms: u0 = N, u1 = H,
//   u2/u3 = first/count of the table rows bound, u4 = V, u5/u6 = first/count of the dy rows
//   bound, u7 = 1 for the first dy window (writes), else adds. The host sets
//   MAXC = ceil(H / 256), the columns each invocation owns.

@compute @workgroup_size(256)
fn emb_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let e = group_index(wid, nwg) * WG + lid;
    if (e >= pu(0u)) {
        return;
    }
    let h = pu(1u);
    let r = e / h;
    let c = e % h;
    let id = ldi_ids(pu(2u) + r);
    let r0 = pu(3u);
    if (id >= 0 && u32(id) < pu(5u)) {
        let row = u32(id);
        if (row >= r0 && row < r0 + pu(4u)) {
            st_y(e, ld_table((row - r0) * h + c));
        }
    } else if (pu(6u) == 1u) {
        st_y(e, 0.0);
    }
}

var<workgroup> scan: array<u32, 256>;
var<workgroup> list: array<u32, 256>;
var<workgroup> owner: u32;

@compute @workgroup_size(256)
fn emb_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let h = pu(1u);
    let r0 = pu(2u);
    let id = ldi_ids(i);
    // Is an earlier token the owner of this id?
    var earlier = 0u;
    for (var j = lid; j < i; j += WG) {
        if (ldi_ids(j) == id) {
            earlier = 1u;
        }
    }
    scan[lid] = earlier;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            scan[lid] = max(scan[lid], scan[lid + k]);
        }
        workgroupBarrier();
    }
    if (lid == 0u) {
        let in_window = id >= 0 && u32(id) < pu(4u) && u32(id) >= r0 && u32(id) < r0 + pu(3u);
        owner = select(0u, 1u, in_window && scan[0] == 0u);
    }
    if (workgroupUniformLoad(&owner) == 0u) {
        return;
    }
    var acc: array<f32, MAXC>;
    for (var k = 0u; k < MAXC; k++) {
        acc[k] = 0.0;
    }
    let d0 = pu(5u);
    let d1 = d0 + pu(6u);
    for (var j0 = max(i, d0); j0 < d1; j0 += WG) {
        let j = j0 + lid;
        var hit = 0u;
        if (j < d1) {
            if (ldi_ids(j) == id) {
                hit = 1u;
            }
        }
        // Inclusive prefix sum (Hillis & Steele) of the hits of this tile.
        scan[lid] = hit;
        workgroupBarrier();
        for (var k = 1u; k < 256u; k <<= 1u) {
            var add = 0u;
            if (lid >= k) {
                add = scan[lid - k];
            }
            workgroupBarrier();
            scan[lid] += add;
            workgroupBarrier();
        }
        if (hit == 1u) {
            list[scan[lid] - 1u] = j;
        }
        let hits = workgroupUniformLoad(&scan[255]);
        for (var q = 0u; q < hits; q++) {
            let row = (list[q] - d0) * h;
            for (var k = 0u; k < MAXC; k++) {
                let c = lid + k * WG;
                if (c < h) {
                    acc[k] += ld_dy(row + c);
                }
            }
        }
        workgroupBarrier();
    }
    let out = (u32(id) - r0) * h;
    for (var k = 0u; k < MAXC; k++) {
        let c = lid + k * WG;
        if (c < h) {
            var v = acc[k];
            if (pu(7u) == 0u) {
                v += ld_dtable(out + c);
            }
            st_dtable(out + c, v);
        }
    }
}
