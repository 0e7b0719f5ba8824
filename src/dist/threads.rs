//! A collective between threads of one process, for tests: each rank deposits its buffer,
//! the last to arrive publishes all of them, and every rank computes its result from the
//! same buffers in rank order. A rank that does not arrive within the timeout is named.

use super::collective::{check_chunks, name_ranks, sum_in_order, Collective};
use crate::Result;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

struct Round {
    /// Completed exchanges so far.
    generation: u64,
    /// What each rank deposited for the exchange in progress: (operation, data).
    slots: Vec<Option<(&'static str, Vec<f32>)>>,
    /// The buffers of the last completed exchange, in rank order.
    done: Arc<Vec<Vec<f32>>>,
    /// Set when a rank gave up; the others fail with it instead of waiting.
    failed: Option<String>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    round: Mutex<Round>,
    cv: Condvar,
}

/// One rank of an in-process group (see [`ThreadCollective::group`]).
pub struct ThreadCollective {
    rank: usize,
    shared: Arc<Shared>,
}

impl ThreadCollective {
    /// `world` ranks sharing one group; move each into its own thread.
    pub fn group(world: usize, timeout: Duration) -> Vec<ThreadCollective> {
        let shared = Arc::new(Shared {
            world,
            timeout,
            round: Mutex::new(Round {
                generation: 0,
                slots: vec![None; world],
                done: Arc::new(Vec::new()),
                failed: None,
            }),
            cv: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadCollective {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    /// Deposits `data` and returns every rank's buffer once all have arrived.
    fn exchange(&self, op: &'static str, data: Vec<f32>) -> Result<Arc<Vec<Vec<f32>>>> {
        let s = &self.shared;
        let mut r = s.round.lock().map_err(|_| crate::msg!("{op}: a rank panicked"))?;
        if let Some(f) = &r.failed {
            return Err(crate::msg!("{op} on rank {}: {f}", self.rank));
        }
        let generation = r.generation;
        r.slots[self.rank] = Some((op, data));
        if r.slots.iter().all(Option::is_some) {
            let mut bufs = Vec::with_capacity(s.world);
            for (rank, slot) in r.slots.iter_mut().enumerate() {
                let (other_op, d) = slot.take().expect("all arrived");
                if other_op != op {
                    let msg = format!("rank {rank} called {other_op} while rank {} called {op}", self.rank);
                    r.failed = Some(msg.clone());
                    s.cv.notify_all();
                    return Err(crate::msg!("{msg}; every rank must run the same steps"));
                }
                bufs.push(d);
            }
            r.done = Arc::new(bufs);
            r.generation += 1;
            s.cv.notify_all();
            return Ok(r.done.clone());
        }
        let deadline = Instant::now() + s.timeout;
        loop {
            let now = Instant::now();
            if now >= deadline {
                let missing: Vec<usize> = (0..s.world).filter(|&k| r.slots[k].is_none()).collect();
                let msg = format!(
                    "{} did not arrive at {op} within {:.1} s",
                    name_ranks(&missing),
                    s.timeout.as_secs_f64()
                );
                r.failed = Some(msg.clone());
                s.cv.notify_all();
                return Err(crate::msg!("rank {}: {msg}", self.rank));
            }
            r =
                s.cv.wait_timeout(r, deadline - now)
                    .map_err(|_| crate::msg!("{op}: a rank panicked"))?
                    .0;
            if r.generation != generation {
                return Ok(r.done.clone());
            }
            if let Some(f) = &r.failed {
                return Err(crate::msg!("{op} on rank {}: {f}", self.rank));
            }
        }
    }
}

impl Collective for ThreadCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }
    fn kind(&self) -> &'static str {
        "threads"
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let all = self.exchange("all_reduce", buf.to_vec())?;
        check_same_len("all_reduce", &all, buf.len())?;
        sum_in_order(all.iter().map(|v| v.as_slice()), buf);
        Ok(())
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_chunks("reduce_scatter", self.shared.world, send.len(), recv.len())?;
        let all = self.exchange("reduce_scatter", send.to_vec())?;
        check_same_len("reduce_scatter", &all, send.len())?;
        let (c, r) = (recv.len(), self.rank);
        sum_in_order(all.iter().map(|v| &v[r * c..(r + 1) * c]), recv);
        Ok(())
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_chunks("all_gather", self.shared.world, recv.len(), send.len())?;
        let all = self.exchange("all_gather", send.to_vec())?;
        check_same_len("all_gather", &all, send.len())?;
        for (k, v) in all.iter().enumerate() {
            recv[k * send.len()..(k + 1) * send.len()].copy_from_slice(v);
        }
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.shared.world {
            return Err(crate::msg!(
                "broadcast: root {root} is not a rank of {}",
                self.shared.world
            ));
        }
        let all = self.exchange("broadcast", buf.to_vec())?;
        check_same_len("broadcast", &all, buf.len())?;
        buf.copy_from_slice(&all[root]);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.exchange("barrier", Vec::new()).map(|_| ())
    }
}

fn check_same_len(op: &str, all: &[Vec<f32>], n: usize) -> Result<()> {
    match all.iter().position(|v| v.len() != n) {
        Some(k) => Err(crate::msg!(
            "{op}: rank {k} passed {} elements, this rank {n}; the ranks' models or configs differ",
            all[k].len()
        )),
        None => Ok(()),
    }
}
