//! Host side of shaders/attention.wgsl: attention (+ backward) over packed rows, and the
//! key/value cache of generation. Launches are sliced by batch rows (sequences), which are
//! independent.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::{AttnSpec, Op};
use crate::tensor::DType;

use super::super::launch::{grid, Builder, Part, Uniforms, MAX_GROUPS};
use super::{check_f32_out, check_float_in, check_int, err, opnd, ATTENTION};

/// Invocations per workgroup (queries or keys per workgroup).
const BQ: u64 = 64;
/// Workgroup memory the kernels may use (WebGPU's default limit).
const SHARED_BYTES: u64 = 16384;

/// Rows per staged tile: two `BK x D` f32 tiles and three `BK` vectors fit `SHARED_BYTES`
/// (beside the cache-write flags, which no attention kernel uses).
fn tile_rows(d: u64) -> u64 {
    let mut bk = 32;
    while bk > 1 && 8 * bk * d + 12 * bk > SHARED_BYTES {
        bk /= 2;
    }
    bk
}

fn consts(d: u64) -> String {
    format!(
        "const D: u32 = {d}u;\nconst BQ: u32 = {BQ}u;\nconst BK: u32 = {}u;\n",
        tile_rows(d)
    )
}

fn check_spec(op: &Op, s: &AttnSpec) -> Result<()> {
    let (hq, hk, d) = (s.n_heads, s.n_kv_heads, s.head_dim);
    if hq == 0 || hk == 0 || hq % hk != 0 || d == 0 || s.seq_len == 0 {
        return Err(err(
            op,
            format!("bad heads {hq}/{hk}, head dim {d} or seq len {}", s.seq_len),
        ));
    }
    if d > 256 {
        return Err(err(
            op,
            format!("head dim {d} is larger than the 256 this kernel supports"),
        ));
    }
    Ok(())
}

fn uniforms(s: &AttnSpec, t: u64) -> Uniforms {
    Uniforms::new(
        &[
            t as u32,
            s.n_heads as u32,
            s.n_kv_heads as u32,
            s.causal as u32,
            s.window.is_some() as u32,
            s.window.unwrap_or(0).min(u32::MAX as usize) as u32,
        ],
        &[s.scale as f32],
    )
}

pub(super) fn forward(b: &mut Builder, op: &Op, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_spec(op, s)?;
    for (k, what) in ["q", "k", "v"].iter().enumerate() {
        check_float_in(op, what, i[k].info.dtype)?;
    }
    check_int(op, "segment ids", i[3].info.dtype, DType::I32)?;
    check_f32_out(op, "the output", o[0].info.dtype)?;
    check_f32_out(op, "lse", o[1].info.dtype)?;
    let (t, d) = (s.seq_len as u64, s.head_dim as u64);
    let (qw, kw) = (s.n_heads as u64 * d, s.n_kv_heads as u64 * d);
    let rows = i[3].info.numel() as u64 / t;
    let ops = [
        opnd("q", &i[0], Part::Rows(t * qw)),
        opnd("k", &i[1], Part::Rows(t * kw)),
        opnd("v", &i[2], Part::Rows(t * kw)),
        opnd("seg", &i[3], Part::Rows(t)),
        opnd("o", &o[0], Part::Rows(t * qw)),
        opnd("lse", &o[1], Part::Rows(s.n_heads as u64 * t)),
    ];
    let dtypes = [("q", ops[0].dtype), ("k", ops[1].dtype), ("v", ops[2].dtype)];
    let pipe = b.pipeline(&ATTENTION, "attn_fwd", &dtypes, &consts(d))?;
    for (u0, nu) in b.chunks(rows, &ops, MAX_GROUPS)? {
        let binds = b.windows(&ops, u0, nu);
        let groups = [t.div_ceil(BQ) as u32, s.n_heads as u32, nu as u32];
        b.dispatch(&pipe, &ATTENTION, binds, uniforms(s, t), groups);
    }
    Ok(())
}

