//! A collective between processes over the rendezvous connections, for the CPU backend
//! (and for testing the launcher without GPUs). Rank 0 is the hub: the other ranks send
//! their buffers, rank 0 reduces them in rank order and sends each rank its result.
//! Rank 0 names a rank that does not arrive within the timeout and tells the others.

use super::collective::{check_chunks, sum_in_order, Collective};
use super::store::Links;
use super::wire::{bytes_f32, f32_bytes, read_frame, write_frame, ReadFail, ABORT, DATA};
use crate::{Error, Result};
use std::time::{Duration, Instant};

pub struct TcpCollective {
    rank: usize,
    world: usize,
    links: Links,
    timeout: Duration,
}

const OPS: [&str; 5] = ["all_reduce", "reduce_scatter", "all_gather", "broadcast", "barrier"];

fn op_code(op: &str) -> u8 {
    OPS.iter().position(|o| *o == op).expect("known op") as u8
}

impl TcpCollective {
    pub fn new(rank: usize, world: usize, links: Links, timeout: Duration) -> Self {
        TcpCollective {
            rank,
            world,
            links,
            timeout,
        }
    }

    /// Every rank's `data` on rank 0 (in rank order), or nothing on the others.
    fn gather_at_hub(&mut self, op: &'static str, data: &[f32]) -> Result<Option<Vec<Vec<f32>>>> {
        let timeout = self.timeout;
        match &mut self.links {
            Links::Alone => Ok(Some(vec![data.to_vec()])),
            Links::Worker(s) => {
                let mut msg = vec![op_code(op)];
                msg.extend(f32_bytes(data));
                write_frame(s, DATA, &msg).map_err(|e| hub_gone(self.rank, op, &e.to_string()))?;
                Ok(None)
            }
            Links::Master(streams) => {
                let deadline = Instant::now() + timeout;
                let mut all = vec![data.to_vec()];
                for k in 1..self.world {
                    let got = read_frame(&mut streams[k - 1], deadline.saturating_duration_since(Instant::now()));
                    // `lost`: rank k is gone, so this failure follows from its own.
                    let (fail, lost) = match got {
                        Ok((DATA, body)) if body.first() == Some(&op_code(op)) => {
                            all.push(bytes_f32(&body[1..])?);
                            continue;
                        }
                        Ok((DATA, body)) => (
                            format!(
                                "rank {k} called {} while rank 0 called {op}; every rank must run the same steps",
                                OPS.get(body.first().copied().unwrap_or(99) as usize)
                                    .unwrap_or(&"an unknown operation")
                            ),
                            false,
                        ),
                        Ok((t, _)) => (format!("rank {k} sent an unexpected message ({t})"), false),
                        Err(ReadFail::TimedOut) => (
                            format!("rank {k} did not arrive at {op} within {:.0} s", timeout.as_secs_f64()),
                            false,
                        ),
                        Err(ReadFail::Closed) => (
                            format!("rank {k} closed its connection during {op} (it exited or failed)"),
                            true,
                        ),
                        Err(ReadFail::Other(e)) => (format!("rank {k}: {e}"), false),
                    };
                    for (j, s) in streams.iter_mut().enumerate() {
                        if j + 1 != k {
                            let _ = write_frame(s, ABORT, fail.as_bytes());
                        }
                    }
                    let fail = format!("rank 0: {fail}");
                    return Err(if lost { Error::PeerLost(fail) } else { Error::Msg(fail) });
                }
                Ok(Some(all))
            }
        }
    }

