// Scaled dot-product attention with grouped-query heads, segment ids and every mask of
// shaders/attn_mask.wgsl (causal, sliding window, document, prefix-LM, a user expression),
// plus the key/value cache of generation. FlashAttention-2 style: one invocation per query
// (forward, dq) or per key (dk, dv), key/query tiles staged in workgroup memory, f32
// accumulation whatever the storage type.
//
// Shapes, for one batch row b of T tokens: q [T, Hq*D], k, v [T, Hkv*D], seg [T] i32,
// o like q, lse [Hq, T]; query head h reads key/value head h / (Hq / Hkv).
//
// Forward (online softmax, Milakov & Gimelshein 2018): s_j = scale q.k_j,
//   m = max_j s_j, l = sum_j exp(s_j - m), o = sum_j exp(s_j - m) v_j / l, lse = m + ln l;
//   a query that sees no key gets o = 0 and lse = -inf (as the CPU reference).
// Backward (FlashAttention-2, Dao 2023, Alg. 2), probabilities recomputed from lse:
//   p_ij = exp(s_ij - lse_i), D_i = do_i . o_i, ds_ij = p_ij (do_i . v_j - D_i),
//   dq_i = scale sum_j ds_ij k_j,  dk_j = scale sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i.
// Three kernels (dq, dk, dv) keep each within 10 storage bindings.
//
// Tiles: the keys (or queries) a block can reach follow from the causal and window rules
// alone; inside that range each tile's mask data (segment ids, prefix flags, run starts)
// is staged first, and a tile no (query, key) pair of the block sees is skipped before its
// K/V (Q/dO) rows are loaded: other documents of a packed row, and whatever a prefix-LM or
// user mask hides, evaluated per element.
//
// The host sets D (head dim), BQ (invocations per workgroup) and BK (tile rows). Uniforms:
// u0 = T, u1 = Hq, u2 = Hkv, u3 = causal, u4 = has window, u5 = window; f0 = scale. The grid
// is (ceil(T / BQ), heads, batch rows of this dispatch). Outputs are written in pairs
// (st2), so f16/bf16 outputs need an even D.
//
// attn_cached: q [B*Tq, Hq*D] over caches [B, Tc, Hkv*D]; the query at position p sees
//   cache rows max(0, p+1-window) ..= min(p, Tc-1); p < 0 gives zeros. One invocation per
//   (query row, head). u0 = Tq, u3 = Tc, u6 = invocations.
// cache_write: cache row slot[i] = x[i] (rows of a [B*Tc, W] cache; slot < 0 skipped; when
//   two rows name one slot the later one wins, as in the sequential reference). One
//   workgroup per x row. u0 = N, u1 = W, u2/u3 = first/count of the cache rows bound,
//   u4 = cache rows in all.

var<workgroup> ta: array<f32, BK * D>;
var<workgroup> tb: array<f32, BK * D>;
var<workgroup> ts: array<i32, BK>;
var<workgroup> tp: array<i32, BK>;
var<workgroup> tr: array<i32, BK>;
var<workgroup> tl: array<f32, BK>;
var<workgroup> td: array<f32, BK>;
var<workgroup> hits: array<u32, BQ>;
var<workgroup> hit_all: u32;
var<workgroup> flag: array<u32, 256>;

// Keys [begin, end) any query of [i0, i_last] can see under the causal and window rules.
fn key_range(i0: u32, i_last: u32, t: u32) -> vec2<u32> {
    var end = t;
    if (causal_bound()) {
        end = i_last + 1u;
    }
    var begin = 0u;
    if (pu(4u) == 1u) {
        let w = pu(5u);
        if (i0 + 1u > w) {
            begin = i0 + 1u - w;
        }
        end = min(end, i_last + w);
    }
    return vec2<u32>(begin, end);
}

