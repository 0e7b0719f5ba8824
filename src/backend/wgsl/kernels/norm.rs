//! Host side of shaders/rmsnorm.wgsl and shaders/rope.wgsl: row-wise ops over
//! `[rows, features]`, sliced by rows when a tensor exceeds one binding.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::Op;

use super::super::launch::{grid, Builder, Part, Uniforms};
use super::{check_f32_out, check_float_in, check_int, err, opnd, reduce, RMSNORM, ROPE};
use crate::tensor::DType;

/// Invocations per workgroup of the row kernels.
const WG: u64 = 256;

fn row_width(op: &Op, i: &[Arg]) -> Result<(u64, u64)> {
    let h = *i[0].info.shape.last().unwrap_or(&0) as u64;
    if h == 0 || i[1].info.numel() as u64 != h {
        return Err(err(op, "the weight must have one element per feature"));
    }
    Ok((h, i[0].info.numel() as u64 / h))
}

pub(super) fn rms_norm(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], eps: f64) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_float_in(op, "the weight", i[1].info.dtype)?;
    check_f32_out(op, "the output", o[0].info.dtype)?;
    let (h, rows) = row_width(op, i)?;
    let ops = [
        opnd("x", &i[0], Part::Rows(h)),
        opnd("w", &i[1], Part::Whole),
        opnd("y", &o[0], Part::Rows(h)),
    ];
    let pipe = b.pipeline(
        &RMSNORM,
        "rms_fwd",
        &[("x", ops[0].dtype), ("w", ops[1].dtype)],
        "const MAXC: u32 = 1u;\nconst ADD: bool = false;\nconst DW: bool = false;\n",
    )?;
    for (u0, nu) in b.chunks(rows, &ops, u64::MAX)? {
        let binds = b.windows(&ops, u0, nu);
        let u = Uniforms::new(&[h as u32, nu as u32], &[eps as f32]);
        b.dispatch(&pipe, &RMSNORM, binds, u, grid(nu)?);
    }
    Ok(())
}

/// `dx` (plus the added gradient `i[3]` when there is one) and, when the op has a second
/// output, `dw`. An absent added gradient or `dw` is bound to a 16-byte placeholder the
/// shader never touches (`ADD`, `DW` are false).
pub(super) fn rms_norm_backward(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], eps: f64) -> Result<()> {
    for (k, what) in ["x", "the weight", "dy"].iter().enumerate() {
        check_float_in(op, what, i[k].info.dtype)?;
    }
    let (add, dw) = (i.len() > 3, o.len() > 1);
    if add {
        check_float_in(op, "the added gradient", i[3].info.dtype)?;
    }
    check_f32_out(op, "dx", o[0].info.dtype)?;
    if dw {
        check_f32_out(op, "dw", o[1].info.dtype)?;
    }
    let (h, rows) = row_width(op, i)?;
    let acc = if add {
        opnd("acc", &i[3], Part::Rows(h))
    } else {
        b.workspace("acc", 16)
    };
    let ops = [
        opnd("x", &i[0], Part::Rows(h)),
        opnd("w", &i[1], Part::Whole),
        opnd("dy", &i[2], Part::Rows(h)),
        opnd("dx", &o[0], Part::Rows(h)),
        acc,
    ];
    let chunks = b.chunks(rows, &ops, u64::MAX)?;
    // Row blocks per chunk: enough workgroups to fill a GPU, their partial rows of dw
    // within one binding.
    let fit = (b.max_binding.saturating_sub(512) / (h * 4)).clamp(1, 256);
    let mut plan = Vec::new();
    let mut blocks = 0u64;
    for &(u0, nu) in &chunks {
        let per = nu.div_ceil(fit).max(1);
        let nb = nu.div_ceil(per).max(1);
        plan.push((u0, nu, per, nb, blocks));
        blocks += nb;
    }
    let part = if dw {
        b.workspace("part", blocks * h * 4).with_part(Part::Rows(h))
    } else {
        b.workspace("part", 16)
    };
    let consts = format!(
        "const MAXC: u32 = {}u;\nconst ADD: bool = {add};\nconst DW: bool = {dw};\n",
        h.div_ceil(WG)
    );
    let dtypes = [
        ("x", ops[0].dtype),
        ("w", ops[1].dtype),
        ("dy", ops[2].dtype),
        ("acc", ops[4].dtype),
    ];
    let pipe = b.pipeline(&RMSNORM, "rms_bwd", &dtypes, &consts)?;
    for (u0, nu, per, nb, first) in plan {
        let mut binds = b.windows(&ops, u0, nu);
        binds.push(b.window(&part, first, nb));
        let u = Uniforms::new(&[h as u32, nu as u32, per as u32, 0], &[eps as f32]);
        b.dispatch(&pipe, &RMSNORM, binds, u, grid(nb)?);
    }
    if !dw {
        return Ok(());
    }
    reduce::column_sum(b, part, opnd("y", &o[1], Part::Whole), blocks, h)
}

pub(super) fn rope(
    b: &mut Builder,
    op: &Op,
    i: &[Arg],
    o: &[Arg],
    head_dim: usize,
    inverse: bool,
    scale: f64,
) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_int(op, "positions", i[1].info.dtype, DType::I32)?;
    check_int(op, "inv_freq", i[2].info.dtype, DType::F32)?;
    check_f32_out(op, "the output", o[0].info.dtype)?;
    let shape = &i[0].info.shape;
    let (rows, w) = (shape[0] as u64, shape[1] as u64);
    let hd = head_dim as u64;
    if hd == 0 || !hd.is_multiple_of(2) || w % hd != 0 {
        return Err(err(op, "x must hold whole heads of an even head dim"));
    }
    let heads = w / hd;
    let ops = [
        opnd("x", &i[0], Part::Rows(w)),
        opnd("pos", &i[1], Part::Rows(1)),
        opnd("inv", &i[2], Part::Whole),
        opnd("y", &o[0], Part::Rows(w)),
    ];
    let pipe = b.pipeline(&ROPE, "rope", &[("x", ops[0].dtype)], "")?;
    // Invocation indices are 32-bit: at most 2^31 per dispatch.
    let max_rows = ((1u64 << 31) / (heads * hd / 2)).max(1);
    for (u0, nu) in b.chunks(rows, &ops, max_rows)? {
        let n = nu * heads * hd / 2;
        let binds = b.windows(&ops, u0, nu);
        let u = Uniforms::new(
            &[nu as u32, heads as u32, hd as u32, inverse as u32, n as u32],
            &[scale as f32],
        );
        b.dispatch(&pipe, &ROPE, binds, u, grid(n.div_ceil(WG))?);
    }
    Ok(())
}
