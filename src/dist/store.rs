//! Start-up rendezvous, as torchrun does it: rank 0 listens on `MASTER_ADDR:MASTER_PORT`,
//! every other rank connects and says who it is and the hash of its config. Rank 0 checks
//! that all ranks arrived within the timeout and run the same config, then hands each the
//! same payload (the NCCL unique id). The connections stay open for the TCP collective.

use super::collective::name_ranks;
use super::wire::{read_frame, read_frame_at_most, write_frame, ReadFail, ABORT, HELLO, OK};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// How long rank 0 waits for the hello of a connection it accepted.
const HELLO_WAIT: Duration = Duration::from_secs(5);
/// A hello is a small JSON object; anything larger is not from a rank.
const MAX_HELLO_BYTES: u64 = 64 << 10;

#[derive(Clone, Debug)]
pub struct RendezvousOptions {
    pub master_addr: String,
    pub master_port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// sha256 of the config each rank loaded; all must agree.
    pub config_hash: String,
    pub timeout: Duration,
}

#[derive(Serialize, Deserialize)]
struct Hello {
    rank: usize,
    world_size: usize,
    config_hash: String,
}

/// The open connections after a rendezvous.
pub enum Links {
    /// Rank 0: one stream per other rank, index `rank - 1`.
    Master(Vec<TcpStream>),
    Worker(TcpStream),
    /// World size 1.
    Alone,
}