// Queries [begin, end) that can see some key of [j0, j_last] under the same rules.
fn query_range(j0: u32, j_last: u32, t: u32) -> vec2<u32> {
    var begin = 0u;
    if (causal_bound()) {
        begin = j0;
    }
    var end = t;
    if (pu(4u) == 1u) {
        let w = pu(5u);
        end = min(end, j_last + w);
        if (j0 + 1u > w) {
            begin = max(begin, j0 + 1u - w);
        }
    }
    return vec2<u32>(begin, end);
}

// Stages the mask data of tokens [r0, r0 + BK) of batch row b (clamped to the row).
fn stage_mask(b: u32, r0: u32, t: u32, lid: u32) {
    for (var x = lid; x < BK; x += BQ) {
        let r = b * t + min(r0 + x, t - 1u);
        ts[x] = ldi_seg(r);
        tp[x] = mask_prefix(r);
        tr[x] = mask_rs(r);
    }
}

// Whether any invocation of the workgroup has `any` set; the same value in all of them.
fn tile_hit(lid: u32, any: bool) -> bool {
    hits[lid] = select(0u, 1u, any);
    workgroupBarrier();
    if (lid == 0u) {
        var h = 0u;
        for (var x = 0u; x < BQ; x++) {
            h |= hits[x];
        }
        hit_all = h;
    }
    return workgroupUniformLoad(&hit_all) != 0u;
}

