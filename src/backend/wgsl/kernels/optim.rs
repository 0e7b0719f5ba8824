//! Host side of shaders/optim.wgsl: the clipping coefficient and the in-place AdamW update.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::{AdamWSpec, Op};
use crate::tensor::DType;

use super::super::launch::{grid, Builder, Part, Uniforms};
use super::{check_f32_out, check_float_in, check_int, err, opnd, OPTIM};

pub(super) fn clip_coef(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], max_norm: f64) -> Result<()> {
    check_float_in(op, "the sum of squares", i[0].info.dtype)?;
    check_f32_out(op, "the norm", o[0].info.dtype)?;
    check_f32_out(op, "the coefficient", o[1].info.dtype)?;
    let ops = [
        opnd("sumsq", &i[0], Part::Whole),
        opnd("norm", &o[0], Part::Whole),
        opnd("coef", &o[1], Part::Whole),
    ];
    let pipe = b.pipeline(&OPTIM, "clip_coef", &[("sumsq", ops[0].dtype)], "")?;
    let binds = b.windows(&ops, 0, 0);
    b.dispatch(&pipe, &OPTIM, binds, Uniforms::new(&[], &[max_norm as f32]), [1, 1, 1]);
    Ok(())
}

pub(super) fn adamw(b: &mut Builder, op: &Op, s: &AdamWSpec, i: &[Arg]) -> Result<()> {
    for (k, what) in ["the parameter", "the gradient", "m", "v"].iter().enumerate() {
        check_f32_out(op, what, i[k].info.dtype)?;
    }
    check_int(op, "hyper", i[4].info.dtype, DType::F32)?;
    check_float_in(op, "coef", i[5].info.dtype)?;
    let n = i[0].info.numel() as u64;
    if (1..4).any(|k| i[k].info.numel() as u64 != n) {
        return Err(err(op, "parameter, gradient and moments must have the same size"));
    }
    let ops = [
        opnd("p", &i[0], Part::Rows(1)),
        opnd("g", &i[1], Part::Rows(1)),
        opnd("m", &i[2], Part::Rows(1)),
        opnd("v", &i[3], Part::Rows(1)),
        opnd("hyper", &i[4], Part::Whole),
        opnd("coef", &i[5], Part::Whole),
    ];
    let pipe = b.pipeline(&OPTIM, "adamw", &[("coef", ops[5].dtype)], "")?;
    let f = [s.beta1 as f32, s.beta2 as f32, s.eps as f32, s.weight_decay as f32];
    for (u0, nu) in b.chunks(n, &ops, u64::MAX)? {
        let binds = b.windows(&ops, u0, nu);
        let groups = grid(nu.div_ceil(2).div_ceil(256))?;
        b.dispatch(&pipe, &OPTIM, binds, Uniforms::new(&[nu as u32], &f), groups);
    }
    Ok(())
}