    /// Rank 0 sends `results[k]` to rank k and returns its own; the others receive theirs.
    fn scatter_from_hub(&mut self, op: &'static str, results: Option<Vec<Vec<f32>>>) -> Result<Vec<f32>> {
        // Rank 0 may wait up to its timeout for a slow rank before answering.
        let wait = self.timeout + self.timeout / 10 + Duration::from_secs(5);
        match &mut self.links {
            Links::Alone => Ok(results.expect("hub").swap_remove(0)),
            Links::Master(streams) => {
                let mut results = results.expect("hub");
                for (k, s) in streams.iter_mut().enumerate() {
                    write_frame(s, DATA, &f32_bytes(&results[k + 1]))
                        .map_err(|e| Error::PeerLost(format!("rank 0: rank {} went away during {op}: {e}", k + 1)))?;
                }
                Ok(results.swap_remove(0))
            }
            Links::Worker(s) => match read_frame(s, wait) {
                Ok((DATA, body)) => bytes_f32(&body),
                Ok((ABORT, m)) => Err(Error::PeerLost(format!(
                    "rank {}: {op} failed: {}",
                    self.rank,
                    String::from_utf8_lossy(&m)
                ))),
                Ok((t, _)) => Err(crate::msg!("rank {}: unexpected message {t} from rank 0", self.rank)),
                Err(ReadFail::TimedOut) => Err(crate::msg!(
                    "rank {}: rank 0 did not answer {op} within {:.0} s",
                    self.rank,
                    wait.as_secs_f64()
                )),
                Err(ReadFail::Closed) => Err(hub_gone(self.rank, op, "connection closed")),
                Err(ReadFail::Other(e)) => Err(hub_gone(self.rank, op, &e)),
            },
        }
    }

    fn run(
        &mut self,
        op: &'static str,
        data: &[f32],
        f: impl FnOnce(&[Vec<f32>]) -> Vec<Vec<f32>>,
    ) -> Result<Vec<f32>> {
        let all = self.gather_at_hub(op, data)?;
        if let Some(all) = &all {
            if let Some(k) = all.iter().position(|v| v.len() != data.len()) {
                let msg = format!(
                    "rank {k} passed {} elements to {op}, rank 0 {}",
                    all[k].len(),
                    data.len()
                );
                if let Links::Master(streams) = &mut self.links {
                    for s in streams.iter_mut() {
                        let _ = write_frame(s, ABORT, msg.as_bytes());
                    }
                }
                return Err(Error::Msg(format!("{msg}; the ranks' models or configs differ")));
            }
        }
        self.scatter_from_hub(op, all.as_deref().map(f))
    }
}

fn hub_gone(rank: usize, op: &str, e: &str) -> Error {
    Error::PeerLost(format!(
        "rank {rank}: rank 0 went away during {op} ({e}); it exited or failed, see its log"
    ))
}

impl Collective for TcpCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn kind(&self) -> &'static str {
        "tcp"
    }

    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<()> {
        let w = self.world;
        let out = self.run("all_reduce", buf, |all| {
            let mut sum = vec![0.0; all[0].len()];
            sum_in_order(all.iter().map(|v| v.as_slice()), &mut sum);
            vec![sum; w]
        })?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn reduce_scatter(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_chunks("reduce_scatter", self.world, send.len(), recv.len())?;
        let (c, w) = (recv.len(), self.world);
        let out = self.run("reduce_scatter", send, |all| {
            let mut sum = vec![0.0; all[0].len()];
            sum_in_order(all.iter().map(|v| v.as_slice()), &mut sum);
            (0..w).map(|k| sum[k * c..(k + 1) * c].to_vec()).collect::<Vec<_>>()
        })?;
        recv.copy_from_slice(&out[..c]);
        Ok(())
    }

    fn all_gather(&mut self, send: &[f32], recv: &mut [f32]) -> Result<()> {
        check_chunks("all_gather", self.world, recv.len(), send.len())?;
        let w = self.world;
        let out = self.run("all_gather", send, |all| vec![all.concat(); w])?;
        recv.copy_from_slice(&out);
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        if root >= self.world {
            return Err(crate::msg!("broadcast: root {root} is not a rank of {}", self.world));
        }
        let w = self.world;
        let out = self.run("broadcast", buf, |all| vec![all[root].clone(); w])?;
        buf.copy_from_slice(&out);
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        self.run("barrier", &[], |all| vec![Vec::new(); all.len()]).map(|_| ())
    }
}
