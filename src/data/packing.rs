//! axolotl's multipack bin packing (`src/axolotl/utils/samplers/multipack.py`, `pack_group`):
//! the sample order is cut into groups of `group_size`, and within each group every sample
//! goes into the first bin (in creation order) with room for it and fewer than `bin_size`
//! samples, or opens a new bin. There is no sorting: the order given (shuffled per epoch by
//! the caller) is kept.

use crate::{Error, Result};

/// Pack `order` (indices into `lengths`) into bins of at most `capacity` tokens.
pub fn pack(
    order: &[usize],
    lengths: &[usize],
    capacity: usize,
    group_size: usize,
    bin_size: usize,
) -> Result<Vec<Vec<usize>>> {
    if capacity == 0 || group_size == 0 || bin_size == 0 {
        return Err(Error::Config(
            "sample packing: capacity, group size and bin size must be at least 1".into(),
        ));
    }
    let mut bins = Vec::new();
    for group in order.chunks(group_size) {
        let mut space: Vec<usize> = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        // Bins that may still take a sample, in creation order.
        let mut open: Vec<usize> = Vec::new();
        let min_len = group.iter().map(|&i| lengths[i]).min().unwrap_or(0);
        for &idx in group {
            let len = lengths[idx];
            if len > capacity {
                return Err(Error::Data(format!(
                    "sample {idx} has {len} tokens, more than the packing capacity {capacity}"
                )));
            }
            let pos = open.iter().position(|&b| space[b] >= len);
            let b = match pos {
                Some(p) => open[p],
                None => {
                    space.push(capacity);
                    members.push(Vec::new());
                    open.push(space.len() - 1);
                    space.len() - 1
                }
            };
            space[b] -= len;
            members[b].push(idx);
            if members[b].len() >= bin_size || space[b] < min_len.max(1) {
                open.retain(|&o| o != b);
            }
        }
        bins.extend(members);
    }
    Ok(bins)
}

/// Used tokens over the tokens the bins could hold.
pub fn efficiency(bins: &[Vec<usize>], lengths: &[usize], capacity: usize) -> f64 {
    if bins.is_empty() {
        return 0.0;
    }
    let used: usize = bins.iter().flatten().map(|&i| lengths[i]).sum();
    used as f64 / (bins.len() * capacity) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_fit_in_the_given_order() {
        // Capacity 10: 6 -> bin0; 5 -> bin1; 4 -> bin0 (6+4); 3 -> bin1 (5+3); 2 -> bin1 (8+2); 7 -> bin2.
        let lengths = [6, 5, 4, 3, 2, 7];
        let order: Vec<usize> = (0..6).collect();
        let bins = pack(&order, &lengths, 10, 100, 100).unwrap();
        assert_eq!(bins, vec![vec![0, 2], vec![1, 3, 4], vec![5]]);
        // used 27 of 3 * 10.
        assert!((efficiency(&bins, &lengths, 10) - 0.9).abs() < 1e-12);
    }

    #[test]
    fn bin_size_and_groups_limit_bins() {
        let lengths = [1; 6];
        let order: Vec<usize> = (0..6).collect();
        assert_eq!(
            pack(&order, &lengths, 100, 100, 2).unwrap(),
            vec![vec![0, 1], vec![2, 3], vec![4, 5]]
        );
        // Groups of 4 never share a bin.
        assert_eq!(
            pack(&order, &lengths, 100, 4, 100).unwrap(),
            vec![vec![0, 1, 2, 3], vec![4, 5]]
        );
    }

    #[test]
    fn a_sample_longer_than_a_bin_is_an_error() {
        let err = pack(&[0], &[11], 10, 10, 10).unwrap_err().to_string();
        assert!(err.contains("11 tokens") && err.contains("capacity 10"), "{err}");
    }
}