fn short(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// Joins the group: rank 0 serves, the others connect. Returns the links and rank 0's payload.
pub fn rendezvous(o: &RendezvousOptions, payload: &dyn Fn() -> Result<Vec<u8>>) -> Result<(Links, Vec<u8>)> {
    if o.world_size <= 1 {
        return Ok((Links::Alone, payload()?));
    }
    if o.rank == 0 {
        let addr = format!("{}:{}", o.master_addr, o.master_port);
        let listener = TcpListener::bind(&addr).map_err(|e| {
            crate::msg!("rank 0: cannot listen on MASTER_ADDR:MASTER_PORT {addr}: {e}; choose a free port")
        })?;
        serve(listener, o, payload)
    } else {
        join(o)
    }
}

/// Rank 0's side, on a bound listener.
pub fn serve(
    listener: TcpListener,
    o: &RendezvousOptions,
    payload: &dyn Fn() -> Result<Vec<u8>>,
) -> Result<(Links, Vec<u8>)> {
    let deadline = Instant::now() + o.timeout;
    listener
        .set_nonblocking(true)
        .map_err(|e| crate::msg!("rendezvous: {e}"))?;
    let mut streams: Vec<Option<(TcpStream, String)>> = (1..o.world_size).map(|_| None).collect();
    let mut problems = Vec::new();
    while streams.iter().any(Option::is_none) {
        let now = Instant::now();
        if now >= deadline {
            let missing: Vec<usize> = (1..o.world_size).filter(|&k| streams[k - 1].is_none()).collect();
            problems.push(format!(
                "{} did not arrive at {}:{} within {:.0} s (started? same MASTER_ADDR/MASTER_PORT?)",
                name_ranks(&missing),
                o.master_addr,
                o.master_port,
                o.timeout.as_secs_f64()
            ));
            let msg = format!("rendezvous: {}", problems.join("; "));
            abort_all(&mut streams, &msg);
            return Err(Error::Msg(msg));
        }
        let (mut s, _) = match listener.accept() {
            Ok(x) => x,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => return Err(crate::msg!("rendezvous: accept failed: {e}")),
        };
        let _ = s.set_nonblocking(false);
        let _ = s.set_nodelay(true);
        // A rank sends its hello at once; anything else on the port gets a few seconds and
        // a small message before it is dropped.
        let wait = deadline.saturating_duration_since(Instant::now()).min(HELLO_WAIT);
        let hello: Hello = match read_frame_at_most(&mut s, wait, MAX_HELLO_BYTES) {
            Ok((HELLO, body)) => match serde_json::from_slice(&body) {
                Ok(h) => h,
                Err(_) => continue,
            },
            // Not one of ours (a port scan, a stale process): ignore it.
            _ => continue,
        };
        if hello.world_size != o.world_size {
            problems.push(format!(
                "rank {} has WORLD_SIZE {}, rank 0 has {}",
                hello.rank, hello.world_size, o.world_size
            ));
        } else if hello.rank == 0 || hello.rank >= o.world_size {
            problems.push(format!(
                "a process says RANK {} (expected 1..{})",
                hello.rank,
                o.world_size - 1
            ));
        } else if streams[hello.rank - 1].is_some() {
            problems.push(format!("two processes say RANK {}", hello.rank));
        } else {
            if hello.config_hash != o.config_hash {
                problems.push(format!(
                    "the config of rank {} (hash {}) differs from rank 0's ({})",
                    hello.rank,
                    short(&hello.config_hash),
                    short(&o.config_hash)
                ));
            }
            streams[hello.rank - 1] = Some((s, hello.config_hash));
            continue;
        }
        let _ = write_frame(&mut s, ABORT, problems.last().expect("just pushed").as_bytes());
    }
    if !problems.is_empty() {
        let msg = format!(
            "rendezvous: {}; start every rank with the same config file, --set overrides and world size",
            problems.join("; ")
        );
        abort_all(&mut streams, &msg);
        return Err(Error::Config(msg));
    }
    let data = match payload() {
        Ok(d) => d,
        Err(e) => {
            abort_all(&mut streams, &format!("rank 0 failed at start-up: {e}"));
            return Err(e);
        }
    };
    let mut out = Vec::new();
    for (k, slot) in streams.into_iter().enumerate() {
        let (mut s, _) = slot.expect("all arrived");
        write_frame(&mut s, OK, &data)
            .map_err(|e| Error::PeerLost(format!("rendezvous: rank {} went away: {e}", k + 1)))?;
        out.push(s);
    }
    Ok((Links::Master(out), data))
}

fn abort_all(streams: &mut [Option<(TcpStream, String)>], msg: &str) {
    for (s, _) in streams.iter_mut().flatten() {
        let _ = write_frame(s, ABORT, msg.as_bytes());
    }
}

/// A non-zero rank's side: connect (retrying until rank 0 listens), introduce, wait for the go.
pub fn join(o: &RendezvousOptions) -> Result<(Links, Vec<u8>)> {
    let deadline = Instant::now() + o.timeout;
    let addr = format!("{}:{}", o.master_addr, o.master_port);
    let mut s = loop {
        let target = addr
            .to_socket_addrs()
            .map_err(|e| crate::msg!("MASTER_ADDR:MASTER_PORT {addr}: {e}"))?
            .next()
            .ok_or_else(|| crate::msg!("MASTER_ADDR {addr} resolves to no address"))?;
        match TcpStream::connect_timeout(&target, Duration::from_millis(500)) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(crate::msg!(
                    "rank {}: rendezvous: rank 0 did not arrive: nothing listens at {addr} after {:.0} s ({e})",
                    o.rank,
                    o.timeout.as_secs_f64()
                ))
            }
        }
    };
    let _ = s.set_nodelay(true);
    let hello = Hello {
        rank: o.rank,
        world_size: o.world_size,
        config_hash: o.config_hash.clone(),
    };
    write_frame(&mut s, HELLO, &serde_json::to_vec(&hello).expect("json"))
        .map_err(|e| crate::msg!("rank {}: rendezvous with rank 0 at {addr}: {e}", o.rank))?;
    // Rank 0 answers once all ranks arrived, or gives up at its own deadline: wait a little longer.
    let wait = o.timeout + Duration::from_secs(5);
    match read_frame(&mut s, wait) {
        Ok((OK, data)) => Ok((Links::Worker(s), data)),
        // Rank 0 gave up and says why: the cause is on rank 0.
        Ok((ABORT, m)) => Err(Error::PeerLost(format!(
            "rank {}: {}",
            o.rank,
            String::from_utf8_lossy(&m)
        ))),
        Ok((t, _)) => Err(crate::msg!(
            "rank {}: rendezvous: unexpected message {t} from rank 0",
            o.rank
        )),
        Err(ReadFail::TimedOut) => Err(crate::msg!(
            "rank {}: rendezvous: rank 0 at {addr} did not answer within {:.0} s",
            o.rank,
            wait.as_secs_f64()
        )),
        Err(ReadFail::Closed) => Err(Error::PeerLost(format!(
            "rank {}: rendezvous: rank 0 at {addr} closed the connection (it exited or failed)",
            o.rank
        ))),
        Err(ReadFail::Other(e)) => Err(crate::msg!("rank {}: rendezvous with rank 0: {e}", o.rank)),
    }
}
