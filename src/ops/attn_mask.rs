//! Which keys a query sees: the mask rules of [`AttnSpec`](super::AttnSpec) evaluated on
//! the CPU (the fused op, the eager softmax, and the reference for every kernel).
//!
//! Query `i` sees key `j` of the same row when all of these hold:
//! - document: `seg[i] == seg[j]` (always on; packed documents never see each other);
//! - window: `|i - j| < window` when the spec has a sliding window;
//! - the core rule, one of
//!   - a user expression ([`FlexMask::expr`]) over `q_idx`, `kv_idx` (positions inside the
//!     document: the distance to the start of the token's run of equal segment ids, which
//!     is its position id when packing) and `seg`; it replaces the causal rule;
//!   - prefix-LM ([`FlexMask::prefix_lm`]): causal, except that two tokens that both carry
//!     the prefix flag see each other both ways (the bidirectional prompt of T5/UniLM
//!     prefix-LMs; `token_type_ids` blocks in transformers' PaliGemma/Gemma 3 masks);
//!   - causal: `j <= i` when `spec.causal`, else everything.
//!
//! A query that sees no key (possible only with an expression) gets a zero output and a
//! log-sum-exp of `-inf`, and passes no gradient.

use super::mask_expr::MaskExpr;
use super::AttnSpec;
use std::ops::Range;

/// The mask terms beyond causal, window and document. The default is none of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlexMask {
    /// Bidirectional attention among flagged prompt tokens. The attention op then takes a
    /// fifth input, `prefix [N] i32` (non-zero = in the prompt prefix of its document).
    pub prefix_lm: bool,
    /// A user mask (`flex_attention_mask`) that replaces the causal rule.
    pub expr: Option<MaskExpr>,
}

impl FlexMask {
    /// True when only the causal / window / document rules apply.
    pub fn is_plain(&self) -> bool {
        !self.prefix_lm && self.expr.is_none()
    }
}

impl AttnSpec {
    /// Inputs of the forward op: `q, k, v, seg`, and `prefix` with prefix-LM.
    pub fn forward_inputs(&self) -> usize {
        4 + self.flex.prefix_lm as usize
    }

    /// An error for a backend whose kernels implement only causal / window / document masks.
    pub fn require_plain_mask(&self, backend: &'static str) -> crate::Result<()> {
        if self.flex.is_plain() {
            return Ok(());
        }
        let what = match &self.flex.expr {
            Some(e) => format!("the custom mask `{}`", e.source),
            None => "prefix-LM masks".to_string(),
        };
        Err(crate::Error::backend(
            backend,
            format!("attention with {what} is not implemented on this backend; run on `device: cpu`"),
        ))
    }
}

/// The mask of one row of `T` tokens, with the per-token facts the rules need.
pub struct RowMask<'a> {
    spec: &'a AttnSpec,
    seg: &'a [i32],
    prefix: Option<&'a [i32]>,
    /// Start and end of each token's run of equal segment ids.
    run: Vec<(u32, u32)>,
    /// Every segment id forms one run, so a token's keys lie inside its run.
    runs_are_documents: bool,
}

impl<'a> RowMask<'a> {
    /// `seg` and `prefix` are this row's slices (`prefix` is used with prefix-LM only).
    pub fn new(spec: &'a AttnSpec, seg: &'a [i32], prefix: Option<&'a [i32]>) -> Self {
        let t = seg.len();
        let mut run = vec![(0u32, 0u32); t];
        let mut starts = Vec::new();
        let mut s = 0;
        while s < t {
            let mut e = s + 1;
            while e < t && seg[e] == seg[s] {
                e += 1;
            }
            run[s..e].fill((s as u32, e as u32));
            starts.push(seg[s]);
            s = e;
        }
        starts.sort_unstable();
        let runs_are_documents = starts.windows(2).all(|w| w[0] != w[1]);
        RowMask {
            spec,
            seg,
            prefix: prefix.filter(|_| spec.flex.prefix_lm),
            run,
            runs_are_documents,
        }
    }

    fn in_prefix(&self, i: usize) -> bool {
        self.prefix.is_some_and(|p| p[i] != 0)
    }

