//! ggml block formats to f32, as `dequantize_row_*` in ggml/src/ggml-quants.c and the
//! block structs in ggml/src/ggml-common.h. All fields are little-endian.
//!
//! | type | block | bytes | layout |
//! | --- | --- | --- | --- |
//! | Q4_0 | 32 | 18 | f16 d; u8 qs[16]: x[j] = (lo(qs[j]) - 8) d, x[j+16] = (hi(qs[j]) - 8) d |
//! | Q4_1 | 32 | 20 | f16 d, f16 m; u8 qs[16]: x = nibble * d + m (same nibble order) |
//! | Q5_0 | 32 | 22 | f16 d; u32 qh; u8 qs[16]: 5th bit of x[j] is bit j of qh, of x[j+16] bit j+16; x = (q - 16) d |
//! | Q5_1 | 32 | 24 | f16 d, f16 m; u32 qh; u8 qs[16]: x = q * d + m |
//! | Q8_0 | 32 | 34 | f16 d; i8 qs[32]: x = q d |

use half::{bf16, f16};
use rayon::prelude::*;

use super::types::{self, GgmlType};
use crate::Result;

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qs = &b[2..18];
    for j in 0..16 {
        y[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
        y[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qs = &b[4..20];
    for j in 0..16 {
        y[j] = (qs[j] & 0x0F) as f32 * d + m;
        y[j + 16] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// The 32 five-bit values of a Q5 block: low nibbles from `qs`, fifth bits from `qh`.
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut q = [0u8; 32];
    for j in 0..16 {
        let h0 = ((qh >> j) & 1) as u8;
        let h1 = ((qh >> (j + 16)) & 1) as u8;
        q[j] = (qs[j] & 0x0F) | (h0 << 4);
        q[j + 16] = (qs[j] >> 4) | (h1 << 4);
    }
    q
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    for (yj, q) in y.iter_mut().zip(q5_values(qh, &b[6..22])) {
        *yj = (q as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    for (yj, q) in y.iter_mut().zip(q5_values(qh, &b[8..24])) {
        *yj = q as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (yj, &q) in y.iter_mut().zip(&b[2..34]) {
        *yj = (q as i8) as f32 * d;
    }
}

fn f32_block(b: &[u8], y: &mut [f32]) {
    y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
}

fn f16_block(b: &[u8], y: &mut [f32]) {
    y[0] = f16_at(b, 0);
}

fn bf16_block(b: &[u8], y: &mut [f32]) {
    y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32();
}

/// Dequantize `data` (whole blocks of `ty`) into `out`, whose length gives the element count.
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let block: fn(&[u8], &mut [f32]) = match ty {
        t if t == types::F32 => f32_block,
        t if t == types::F16 => f16_block,
        t if t == types::BF16 => bf16_block,
        t if t == types::Q4_0 => q4_0,
        t if t == types::Q4_1 => q4_1,
        t if t == types::Q5_0 => q5_0,
        t if t == types::Q5_1 => q5_1,
        t if t == types::Q8_0 => q8_0,
        t => {
            return Err(crate::msg!(
                "ggml type {t} (id {}) cannot be dequantized; supported types: {}",
                t.id,
                GgmlType::dequantizable_list()
            ))
        }
    };
    let need = ty.bytes_for(out.len()).ok_or_else(|| {
        crate::msg!(
            "{} values are not a whole number of {ty} blocks of {}",
            out.len(),
            ty.block_size
        )
    })?;
    if data.len() != need {
        return Err(crate::msg!(
            "{} values of {ty} need {need} bytes, got {}",
            out.len(),
            data.len()
        ));
    }
    // Chunks of many blocks per task keep the rayon overhead small for the 1-element types.
    let per_task = (16384 / ty.block_size).max(1);
    out.par_chunks_mut(per_task * ty.block_size)
        .zip(data.par_chunks(per_task * ty.type_size))
        .for_each(|(y, b)| {
            for (yb, bb) in y.chunks_mut(ty.block_size).zip(b.chunks(ty.type_size)) {
                block(bb, yb);
            }
        });
    Ok(())
}
