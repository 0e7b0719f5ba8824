//! Memory planning: every tensor gets an offset before anything runs.
//!
//! Persistent tensors (weights, constants, optimizer state) are laid out once, one after
//! another. Transient tensors (inputs, activations, gradients) are planned per program
//! from their live intervals on the schedule: two tensors may share bytes only if their
//! intervals do not overlap. Placement is greedy by size, each tensor at the lowest offset
//! that fits beside the already placed tensors it overlaps in time (the "greedy by size"
//! strategy of Pisarchyk & Lee 2020, "Efficient Memory Management for Deep Neural Net
//! Inference"). Offsets are aligned to the backend's binding alignment, and no tensor
//! crosses a multiple of the backend's largest buffer, so an arena splits into buffers.

/// A transient tensor to place: bytes and live interval `[first, last]` in schedule time.
#[derive(Clone, Copy, Debug)]
pub struct Interval {
    pub bytes: u64,
    pub first: usize,
    pub last: usize,
}

pub fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

/// Moves `offset` past a chunk boundary when `[offset, offset+bytes)` would straddle it.
fn fit_chunk(offset: u64, bytes: u64, chunk: u64) -> u64 {
    if bytes <= chunk && offset / chunk != (offset + bytes - 1) / chunk {
        align_up(offset, chunk)
    } else {
        offset
    }
}

/// Sequential layout (persistent tensors). Returns offsets and the total size.
pub fn layout_sequential(sizes: &[u64], align: u64, chunk: u64) -> (Vec<u64>, u64) {
    let mut offsets = Vec::with_capacity(sizes.len());
    let mut end = 0;
    for &b in sizes {
        let o = fit_chunk(align_up(end, align), b.max(1), chunk);
        offsets.push(o);
        end = o + b;
    }
    (offsets, align_up(end, align))
}

/// Interval-aware placement. Returns offsets (same order as `items`) and the peak.
pub fn layout_intervals(items: &[Interval], align: u64, chunk: u64) -> (Vec<u64>, u64) {
    let mut order: Vec<usize> = (0..items.len()).collect();
    // Largest first; ties by earlier start for determinism.
    order.sort_by(|&a, &b| {
        items[b]
            .bytes
            .cmp(&items[a].bytes)
            .then(items[a].first.cmp(&items[b].first))
            .then(a.cmp(&b))
    });
    let mut offsets = vec![0u64; items.len()];
    let mut placed: Vec<usize> = Vec::new();
    let mut peak = 0;
    for &i in &order {
        let it = items[i];
        let size = align_up(it.bytes.max(1), align);
        // Ranges taken by placed tensors that are alive at the same time, by offset.
        let mut busy: Vec<(u64, u64)> = placed
            .iter()
            .filter(|&&j| items[j].first <= it.last && it.first <= items[j].last)
            .map(|&j| (offsets[j], offsets[j] + align_up(items[j].bytes.max(1), align)))
            .collect();
        busy.sort_unstable();
        let mut off = fit_chunk(0, size, chunk);
        for (s, e) in busy {
            if off + size <= s {
                break;
            }
            if e > off {
                off = fit_chunk(align_up(e, align), size, chunk);
            }
        }
        offsets[i] = off;
        peak = peak.max(off + size);
        placed.push(i);
    }
    (offsets, peak)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disjoint_lifetimes_share_memory() {
        let items = [
            Interval {
                bytes: 100,
                first: 0,
                last: 1,
            },
            Interval {
                bytes: 100,
                first: 2,
                last: 3,
            },
            Interval {
                bytes: 50,
                first: 1,
                last: 2,
            },
        ];
        let (off, peak) = layout_intervals(&items, 4, u64::MAX);
        assert_eq!(off[0], off[1]);
        assert_eq!(peak, 152);
        for a in 0..3 {
            for b in 0..a {
                let (x, y) = (items[a], items[b]);
                if x.first <= y.last && y.first <= x.last {
                    let (xa, xb) = (off[a], off[a] + x.bytes);
                    let (ya, yb) = (off[b], off[b] + y.bytes);
                    assert!(xb <= ya || yb <= xa, "live tensors {a} and {b} overlap");
                }
            }
        }
    }

    #[test]
    fn nothing_straddles_a_chunk() {
        let items: Vec<Interval> = (0..20)
            .map(|i| Interval {
                bytes: 30 + i * 7,
                first: 0,
                last: 5,
            })
            .collect();
        let (off, peak) = layout_intervals(&items, 16, 256);
        for (o, it) in off.iter().zip(&items) {
            assert_eq!(o / 256, (o + it.bytes - 1) / 256);
            assert_eq!(o % 16, 0);
        }
        assert!(peak >= items.iter().map(|i| i.bytes).sum::<u64>());
        let (offs, total) = layout_sequential(&[100, 200, 100], 64, 256);
        assert_eq!(offs, vec![0, 256, 512]);
        assert_eq!(total, 640);
    }
}
