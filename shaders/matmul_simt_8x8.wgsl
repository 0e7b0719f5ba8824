
// Entry point for TM = TN = 8: invocation (tx, ty) owns rows ty*8 .. ty*8+7 and the column
// groups tx*4 .. tx*4+3 and BN/2 + tx*4 .. BN/2 + tx*4+3 (two halves of the tile, so that
// neighbouring invocations read neighbouring vec4s of b_tile: no bank conflicts).
@compute @workgroup_size(THREADS)
fn main(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let a_base = p.a_off + wg.z * p.a_bstride;
    let b_base = p.b_off + wg.z * p.b_bstride;
    let c_base = p.c_off + wg.z * p.c_bstride;
    let tx = t % WG_X;
    let ty = t / WG_X;

    var c0a = vec4<f32>(0.0);
    var c0b = vec4<f32>(0.0);
    var c1a = vec4<f32>(0.0);
    var c1b = vec4<f32>(0.0);
    var c2a = vec4<f32>(0.0);
    var c2b = vec4<f32>(0.0);
    var c3a = vec4<f32>(0.0);
    var c3b = vec4<f32>(0.0);
    var c4a = vec4<f32>(0.0);
    var c4b = vec4<f32>(0.0);
    var c5a = vec4<f32>(0.0);
    var c5b = vec4<f32>(0.0);
    var c6a = vec4<f32>(0.0);
    var c6b = vec4<f32>(0.0);
    var c7a = vec4<f32>(0.0);
    var c7b = vec4<f32>(0.0);
    put_step(0u, t, fetch_step(t, a_base, b_base, row0, col0, 0u));
    workgroupBarrier();
    let nk = (p.k + BK - 1u) / BK;
    for (var kt = 0u; kt < nk; kt++) {
        let more = kt + 1u < nk;
        var next: Step;
        if more {
            next = fetch_step(t, a_base, b_base, row0, col0, (kt + 1u) * BK);
        }
        let ao = (kt & 1u) * A_STAGE;
        let bo = (kt & 1u) * B_STAGE;
        for (var kk = 0u; kk < BK; kk++) {
            let a0 = a_tile[ao + kk * (BM / 4u) + ty * 2u];
            let a1 = a_tile[ao + kk * (BM / 4u) + ty * 2u + 1u];
            let b0 = b_tile[bo + kk * (BN / 4u) + tx];
            let b1 = b_tile[bo + kk * (BN / 4u) + BN / 8u + tx];
            c0a = fma(vec4<f32>(a0.x), b0, c0a);
            c0b = fma(vec4<f32>(a0.x), b1, c0b);
            c1a = fma(vec4<f32>(a0.y), b0, c1a);
            c1b = fma(vec4<f32>(a0.y), b1, c1b);
            c2a = fma(vec4<f32>(a0.z), b0, c2a);
            c2b = fma(vec4<f32>(a0.z), b1, c2b);
            c3a = fma(vec4<f32>(a0.w), b0, c3a);
            c3b = fma(vec4<f32>(a0.w), b1, c3b);
            c4a = fma(vec4<f32>(a1.x), b0, c4a);
            c4b = fma(vec4<f32>(a1.x), b1, c4b);
            c5a = fma(vec4<f32>(a1.y), b0, c5a);
            c5b = fma(vec4<f32>(a1.y), b1, c5b);
            c6a = fma(vec4<f32>(a1.z), b0, c6a);
            c6b = fma(vec4<f32>(a1.z), b1, c6b);
            c7a = fma(vec4<f32>(a1.w), b0, c7a);
            c7b = fma(vec4<f32>(a1.w), b1, c7b);
        }
        if more {
            put_step((kt & 1u) ^ 1u, t, next);
        }
        workgroupBarrier();
    }

    let r = row0 + ty * 8u;
    let c = col0 + tx * 4u;
    store4(c_base, r, c, c0a);
    store4(c_base, r, c + BN / 2u, c0b);
    store4(c_base, r + 1u, c, c1a);
    store4(c_base, r + 1u, c + BN / 2u, c1b);
    store4(c_base, r + 2u, c, c2a);
    store4(c_base, r + 2u, c + BN / 2u, c2b);
    store4(c_base, r + 3u, c, c3a);
    store4(c_base, r + 3u, c + BN / 2u, c3b);
    store4(c_base, r + 4u, c, c4a);
    store4(c_base, r + 4u, c + BN / 2u, c4b);
    store4(c_base, r + 5u, c, c5a);
    store4(c_base, r + 5u, c + BN / 2u, c5b);
    store4(c_base, r + 6u, c, c6a);
    store4(c_base, r + 6u, c + BN / 2u, c6b);
    store4(c_base, r + 7u, c, c7a);
    store4(c_base, r + 7u, c + BN / 2u, c7b);
}
