// Rotary position embedding, rotate-half layout (src/ops/rope.rs; Su et al. 2021, as in
// Hugging Face Llama). x [rows, heads * D], pos [rows] i32, inv [D/2] f32:
//   a = f32(pos) * inv[i]  (formed in f32, as the reference does),
//   y[i]       = x[i] cos a - x[i + D/2] sin a,
//   y[i + D/2] = x[i + D/2] cos a + x[i] sin a,
// both times `scale`; the inverse rotation negates sin. One invocation per (row, head, i).
// Uniforms: u0 = rows, u1 = heads, u2 = D, u3 = inverse, u4 = invocations; f0 = scale.

@compute @workgroup_size(256)
fn rope(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = group_index(wid, nwg) * WG + lid;
    if (t >= pu(4u)) {
        return;
    }
    let heads = pu(1u);
    let d = pu(2u);
    let half = d / 2u;
    let i = t % half;
    let hd = (t / half) % heads;
    let row = t / (half * heads);
    let a = f32(ldi_pos(row)) * ld_inv(i);
    let sc = sin_cos(a);
    var s = sc.x;
    if (pu(3u) == 1u) {
        s = -s;
    }
    s *= pf(0u);
    let c = sc.y * pf(0u);
    let base = row * heads * d + hd * d;
    let x1 = ld_x(base + i);
    let x2 = ld_x(base + i + half);
    st_y(base + i, x1 * c - x2 * s);
    st_y(base + i + half, x2 * c + x1 * s);
}
