//! Attention test cases shared by the CPU and WGSL attention tests: specs, packed segment
//! ids and prompt (prefix-LM) flags.
#![allow(dead_code)]

use ferrotune::ops::{AttnSpec, FlexMask, MaskExpr};

pub fn spec(hq: usize, hk: usize, d: usize, t: usize, causal: bool, window: Option<usize>) -> AttnSpec {
    AttnSpec {
        n_heads: hq,
        n_kv_heads: hk,
        head_dim: d,
        seq_len: t,
        causal,
        window,
        scale: 1.0 / (d as f64).sqrt(),
        flex: FlexMask::default(),
    }
}

pub fn with_expr(mut s: AttnSpec, e: &str) -> AttnSpec {
    s.flex.expr = Some(MaskExpr::parse(e).unwrap());
    s
}

/// Two rows: three documents and a padding segment, then one document.
pub fn packed_segments(t: usize) -> Vec<i32> {
    let mut seg: Vec<i32> = (0..t)
        .map(|i| match i * 10 / t {
            0..=2 => 1,
            3..=6 => 2,
            7 | 8 => 3,
            _ => 4,
        })
        .collect();
    seg.extend(std::iter::repeat_n(1, t));
    seg
}

/// The first `prompt` tokens of each document (rows of `t` tokens) are its prompt.
pub fn prompt_flags(seg: &[i32], t: usize, prompt: usize) -> Vec<i32> {
    let mut out = vec![0; seg.len()];
    let mut start = 0;
    for i in 0..seg.len() {
        if i % t == 0 || seg[i] != seg[i - 1] {
            start = i;
        }
        out[i] = (i - start < prompt) as i32;
    }
    out
}
