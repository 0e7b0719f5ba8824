// RMSNorm (src/ops/rmsnorm.rs; Zhang & Sennrich 2019) over rows of x [rows, H]:
//   r = 1 / sqrt(mean(x^2) + eps),  y = (x r) * w.
// Backward, with xh = x r and g = dy * w:
//   dx = r (g - xh * mean(g * xh)),  dw = sum_rows dy * xh.
//
// rms_fwd: one workgroup per row; the sum of squares is a tree sum over the workgroup.
// rms_bwd: one workgroup per block of P.u[2] rows, rows in order; it writes dx and the
//   block's partial dw into part[(P.u[3] + block) * H ..] (part is bound from the first
//   block of the dispatch, so u3 = 0); the partials are then summed
//   over blocks in a fixed order by reduce.wgsl's colsum, so dw is deterministic.
//   With ADD, acc (x's shape) is added to dx; without DW (a frozen weight) no partials are
//   written and part is a placeholder.
// Uniforms: u0 = H, u1 = rows in this dispatch, u2 = rows per block, u3 = first block;
// f0 = eps. The host sets MAXC = ceil(H / 256), the columns each invocation owns, and the
// flags ADD and DW.

var<workgroup> red: array<vec2<f32>, 256>;

fn tree_sum2(lid: u32) -> vec2<f32> {
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            red[lid] += red[lid + k];
        }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(256)
fn rms_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let row = group_index(wid, nwg);
    let h = pu(0u);
    if (row >= pu(1u)) {
        return;
    }
    let base = row * h;
    var s = 0.0;
    for (var c = lid; c < h; c += WG) {
        let v = ld_x(base + c);
        s += v * v;
    }
    red[lid] = vec2<f32>(s, 0.0);
    workgroupBarrier();
    let ss = tree_sum2(lid).x;
    let r = 1.0 / sqrt(ss / f32(h) + pf(0u));
    for (var c = lid; c < h; c += WG) {
        st_y(base + c, (ld_x(base + c) * r) * ld_w(c));
    }
}

@compute @workgroup_size(256)
fn rms_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let blk = group_index(wid, nwg);
    let h = pu(0u);
    let rows = pu(1u);
    let per = pu(2u);
    let first = blk * per;
    if (first >= rows) {
        return;
    }
    let last = min(rows, first + per);
    var acc: array<f32, MAXC>;
    for (var k = 0u; k < MAXC; k++) {
        acc[k] = 0.0;
    }
    for (var row = first; row < last; row++) {
        let base = row * h;
        var s = vec2<f32>(0.0, 0.0);
        for (var c = lid; c < h; c += WG) {
            let x = ld_x(base + c);
            s += vec2<f32>(x * x, ld_dy(base + c) * ld_w(c) * x);
        }
        red[lid] = s;
        workgroupBarrier();
        let t = tree_sum2(lid);
        let r = 1.0 / sqrt(t.x / f32(h) + pf(0u));
        let dot = t.y * r / f32(h);
        for (var k = 0u; k < MAXC; k++) {
            let c = lid + k * WG;
            if (c < h) {
                let dy = ld_dy(base + c);
                let xh = ld_x(base + c) * r;
                var d = r * (dy * ld_w(c) - xh * dot);
                if (ADD) {
                    d += ld_acc(base + c);
                }
                st_dx(base + c, d);
                acc[k] += dy * xh;
            }
        }
        // Everyone has read red[0] before the next row overwrites it.
        workgroupBarrier();
    }
    if (!DW) {
        return;
    }
    let out = (pu(3u) + blk) * h;
    for (var k = 0u; k < MAXC; k++) {
        let c = lid + k * WG;
        if (c < h) {
            st_part(out + c, acc[k]);
        }
    }
}