pub(super) fn backward(b: &mut Builder, op: &Op, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_spec(op, s)?;
    for (k, what) in ["q", "k", "v", "", "o", "lse", "do"].iter().enumerate() {
        if k != 3 {
            check_float_in(op, what, i[k].info.dtype)?;
        }
    }
    check_int(op, "segment ids", i[3].info.dtype, DType::I32)?;
    for (k, what) in ["dq", "dk", "dv"].iter().enumerate() {
        check_f32_out(op, what, o[k].info.dtype)?;
    }
    let (t, d) = (s.seq_len as u64, s.head_dim as u64);
    let (qw, kw) = (s.n_heads as u64 * d, s.n_kv_heads as u64 * d);
    let rows = i[3].info.numel() as u64 / t;
    let q = opnd("q", &i[0], Part::Rows(t * qw));
    let k = opnd("k", &i[1], Part::Rows(t * kw));
    let v = opnd("v", &i[2], Part::Rows(t * kw));
    let seg = opnd("seg", &i[3], Part::Rows(t));
    let out = opnd("o", &i[4], Part::Rows(t * qw));
    let lse = opnd("lse", &i[5], Part::Rows(s.n_heads as u64 * t));
    let dout = opnd("dout", &i[6], Part::Rows(t * qw));
    let dq = opnd("dq", &o[0], Part::Rows(t * qw));
    let dk = opnd("dk", &o[1], Part::Rows(t * kw));
    let dv = opnd("dv", &o[2], Part::Rows(t * kw));
    let all = [q, k, v, seg, out, lse, dout, dq, dk, dv];
    let dtypes: Vec<(&'static str, DType)> = all.iter().map(|x| (x.name, x.dtype)).collect();
    let c = consts(d);
    let p_dq = b.pipeline(&ATTENTION, "attn_bwd_dq", &dtypes, &c)?;
    let p_dk = b.pipeline(&ATTENTION, "attn_bwd_dk", &dtypes, &c)?;
    let p_dv = b.pipeline(&ATTENTION, "attn_bwd_dv", &dtypes, &c)?;
    for (u0, nu) in b.chunks(rows, &all, MAX_GROUPS)? {
        let u = uniforms(s, t);
        let qg = [t.div_ceil(BQ) as u32, s.n_heads as u32, nu as u32];
        let kg = [t.div_ceil(BQ) as u32, s.n_kv_heads as u32, nu as u32];
        let binds = b.windows(&[q, k, v, seg, out, lse, dout, dq], u0, nu);
        b.dispatch(&p_dq, &ATTENTION, binds, u, qg);
        let binds = b.windows(&[q, k, v, seg, out, lse, dout, dk], u0, nu);
        b.dispatch(&p_dk, &ATTENTION, binds, u, kg);
        let binds = b.windows(&[q, k, seg, lse, dout, dv], u0, nu);
        b.dispatch(&p_dv, &ATTENTION, binds, u, kg);
    }
    Ok(())
}

pub(super) fn cached(b: &mut Builder, op: &Op, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_spec(op, s)?;
    for (k, what) in ["q", "the key cache", "the value cache"].iter().enumerate() {
        check_float_in(op, what, i[k].info.dtype)?;
    }
    check_int(op, "positions", i[3].info.dtype, DType::I32)?;
    check_f32_out(op, "the output", o[0].info.dtype)?;
    let d = s.head_dim as u64;
    let (qw, kw) = (s.n_heads as u64 * d, s.n_kv_heads as u64 * d);
    let cshape = &i[1].info.shape;
    let (rows, tc) = (cshape[0] as u64, cshape[1] as u64);
    let tq = s.seq_len as u64;
    if tc == 0 {
        return Err(err(op, "the cache has no positions"));
    }
    let ops = [
        opnd("q", &i[0], Part::Rows(tq * qw)),
        opnd("k", &i[1], Part::Rows(tc * kw)),
        opnd("v", &i[2], Part::Rows(tc * kw)),
        opnd("pos", &i[3], Part::Rows(tq)),
        opnd("o", &o[0], Part::Rows(tq * qw)),
    ];
    let dtypes = [("q", ops[0].dtype), ("k", ops[1].dtype), ("v", ops[2].dtype)];
    let pipe = b.pipeline(&ATTENTION, "attn_cached", &dtypes, &consts(d))?;
    for (u0, nu) in b.chunks(rows, &ops, u64::MAX)? {
        let n = nu * tq * s.n_heads as u64;
        let mut u = uniforms(s, tq);
        u.u[3] = tc as u32;
        u.u[6] = n as u32;
        let binds = b.windows(&ops, u0, nu);
        b.dispatch(&pipe, &ATTENTION, binds, u, grid(n.div_ceil(BQ))?);
    }
    Ok(())
}

pub(super) fn cache_write(b: &mut Builder, op: &Op, i: &[Arg]) -> Result<()> {
    check_f32_out(op, "the cache", i[0].info.dtype)?;
    check_float_in(op, "x", i[1].info.dtype)?;
    check_int(op, "slots", i[2].info.dtype, DType::I32)?;
    let w = i[1].info.shape[1] as u64;
    let n = i[1].info.shape[0] as u64;
    if w == 0 {
        return Ok(());
    }
    let cache_rows = i[0].info.numel() as u64 / w;
    let ops = [
        opnd("cache", &i[0], Part::Rows(w)),
        opnd("x", &i[1], Part::Whole),
        opnd("slot", &i[2], Part::Whole),
    ];
    let pipe = b.pipeline(&ATTENTION, "cache_write", &[("x", ops[1].dtype)], &consts(1))?;
    for (u0, nu) in b.chunks(cache_rows, &ops, u64::MAX)? {
        let binds = b.windows(&ops, u0, nu);
        let u = Uniforms::new(&[n as u32, w as u32, u0 as u32, nu as u32, cache_rows as u32], &[]);
        b.dispatch(&pipe, &ATTENTION, binds, u, grid(n)?);
    }
    Ok(())
}
