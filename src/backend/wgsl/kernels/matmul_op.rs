//! `Op::MatMul` through the device layer's matmul (`plan_matmul`), which binds A and B
//! read-only and C writable, so C must live in another buffer than A and B. The executor's
//! transient arena usually holds all three; the product is then computed into a scratch
//! buffer and copied into place, in chunks of rows (or batches) so the scratch stays small:
//! at most [`scratch_cap`] bytes, or one batch of C when A is transposed (its rows are then
//! not contiguous).

use crate::backend::Arg;
use crate::error::Result;
use crate::ops::{matmul, Op};

use super::super::buffers::BufSlice;
use super::super::launch::{elem_bytes, Builder, Part, Pending};
use super::super::matmul::{plan_matmul, MatmulArgs, MatmulKernel};
use super::{check_f32_out, check_float_in, elementwise, err, opnd};

/// Bytes of scratch a chunked product aims for.
pub(crate) fn scratch_cap(max_binding: u64) -> u64 {
    (32u64 << 20).min(max_binding / 2).max(4096)
}

/// A block of C computed by one product: batches `[b0, b0 + nb)`, rows `[m0, m0 + mc)`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    b0: u64,
    nb: u64,
    m0: u64,
    mc: u64,
}

/// Chunks of C for the scratch path, and the scratch bytes they need.
fn chunks(batch: u64, m: u64, n: u64, trans_a: bool, cap: u64) -> (Vec<Chunk>, u64) {
    let per_batch = m * n * 4;
    let mut out = Vec::new();
    if trans_a || per_batch <= cap {
        let nb = (cap / per_batch.max(1)).clamp(1, batch.max(1));
        for b0 in (0..batch).step_by(nb as usize) {
            out.push(Chunk {
                b0,
                nb: nb.min(batch - b0),
                m0: 0,
                mc: m,
            });
        }
    } else {
        let mc = (cap / (n * 4).max(1)).clamp(1, m);
        for b0 in 0..batch {
            for m0 in (0..m).step_by(mc as usize) {
                out.push(Chunk {
                    b0,
                    nb: 1,
                    m0,
                    mc: mc.min(m - m0),
                });
            }
        }
    }
    let bytes = out.iter().map(|c| c.nb * c.mc * n * 4).max().unwrap_or(0);
    (out, bytes)
}

pub(super) fn plan(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg], trans_a: bool, trans_b: bool) -> Result<()> {
    check_float_in(op, "A", i[0].info.dtype)?;
    check_float_in(op, "B", i[1].info.dtype)?;
    check_f32_out(op, "the product", o[0].info.dtype)?;
    let d = matmul::dims(&i[0].info.shape, &i[1].info.shape, trans_a, trans_b).map_err(|e| err(op, e))?;
    let (batch, m, n, k) = (d.batch as u64, d.m as u64, d.n as u64, d.k as u64);
    if batch * m * n == 0 {
        return Ok(());
    }
    if k == 0 {
        // An empty sum: C = 0.
        return elementwise::fill(b, opnd("y", &o[0], Part::Rows(1)), batch * m * n, 0.0);
    }
    let (ea, eb) = (elem_bytes(i[0].info.dtype), elem_bytes(i[1].info.dtype));
    let (la, lb, lc) = (i[0].loc, i[1].loc, o[0].loc);
    let (parts, scratch_bytes) = chunks(batch, m, n, trans_a, scratch_cap(b.max_binding));
    if b.dry {
        b.want_scratch(scratch_bytes);
        return Ok(());
    }
    let (ctx, arena) = (b.ctx, b.arena);
    let buf = |id: crate::backend::BufferId| -> Result<&wgpu::Buffer> {
        arena
            .get(id.0 as usize)
            .ok_or_else(|| err(op, format!("buffer {} was never allocated", id.0)))
    };
    let (ba, bb, bc) = (buf(la.buffer)?, buf(lb.buffer)?, buf(lc.buffer)?);
    let args = |a: BufSlice<'_>, bm: BufSlice<'_>, c: BufSlice<'_>, nb: u64, mc: u64| -> Result<_> {
        let margs = MatmulArgs {
            a,
            b: bm,
            c,
            m: mc as usize,
            n: n as usize,
            k: k as usize,
            batch: nb as usize,
            batch_stride_a: None,
            batch_stride_b: None,
            batch_stride_c: None,
            trans_a,
            trans_b,
            a_dtype: i[0].info.dtype,
            b_dtype: i[1].info.dtype,
            alpha: 1.0,
            accumulate: false,
            kernel: MatmulKernel::Auto,
        };
        plan_matmul(ctx, &margs)
    };
    let slice = |buffer, offset, size| BufSlice { buffer, offset, size };
    if lc.buffer != la.buffer && lc.buffer != lb.buffer {
        let p = args(
            slice(ba, la.offset, la.bytes),
            slice(bb, lb.offset, lb.bytes),
            slice(bc, lc.offset, lc.bytes),
            batch,
            m,
        )?;
        b.steps.push(Pending::Matmul(p));
        return Ok(());
    }
    let scratch = b.scratch_buffer(scratch_bytes)?;
    let mut steps = Vec::new();
    for ch in parts {
        let a_first = ch.b0 * m * k + ch.m0 * k;
        let a = slice(ba, la.offset + a_first * ea, ch.nb * ch.mc * k * ea);
        let bm = if d.shared_b {
            slice(bb, lb.offset, lb.bytes)
        } else {
            slice(bb, lb.offset + ch.b0 * k * n * eb, ch.nb * k * n * eb)
        };
        let size = ch.nb * ch.mc * n * 4;
        let p = args(a, bm, slice(&scratch, 0, size), ch.nb, ch.mc)?;
        steps.push(Pending::Matmul(p));
        steps.push(Pending::Copy {
            src: scratch.clone(),
            dst: lc.buffer.0,
            offset: lc.offset + (ch.b0 * m * n + ch.m0 * n) * 4,
            size,
        });
    }
    b.steps.extend(steps);
    Ok(())
}
