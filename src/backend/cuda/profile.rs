//! Device time by op kind (`FERROTUNE_CUDA_PROFILE=1`): an event pair around every launch,
//! read back at each synchronisation, summed per kind and printed to stderr when the backend
//! is dropped. Graphs are off while profiling (events inside a capture cannot be timed).

use super::gpu::drv;
use crate::Result;
use cudarc::driver::result::event;
use cudarc::driver::sys;
use std::collections::HashMap;

#[derive(Default)]
pub struct Profile {
    pending: Vec<(String, sys::CUevent, sys::CUevent)>,
    free: Vec<sys::CUevent>,
    totals: HashMap<String, (u64, f64)>,
}

impl Profile {
    fn event(&mut self) -> Result<sys::CUevent> {
        match self.free.pop() {
            Some(e) => Ok(e),
            None => event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| drv("cuEventCreate", e)),
        }
    }

    /// Records the start of a launch labelled `what`; returns the event pair to close.
    pub fn start(&mut self, stream: sys::CUstream) -> Result<(sys::CUevent, sys::CUevent)> {
        let (a, b) = (self.event()?, self.event()?);
        // SAFETY: a fresh event on the backend's stream.
        unsafe { event::record(a, stream) }.map_err(|e| drv("cuEventRecord", e))?;
        Ok((a, b))
    }

    pub fn stop(&mut self, stream: sys::CUstream, what: String, ev: (sys::CUevent, sys::CUevent)) -> Result<()> {
        // SAFETY: as in `start`.
        unsafe { event::record(ev.1, stream) }.map_err(|e| drv("cuEventRecord", e))?;
        self.pending.push((what, ev.0, ev.1));
        Ok(())
    }

    /// Adds the pending pairs to the totals; call after the stream is synchronised.
    pub fn collect(&mut self) {
        for (what, a, b) in std::mem::take(&mut self.pending) {
            // SAFETY: both events completed (the stream was synchronised).
            if let Ok(ms) = unsafe { event::elapsed(a, b) } {
                let t = self.totals.entry(what).or_insert((0, 0.0));
                t.0 += 1;
                t.1 += ms as f64;
            }
            self.free.extend([a, b]);
        }
    }

    /// The totals as a table, largest first.
    pub fn report(&self) -> String {
        let mut rows: Vec<_> = self.totals.iter().collect();
        rows.sort_by(|a, b| b.1 .1.total_cmp(&a.1 .1));
        let all: f64 = rows.iter().map(|r| r.1 .1).sum();
        let mut s = format!("device time by op, {all:.1} ms in all:\n| op | launches | ms | share |\n");
        for (what, (n, ms)) in rows {
            s += &format!("| {what} | {n} | {ms:.2} | {:.1}% |\n", 100.0 * ms / all.max(1e-9));
        }
        s
    }

    pub fn is_empty(&self) -> bool {
        self.totals.is_empty() && self.pending.is_empty()
    }

    /// Destroys the events (the stream is idle).
    pub fn release(&mut self) {
        for e in self
            .free
            .drain(..)
            .chain(self.pending.drain(..).flat_map(|(_, a, b)| [a, b]))
        {
            // SAFETY: idle events owned here.
            unsafe {
                let _ = event::destroy(e);
            }
        }
    }
}

/// One program run wrapped in `cuProfilerStart` / `cuProfilerStop`
/// (`FERROTUNE_CUDA_PROFILER_RUN=k`: the k-th program run of the process, counting from 0),
/// so `ncu --profile-from-start off` measures exactly that run's kernels, replayed from its
/// CUDA graph when it has one.
pub struct ProfilerRange {
    target: Option<usize>,
    runs: usize,
}

impl ProfilerRange {
    pub fn from_env() -> Self {
        ProfilerRange {
            target: std::env::var("FERROTUNE_CUDA_PROFILER_RUN")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            runs: 0,
        }
    }

    /// Called as a program starts: opens the range on the chosen run.
    pub fn begin(&mut self) -> Result<()> {
        if self.target == Some(self.runs) {
            // SAFETY: a plain driver call on the current context.
            unsafe { sys::cuProfilerStart() }
                .result()
                .map_err(|e| drv("cuProfilerStart", e))?;
        }
        Ok(())
    }

    /// Called as a program ends (after its graph launch): closes the range it opened.
    pub fn end(&mut self) -> Result<()> {
        let chosen = self.target == Some(self.runs);
        self.runs += 1;
        if chosen {
            // SAFETY: as in `begin`.
            unsafe { sys::cuProfilerStop() }
                .result()
                .map_err(|e| drv("cuProfilerStop", e))?;
        }
        Ok(())
    }
}

/// Device time of whole program runs (`FERROTUNE_CUDA_RUN_TIMES=1`): an event pair around
/// each run, CUDA graph replays included, printed per program when the backend is dropped.
/// Set beside the step's wall time, it says how much of a step the device is busy.
#[derive(Default)]
pub struct RunTimes {
    events: Profile,
    open: Option<(usize, (sys::CUevent, sys::CUevent))>,
    runs: HashMap<usize, Vec<f64>>,
}

impl RunTimes {
    pub fn from_env() -> Option<Self> {
        (std::env::var("FERROTUNE_CUDA_RUN_TIMES").as_deref() == Ok("1")).then(RunTimes::default)
    }

    pub fn begin(&mut self, stream: sys::CUstream, id: usize) -> Result<()> {
        self.open = Some((id, self.events.start(stream)?));
        Ok(())
    }

    pub fn end(&mut self, stream: sys::CUstream) -> Result<()> {
        if let Some((id, ev)) = self.open.take() {
            self.events.stop(stream, id.to_string(), ev)?;
        }
        Ok(())
    }

    /// Reads the finished pairs; call after the stream is synchronised.
    pub fn collect(&mut self) {
        for (id, a, b) in std::mem::take(&mut self.events.pending) {
            // SAFETY: both events completed (the stream was synchronised).
            if let Ok(ms) = unsafe { event::elapsed(a, b) } {
                self.runs
                    .entry(id.parse().unwrap_or(usize::MAX))
                    .or_default()
                    .push(ms as f64);
            }
            self.events.free.extend([a, b]);
        }
    }

    /// One line per program: runs, then the median and the fastest run in ms.
    pub fn report(&self) -> String {
        let mut ids: Vec<_> = self.runs.keys().copied().collect();
        ids.sort();
        let mut s = String::from("device time per program run:\n");
        for id in ids {
            let mut t = self.runs[&id].clone();
            t.sort_by(f64::total_cmp);
            s += &format!(
                "program {id}: {} runs, median {:.3} ms, fastest {:.3} ms, all {:?}\n",
                t.len(),
                t[t.len() / 2],
                t[0],
                t.iter().map(|x| (x * 1e3).round() / 1e3).collect::<Vec<_>>()
            );
        }
        s
    }

    pub fn release(&mut self) {
        self.events.release();
    }
}
