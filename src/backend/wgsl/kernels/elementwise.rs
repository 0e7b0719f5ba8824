//! Host side of shaders/elementwise.wgsl: add, mul, scale, cast, broadcast, dropout,
//! swiglu (+ backward), gradient accumulation and fills.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::Op;

use super::super::launch::{grid, Builder, Operand, Part, Uniforms};
use super::{check_any_out, check_f32_out, check_float_in, check_int, err, opnd, ELEMENTWISE};
use crate::tensor::DType;

/// Runs `entry` over `n` elements: `ops` sliced along (or whole), `u` from index 2 on.
pub(super) fn run(b: &mut Builder, entry: &'static str, ops: &[Operand], n: u64, u: &[u32], f: &[f32]) -> Result<()> {
    let dtypes: Vec<(&'static str, DType)> = ops.iter().map(|o| (o.name, o.dtype)).collect();
    let pipe = b.pipeline(&ELEMENTWISE, entry, &dtypes, "")?;
    for (u0, nu) in b.chunks(n, ops, u64::MAX)? {
        let mut all = vec![nu as u32, u0 as u32];
        all.extend_from_slice(u);
        let groups = grid(nu.div_ceil(2).div_ceil(256))?;
        let binds = b.windows(ops, u0, nu);
        b.dispatch(&pipe, &ELEMENTWISE, binds, Uniforms::new(&all, f), groups);
    }
    Ok(())
}

/// Sets `n` elements of `y` (sliced) to `value`.
pub(super) fn fill(b: &mut Builder, y: Operand, n: u64, value: f32) -> Result<()> {
    run(b, "fill", &[y.rename("y").with_part(Part::Rows(1))], n, &[], &[value])
}

pub(super) fn binary(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "a", i[0].info.dtype)?;
    check_float_in(op, "b", i[1].info.dtype)?;
    check_any_out(op, "the output", o[0].info.dtype)?;
    let n = o[0].info.numel() as u64;
    let nb = i[1].info.numel() as u64;
    let full = nb == n;
    let bpart = if full { Part::Rows(1) } else { Part::Whole };
    let ops = [
        opnd("a", &i[0], Part::Rows(1)),
        opnd("b", &i[1], bpart),
        opnd("y", &o[0], Part::Rows(1)),
    ];
    let code = if *op == Op::Mul { 1 } else { 0 };
    run(b, "binary", &ops, n, &[nb.max(1) as u32, code, full as u32], &[])
}

pub(super) fn unary(b: &mut Builder, op: &Op, entry: &'static str, i: &[Arg], o: &[Arg], f: f32) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_any_out(op, "the output", o[0].info.dtype)?;
    let ops = [opnd("x", &i[0], Part::Rows(1)), opnd("y", &o[0], Part::Rows(1))];
    run(b, entry, &ops, o[0].info.numel() as u64, &[], &[f])
}

pub(super) fn broadcast(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_any_out(op, "the output", o[0].info.dtype)?;
    let nx = i[0].info.numel() as u64;
    let ops = [opnd("x", &i[0], Part::Whole), opnd("y", &o[0], Part::Rows(1))];
    run(b, "broadcast", &ops, o[0].info.numel() as u64, &[nx.max(1) as u32], &[])
}

pub(super) fn dropout(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], salt: u32) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_int(op, "the seed", i[1].info.dtype, DType::U32)?;
    check_int(op, "p", i[2].info.dtype, DType::F32)?;
    check_any_out(op, "the output", o[0].info.dtype)?;
    let ops = [
        opnd("x", &i[0], Part::Rows(1)),
        opnd("seed", &i[1], Part::Whole),
        opnd("p", &i[2], Part::Whole),
        opnd("y", &o[0], Part::Rows(1)),
    ];
    run(b, "dropout", &ops, o[0].info.numel() as u64, &[0, 0, 0, salt], &[])
}

pub(super) fn swiglu(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "gate", i[0].info.dtype)?;
    check_float_in(op, "up", i[1].info.dtype)?;
    check_any_out(op, "the output", o[0].info.dtype)?;
    let ops = [
        opnd("g", &i[0], Part::Rows(1)),
        opnd("u", &i[1], Part::Rows(1)),
        opnd("y", &o[0], Part::Rows(1)),
    ];
    run(b, "swiglu", &ops, o[0].info.numel() as u64, &[], &[])
}

pub(super) fn swiglu_backward(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    for (k, what) in ["gate", "up", "dy"].iter().enumerate() {
        check_float_in(op, what, i[k].info.dtype)?;
    }
    check_any_out(op, "dgate", o[0].info.dtype)?;
    check_any_out(op, "dup", o[1].info.dtype)?;
    let ops = [
        opnd("g", &i[0], Part::Rows(1)),
        opnd("u", &i[1], Part::Rows(1)),
        opnd("dy", &i[2], Part::Rows(1)),
        opnd("dg", &o[0], Part::Rows(1)),
        opnd("du", &o[1], Part::Rows(1)),
    ];
    run(b, "swiglu_bwd", &ops, o[0].info.numel() as u64, &[], &[])
}

pub(super) fn accumulate(b: &mut Builder, op: &Op, i: &[Arg]) -> Result<()> {
    check_f32_out(op, "the accumulator", i[0].info.dtype)?;
    check_float_in(op, "the gradient", i[1].info.dtype)?;
    if i[0].info.numel() != i[1].info.numel() {
        return Err(err(op, "accumulator and gradient sizes differ"));
    }
    let ops = [opnd("acc", &i[0], Part::Rows(1)), opnd("g", &i[1], Part::Rows(1))];
    run(b, "accumulate", &ops, i[0].info.numel() as u64, &[], &[])
}
