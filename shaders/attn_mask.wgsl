// Which keys a query sees (src/ops/attn_mask.rs), shared by the fused attention kernels
// and the eager masked softmax. Query i sees key j of the same batch row when
//   seg[i] == seg[j], |i - j| < window (when set), and the core rule:
//   - a user expression over (q_idx, kv_idx, seg), positions inside the run of equal
//     segment ids (i - run_start(i)), when HAS_EXPR; it replaces the causal rule;
//   - causal j <= i, or both tokens flagged as prompt prefix (HAS_PREFIX);
//   - everything when not causal.
//
// The host prepends, per pipeline (the expression text is part of the cache key):
//   const HAS_PREFIX: bool; const HAS_EXPR: bool;
//   fn mask_expr(q_idx: i32, kv_idx: i32, seg: i32) -> bool   (the compiled expression)
//   fn mask_prefix(r: u32) -> i32   prefix flag of token r (0 without prefix-LM)
//   fn mask_rs(r: u32) -> i32       run start of token r (0 without an expression)
// so kernels without those terms bind neither the prefix flags nor the run starts.
// Uniforms: u3 = causal, u4 = has window, u5 = window.
//
// run_starts: rs[r] = the row position where token r's run of equal segment ids starts.
// One workgroup of 256 per batch row: each invocation scans a contiguous chunk for its
// last run start, a max-scan over the invocations carries starts across chunks, then each
// chunk is rescanned and written. u0 = T (tokens per row).

fn visible(i: u32, j: u32, si: i32, sj: i32, pi: i32, pj: i32, ri: i32, rj: i32) -> bool {
    if (si != sj) {
        return false;
    }
    if (pu(4u) == 1u) {
        let dist = select(j - i, i - j, i > j);
        if (dist >= pu(5u)) {
            return false;
        }
    }
    if (HAS_EXPR) {
        return mask_expr(i32(i) - ri, i32(j) - rj, si);
    }
    return pu(3u) == 0u || j <= i || (HAS_PREFIX && pi != 0 && pj != 0);
}

// True when the causal rule bounds the keys of a query by its position (no prefix or
// expression terms widen it).
fn causal_bound() -> bool {
    return pu(3u) == 1u && !HAS_PREFIX && !HAS_EXPR;
}

var<workgroup> scan: array<u32, 256>;

@compute @workgroup_size(256)
fn run_starts(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = pu(0u);
    let base = wid.x * t;
    let per = (t + 255u) / 256u;
    let lo = min(lid * per, t);
    let hi = min(lo + per, t);
    var last = 0u;
    for (var r = lo; r < hi; r++) {
        if (r == 0u || ldi_seg(base + r) != ldi_seg(base + r - 1u)) {
            last = r;
        }
    }
    scan[lid] = last;
    workgroupBarrier();
    // Inclusive max-scan (Hillis and Steele).
    for (var k = 1u; k < 256u; k <<= 1u) {
        var v = scan[lid];
        if (lid >= k) {
            v = max(v, scan[lid - k]);
        }
        workgroupBarrier();
        scan[lid] = v;
        workgroupBarrier();
    }
    var cur = 0u;
    if (lid > 0u) {
        cur = scan[lid - 1u];
    }
    for (var r = lo; r < hi; r++) {
        if (r == 0u || ldi_seg(base + r) != ldi_seg(base + r - 1u)) {
            cur = r;
        }
        sti_rs(base + r, i32(cur));
    }
}