    /// Whether query `i` sees key `j`.
    #[inline]
    pub fn visible(&self, i: usize, j: usize) -> bool {
        if self.seg[i] != self.seg[j] {
            return false;
        }
        if let Some(w) = self.spec.window {
            if i.abs_diff(j) >= w {
                return false;
            }
        }
        if let Some(e) = &self.spec.flex.expr {
            let qi = (i - self.run[i].0 as usize) as i32;
            let kj = (j - self.run[j].0 as usize) as i32;
            return e.eval(qi, kj, self.seg[i]);
        }
        !self.spec.causal || j <= i || (self.in_prefix(i) && self.in_prefix(j))
    }

    /// True when `key_range` and `query_range` are exactly the visible sets (no prefix or
    /// expression terms, and each segment id forms one run).
    pub fn ranges_exact(&self) -> bool {
        self.spec.flex.is_plain() && self.runs_are_documents
    }

    /// Keys that query `i` may see (a superset; `visible` decides).
    pub fn key_range(&self, i: usize) -> Range<usize> {
        let (lo, mut hi) = self.doc_bounds(i);
        if self.causal_core() && !self.in_prefix(i) {
            hi = hi.min(i + 1);
        }
        self.window_clip(i, lo, hi)
    }

    /// Queries that may see key `j` (a superset; `visible` decides).
    pub fn query_range(&self, j: usize) -> Range<usize> {
        let (mut lo, hi) = self.doc_bounds(j);
        if self.causal_core() && !self.in_prefix(j) {
            lo = lo.max(j);
        }
        self.window_clip(j, lo, hi)
    }

    fn causal_core(&self) -> bool {
        self.spec.flex.expr.is_none() && self.spec.causal
    }

    fn doc_bounds(&self, i: usize) -> (usize, usize) {
        if self.runs_are_documents {
            (self.run[i].0 as usize, self.run[i].1 as usize)
        } else {
            (0, self.seg.len())
        }
    }

    fn window_clip(&self, i: usize, mut lo: usize, mut hi: usize) -> Range<usize> {
        if let Some(w) = self.spec.window {
            lo = lo.max((i + 1).saturating_sub(w));
            hi = hi.min(i + w);
        }
        lo..hi.max(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(causal: bool, window: Option<usize>, flex: FlexMask) -> AttnSpec {
        AttnSpec {
            n_heads: 1,
            n_kv_heads: 1,
            head_dim: 1,
            seq_len: 9,
            causal,
            window,
            scale: 1.0,
            flex,
        }
    }

    /// Brute force over every pair: the ranges contain every visible key and query.
    fn ranges_cover(s: &AttnSpec, seg: &[i32], prefix: Option<&[i32]>) {
        let m = RowMask::new(s, seg, prefix);
        for i in 0..seg.len() {
            for j in 0..seg.len() {
                if m.visible(i, j) {
                    assert!(m.key_range(i).contains(&j), "key {j} of query {i}");
                    assert!(m.query_range(j).contains(&i), "query {i} of key {j}");
                }
            }
        }
    }

    #[test]
    fn rules_and_ranges() {
        let seg = [1, 1, 1, 1, 2, 2, 2, 3, 3];
        let pre = [1, 1, 0, 0, 1, 0, 0, 0, 0];
        let prefix = FlexMask {
            prefix_lm: true,
            expr: None,
        };
        let s = spec(true, None, prefix.clone());
        let m = RowMask::new(&s, &seg, Some(&pre));
        assert!(m.visible(0, 1), "prompt tokens see each other both ways");
        assert!(!m.visible(1, 2), "a prompt token does not see the answer");
        assert!(m.visible(3, 2) && !m.visible(2, 3), "the answer is causal");
        assert!(!m.visible(4, 3), "documents are separate");
        let expr = FlexMask {
            prefix_lm: false,
            expr: Some(MaskExpr::parse("kv_idx == 0 || q_idx - kv_idx == 1").unwrap()),
        };
        let s2 = spec(true, None, expr.clone());
        let m = RowMask::new(&s2, &seg, None);
        assert!(m.visible(6, 4) && m.visible(6, 5) && !m.visible(6, 6) && !m.visible(4, 6) && m.visible(4, 4));
        for s in [
            spec(true, None, FlexMask::default()),
            spec(false, Some(2), FlexMask::default()),
            spec(true, Some(3), prefix.clone()),
            spec(false, None, prefix),
            spec(true, Some(2), expr.clone()),
        ] {
            ranges_cover(&s, &seg, Some(&pre));
            // Segment ids that repeat after another document: the ranges widen to the row.
            ranges_cover(&s, &[1, 1, 2, 2, 1, 1, 3, 3, 1], Some(&pre));
        }
    }
}
