//! Host side of shaders/embedding.wgsl: the gather and its deterministic scatter-add.
//! Tables and row tensors larger than one binding are bound in row windows; each pair of
//! windows (table rows x output or gradient rows) is one dispatch.

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::Op;
use crate::tensor::DType;

use super::super::launch::{grid, Builder, Part, Uniforms};
use super::{check_f32_out, check_float_in, check_int, elementwise, err, opnd, EMBEDDING};

fn width(op: &Op, x: &Arg) -> Result<u64> {
    match x.info.shape[..] {
        [_, h] => Ok(h as u64),
        _ => Err(err(op, "expects 2-D rows")),
    }
}

pub(super) fn forward(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "the table", i[0].info.dtype)?;
    check_int(op, "ids", i[1].info.dtype, DType::I32)?;
    check_f32_out(op, "the output", o[0].info.dtype)?;
    let h = width(op, &i[0])?;
    let vocab = i[0].info.shape[0] as u64;
    let n = i[1].info.numel() as u64;
    let table = opnd("table", &i[0], Part::Rows(h));
    let ids = opnd("ids", &i[1], Part::Whole);
    let y = opnd("y", &o[0], Part::Rows(h));
    let pipe = b.pipeline(
        &EMBEDDING,
        "emb_fwd",
        &[("table", table.dtype)],
        "const MAXC: u32 = 1u;\n",
    )?;
    let max_rows = ((1u64 << 31) / h.max(1)).max(1);
    let t_chunks = b.chunks(vocab.max(1), &[table, ids], u64::MAX)?;
    let y_chunks = b.chunks(n, &[y, ids], max_rows)?;
    for (tk, &(t0, tn)) in t_chunks.iter().enumerate() {
        for &(y0, yn) in &y_chunks {
            let elems = yn * h;
            let binds = vec![b.window(&table, t0, tn), b.window(&ids, 0, 0), b.window(&y, y0, yn)];
            let u = [
                elems as u32,
                h as u32,
                y0 as u32,
                t0 as u32,
                tn as u32,
                vocab as u32,
                (tk == 0) as u32,
            ];
            b.dispatch(
                &pipe,
                &EMBEDDING,
                binds,
                Uniforms::new(&u, &[]),
                grid(elems.div_ceil(256))?,
            );
        }
    }
    Ok(())
}

pub(super) fn backward(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    check_float_in(op, "dy", i[0].info.dtype)?;
    check_int(op, "ids", i[1].info.dtype, DType::I32)?;
    check_f32_out(op, "the table gradient", o[0].info.dtype)?;
    let h = width(op, &i[0])?;
    let n = i[1].info.numel() as u64;
    let vocab = o[0].info.shape[0] as u64;
    let dtable = opnd("dtable", &o[0], Part::Rows(h));
    // Rows no token names stay zero.
    elementwise::fill(b, dtable, vocab * h, 0.0)?;
    if h == 0 {
        return Ok(());
    }
    let dy = opnd("dy", &i[0], Part::Rows(h));
    let ids = opnd("ids", &i[1], Part::Whole);
    let consts = format!("const MAXC: u32 = {}u;\n", h.div_ceil(256));
    let pipe = b.pipeline(&EMBEDDING, "emb_bwd", &[("dy", dy.dtype)], &consts)?;
    let t_chunks = b.chunks(vocab, &[dtable, ids], u64::MAX)?;
    let d_chunks = b.chunks(n, &[dy, ids], u64::MAX)?;
    for &(t0, tn) in &t_chunks {
        for (dk, &(d0, dn)) in d_chunks.iter().enumerate() {
            let binds = vec![b.window(&ids, 0, 0), b.window(&dy, d0, dn), b.window(&dtable, t0, tn)];
            let u = [
                n as u32,
                h as u32,
                t0 as u32,
                tn as u32,
                vocab as u32,
                d0 as u32,
                dn as u32,
                (dk == 0) as u32,
            ];
            b.dispatch(&pipe, &EMBEDDING, binds, Uniforms::new(&u, &[]), grid(n)?);
        }
    }
    Ok(())
}
