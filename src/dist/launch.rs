//! `ferrotune launch`: starts one process per GPU of this node with the torchrun
//! environment, forwards Ctrl-C / SIGTERM to them (as SIGINT: they save a checkpoint and
//! stop), and when a rank dies reports it by number, waits briefly for the others to stop
//! (they fail naming it), then ends them.

use crate::{Error, Result};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug)]
pub struct LaunchOptions {
    pub nproc_per_node: usize,
    pub nnodes: usize,
    pub node_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// The program each rank runs and its arguments (`ferrotune train CONFIG ...`).
    pub program: PathBuf,
    pub args: Vec<String>,
    /// How long the other ranks get to stop on their own after one failed.
    pub grace: Duration,
    /// Catch this process's SIGINT / SIGTERM and forward them to the ranks (the CLI does;
    /// a program that handles its own signals may not want it).
    pub forward_signals: bool,
}

/// How the ranks ended.
#[derive(Debug)]
pub struct LaunchReport {
    /// (global rank, exit status) in the order the launcher saw them end.
    pub exits: Vec<(usize, ExitStatus)>,
}

impl LaunchOptions {
    fn check(&self) -> Result<()> {
        if self.nproc_per_node == 0 || self.nnodes == 0 {
            return Err(Error::Config("--nproc-per-node and --nnodes must be at least 1".into()));
        }
        if self.node_rank >= self.nnodes {
            return Err(Error::Config(format!(
                "--node-rank {} must be below --nnodes {}",
                self.node_rank, self.nnodes
            )));
        }
        Ok(())
    }

    /// The environment of local process `local` (see torchrun's variables).
    pub fn env(&self, local: usize) -> Vec<(&'static str, String)> {
        let world = self.nproc_per_node * self.nnodes;
        vec![
            ("RANK", (self.node_rank * self.nproc_per_node + local).to_string()),
            ("WORLD_SIZE", world.to_string()),
            ("LOCAL_RANK", local.to_string()),
            ("LOCAL_WORLD_SIZE", self.nproc_per_node.to_string()),
            ("GROUP_RANK", self.node_rank.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            // NVLink SHARP multicast stays off.
            ("NCCL_NVLS_ENABLE", "0".into()),
        ]
    }
}

/// Interrupts (SIGINT, SIGTERM) received by the launcher.
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

#[cfg(unix)]
extern "C" fn on_signal(_: libc::c_int) {
    // An atomic add is async-signal-safe.
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

#[cfg(unix)]
fn catch_signals() {
    // SAFETY: installs a handler that only touches an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGTERM,
            on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

#[cfg(unix)]
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we started and have not reaped.
    unsafe {
        libc::kill(child.id() as libc::pid_t, sig);
    }
}

/// Starts the ranks and waits for them. An error names the rank that failed first.
pub fn launch(o: &LaunchOptions) -> Result<LaunchReport> {
    o.check()?;
    #[cfg(unix)]
    if o.forward_signals {
        catch_signals();
    }
    let first_rank = o.node_rank * o.nproc_per_node;
    let mut children: Vec<Option<Child>> = Vec::new();
    for local in 0..o.nproc_per_node {
        let mut cmd = Command::new(&o.program);
        cmd.args(&o.args).envs(o.env(local));
        // Own process group: a terminal's Ctrl-C reaches only the launcher, which forwards it once.
        #[cfg(unix)]
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        match cmd.spawn() {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                for c in children.iter_mut().flatten() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                return Err(crate::msg!(
                    "launch: cannot start rank {} ({}): {e}",
                    first_rank + local,
                    o.program.display()
                ));
            }
        }
    }
    let mut exits: Vec<(usize, ExitStatus)> = Vec::new();
    let mut forwarded = 0;
    let mut failed_at: Option<Instant> = None;
    let mut killed = false;
    while children.iter().any(Option::is_some) {
        let n = SIGNALS.load(Ordering::SeqCst);
        while forwarded < n {
            forwarded += 1;
            // As SIGINT, whichever arrived: the first makes every rank save a checkpoint
            // and stop after its step, a second aborts.
            eprintln!("launch: forwarding the interrupt to the ranks");
            #[cfg(unix)]
            for c in children.iter().flatten() {
                signal(c, libc::SIGINT);
            }
        }
        for (local, slot) in children.iter_mut().enumerate() {
            if let Some(c) = slot {
                if let Some(status) = c.try_wait().map_err(|e| crate::msg!("launch: {e}"))? {
                    let rank = first_rank + local;
                    if !status.success() {
                        eprintln!("launch: rank {rank} exited with {status}");
                        failed_at.get_or_insert_with(Instant::now);
                    }
                    exits.push((rank, status));
                    *slot = None;
                }
            }
        }
        if let Some(t) = failed_at {
            if !killed && t.elapsed() > o.grace {
                killed = true;
                for (local, c) in children.iter_mut().enumerate() {
                    if let Some(c) = c {
                        eprintln!(
                            "launch: stopping rank {} (still running after a rank failed)",
                            first_rank + local
                        );
                        let _ = c.kill();
                    }
                }
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut failed: Vec<&(usize, ExitStatus)> = exits.iter().filter(|(_, s)| !s.success()).collect();
    // Exit order alone can mislead: a rank that saw a peer go away may end before that peer
    // finished exiting. Ranks whose failure names another rank's as its cause go last.
    failed.sort_by_key(|(_, s)| s.code() == Some(crate::error::PEER_LOST_EXIT));
    if let Some((rank, status)) = failed.first() {
        let others: Vec<usize> = failed[1..].iter().map(|(r, _)| *r).collect();
        let also = if others.is_empty() {
            String::new()
        } else {
            format!("; then {} failed too", super::collective::name_ranks(&others))
        };
        return Err(crate::msg!(
            "launch: rank {rank} failed first ({status}){also}; see its messages above"
        ));
    }
    Ok(LaunchReport { exits })
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;

    /// Local rank 0 runs `rank0`, rank 1 runs `rank1` (shell commands; `$RANK` is set).
    fn launch_sh(rank0: &str, rank1: &str) -> Result<LaunchReport> {
        let script = format!("if [ \"$RANK\" = 0 ]; then {rank0}; else {rank1}; fi");
        launch(&LaunchOptions {
            nproc_per_node: 2,
            nnodes: 1,
            node_rank: 0,
            master_addr: "127.0.0.1".into(),
            master_port: 29500,
            program: "sh".into(),
            args: vec!["-c".into(), script],
            grace: Duration::from_secs(5),
            forward_signals: false,
        })
    }

    #[test]
    fn the_rank_that_failed_first_is_named_even_when_its_peer_exits_sooner() {
        // Rank 1 ends at once as a consequence (exit 3); rank 0, the cause, ends later.
        let e = launch_sh("sleep 0.3; exit 2", &format!("exit {}", crate::error::PEER_LOST_EXIT)).unwrap_err();
        assert!(
            e.to_string()
                .contains("rank 0 failed first (exit status: 2); then rank 1 failed too"),
            "{e}"
        );
        // Without a consequence's status, exit order decides.
        let e = launch_sh("sleep 0.3; exit 2", "exit 2").unwrap_err();
        assert!(e.to_string().contains("rank 1 failed first"), "{e}");
        let r = launch_sh("true", "true").unwrap();
        assert_eq!(r.exits.len(), 2);
        assert!(r.exits.iter().all(|(_, s)| s.success()));
    }
}
