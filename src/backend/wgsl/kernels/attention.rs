//! Host side of shaders/attention.wgsl: attention (+ backward) over packed rows with every
//! mask of the spec, and the key/value cache of generation. Launches are sliced by batch
//! rows (sequences), which are independent.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::mask_codegen::VarNames;
use crate::ops::{AttnSpec, Op};
use crate::tensor::DType;

use super::super::launch::{grid, Builder, Operand, Part, Uniforms, MAX_GROUPS};
use super::{check_f32_out, check_float_in, check_int, err, opnd, ATTENTION};

/// Invocations per workgroup (queries or keys per workgroup).
const BQ: u64 = 64;
/// Workgroup memory the kernels use at most (below every device's limit we meet; the
/// device's own limit applies when smaller).
const SHARED_BYTES: u64 = 32768;

/// Rows per staged tile: two `BK x D` f32 tiles, five `BK` vectors and the `BQ` hit flags
/// fit the workgroup memory.
fn tile_rows(d: u64, shared: u64) -> u64 {
    let budget = shared.min(SHARED_BYTES).saturating_sub(4 * BQ + 16);
    let mut bk = 64;
    while bk > 1 && 8 * bk * d + 20 * bk > budget {
        bk /= 2;
    }
    bk
}

/// The WGSL the mask terms of `s` add to a pipeline (see shaders/attn_mask.wgsl): the
/// flags, the user expression, and accessors that read the prefix flags and run starts
/// only when the mask uses them (so the pipeline binds them only then).
pub(super) fn mask_prelude(s: &AttnSpec) -> String {
    let expr = s.flex.expr.as_ref();
    let code = expr.map_or("true".to_string(), |e| e.to_wgsl(VarNames::default()));
    let prefix = if s.flex.prefix_lm { "ldi_prefix(r)" } else { "0" };
    let rs = if expr.is_some() { "ldi_rs(r)" } else { "0" };
    format!(
        "const HAS_PREFIX: bool = {};\nconst HAS_EXPR: bool = {};\n\
         fn mask_expr(q_idx: i32, kv_idx: i32, seg: i32) -> bool {{ return {code}; }}\n\
         fn mask_prefix(r: u32) -> i32 {{ return {prefix}; }}\n\
         fn mask_rs(r: u32) -> i32 {{ return {rs}; }}\n",
        s.flex.prefix_lm,
        expr.is_some()
    )
}

/// The mask prelude of kernels that do not mask.
pub(super) fn plain_prelude() -> String {
    mask_prelude(&PLAIN)
}

fn consts(d: u64, shared: u64, s: Option<&AttnSpec>) -> String {
    let mut c = format!(
        "const D: u32 = {d}u;\nconst BQ: u32 = {BQ}u;\nconst BK: u32 = {}u;\n",
        tile_rows(d, shared)
    );
    c += &mask_prelude(s.unwrap_or(&PLAIN));
    c
}

static PLAIN: AttnSpec = AttnSpec {
    n_heads: 1,
    n_kv_heads: 1,
    head_dim: 1,
    seq_len: 1,
    causal: false,
    window: None,
    scale: 1.0,
    flex: crate::ops::FlexMask {
        prefix_lm: false,
        expr: None,
    },
};

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

/// Outputs written in pairs: f32 for any head dim, f16/bf16 when it is even.
fn check_pair_out(op: &Op, what: &str, d: DType, head_dim: usize) -> Result<()> {
    match d {
        DType::F32 => Ok(()),
        DType::F16 | DType::BF16 if head_dim.is_multiple_of(2) => Ok(()),
        DType::F16 | DType::BF16 => Err(err(
            op,
            format!("{what} is {d} with the odd head dim {head_dim}; half outputs need an even head dim (use f32)"),
        )),
        other => check_f32_out(op, what, other),
    }
}

