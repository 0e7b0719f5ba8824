// Optimizer ops (src/ops/optim.rs): the clipping coefficient and AdamW
// (Loshchilov & Hutter 2019, as torch.optim.AdamW).
//
// clip_coef: norm = sqrt(sumsq); coef = min(1, max_norm / (norm + 1e-6)), or NaN when the
//   norm is not finite (an overflowed gradient). f0 = max_norm. One invocation.
// adamw, in place over elements (two per invocation), with hyper = [lr, bc1, sqrt(bc2)]
//   and f = [beta1, beta2, eps, weight_decay]:
//     g' = g * coef;  p *= 1 - lr * wd;  m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2;
//     p -= (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps);  g = 0
//   A non-finite coef leaves p, m and v unchanged and still zeroes g. u0 = elements.

@compute @workgroup_size(1)
fn clip_coef() {
    let norm = sqrt(ld_sumsq(0u));
    var coef = nan_f32();
    if (is_finite(norm)) {
        coef = min(1.0, pf(0u) / (norm + 1e-6));
    }
    st_norm(0u, norm);
    st_coef(0u, coef);
}

struct Moments {
    p: f32,
    m: f32,
    v: f32,
}

fn adamw_at(i: u32, coef: f32, lr: f32, bc1: f32, bc2s: f32) -> Moments {
    let b1 = pf(0u);
    let b2 = pf(1u);
    let gv = ld_g(i) * coef;
    var p = ld_p(i) * (1.0 - lr * pf(3u));
    let m = b1 * ld_m(i) + (1.0 - b1) * gv;
    let v = b2 * ld_v(i) + (1.0 - b2) * gv * gv;
    p = p - (lr / bc1) * m / (sqrt(v) / bc2s + pf(2u));
    return Moments(p, m, v);
}

@compute @workgroup_size(256)
fn adamw(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = 2u * (group_index(wid, nwg) * WG + lid);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let both = i + 1u < n;
    let coef = ld_coef(0u);
    if (is_finite(coef)) {
        let lr = ld_hyper(0u);
        let bc1 = ld_hyper(1u);
        let bc2s = ld_hyper(2u);
        let a = adamw_at(i, coef, lr, bc1, bc2s);
        var b = Moments(0.0, 0.0, 0.0);
        if (both) {
            b = adamw_at(i + 1u, coef, lr, bc1, bc2s);
        }
        st2_p(i, a.p, b.p, both);
        st2_m(i, a.m, b.m, both);
        st2_v(i, a.v, b.v, both);
    }
    st2_g(i, 0.0, 0.0, both);
}
