//! Host side of shaders/attn_eager.wgsl: the head layout change of eager attention (both
//! directions), the masked softmax over score rows and its backward. The score tensors
//! are `[B, H, T, T]`, far larger than one binding at long sequences: those launches are
//! sliced by score rows; the head layout changes by batch rows.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::{AttnSpec, HeadLayout, Op};
use crate::tensor::DType;

use super::super::launch::{grid, Builder, Operand, Part, Uniforms};
use super::attention::{mask_operands, mask_prelude, plain_prelude, uniforms};
use super::{check_any_out, check_f32_out, check_float_in, check_int, err, opnd, ATTN_EAGER};

fn layout_check(op: &Op, l: &HeadLayout, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_any_out(op, "the output", o[0].info.dtype)?;
    if l.seq_len == 0 || l.heads == 0 || l.head_dim == 0 || l.repeat == 0 {
        return Err(err(op, format!("empty layout {l:?}")));
    }
    Ok(())
}

/// Runs `entry` over whole batch rows: `x` and `y` sliced by rows of `x_row` / `y_row`
/// elements.
fn by_rows(
    b: &mut Builder,
    entry: &'static str,
    l: &HeadLayout,
    ops: [Operand; 2],
    rows: u64,
    y_row: u64,
) -> Result<()> {
    let dtypes = [("x", ops[0].dtype), ("y", ops[1].dtype)];
    let pipe = b.pipeline(&ATTN_EAGER, entry, &dtypes, &plain_prelude())?;
    for (u0, nu) in b.chunks(rows, &ops, u64::MAX)? {
        let n = nu * y_row;
        let u = [
            n as u32,
            l.seq_len as u32,
            l.heads as u32,
            0,
            0,
            0,
            l.repeat as u32,
            l.head_dim as u32,
        ];
        let binds = b.windows(&ops, u0, nu);
        b.dispatch(
            &pipe,
            &ATTN_EAGER,
            binds,
            Uniforms::new(&u, &[]),
            grid(n.div_ceil(2).div_ceil(256))?,
        );
    }
    Ok(())
}

pub(super) fn split_heads(b: &mut Builder, op: &Op, l: &HeadLayout, i: &[Arg], o: &[Arg]) -> Result<()> {
    layout_check(op, l, i, o)?;
    let (t, d) = (l.seq_len as u64, l.head_dim as u64);
    let (h, r) = (l.heads as u64, l.repeat as u64);
    let rows = i[0].info.numel() as u64 / (t * h * d);
    let ops = [
        opnd("x", &i[0], Part::Rows(t * h * d)),
        opnd("y", &o[0], Part::Rows(h * r * t * d)),
    ];
    by_rows(b, "split_heads", l, ops, rows, h * r * t * d)
}

pub(super) fn merge_heads(b: &mut Builder, op: &Op, l: &HeadLayout, i: &[Arg], o: &[Arg]) -> Result<()> {
    layout_check(op, l, i, o)?;
    let (t, d) = (l.seq_len as u64, l.head_dim as u64);
    let (h, r) = (l.heads as u64, l.repeat as u64);
    let rows = o[0].info.numel() as u64 / (t * h * d);
    let ops = [
        opnd("x", &i[0], Part::Rows(h * r * t * d)),
        opnd("y", &o[0], Part::Rows(t * h * d)),
    ];
    by_rows(b, "merge_heads", l, ops, rows, t * h * d)
}

pub(super) fn masked_softmax(b: &mut Builder, op: &Op, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "the scores", i[0].info.dtype)?;
    check_f32_out(op, "the probabilities", o[0].info.dtype)?;
    check_int(op, "segment ids", i[1].info.dtype, DType::I32)?;
    let t = s.seq_len as u64;
    if t == 0 || t > u32::MAX as u64 / 2 {
        return Err(err(op, format!("sequence length {t} is not supported")));
    }
    let tokens = i[1].info.numel() as u64;
    let score_rows = i[0].info.numel() as u64 / t;
    let seg = opnd("seg", &i[1], Part::Whole);
    let mut ops = vec![opnd("x", &i[0], Part::Rows(t)), opnd("y", &o[0], Part::Rows(t)), seg];
    for m in mask_operands(b, op, s, seg, i, 2, tokens / t)? {
        ops.push(m.with_part(Part::Whole));
    }
    let dtypes: Vec<(&'static str, DType)> = ops.iter().map(|x| (x.name, x.dtype)).collect();
    let pipe = b.pipeline(&ATTN_EAGER, "masked_softmax", &dtypes, &mask_prelude(s))?;
    for (u0, nu) in b.chunks(score_rows, &ops, u64::MAX)? {
        let mut u = uniforms(s, t);
        u.u[2] = u0 as u32;
        u.u[6] = nu as u32;
        let binds = b.windows(&ops, u0, nu);
        b.dispatch(&pipe, &ATTN_EAGER, binds, u, grid(nu)?);
    }
    Ok(())
}

pub(super) fn softmax_backward(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "p", i[0].info.dtype)?;
    check_float_in(op, "dp", i[1].info.dtype)?;
    check_f32_out(op, "ds", o[0].info.dtype)?;
    let cols = *i[0].info.shape.last().unwrap_or(&1) as u64;
    if cols == 0 {
        return Ok(());
    }
    let rows = i[0].info.numel() as u64 / cols;
    let ops = [
        opnd("p", &i[0], Part::Rows(cols)),
        opnd("dp", &i[1], Part::Rows(cols)),
        opnd("ds", &o[0], Part::Rows(cols)),
    ];
    let dtypes: Vec<(&'static str, DType)> = ops.iter().map(|x| (x.name, x.dtype)).collect();
    let pipe = b.pipeline(&ATTN_EAGER, "softmax_backward", &dtypes, &plain_prelude())?;
    for (u0, nu) in b.chunks(rows, &ops, u64::MAX)? {
        let u = Uniforms::new(&[cols as u32, 0, 0, 0, 0, 0, nu as u32], &[]);
        let binds = b.windows(&ops, u0, nu);
        b.dispatch(&pipe, &ATTN_EAGER, binds, u, grid(nu)?);
    }
    Ok(())
}
