//! The CUDA backend: kernels in cuda/*.cu compiled at run time by NVRTC for the device's
//! architecture, matrix products through cuBLASLt, one stream, arena buffers in plain device
//! memory, AdamW over every parameter in one launch, and CUDA graphs replaying a program's
//! launches after its first runs.
//!
//! Every op accepts the float storage types the CPU reference accepts (f32, bf16, f16, in
//! any combination the graph's shape rules allow) and computes in f32; f64 tensors (the
//! CPU's gradient checks) are refused with an error rather than computed in lower precision.
//!
//! Environment: `FERROTUNE_CUDA_GRAPHS=0` runs every program eagerly;
//! `FERROTUNE_CUDA_SYNC=1` waits after each launch so a failing kernel is named;
//! `FERROTUNE_CUDA_FLASH=0` keeps attention on the general kernels;
//! `FERROTUNE_CUDA_PROFILE=1` prints device time by op kind when the backend is dropped.
//! For kernel work: `FERROTUNE_CUDA_SOURCE_DIR=DIR` compiles `DIR/<family>.cu` (and
//! `DIR/common.cuh`) where present instead of the built-in sources, and
//! `FERROTUNE_CUDA_DEFINES="NAME=VALUE ..."` adds defines to every compilation.

mod attention;
mod attn_eager;
pub mod bench;
mod gpu;
mod graphs;
pub mod kernels;
mod low_rank_grads;
mod matmul;
mod multi;
mod ops;
mod profile;
mod seg_ranges;
mod swiglu_low_rank;
mod weight_casts;

pub use attention::FlashTiles;
pub use kernels::compile_all_kernels;

use super::{Arg, Backend, BufferId, Loc};
use crate::graph::TensorInfo;
use crate::ops::Op;
use crate::{Error, Result};
use cudarc::cublaslt::sys as lt;
use gpu::{Args, Gpu, Kernel};
use graphs::Graphs;
use kernels::{Family, Modules};
use matmul::{MatmulKey, Plan};
use std::collections::HashMap;

/// Options for [`CudaBackend::with_options`].
#[derive(Clone, Debug)]
pub struct CudaOptions {
    pub device: i32,
    /// Capture programs into CUDA graphs after their first run.
    pub graphs: bool,
    /// Wait after every launch (slow; names the kernel that failed).
    pub sync_each_launch: bool,
    /// Fill new buffers with 0xFF bytes (NaN in every float type) so an output a kernel
    /// forgets to write shows up in tests.
    pub poison_allocations: bool,
    /// Use the tensor-core attention kernels where they apply (bf16/f16, head dim 64, 96,
    /// 128, compute capability 8.0+).
    pub flash_attention: bool,
    /// Tile shapes of the tensor-core attention kernels (None: per head dim defaults;
    /// `FERROTUNE_FLASH_TILES="mw,bn,nw,bm[,p]"` sets them for every head dim, see
    /// [`FlashTiles::parse`]; an unparsable value is ignored with a notice).
    pub flash_tiles: Option<FlashTiles>,
    /// Time every launch with events and print the totals by op kind on drop (no graphs).
    pub profile: bool,
    /// Time cuBLASLt's candidate algorithms for each matmul shape when it is prepared and
    /// keep the fastest (products whose operands take at most 1 GiB).
    pub tune_matmuls: bool,
    /// How many of cuBLASLt's heuristic candidates are timed per shape
    /// (`FERROTUNE_CUDA_TUNE_CANDIDATES`, default 32).
    pub tune_candidates: usize,
    /// Programmatic dependent launch of our kernels on compute capability 9.0 and up
    /// (`FERROTUNE_CUDA_PDL=1`; see [`gpu::Gpu::pdl`]). Off by default until the GPU tests
    /// have run with it and it is measured faster.
    pub pdl: bool,
}

impl Default for CudaOptions {
    fn default() -> Self {
        let env = |k: &str| std::env::var(k).ok();
        CudaOptions {
            // One process per GPU under `ferrotune launch` / torchrun: rank i takes GPU LOCAL_RANK.
            device: env("LOCAL_RANK").and_then(|v| v.trim().parse().ok()).unwrap_or(0),
            graphs: env("FERROTUNE_CUDA_GRAPHS").as_deref() != Some("0"),
            sync_each_launch: env("FERROTUNE_CUDA_SYNC").as_deref() == Some("1"),
            poison_allocations: false,
            flash_attention: env("FERROTUNE_CUDA_FLASH").as_deref() != Some("0"),
            flash_tiles: env("FERROTUNE_FLASH_TILES").and_then(|v| match FlashTiles::parse(&v) {
                Ok(t) => Some(t),
                Err(e) => {
                    eprintln!("ferrotune: ignoring FERROTUNE_FLASH_TILES: {e}");
                    None
                }
            }),
            profile: env("FERROTUNE_CUDA_PROFILE").as_deref() == Some("1"),
            tune_matmuls: env("FERROTUNE_CUDA_TUNE").as_deref() != Some("0"),
            tune_candidates: env("FERROTUNE_CUDA_TUNE_CANDIDATES")
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(32),
            pdl: env("FERROTUNE_CUDA_PDL").as_deref() == Some("1"),
        }
    }
}

