//! CUDA graphs: a program's launches are captured on its second run and replayed from then
//! on (the first run is eager, so kernels are loaded, cuBLASLt has chosen its algorithms and
//! the multi-tensor tables are on the device before anything is captured).
//!
//! A replay is valid because the executor writes every input to the same planned address
//! before each run, and every per-step scalar (learning rate, dropout seed, loss scale) is
//! read by kernels from device memory, never baked into launch arguments.

use super::gpu::{drv, Gpu};
use crate::{Error, Result};
use cudarc::driver::sys;
use std::collections::{HashMap, HashSet};

pub struct Graphs {
    pub enabled: bool,
    runs: HashMap<usize, usize>,
    execs: HashMap<usize, (sys::CUgraph, sys::CUgraphExec)>,
    capturing: Option<usize>,
    /// Programs whose capture failed: they stay eager.
    broken: HashSet<usize>,
}

impl Graphs {
    pub fn new(enabled: bool) -> Self {
        Graphs {
            enabled,
            runs: HashMap::new(),
            execs: HashMap::new(),
            capturing: None,
            broken: HashSet::new(),
        }
    }

    pub fn capturing(&self) -> bool {
        self.capturing.is_some()
    }

    /// Replays program `id` if it was captured (returns true), else runs it eagerly,
    /// capturing this run when the program ran eagerly before.
    pub fn begin(&mut self, gpu: &Gpu, id: usize) -> Result<bool> {
        if self.capturing.is_some() {
            return Err(Error::backend(
                "cuda",
                "begin_program while a program is being captured",
            ));
        }
        if let Some(&(_, exec)) = self.execs.get(&id) {
            // SAFETY: an instantiated graph and the stream it was captured on.
            unsafe { sys::cuGraphLaunch(exec, gpu.stream) }
                .result()
                .map_err(|e| drv(&format!("replaying the CUDA graph of program {id}"), e))?;
            return Ok(true);
        }
        let runs = self.runs.entry(id).or_insert(0);
        *runs += 1;
        if self.enabled && *runs >= 2 && !self.broken.contains(&id) {
            // SAFETY: a valid stream; thread-local mode rejects unsafe calls from this thread.
            unsafe {
                sys::cuStreamBeginCapture_v2(
                    gpu.stream,
                    sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
                )
            }
            .result()
            .map_err(|e| drv(&format!("starting to capture program {id}"), e))?;
            self.capturing = Some(id);
        }
        Ok(false)
    }

    /// Ends a capture: instantiates the graph and launches it (capture records, it does not run).
    pub fn end(&mut self, gpu: &Gpu, id: usize) -> Result<()> {
        if self.capturing != Some(id) {
            return Ok(());
        }
        self.capturing = None;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: the stream is capturing; the graph is owned below.
        let r = unsafe { sys::cuStreamEndCapture(gpu.stream, &mut graph) };
        if let Err(e) = r.result() {
            self.broken.insert(id);
            return Err(drv(
                &format!("capturing program {id} into a CUDA graph failed; its launches did not run (set FERROTUNE_CUDA_GRAPHS=0 to run without graphs)"),
                e,
            ));
        }
        let mut exec: sys::CUgraphExec = std::ptr::null_mut();
        // SAFETY: a complete graph.
        let r = unsafe { sys::cuGraphInstantiateWithFlags(&mut exec, graph, 0) };
        if let Err(e) = r.result() {
            self.broken.insert(id);
            // SAFETY: created by the capture.
            unsafe {
                let _ = sys::cuGraphDestroy(graph);
            }
            return Err(drv(&format!("instantiating the CUDA graph of program {id}"), e));
        }
        self.execs.insert(id, (graph, exec));
        // SAFETY: just instantiated.
        unsafe { sys::cuGraphLaunch(exec, gpu.stream) }
            .result()
            .map_err(|e| drv(&format!("launching the CUDA graph of program {id}"), e))
    }

    /// Stops a capture after a failed launch, so the stream is usable again.
    pub fn abort(&mut self, gpu: &Gpu) {
        if let Some(id) = self.capturing.take() {
            let mut graph: sys::CUgraph = std::ptr::null_mut();
            // SAFETY: the stream is capturing; whatever graph comes back is destroyed.
            unsafe {
                let _ = sys::cuStreamEndCapture(gpu.stream, &mut graph);
                if !graph.is_null() {
                    let _ = sys::cuGraphDestroy(graph);
                }
            }
            self.broken.insert(id);
        }
    }

    /// Forgets every captured graph (device addresses they use have changed).
    pub fn invalidate(&mut self) {
        for (_, (g, e)) in self.execs.drain() {
            // SAFETY: graphs owned here; the caller synchronized the stream.
            unsafe {
                let _ = sys::cuGraphExecDestroy(e);
                let _ = sys::cuGraphDestroy(g);
            }
        }
        self.runs.clear();
    }
}
