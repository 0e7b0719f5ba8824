//! Host side of shaders/reduce.wgsl: column sums (ReduceSum to a suffix shape), full sums
//! and sums of squares through per-workgroup partials and a final one-workgroup sum.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::Op;

use super::super::launch::{grid, Builder, Operand, Part, Uniforms};
use super::{check_f32_out, check_float_in, err, opnd, REDUCE};

/// Partial sums one dispatch of `n` elements writes (its workgroup count).
fn partial_groups(n: u64) -> u64 {
    n.div_ceil(256 * 8).clamp(1, 1024)
}

/// y[c] = sum over rows of x[r * cols + c], x sliced by rows.
pub(super) fn column_sum(b: &mut Builder, x: Operand, y: Operand, rows: u64, cols: u64) -> Result<()> {
    let x = x.rename("x").with_part(Part::Rows(cols));
    let y = y.rename("y").with_part(Part::Whole);
    let per_column = cols < 2048 && rows >= 256;
    let entry = if per_column { "colsum_wg" } else { "colsum" };
    let pipe = b.pipeline(&REDUCE, entry, &[("x", x.dtype), ("y", y.dtype)], "")?;
    let ops = [x, y];
    for (k, (u0, nu)) in b.chunks(rows, &ops, u64::MAX)?.into_iter().enumerate() {
        let groups = if per_column { cols } else { cols.div_ceil(256) };
        let binds = b.windows(&ops, u0, nu);
        let u = [cols as u32, nu as u32, (k > 0) as u32];
        b.dispatch(&pipe, &REDUCE, binds, Uniforms::new(&u, &[]), grid(groups)?);
    }
    Ok(())
}

/// y[0] = the sum (of squares when `square`) of every element of every input.
fn total(b: &mut Builder, inputs: &[Operand], y: Operand, square: bool) -> Result<()> {
    // First count the partial sums, so one workspace holds them all.
    let mut plans = Vec::new();
    let mut slots = 0u64;
    for x in inputs {
        let x = x.rename("x").with_part(Part::Rows(1));
        let n = x.bytes / super::super::launch::elem_bytes(x.dtype);
        let chunks = b.chunks(n, &[x], u64::MAX)?;
        for &(u0, nu) in &chunks {
            let g = partial_groups(nu);
            plans.push((x, u0, nu, g, slots));
            slots += g;
        }
    }
    let part = b.workspace("part", slots * 4);
    for (x, u0, nu, g, base) in plans {
        let pipe = b.pipeline(&REDUCE, "partial", &[("x", x.dtype)], "")?;
        let binds = vec![b.window(&x, u0, nu), b.window(&part, 0, 0)];
        let u = [nu as u32, g as u32, base as u32, square as u32];
        b.dispatch(&pipe, &REDUCE, binds, Uniforms::new(&u, &[]), grid(g)?);
    }
    let pipe = b.pipeline(&REDUCE, "final_sum", &[], "")?;
    let binds = vec![
        b.window(&part, 0, 0),
        b.window(&y.rename("y").with_part(Part::Whole), 0, 0),
    ];
    b.dispatch(&pipe, &REDUCE, binds, Uniforms::new(&[slots as u32], &[]), [1, 1, 1]);
    Ok(())
}

pub(super) fn reduce_sum(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "x", i[0].info.dtype)?;
    check_f32_out(op, "the output", o[0].info.dtype)?;
    let (n, cols) = (i[0].info.numel() as u64, o[0].info.numel() as u64);
    if cols == 0 || n % cols != 0 {
        return Err(err(op, format!("cannot sum {n} elements into {cols}")));
    }
    let (x, y) = (opnd("x", &i[0], Part::Whole), opnd("y", &o[0], Part::Whole));
    if cols == 1 {
        total(b, &[x], y, false)
    } else {
        column_sum(b, x, y, n / cols, cols)
    }
}

pub(super) fn sum_squares(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    for a in i {
        check_float_in(op, &a.info.name, a.info.dtype)?;
    }
    check_f32_out(op, "the output", o[0].info.dtype)?;
    let xs: Vec<Operand> = i.iter().map(|a| opnd("x", a, Part::Whole)).collect();
    total(b, &xs, opnd("y", &o[0], Part::Whole), true)
}
