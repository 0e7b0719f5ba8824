// Elementwise ops (src/ops/elementwise.rs, swiglu.rs, optim.rs's accumulation).
//
// A dispatch covers `n = P.u[0]` consecutive elements of every full-size operand (a large
// tensor is processed in several dispatches, each binding a slice); `P.u[1]` is the index
// of the dispatch's first element in the whole tensor. Each invocation computes two
// adjacent elements (i, i+1) so an f16/bf16 output, stored as packed u32 pairs, is written
// in whole words: no two invocations touch the same word.
//
//   binary:     y[i] = a[i] + b[j]  or  a[i] * b[j]   (P.u[3]: 0 add, 1 mul);
//               b has y's shape (j = i, P.u[4] = 1) or is a suffix / one element of it,
//               read as j = (P.u[1] + i) % P.u[2]
//   scale:      y = x * P.f[0]
//   convert:    y = x, a cast (the store rounds to nearest even)
//   broadcast:  y[i] = x[(P.u[1] + i) % P.u[2]]
//   dropout:    y[i] = keep(i) ? x[i] / (1 - p) : 0, keep from Wellons' lowbias32 hash of
//               (seed, salt = P.u[5], global index) exactly as elementwise::dropout_keep
//   swiglu:     y = silu(g) * u,  silu(g) = g / (1 + exp(-g))
//   swiglu_bwd: dg = dy * u * s * (1 + g (1 - s)), du = dy * silu(g), s = sigmoid(g)
//   accumulate: acc += g (in place)
//   fill:       y = P.f[0]

fn pair_start(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return 2u * (group_index(wid, nwg) * WG + lid);
}

fn binary_at(i: u32) -> f32 {
    var j = i;
    if (pu(4u) == 0u) {
        j = (pu(1u) + i) % pu(2u);
    }
    let a = ld_a(i);
    let b = ld_b(j);
    if (pu(3u) == 1u) {
        return a * b;
    }
    return a + b;
}

@compute @workgroup_size(256)
fn binary(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let v0 = binary_at(i);
    var v1 = 0.0;
    if (both) {
        v1 = binary_at(i + 1u);
    }
    st2_y(i, v0, v1, both);
}

@compute @workgroup_size(256)
fn scale(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let f = pf(0u);
    let v0 = ld_x(i) * f;
    var v1 = 0.0;
    if (both) {
        v1 = ld_x(i + 1u) * f;
    }
    st2_y(i, v0, v1, both);
}

@compute @workgroup_size(256)
fn convert(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let v0 = ld_x(i);
    var v1 = 0.0;
    if (both) {
        v1 = ld_x(i + 1u);
    }
    st2_y(i, v0, v1, both);
}

@compute @workgroup_size(256)
fn broadcast(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let nx = pu(2u);
    let v0 = ld_x((pu(1u) + i) % nx);
    var v1 = 0.0;
    if (both) {
        v1 = ld_x((pu(1u) + i + 1u) % nx);
    }
    st2_y(i, v0, v1, both);
}

fn hash32(v: u32) -> u32 {
    var x = v;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

fn dropout_at(i: u32, key: u32, p: f32, k: f32) -> f32 {
    let u = f32(hash32(key ^ (pu(1u) + i)) >> 8u) * (1.0 / 16777216.0);
    if (u >= p) {
        return ld_x(i) * k;
    }
    return 0.0;
}

@compute @workgroup_size(256)
fn dropout(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let key = hash32(ldu_seed(0u) + pu(5u) * 0x9e3779b9u);
    let p = ld_p(0u);
    let k = select(0.0, 1.0 / (1.0 - p), p < 1.0);
    let v0 = dropout_at(i, key, p, k);
    var v1 = 0.0;
    if (both) {
        v1 = dropout_at(i + 1u, key, p, k);
    }
    st2_y(i, v0, v1, both);
}

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

@compute @workgroup_size(256)
fn swiglu(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let v0 = silu(ld_g(i)) * ld_u(i);
    var v1 = 0.0;
    if (both) {
        v1 = silu(ld_g(i + 1u)) * ld_u(i + 1u);
    }
    st2_y(i, v0, v1, both);
}

// (dg, du) of one element.
fn swiglu_grad(i: u32) -> vec2<f32> {
    let g = ld_g(i);
    let u = ld_u(i);
    let d = ld_dy(i);
    let s = 1.0 / (1.0 + exp(-g));
    return vec2<f32>(d * u * s * (1.0 + g * (1.0 - s)), d * g * s);
}

@compute @workgroup_size(256)
fn swiglu_bwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let v0 = swiglu_grad(i);
    var v1 = vec2<f32>(0.0, 0.0);
    if (both) {
        v1 = swiglu_grad(i + 1u);
    }
    st2_dg(i, v0.x, v1.x, both);
    st2_du(i, v0.y, v1.y, both);
}

@compute @workgroup_size(256)
fn accumulate(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let v0 = ld_acc(i) + ld_g(i);
    var v1 = 0.0;
    if (both) {
        v1 = ld_acc(i + 1u) + ld_g(i + 1u);
    }
    st2_acc(i, v0, v1, both);
}

@compute @workgroup_size(256)
fn fill(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = pair_start(wid, nwg, lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    st2_y(i, pf(0u), pf(0u), i + 1u < n);
}
