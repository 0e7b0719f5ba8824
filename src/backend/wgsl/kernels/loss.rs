//! Host side of shaders/cross_entropy.wgsl, sliced by rows of the logits.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::Op;
use crate::tensor::DType;

use super::super::launch::{grid, Builder, Part, Uniforms};
use super::{check_any_out, check_f32_out, check_float_in, check_int, err, opnd, CROSS_ENTROPY};

fn shape(op: &Op, logits: &Arg) -> Result<(u64, u64)> {
    match logits.info.shape[..] {
        [n, v] if v > 0 => Ok((n as u64, v as u64)),
        _ => Err(err(op, "logits must be [N, V] with V > 0")),
    }
}

pub(super) fn cross_entropy(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], ignore: i32) -> Result<()> {
    check_float_in(op, "logits", i[0].info.dtype)?;
    check_int(op, "labels", i[1].info.dtype, DType::I32)?;
    for (k, what) in ["the loss", "the label count", "lse"].iter().enumerate() {
        check_f32_out(op, what, o[k].info.dtype)?;
    }
    let (n, v) = shape(op, &i[0])?;
    let ops = [
        opnd("logits", &i[0], Part::Rows(v)),
        opnd("labels", &i[1], Part::Rows(1)),
        opnd("lse", &o[2], Part::Rows(1)),
        opnd("loss", &o[0], Part::Whole),
        opnd("count", &o[1], Part::Whole),
    ];
    let dtypes = [("logits", ops[0].dtype)];
    let rows_pipe = b.pipeline(&CROSS_ENTROPY, "ce_rows", &dtypes, "")?;
    let total_pipe = b.pipeline(&CROSS_ENTROPY, "ce_total", &dtypes, "")?;
    for (k, (u0, nu)) in b.chunks(n, &ops, u64::MAX)?.into_iter().enumerate() {
        let u = Uniforms::new(&[v as u32, nu as u32, ignore as u32, (k > 0) as u32], &[]);
        let binds = b.windows(&[ops[0], ops[2]], u0, nu);
        b.dispatch(&rows_pipe, &CROSS_ENTROPY, binds, u, grid(nu)?);
        let binds = b.windows(&ops, u0, nu);
        b.dispatch(&total_pipe, &CROSS_ENTROPY, binds, u, [1, 1, 1]);
    }
    Ok(())
}

pub(super) fn cross_entropy_backward(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], ignore: i32) -> Result<()> {
    check_float_in(op, "logits", i[0].info.dtype)?;
    check_int(op, "labels", i[1].info.dtype, DType::I32)?;
    check_float_in(op, "lse", i[2].info.dtype)?;
    check_float_in(op, "dloss", i[3].info.dtype)?;
    check_any_out(op, "dlogits", o[0].info.dtype)?;
    let (n, v) = shape(op, &i[0])?;
    let ops = [
        opnd("logits", &i[0], Part::Rows(v)),
        opnd("labels", &i[1], Part::Rows(1)),
        opnd("lse", &i[2], Part::Rows(1)),
        opnd("dloss", &i[3], Part::Whole),
        opnd("dlogits", &o[0], Part::Rows(v)),
    ];
    let dtypes: Vec<(&'static str, DType)> = ops
        .iter()
        .filter(|x| x.name != "labels")
        .map(|x| (x.name, x.dtype))
        .collect();
    let pipe = b.pipeline(&CROSS_ENTROPY, "ce_bwd", &dtypes, "")?;
    // Element indices are 32-bit: at most 2^31 elements per dispatch.
    let max_rows = ((1u64 << 31) / v).max(1);
    for (u0, nu) in b.chunks(n, &ops, max_rows)? {
        let elems = nu * v;
        let u = Uniforms::new(&[elems as u32, v as u32, ignore as u32], &[]);
        let binds = b.windows(&ops, u0, nu);
        b.dispatch(&pipe, &CROSS_ENTROPY, binds, u, grid(elems.div_ceil(2).div_ceil(256))?);
    }
    Ok(())
}