@compute @workgroup_size(BQ)
fn attn_fwd(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = pu(0u);
    let hq = pu(1u);
    let hkv = pu(2u);
    let b = wid.z;
    let h = wid.y;
    let kh = h / (hq / hkv);
    let qw = hq * D;
    let kw = hkv * D;
    let i0 = wid.x * BQ;
    let i = i0 + lid;
    let live = i < t;
    let iq = min(i, t - 1u);
    let qrow = (b * t + iq) * qw + h * D;
    let scale = pf(0u);
    var q: array<f32, D>;
    var acc: array<f32, D>;
    for (var c = 0u; c < D; c++) {
        q[c] = ld_q(qrow + c) * scale;
        acc[c] = 0.0;
    }
    let si = ldi_seg(b * t + iq);
    let pi = mask_prefix(b * t + iq);
    let ri = mask_rs(b * t + iq);
    var m = NEG_BIG;
    var l = 0.0;
    let kr = key_range(i0, min(i0 + BQ, t) - 1u, t);
    for (var k0 = kr.x; k0 < kr.y; k0 += BK) {
        let kn = min(BK, kr.y - k0);
        stage_mask(b, k0, t, lid);
        workgroupBarrier();
        var any = false;
        if (live) {
            for (var jj = 0u; jj < kn; jj++) {
                if (visible(i, k0 + jj, si, ts[jj], pi, tp[jj], ri, tr[jj])) {
                    any = true;
                    break;
                }
            }
        }
        if (tile_hit(lid, any)) {
            for (var e = lid; e < BK * D; e += BQ) {
                let j = min(k0 + e / D, t - 1u);
                let src = (b * t + j) * kw + kh * D + e % D;
                ta[e] = ld_k(src);
                tb[e] = ld_v(src);
            }
            workgroupBarrier();
            if (any) {
                for (var jj = 0u; jj < kn; jj++) {
                    if (visible(i, k0 + jj, si, ts[jj], pi, tp[jj], ri, tr[jj])) {
                        var s = 0.0;
                        for (var c = 0u; c < D; c++) {
                            s += q[c] * ta[jj * D + c];
                        }
                        if (s > m) {
                            let corr = exp(m - s);
                            l *= corr;
                            for (var c = 0u; c < D; c++) {
                                acc[c] *= corr;
                            }
                            m = s;
                        }
                        let p = exp(s - m);
                        l += p;
                        for (var c = 0u; c < D; c++) {
                            acc[c] += p * tb[jj * D + c];
                        }
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        let inv = select(0.0, 1.0 / l, l > 0.0);
        for (var c = 0u; c < D; c += 2u) {
            st2_o(qrow + c, acc[c] * inv, acc[min(c + 1u, D - 1u)] * inv, c + 1u < D);
        }
        let lse = select(neg_inf_f32(), m + log(l), l > 0.0);
        st_lse((b * hq + h) * t + i, lse);
    }
}

@compute @workgroup_size(BQ)
fn attn_bwd_dq(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = pu(0u);
    let hq = pu(1u);
    let hkv = pu(2u);
    let b = wid.z;
    let h = wid.y;
    let kh = h / (hq / hkv);
    let qw = hq * D;
    let kw = hkv * D;
    let i0 = wid.x * BQ;
    let i = i0 + lid;
    let live = i < t;
    let iq = min(i, t - 1u);
    let qrow = (b * t + iq) * qw + h * D;
    var q: array<f32, D>;
    var g: array<f32, D>;
    var dq: array<f32, D>;
    var di = 0.0;
    for (var c = 0u; c < D; c++) {
        q[c] = ld_q(qrow + c);
        g[c] = ld_dout(qrow + c);
        dq[c] = 0.0;
        di += g[c] * ld_o(qrow + c);
    }
    let li = ld_lse((b * hq + h) * t + iq);
    let si = ldi_seg(b * t + iq);
    let pi = mask_prefix(b * t + iq);
    let ri = mask_rs(b * t + iq);
    let scale = pf(0u);
    let kr = key_range(i0, min(i0 + BQ, t) - 1u, t);
    for (var k0 = kr.x; k0 < kr.y; k0 += BK) {
        let kn = min(BK, kr.y - k0);
        stage_mask(b, k0, t, lid);
        workgroupBarrier();
        var any = false;
        if (live) {
            for (var jj = 0u; jj < kn; jj++) {
                if (visible(i, k0 + jj, si, ts[jj], pi, tp[jj], ri, tr[jj])) {
                    any = true;
                    break;
                }
            }
        }
        if (tile_hit(lid, any)) {
            for (var e = lid; e < BK * D; e += BQ) {
                let j = min(k0 + e / D, t - 1u);
                let src = (b * t + j) * kw + kh * D + e % D;
                ta[e] = ld_k(src);
                tb[e] = ld_v(src);
            }
            workgroupBarrier();
            if (any) {
                for (var jj = 0u; jj < kn; jj++) {
                    if (visible(i, k0 + jj, si, ts[jj], pi, tp[jj], ri, tr[jj])) {
                        var dot = 0.0;
                        var dp = 0.0;
                        for (var c = 0u; c < D; c++) {
                            dot += q[c] * ta[jj * D + c];
                            dp += g[c] * tb[jj * D + c];
                        }
                        let p = exp(dot * scale - li);
                        let ds = p * (dp - di) * scale;
                        for (var c = 0u; c < D; c++) {
                            dq[c] += ds * ta[jj * D + c];
                        }
                    }
                }
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < D; c += 2u) {
            st2_dq(qrow + c, dq[c], dq[min(c + 1u, D - 1u)], c + 1u < D);
        }
    }
}

// Stages lse (and D_i = do_i . o_i when `with_di`) of queries [i0, i0 + BK) of head h.
fn stage_queries(b: u32, h: u32, i0: u32, t: u32, lid: u32, with_di: bool) {
    let hq = pu(1u);
    for (var ii = lid; ii < BK; ii += BQ) {
        let i = min(i0 + ii, t - 1u);
        tl[ii] = ld_lse((b * hq + h) * t + i);
        if (with_di) {
            let row = (b * t + i) * hq * D + h * D;
            var di = 0.0;
            for (var c = 0u; c < D; c++) {
                di += ld_dout(row + c) * ld_o(row + c);
            }
            td[ii] = di;
        }
    }
}

@compute @workgroup_size(BQ)
fn attn_bwd_dv(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = pu(0u);
    let hq = pu(1u);
    let hkv = pu(2u);
    let group = hq / hkv;
    let b = wid.z;
    let kh = wid.y;
    let qw = hq * D;
    let kw = hkv * D;
    let j0 = wid.x * BQ;
    let j = j0 + lid;
    let live = j < t;
    let jk = min(j, t - 1u);
    let krow = (b * t + jk) * kw + kh * D;
    let scale = pf(0u);
    var k: array<f32, D>;
    var dv: array<f32, D>;
    for (var c = 0u; c < D; c++) {
        k[c] = ld_k(krow + c) * scale;
        dv[c] = 0.0;
    }
    let sj = ldi_seg(b * t + jk);
    let pj = mask_prefix(b * t + jk);
    let rj = mask_rs(b * t + jk);
    let qr = query_range(j0, min(j0 + BQ, t) - 1u, t);
    for (var i0 = qr.x; i0 < qr.y; i0 += BK) {
        let qn = min(BK, qr.y - i0);
        stage_mask(b, i0, t, lid);
        workgroupBarrier();
        var any = false;
        if (live) {
            for (var ii = 0u; ii < qn; ii++) {
                if (visible(i0 + ii, j, ts[ii], sj, tp[ii], pj, tr[ii], rj)) {
                    any = true;
                    break;
                }
            }
        }
        if (tile_hit(lid, any)) {
            for (var hg = 0u; hg < group; hg++) {
                let h = kh * group + hg;
                for (var e = lid; e < BK * D; e += BQ) {
                    let i = min(i0 + e / D, t - 1u);
                    let src = (b * t + i) * qw + h * D + e % D;
                    ta[e] = ld_q(src);
                    tb[e] = ld_dout(src);
                }
                stage_queries(b, h, i0, t, lid, false);
                workgroupBarrier();
                if (any) {
                    for (var ii = 0u; ii < qn; ii++) {
                        if (visible(i0 + ii, j, ts[ii], sj, tp[ii], pj, tr[ii], rj)) {
                            var dot = 0.0;
                            for (var c = 0u; c < D; c++) {
                                dot += ta[ii * D + c] * k[c];
                            }
                            let p = exp(dot - tl[ii]);
                            for (var c = 0u; c < D; c++) {
                                dv[c] += p * tb[ii * D + c];
                            }
                        }
                    }
                }
                workgroupBarrier();
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < D; c += 2u) {
            st2_dv(krow + c, dv[c], dv[min(c + 1u, D - 1u)], c + 1u < D);
        }
    }
}

@compute @workgroup_size(BQ)
fn attn_bwd_dk(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let t = pu(0u);
    let hq = pu(1u);
    let hkv = pu(2u);
    let group = hq / hkv;
    let b = wid.z;
    let kh = wid.y;
    let qw = hq * D;
    let kw = hkv * D;
    let j0 = wid.x * BQ;
    let j = j0 + lid;
    let live = j < t;
    let jk = min(j, t - 1u);
    let krow = (b * t + jk) * kw + kh * D;
    var k: array<f32, D>;
    var v: array<f32, D>;
    var dk: array<f32, D>;
    for (var c = 0u; c < D; c++) {
        k[c] = ld_k(krow + c);
        v[c] = ld_v(krow + c);
        dk[c] = 0.0;
    }
    let sj = ldi_seg(b * t + jk);
    let pj = mask_prefix(b * t + jk);
    let rj = mask_rs(b * t + jk);
    let scale = pf(0u);
    let qr = query_range(j0, min(j0 + BQ, t) - 1u, t);
    for (var i0 = qr.x; i0 < qr.y; i0 += BK) {
        let qn = min(BK, qr.y - i0);
        stage_mask(b, i0, t, lid);
        workgroupBarrier();
        var any = false;
        if (live) {
            for (var ii = 0u; ii < qn; ii++) {
                if (visible(i0 + ii, j, ts[ii], sj, tp[ii], pj, tr[ii], rj)) {
                    any = true;
                    break;
                }
            }
        }
        if (tile_hit(lid, any)) {
            for (var hg = 0u; hg < group; hg++) {
                let h = kh * group + hg;
                for (var e = lid; e < BK * D; e += BQ) {
                    let i = min(i0 + e / D, t - 1u);
                    let src = (b * t + i) * qw + h * D + e % D;
                    ta[e] = ld_q(src);
                    tb[e] = ld_dout(src);
                }
                stage_queries(b, h, i0, t, lid, true);
                workgroupBarrier();
                if (any) {
                    for (var ii = 0u; ii < qn; ii++) {
                        if (visible(i0 + ii, j, ts[ii], sj, tp[ii], pj, tr[ii], rj)) {
                            var dot = 0.0;
                            var dp = 0.0;
                            for (var c = 0u; c < D; c++) {
                                dot += ta[ii * D + c] * k[c];
                                dp += tb[ii * D + c] * v[c];
                            }
                            let p = exp(dot * scale - tl[ii]);
                            let ds = p * (dp - td[ii]) * scale;
                            for (var c = 0u; c < D; c++) {
                                dk[c] += ds * ta[ii * D + c];
                            }
                        }
                    }
                }
                workgroupBarrier();
            }
        }
        workgroupBarrier();
    }
    if (live) {
        for (var c = 0u; c < D; c += 2u) {
            st2_dk(krow + c, dk[c], dk[min(c + 1u, D - 1u)], c + 1u < D);
        }
    }
}

@compute @workgroup_size(BQ)
fn attn_cached(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let inv = group_index(wid, nwg) * BQ + lid;
    if (inv >= pu(6u)) {
        return;
    }
    let tq = pu(0u);
    let hq = pu(1u);
    let hkv = pu(2u);
    let tc = pu(3u);
    let row = inv / hq;
    let h = inv % hq;
    let b = row / tq;
    let kh = h / (hq / hkv);
    let kw = hkv * D;
    let out = row * hq * D + h * D;
    let p = ldi_pos(row);
    if (p < 0) {
        for (var c = 0u; c < D; c += 2u) {
            st2_o(out + c, 0.0, 0.0, c + 1u < D);
        }
        return;
    }
    let pp = u32(p);
    var lo = 0u;
    if (pu(4u) == 1u && pp + 1u > pu(5u)) {
        lo = pp + 1u - pu(5u);
    }
    let hi = min(pp, tc - 1u);
    var q: array<f32, D>;
    var acc: array<f32, D>;
    for (var c = 0u; c < D; c++) {
        q[c] = ld_q(out + c);
        acc[c] = 0.0;
    }
    let scale = pf(0u);
    var m = NEG_BIG;
    var l = 0.0;
    for (var j = lo; j <= hi; j++) {
        let kb = (b * tc + j) * kw + kh * D;
        var dot = 0.0;
        for (var c = 0u; c < D; c++) {
            dot += q[c] * ld_k(kb + c);
        }
        let s = dot * scale;
        if (s > m) {
            let corr = exp(m - s);
            l *= corr;
            for (var c = 0u; c < D; c++) {
                acc[c] *= corr;
            }
            m = s;
        }
        let e = exp(s - m);
        l += e;
        for (var c = 0u; c < D; c++) {
            acc[c] += e * ld_v(kb + c);
        }
    }
    for (var c = 0u; c < D; c += 2u) {
        st2_o(out + c, acc[c] / l, acc[min(c + 1u, D - 1u)] / l, c + 1u < D);
    }
}

@compute @workgroup_size(256)
fn cache_write(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = group_index(wid, nwg);
    let n = pu(0u);
    if (i >= n) {
        return;
    }
    let w = pu(1u);
    let r0 = pu(2u);
    let cnt = pu(3u);
    let s = ldi_slot(i);
    var later = 0u;
    for (var k = i + 1u + lid; k < n; k += 256u) {
        if (ldi_slot(k) == s) {
            later = 1u;
        }
    }
    flag[lid] = later;
    workgroupBarrier();
    for (var k = 128u; k > 0u; k >>= 1u) {
        if (lid < k) {
            flag[lid] = max(flag[lid], flag[lid + k]);
        }
        workgroupBarrier();
    }
    let ok = flag[0] == 0u && s >= 0 && u32(s) < pu(4u) && u32(s) >= r0 && u32(s) < r0 + cnt;
    if (ok) {
        let dst = (u32(s) - r0) * w;
        for (var c = lid; c < w; c += 256u) {
            st_cache(dst + c, ld_x(i * w + c));
        }
    }
}
