//! The collective operations data-parallel training needs, over f32 host buffers.
//!
//! Every implementation reduces in rank order (rank 0 + rank 1 + ...), so all ranks hold
//! bit-identical results and a run is reproducible for a given world size.

use crate::Result;
use std::time::Duration;

/// Default wait for a collective before the ranks that did not arrive are named (10 minutes).
pub const DEFAULT_COLLECTIVE_TIMEOUT: Duration = Duration::from_secs(600);
/// Default wait for every rank to join at start-up.
pub const DEFAULT_RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(120);
/// The longest wait either timeout may be set to: 30 days.
pub const MAX_TIMEOUT_SECS: u64 = 30 * 24 * 3600;

/// A group of `world_size` ranks; each rank calls the same operations in the same order.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over ranks, in place.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()>;
    /// `send` holds `world_size` equal chunks; `recv` (one chunk long) gets the sum over
    /// ranks of chunk `rank`.
    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// `recv` (`world_size` chunks of `send.len()`) gets every rank's `send`, in rank order.
    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()>;
    /// Every rank's `buf` becomes `root`'s.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
    /// A short description for messages (`threads`, `tcp`, `nccl`).
    fn kind(&self) -> &'static str;
}

/// Checks the buffer sizes of a reduce-scatter or all-gather.
pub(crate) fn check_chunks(op: &str, world: usize, whole: usize, chunk: usize) -> Result<()> {
    if whole != world * chunk {
        return Err(crate::msg!(
            "{op}: the full buffer has {whole} elements, expected world_size {world} x chunk {chunk}"
        ));
    }
    Ok(())
}

/// Formats ranks as `rank 3` or `ranks 1, 3`.
pub(crate) fn name_ranks(ranks: &[usize]) -> String {
    let list: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    if ranks.len() == 1 {
        format!("rank {}", list[0])
    } else {
        format!("ranks {}", list.join(", "))
    }
}

/// Sums `parts` element-wise in order into `out`.
pub(crate) fn sum_in_order<'a>(parts: impl IntoIterator<Item = &'a [f32]>, out: &mut [f32]) {
    let mut first = true;
    for p in parts {
        if first {
            out.copy_from_slice(p);
            first = false;
        } else {
            out.iter_mut().zip(p).for_each(|(o, x)| *o += x);
        }
    }
}