const ALIGN: u64 = 256;

fn align_up(x: u64) -> u64 {
    x.div_ceil(ALIGN) * ALIGN
}

pub struct CudaBackend {
    opts: CudaOptions,
    buffers: Vec<(u64, u64)>,
    allocated: u64,
    /// Temporary space shared by all ops (one stream: an op's use ends before the next op's
    /// kernels start). Grows at prepare time; growing invalidates captured graphs.
    scratch: (u64, u64),
    /// Multi-tensor tables on the device, by content.
    tables: HashMap<Vec<u64>, u64>,
    pending_adamw: Vec<multi::AdamEntry>,
    weight_casts: weight_casts::WeightCasts,
    seg_cache: seg_ranges::SegRanges,
    plans: HashMap<MatmulKey, Plan>,
    lt: lt::cublasLtHandle_t,
    lt_workspace: u64,
    graphs: Graphs,
    profile: Option<profile::Profile>,
    profiler_range: profile::ProfilerRange,
    run_times: Option<profile::RunTimes>,
    mods: Modules,
    gpu: Gpu,
}

// SAFETY: the backend owns its context and handles; every entry point makes the context
// current on the calling thread, and it is used from one thread at a time (&mut self).
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// Opens CUDA device `LOCAL_RANK` (0 when unset) with options from the environment.
    pub fn new() -> Result<Self> {
        Self::with_options(CudaOptions::default())
    }

    pub fn with_options(opts: CudaOptions) -> Result<Self> {
        // cudarc panics on the first call into a library that does not load: check first.
        let missing = gpu::missing_libraries();
        if !missing.is_empty() {
            return Err(Error::backend(
                "cuda",
                format!(
                    "CUDA libraries not found: {}. Install the NVIDIA driver and the CUDA 13 runtime libraries \
                     (libnvrtc, libcublas, libcublasLt), or add their folder to LD_LIBRARY_PATH",
                    missing.join("; ")
                ),
            ));
        }
        let mut gpu = Gpu::open(opts.device)?;
        // Programmatic launches need sm_90, and CUDA 12.3's driver to be captured in graphs.
        gpu.pdl = opts.pdl && gpu.cc.0 >= 9 && gpu.driver_version >= 12030;
        let handle = cudarc::cublaslt::result::create_handle()
            .map_err(|e| Error::backend("cuda", format!("cuBLASLt handle: {e:?}")))?;
        let lt_workspace = gpu.alloc(matmul::WORKSPACE_BYTES)?;
        let graphs = Graphs::new(opts.graphs && !opts.sync_each_launch && !opts.profile);
        let profile = opts.profile.then(profile::Profile::default);
        Ok(CudaBackend {
            mods: Modules::new(gpu.cc),
            opts,
            buffers: Vec::new(),
            allocated: 0,
            scratch: (0, 0),
            tables: HashMap::new(),
            pending_adamw: Vec::new(),
            weight_casts: Default::default(),
            seg_cache: Default::default(),
            plans: HashMap::new(),
            lt: handle,
            lt_workspace,
            graphs,
            profile,
            profiler_range: profile::ProfilerRange::from_env(),
            run_times: profile::RunTimes::from_env(),
            gpu,
        })
    }

    /// Device name and compute capability, e.g. `("NVIDIA H100 80GB HBM3", (9, 0))`.
    pub fn device(&self) -> (&str, (i32, i32)) {
        (&self.gpu.name, self.gpu.cc)
    }

    /// Bytes of device memory the backend holds beside the arena buffers (scratch,
    /// cuBLASLt workspace, multi-tensor tables).
    pub fn workspace_bytes(&self) -> u64 {
        self.scratch.1 + matmul::WORKSPACE_BYTES + self.tables.keys().map(|t| t.len() as u64 * 8).sum::<u64>()
    }

    pub fn set_graphs(&mut self, on: bool) {
        self.graphs.enabled = on && !self.opts.sync_each_launch && !self.opts.profile;
    }

    fn ptr(&self, loc: Loc) -> u64 {
        self.buffers[loc.buffer.0 as usize].0 + loc.offset
    }

    fn check_loc(&self, loc: Loc) -> Result<()> {
        match self.buffers.get(loc.buffer.0 as usize) {
            Some(&(_, size)) if loc.offset + loc.bytes <= size => Ok(()),
            _ => Err(Error::backend(
                "cuda",
                format!(
                    "location {loc:?} is outside the allocated buffers ({} of them)",
                    self.buffers.len()
                ),
            )),
        }
    }

    /// Makes the scratch space at least `bytes` long.
    fn ensure_scratch(&mut self, bytes: u64) -> Result<()> {
        if bytes <= self.scratch.1 {
            return Ok(());
        }
        if self.graphs.capturing() {
            return Err(Error::backend(
                "cuda",
                "scratch space must grow while a program is being captured (prepare every op first)",
            ));
        }
        self.gpu.sync()?;
        if self.scratch.0 != 0 {
            // SAFETY: synchronized above; nothing else holds the old scratch.
            unsafe { self.gpu.free(self.scratch.0) };
        }
        self.scratch = (0, 0);
        let size = align_up(bytes);
        self.scratch = (self.gpu.alloc(size)?, size);
        self.graphs.invalidate();
        Ok(())
    }

    /// Carves consecutive 256-byte aligned pieces of the scratch space.
    fn carve(&mut self, sizes: &[u64]) -> Result<Vec<u64>> {
        let total: u64 = sizes.iter().map(|&s| align_up(s.max(1))).sum();
        self.ensure_scratch(total)?;
        let mut at = self.scratch.0;
        Ok(sizes
            .iter()
            .map(|&s| {
                let p = at;
                at += align_up(s.max(1));
                p
            })
            .collect())
    }

    fn kernel(&mut self, family: Family, name: &'static str) -> Result<Kernel> {
        self.mods.get(family, name)
    }

    fn run(&self, k: &Kernel, grid: (u32, u32, u32), block: u32, smem: u32, args: Args) -> Result<()> {
        self.gpu.launch(k, grid, (block, 1, 1), smem, &args)?;
        if self.opts.sync_each_launch {
            self.gpu
                .sync()
                .map_err(|e| Error::backend("cuda", format!("kernel {} failed: {e}", k.name)))?;
        }
        Ok(())
    }

    fn plan(&mut self, key: MatmulKey) -> Result<&Plan> {
        if !self.plans.contains_key(&key) {
            if self.graphs.capturing() {
                return Err(Error::backend("cuda", "a matmul was not prepared before capture"));
            }
            let mut p = Plan::new(self.lt, key, self.opts.tune_candidates)?;
            if self.opts.tune_matmuls && p.candidates.len() > 1 {
                if let Some(best) = self.tune(&p, &key)? {
                    p.algo = best;
                }
            }
            self.plans.insert(key, p);
        }
        Ok(&self.plans[&key])
    }

    /// Times each candidate algorithm of `plan` on scratch operands (filled with 0.1, not
    /// zeros) with device events, median of 5 after one warm-up, and returns the fastest;
    /// None when the operands would take more than 1 GiB.
    fn tune(&mut self, plan: &Plan, key: &MatmulKey) -> Result<Option<lt::cublasLtMatmulAlgo_t>> {
        use cudarc::driver::result::event;
        use cudarc::driver::sys;
        let (ab, bb, cb) = matmul::operand_bytes(key)?;
        if ab + bb + cb > 1 << 30 {
            return Ok(None);
        }
        let pattern = match matmul::precision(key.a, key.b, key.c)?.compute {
            crate::tensor::DType::BF16 => 0x3dcd_3dcd,
            crate::tensor::DType::F16 => 0x2e66_2e66,
            _ => 0x3dcc_cccd,
        };
        self.gpu.sync()?;
        let bufs = [
            self.gpu.alloc(ab.max(4))?,
            self.gpu.alloc(bb.max(4))?,
            self.gpu.alloc(cb.max(4))?,
        ];
        for (p, n) in bufs.iter().zip([ab, bb, cb]) {
            self.gpu.memset32(*p, pattern, (n / 4) as usize)?;
        }
        let ev = || event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(|e| gpu::drv("cuEventCreate", e));
        let (e0, e1) = (ev()?, ev()?);
        let mut best: Option<(f32, lt::cublasLtMatmulAlgo_t)> = None;
        for algo in &plan.candidates {
            let ops = matmul::Operands::plain(bufs[0], bufs[1], bufs[2]);
            let run = |b: &Self| plan.run_algo(algo, b.lt, &b.gpu, ops, b.lt_workspace);
            if run(self).is_err() {
                continue;
            }
            let mut times = Vec::new();
            for _ in 0..5 {
                // SAFETY: events of this context recorded on the backend's stream.
                unsafe { event::record(e0, self.gpu.stream) }.map_err(|e| gpu::drv("cuEventRecord", e))?;
                run(self)?;
                unsafe { event::record(e1, self.gpu.stream) }.map_err(|e| gpu::drv("cuEventRecord", e))?;
                self.gpu.sync()?;
                // SAFETY: both events completed.
                times.push(unsafe { event::elapsed(e0, e1) }.map_err(|e| gpu::drv("cuEventElapsedTime", e))?);
            }
            times.sort_by(f32::total_cmp);
            if best.is_none_or(|(t, _)| times[2] < t) {
                best = Some((times[2], *algo));
            }
        }
        self.gpu.sync()?;
        // SAFETY: the stream is idle; the buffers and events are used by nothing else.
        unsafe {
            for p in bufs {
                self.gpu.free(p);
            }
            let _ = event::destroy(e0);
            let _ = event::destroy(e1);
        }
        Ok(best.map(|b| b.1))
    }

    /// Issues the AdamW updates collected so far as one launch.
    fn flush_adamw(&mut self) -> Result<()> {
        if self.pending_adamw.is_empty() {
            return Ok(());
        }
        let entries = std::mem::take(&mut self.pending_adamw);
        let ev = self.profile_start()?;
        self.launch_adamw(&entries)?;
        self.profile_stop(ev, || format!("adamw ({} tensors)", entries.len()))
    }

    fn launch_op(&mut self, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
        if !matches!(op, Op::AdamW(_)) {
            self.flush_adamw()?;
        }
        if op.writes().iter().any(|&w| self.weight_casts.holds(self.ptr(i[w].loc))) {
            self.weight_casts.invalidate();
        }
        if matches!(op, Op::AdamW(_)) || self.profile.is_none() {
            return self.dispatch(op, i, o);
        }
        let ev = self.profile_start()?;
        self.dispatch(op, i, o)?;
        self.profile_stop(ev, || {
            let product = |ta: bool, tb: bool| {
                format!(
                    "{} {:?} x {:?}{}{} -> {}",
                    op.name(),
                    i[0].info.shape,
                    i[1].info.shape,
                    if ta { " (a^T)" } else { "" },
                    if tb { " (b^T)" } else { "" },
                    o.first()
                        .or(i.get(2))
                        .map_or(crate::tensor::DType::F32, |a| a.info.dtype)
                )
            };
            match op {
                Op::MatMul { trans_a, trans_b }
                | Op::MatMulFused { trans_a, trans_b, .. }
                | Op::MatMulAccumulate { trans_a, trans_b, .. } => product(*trans_a, *trans_b),
                _ => op.name().to_string(),
            }
        })
    }

    fn profile_start(&mut self) -> Result<Option<(cudarc::driver::sys::CUevent, cudarc::driver::sys::CUevent)>> {
        let stream = self.gpu.stream;
        self.profile.as_mut().map(|p| p.start(stream)).transpose()
    }

    fn profile_stop(
        &mut self,
        ev: Option<(cudarc::driver::sys::CUevent, cudarc::driver::sys::CUevent)>,
        what: impl FnOnce() -> String,
    ) -> Result<()> {
        let stream = self.gpu.stream;
        match (self.profile.as_mut(), ev) {
            (Some(p), Some(ev)) => p.stop(stream, what(), ev),
            _ => Ok(()),
        }
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_info(&self) -> String {
        format!(
            "{}, compute capability {}.{}, {} SMs, {:.1} GiB, driver API {}.{}",
            self.gpu.name,
            self.gpu.cc.0,
            self.gpu.cc.1,
            self.gpu.sms,
            self.gpu.total_mem as f64 / (1u64 << 30) as f64,
            self.gpu.driver_version / 1000,
            (self.gpu.driver_version % 1000) / 10
        )
    }

    fn max_buffer_bytes(&self) -> u64 {
        self.gpu.total_mem
    }

    fn fuses_matmul_epilogues(&self) -> bool {
        true
    }
    fn alignment(&self) -> u64 {
        ALIGN
    }

    fn alloc(&mut self, bytes: u64) -> Result<BufferId> {
        self.gpu.bind()?;
        let p = self.gpu.alloc(bytes)?;
        if self.opts.poison_allocations {
            self.gpu.memset8(p, 0xff, bytes as usize)?;
        }
        self.buffers.push((p, bytes));
        self.allocated += bytes;
        Ok(BufferId(self.buffers.len() as u32 - 1))
    }

    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }

    fn write(&mut self, dst: Loc, data: &[u8]) -> Result<()> {
        self.gpu.bind()?;
        self.check_loc(dst)?;
        if data.len() as u64 != dst.bytes {
            return Err(Error::backend(
                "cuda",
                format!("write of {} bytes into a {}-byte tensor", data.len(), dst.bytes),
            ));
        }
        if self.graphs.capturing() {
            return Err(Error::backend("cuda", "write while a program is being captured"));
        }
        self.weight_casts.invalidate();
        self.seg_cache.invalidate();
        self.gpu.htod(self.ptr(dst), data)
    }

    fn read(&mut self, src: &[Loc]) -> Result<Vec<Vec<u8>>> {
        self.gpu.bind()?;
        self.flush_adamw()?;
        let mut out: Vec<Vec<u8>> = Vec::with_capacity(src.len());
        for l in src {
            self.check_loc(*l)?;
            out.push(vec![0u8; l.bytes as usize]);
        }
        for (l, buf) in src.iter().zip(out.iter_mut()) {
            // SAFETY: `buf` stays alive and untouched until the sync below.
            unsafe { self.gpu.dtoh(buf, self.ptr(*l))? };
        }
        self.gpu.sync()?;
        if let Some(p) = self.profile.as_mut() {
            p.collect();
        }
        if let Some(r) = self.run_times.as_mut() {
            r.collect();
        }
        Ok(out)
    }

    fn prepare(&mut self, op: &Op, inputs: &[&TensorInfo], outputs: &[&TensorInfo]) -> Result<()> {
        self.gpu.bind()?;
        self.prepare_op(op, inputs, outputs)
            .map_err(|e| prefix(e, &format!("preparing {}", op.name())))
    }

    fn launch(&mut self, op: &Op, inputs: &[Arg], outputs: &[Arg]) -> Result<()> {
        self.gpu.bind()?;
        let r = self.launch_op(op, inputs, outputs);
        if r.is_err() && self.graphs.capturing() {
            self.graphs.abort(&self.gpu);
        }
        r
    }

    fn flush(&mut self) -> Result<()> {
        self.gpu.bind()?;
        self.flush_adamw()
    }

    fn begin_program(&mut self, id: usize) -> Result<bool> {
        self.gpu.bind()?;
        self.flush_adamw()?;
        self.weight_casts.invalidate();
        self.seg_cache.invalidate();
        self.weight_cast_table()?;
        self.profiler_range.begin()?;
        if let Some(r) = self.run_times.as_mut() {
            r.begin(self.gpu.stream, id)?;
        }
        self.graphs.begin(&self.gpu, id)
    }

    fn end_program(&mut self, id: usize) -> Result<()> {
        self.gpu.bind()?;
        let r = self.flush_adamw();
        if r.is_err() {
            self.graphs.abort(&self.gpu);
            return r;
        }
        self.graphs.end(&self.gpu, id)?;
        if let Some(r) = self.run_times.as_mut() {
            r.end(self.gpu.stream)?;
        }
        self.profiler_range.end()
    }
}

fn prefix(e: Error, what: &str) -> Error {
    match e {
        Error::Backend { backend, msg } => Error::Backend {
            backend,
            msg: format!("{what}: {msg}"),
        },
        e => e,
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.gpu.bind();
        let _ = self.gpu.sync();
        if let Some(p) = self.profile.as_mut() {
            p.collect();
            if !p.is_empty() {
                eprint!("{}", p.report());
            }
            p.release();
        }
        if let Some(r) = self.run_times.as_mut() {
            r.collect();
            eprint!("{}", r.report());
            r.release();
        }
        self.graphs.invalidate();
        self.plans.clear();
        // SAFETY: the stream is idle; nothing uses these allocations or the handle after this.
        unsafe {
            for &(p, _) in &self.buffers {
                self.gpu.free(p);
            }
            for &p in self.tables.values() {
                self.gpu.free(p);
            }
            for p in self.weight_casts.allocations().chain(self.seg_cache.allocations()) {
                self.gpu.free(p);
            }
            if self.scratch.0 != 0 {
                self.gpu.free(self.scratch.0);
            }
            self.gpu.free(self.lt_workspace);
            let _ = lt::cublasLtDestroy(self.lt);
        }
    }
}
