
// Entry point for TM = TN = 4: invocation (tx, ty) owns rows ty*4 .. ty*4+3 and columns
// tx*4 .. tx*4+3 of the tile.
@compute @workgroup_size(THREADS)
fn main(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wg: vec3<u32>) {
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let a_base = p.a_off + wg.z * p.a_bstride;
    let b_base = p.b_off + wg.z * p.b_bstride;
    let c_base = p.c_off + wg.z * p.c_bstride;
    let tx = t % WG_X;
    let ty = t / WG_X;

    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
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
            let a = a_tile[ao + kk * (BM / 4u) + ty];
            let b = b_tile[bo + kk * (BN / 4u) + tx];
            c0 = fma(vec4<f32>(a.x), b, c0);
            c1 = fma(vec4<f32>(a.y), b, c1);
            c2 = fma(vec4<f32>(a.z), b, c2);
            c3 = fma(vec4<f32>(a.w), b, c3);
        }
        if more {
            put_step((kt & 1u) ^ 1u, t, next);
        }
        workgroupBarrier();
    }

    let r = row0 + ty * 4u;
    let c = col0 + tx * 4u;
    store4(c_base, r, c, c0);
    store4(c_base, r + 1u, c, c1);
    store4(c_base, r + 2u, c, c2);
    store4(c_base, r + 3u, c, c3);
}