pub(super) fn uniforms(s: &AttnSpec, t: u64) -> Uniforms {
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

/// The mask operands beyond the segment ids: the prefix flags (input `at`, prefix-LM) and
/// the run starts of the tokens (a user expression), which this computes first into a
/// workspace with `run_starts`. Both are sliced by batch rows of `t` tokens.
pub(super) fn mask_operands(
    b: &mut Builder,
    op: &Op,
    s: &AttnSpec,
    seg: Operand,
    i: &[Arg],
    at: usize,
    rows: u64,
) -> Result<Vec<Operand>> {
    let t = s.seq_len as u64;
    let mut out = Vec::new();
    if s.flex.prefix_lm {
        let p = i
            .get(at)
            .ok_or_else(|| err(op, "prefix-LM masks need the prefix flags input"))?;
        check_int(op, "prefix flags", p.info.dtype, DType::I32)?;
        out.push(opnd("prefix", p, Part::Rows(t)));
    }
    if s.flex.expr.is_some() {
        let rs = b.workspace("rs", rows * t * 4).with_part(Part::Rows(t));
        let rs = Operand {
            dtype: DType::I32,
            ..rs
        };
        let seg = seg.rename("seg").with_part(Part::Rows(t));
        let pipe = b.pipeline(&ATTENTION, "run_starts", &[], &consts(1, 0, Some(s)))?;
        let ops = [seg, rs];
        for (u0, nu) in b.chunks(rows, &ops, MAX_GROUPS)? {
            let binds = b.windows(&ops, u0, nu);
            b.dispatch(
                &pipe,
                &ATTENTION,
                binds,
                Uniforms::new(&[t as u32], &[]),
                [nu as u32, 1, 1],
            );
        }
        out.push(rs);
    }
    Ok(out)
}

fn shared(b: &Builder) -> u64 {
    b.ctx.limits.max_compute_workgroup_storage_size as u64
}

pub(super) fn forward(b: &mut Builder, op: &Op, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_spec(op, s)?;
    for (k, what) in ["q", "k", "v"].iter().enumerate() {
        check_float_in(op, what, i[k].info.dtype)?;
    }
    check_int(op, "segment ids", i[3].info.dtype, DType::I32)?;
    check_pair_out(op, "the output", o[0].info.dtype, s.head_dim)?;
    check_f32_out(op, "lse", o[1].info.dtype)?;
    let (t, d) = (s.seq_len as u64, s.head_dim as u64);
    let (qw, kw) = (s.n_heads as u64 * d, s.n_kv_heads as u64 * d);
    let rows = i[3].info.numel() as u64 / t;
    let seg = opnd("seg", &i[3], Part::Rows(t));
    let mut ops = vec![
        opnd("q", &i[0], Part::Rows(t * qw)),
        opnd("k", &i[1], Part::Rows(t * kw)),
        opnd("v", &i[2], Part::Rows(t * kw)),
        seg,
        opnd("o", &o[0], Part::Rows(t * qw)),
        opnd("lse", &o[1], Part::Rows(s.n_heads as u64 * t)),
    ];
    ops.extend(mask_operands(b, op, s, seg, i, 4, rows)?);
    let dtypes: Vec<(&'static str, DType)> = ops.iter().map(|x| (x.name, x.dtype)).collect();
    let pipe = b.pipeline(&ATTENTION, "attn_fwd", &dtypes, &consts(d, shared(b), Some(s)))?;
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
        check_pair_out(op, what, o[k].info.dtype, s.head_dim)?;
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
    let mask = mask_operands(b, op, s, seg, i, 7, rows)?;
    let mut all = vec![q, k, v, seg, out, lse, dout, dq, dk, dv];
    all.extend(mask.iter().copied());
    let dtypes: Vec<(&'static str, DType)> = all.iter().map(|x| (x.name, x.dtype)).collect();
    let c = consts(d, shared(b), Some(s));
    let p_dq = b.pipeline(&ATTENTION, "attn_bwd_dq", &dtypes, &c)?;
    let p_dk = b.pipeline(&ATTENTION, "attn_bwd_dk", &dtypes, &c)?;
    let p_dv = b.pipeline(&ATTENTION, "attn_bwd_dv", &dtypes, &c)?;
    let with_mask = |x: &[Operand]| {
        let mut v = x.to_vec();
        v.extend(mask.iter().copied());
        v
    };
    for (u0, nu) in b.chunks(rows, &all, MAX_GROUPS)? {
        let u = uniforms(s, t);
        let qg = [t.div_ceil(BQ) as u32, s.n_heads as u32, nu as u32];
        let kg = [t.div_ceil(BQ) as u32, s.n_kv_heads as u32, nu as u32];
        let binds = b.windows(&with_mask(&[q, k, v, seg, out, lse, dout, dq]), u0, nu);
        b.dispatch(&p_dq, &ATTENTION, binds, u, qg);
        let binds = b.windows(&with_mask(&[q, k, v, seg, out, lse, dout, dk]), u0, nu);
        b.dispatch(&p_dk, &ATTENTION, binds, u, kg);
        let binds = b.windows(&with_mask(&[q, k, seg, out, lse, dout, dv]), u0, nu);
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
    let pipe = b.pipeline(&ATTENTION, "attn_cached", &dtypes, &consts(d, 0, None))?;
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
    let pipe = b.pipeline(&ATTENTION, "cache_write", &[("x", ops[1].dtype)], &consts(1, 0, None))?;
    for (u0, nu) in b.chunks(cache_rows, &ops, u64::MAX)? {
        let binds = b.windows(&ops, u0, nu);
        let u = Uniforms::new(&[n as u32, w as u32, u0 as u32, nu as u32, cache_rows as u32], &[]);
        b.dispatch(&pipe, &ATTENTION, binds, u, grid(n)?);
    }
    Ok(())
}
