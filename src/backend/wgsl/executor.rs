//! [`WgslBackend`]: the executor's `Backend` on wgpu.
//!
//! - Memory: every arena buffer the executor allocates is one wgpu storage buffer
//!   (`STORAGE | COPY_SRC | COPY_DST`); [`Backend::allocated_bytes`] is their sum, so it
//!   equals the memory plan. Not counted there (see [`WgslBackend::workspace_bytes`]): the
//!   uniform blocks of the recorded launches, small partial-sum buffers of reductions, and
//!   the matmul scratch buffer (at most 32 MiB, or one batch of a product with a
//!   transposed A) that exists while the device matmul cannot write into the buffer it
//!   reads. Read-back staging buffers are created per read and dropped after it.
//! - Work: `launch` records compute passes into one command encoder per step; `flush`
//!   submits it. `write` submits what was recorded before it, then queues the upload, so
//!   uploads and launches run in program order. `read` submits, copies the ranges into one
//!   mapped staging buffer and waits for it.
//! - Kernels: `prepare` checks each op's dtypes and shapes against the device and builds
//!   its pipelines; the first launch of a node at its planned locations builds the bind
//!   groups and uniforms once, and every later step replays them.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use crate::backend::{Arg, Backend, BoxFuture, BufferId, Loc};
use crate::error::{Error, Result};
use crate::graph::TensorInfo;
use crate::ops::Op;
use crate::tensor::DType;

use super::context::WgslContext;
use super::kernels;
use super::launch::{Builder, LaunchPlan, Params, Pending, Scratch, Src, Step};

pub struct WgslBackend {
    ctx: Arc<WgslContext>,
    buffers: Vec<wgpu::Buffer>,
    allocated: u64,
    encoder: Option<wgpu::CommandEncoder>,
    launches: HashMap<String, LaunchPlan>,
    scratch: Scratch,
    /// Bytes of uniform and partial-sum buffers held by recorded launches.
    launch_bytes: u64,
    max_binding: u64,
}

/// The largest storage binding the kernels use: the device's, and below 2 GiB so element
/// indices stay within 32 bits.
fn device_binding(ctx: &WgslContext) -> u64 {
    ctx.max_storage_binding().min(1 << 31)
}

fn launch_key(op: &Op, i: &[Arg], o: &[Arg]) -> String {
    let mut s = format!("{op:?}");
    for a in i.iter().chain(o) {
        let _ = write!(
            s,
            "|{}:{}:{}:{:?}:{}",
            a.loc.buffer.0,
            a.loc.offset,
            a.loc.bytes,
            a.info.shape,
            a.info.dtype.name()
        );
    }
    s
}

/// Runs `f` inside a validation error scope (natively; the browser reports asynchronously).
fn checked<T>(ctx: &WgslContext, what: &str, f: impl FnOnce() -> T) -> Result<T> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let oom = ctx.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let out = f();
        let e1 = pollster::block_on(oom.pop());
        let e2 = pollster::block_on(scope.pop());
        if let Some(e) = e1.or(e2) {
            return Err(Error::backend("wgsl", format!("{what}: {e}")));
        }
        Ok(out)
    }
    #[cfg(target_arch = "wasm32")]
    {
        let _ = (ctx, what);
        Ok(f())
    }
}

impl WgslBackend {
    pub fn new(ctx: WgslContext) -> Self {
        Self::with_context(Arc::new(ctx))
    }

    pub fn with_context(ctx: Arc<WgslContext>) -> Self {
        let max_binding = device_binding(&ctx);
        WgslBackend {
            ctx,
            buffers: Vec::new(),
            allocated: 0,
            encoder: None,
            launches: HashMap::new(),
            scratch: Scratch::default(),
            launch_bytes: 0,
            max_binding,
        }
    }

    pub fn context(&self) -> &WgslContext {
        &self.ctx
    }

    /// Bind at most `bytes` per storage binding (never more than the device allows), so
    /// tensors larger than that are processed in slices. For tests of the slicing, and for
    /// drivers that misreport their limit. Applies to launches recorded afterwards.
    pub fn set_max_binding(&mut self, bytes: u64) {
        self.max_binding = bytes.clamp(4096, device_binding(&self.ctx));
    }

    /// Device memory outside the arenas: the matmul scratch buffer and the uniform and
    /// partial-sum buffers of the recorded launches.
    pub fn workspace_bytes(&self) -> u64 {
        self.scratch.buffer.as_ref().map_or(0, |b| b.size()) + self.launch_bytes
    }

    fn buffer(&self, id: BufferId) -> Result<&wgpu::Buffer> {
        self.buffers
            .get(id.0 as usize)
            .ok_or_else(|| Error::backend("wgsl", format!("buffer {} was never allocated", id.0)))
    }

    /// Builds the bind groups and uniforms of planned steps.
    fn materialize(&mut self, pending: Vec<Pending>, work: Vec<u64>) -> Result<LaunchPlan> {
        let ctx = self.ctx.clone();
        let work: Vec<wgpu::Buffer> = work
            .iter()
            .map(|&b| ctx.create_buffer("workspace", b))
            .collect::<Result<_>>()?;
        let dispatches = pending.iter().filter(|p| matches!(p, Pending::Dispatch { .. })).count() as u64;
        let psize = std::mem::size_of::<Params>() as u64;
        let stride = psize.next_multiple_of(ctx.limits.min_uniform_buffer_offset_alignment as u64);
        let uniforms = (dispatches > 0).then(|| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("op uniforms"),
                size: stride * dispatches,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        });
        let mut bytes = vec![0u8; (stride * dispatches) as usize];
        let mut steps = Vec::with_capacity(pending.len());
        let mut k = 0u64;
        checked(&ctx, "recording a launch", || -> Result<()> {
            for p in pending {
                match p {
                    Pending::Dispatch {
                        pipe,
                        file,
                        binds,
                        uniforms: u,
                        groups,
                    } => {
                        let mut params = Params {
                            u: u.u,
                            f: u.f,
                            ..Default::default()
                        };
                        let mut entries = Vec::with_capacity(binds.len() + 1);
                        let ubuf = uniforms
                            .as_ref()
                            .ok_or_else(|| Error::backend("wgsl", "a dispatch without its uniform buffer"))?;
                        entries.push(wgpu::BindGroupEntry {
                            binding: 0,
                            resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                buffer: ubuf,
                                offset: k * stride,
                                size: wgpu::BufferSize::new(psize),
                            }),
                        });
                        for bd in &binds {
                            if bd.size > self.max_binding {
                                return Err(Error::backend(
                                    "wgsl",
                                    format!(
                                        "{}: a {}-byte binding of {} exceeds the {}-byte limit",
                                        file.name, bd.size, bd.name, self.max_binding
                                    ),
                                ));
                            }
                            let slot = kernels::slot(file, bd.name)?;
                            params.eo[slot as usize - 1] = bd.elem;
                            let buffer = match bd.src {
                                Src::Arena(id) => self.buffer(BufferId(id))?,
                                Src::Work(w) => &work[w],
                            };
                            entries.push(wgpu::BindGroupEntry {
                                binding: slot,
                                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                                    buffer,
                                    offset: bd.offset,
                                    size: wgpu::BufferSize::new(bd.size),
                                }),
                            });
                        }
                        let o = (k * stride) as usize;
                        bytes[o..o + psize as usize].copy_from_slice(bytemuck::bytes_of(&params));
                        let group = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                            label: Some(file.name),
                            layout: &pipe.layout,
                            entries: &entries,
                        });
                        steps.push(Step::Dispatch { pipe, group, groups });
                        k += 1;
                    }
                    Pending::Matmul(p) => steps.push(Step::Matmul(p)),
                    Pending::Copy { src, dst, offset, size } => steps.push(Step::Copy {
                        src,
                        dst: self.buffer(BufferId(dst))?.clone(),
                        offset,
                        size,
                    }),
                }
            }
            Ok(())
        })??;
        if let Some(u) = &uniforms {
            ctx.queue.write_buffer(u, 0, &bytes);
        }
        self.launch_bytes += work.iter().map(|b| b.size()).sum::<u64>() + stride * dispatches;
        Ok(LaunchPlan {
            steps,
            _uniforms: uniforms,
            _work: work,
        })
    }

    fn build(&mut self, op: &Op, i: &[Arg], o: &[Arg]) -> Result<LaunchPlan> {
        let ctx = self.ctx.clone();
        let mut b = Builder::new(&ctx, &self.buffers, &mut self.scratch, false, self.max_binding);
        kernels::plan(&mut b, op, i, o)?;
        let (steps, work) = (b.steps, b.work);
        self.materialize(steps, work)
    }

    /// Records a planned launch into the step's encoder.
    fn record(&mut self, key: &str) {
        let Some(plan) = self.launches.get(key) else {
            return;
        };
        let enc = self
            .encoder
            .get_or_insert_with(|| self.ctx.device.create_command_encoder(&Default::default()));
        let steps = &plan.steps;
        let mut at = 0;
        while at < steps.len() {
            if let Step::Copy { src, dst, offset, size } = &steps[at] {
                enc.copy_buffer_to_buffer(src, 0, dst, *offset, *size);
                at += 1;
                continue;
            }
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: None,
                timestamp_writes: None,
            });
            while at < steps.len() {
                match &steps[at] {
                    Step::Dispatch { pipe, group, groups } => {
                        pass.set_pipeline(&pipe.pipeline);
                        pass.set_bind_group(0, group, &[]);
                        pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
                    }
                    Step::Matmul(p) => p.encode(&mut pass),
                    Step::Copy { .. } => break,
                }
                at += 1;
            }
        }
    }

    /// Copies `src` ranges to the host; resolves when the copies are done.
    pub async fn read_async(&mut self, src: &[Loc]) -> Result<Vec<Vec<u8>>> {
        self.submit()?;
        let total: u64 = src.iter().map(|l| l.bytes.next_multiple_of(4)).sum();
        if total == 0 {
            return Ok(src.iter().map(|_| Vec::new()).collect());
        }
        let staging = self.ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("read-back"),
            size: total,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.ctx.device.create_command_encoder(&Default::default());
        let mut at = 0;
        for l in src {
            let n = l.bytes.next_multiple_of(4);
            if n > 0 {
                enc.copy_buffer_to_buffer(self.buffer(l.buffer)?, l.offset, &staging, at, n);
            }
            at += n;
        }
        self.ctx.queue.submit([enc.finish()]);
        let (tx, rx) = futures_channel::oneshot::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        #[cfg(not(target_arch = "wasm32"))]
        self.ctx.wait_idle()?;
        rx.await
            .map_err(|_| Error::backend("wgsl", "read-back was cancelled"))?
            .map_err(|e| Error::backend("wgsl", format!("mapping the read-back buffer failed: {e}")))?;
        let out = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::backend("wgsl", format!("read-back range: {e}")))?;
            let mut out = Vec::with_capacity(src.len());
            let mut at = 0usize;
            for l in src {
                out.push(view[at..at + l.bytes as usize].to_vec());
                at += l.bytes.next_multiple_of(4) as usize;
            }
            out
        };
        staging.unmap();
        Ok(out)
    }

    /// Submits the recorded commands, reporting validation errors natively.
    fn submit(&mut self) -> Result<()> {
        if let Some(enc) = self.encoder.take() {
            let ctx = self.ctx.clone();
            checked(&ctx, "submitting a step", || {
                ctx.queue.submit([enc.finish()]);
            })?;
        }
        Ok(())
    }
}

impl Backend for WgslBackend {
    fn name(&self) -> &'static str {
        "wgsl"
    }

    fn device_info(&self) -> String {
        self.ctx.describe()
    }

    fn max_buffer_bytes(&self) -> u64 {
        let a = self.alignment();
        self.ctx.limits.max_buffer_size / a * a
    }

    fn alignment(&self) -> u64 {
        self.ctx.limits.min_storage_buffer_offset_alignment as u64
    }

    fn alloc(&mut self, bytes: u64) -> Result<BufferId> {
        let label = format!("arena {}", self.buffers.len());
        let ctx = self.ctx.clone();
        let buf = checked(&ctx, "allocating device memory", || ctx.create_buffer(&label, bytes))??;
        // Count what the device holds (sizes round up to 16 bytes), not what was asked for.
        self.allocated += buf.size();
        self.buffers.push(buf);
        Ok(BufferId(self.buffers.len() as u32 - 1))
    }

    fn allocated_bytes(&self) -> u64 {
        self.allocated
    }

    fn write(&mut self, dst: Loc, data: &[u8]) -> Result<()> {
        if data.len() as u64 != dst.bytes {
            return Err(Error::backend(
                "wgsl",
                format!("write of {} bytes into a {}-byte tensor", data.len(), dst.bytes),
            ));
        }
        // Commands recorded so far must see the old contents.
        self.submit()?;
        if !data.is_empty() {
            let buf = self.buffer(dst.buffer)?;
            self.ctx.write(buf, dst.offset, data);
        }
        Ok(())
    }

    fn read_async<'a>(&'a mut self, src: &'a [Loc]) -> BoxFuture<'a, Result<Vec<Vec<u8>>>> {
        Box::pin(WgslBackend::read_async(self, src))
    }

    #[cfg(not(target_arch = "wasm32"))]
    fn read(&mut self, src: &[Loc]) -> Result<Vec<Vec<u8>>> {
        pollster::block_on(self.read_async(src))
    }

    #[cfg(target_arch = "wasm32")]
    fn read(&mut self, _src: &[Loc]) -> Result<Vec<Vec<u8>>> {
        Err(Error::backend(
            "wgsl",
            "the browser cannot wait for the GPU: use WgslBackend::read_async",
        ))
    }

    fn prepare(&mut self, op: &Op, inputs: &[&TensorInfo], outputs: &[&TensorInfo]) -> Result<()> {
        if op.is_view() {
            return Ok(());
        }
        // A dry run at placeholder locations: checks dtypes and shapes, builds pipelines
        // and sizes the matmul scratch buffer.
        let fake = |info: &&TensorInfo| Loc {
            buffer: BufferId(0),
            offset: 0,
            bytes: info.bytes() as u64,
        };
        let i: Vec<Arg> = inputs.iter().map(|t| Arg { loc: fake(t), info: t }).collect();
        let o: Vec<Arg> = outputs.iter().map(|t| Arg { loc: fake(t), info: t }).collect();
        let ctx = self.ctx.clone();
        let mut b = Builder::new(&ctx, &[], &mut self.scratch, true, self.max_binding);
        kernels::plan(&mut b, op, &i, &o)
    }

    fn launch(&mut self, op: &Op, inputs: &[Arg], outputs: &[Arg]) -> Result<()> {
        if op.is_view() {
            return Ok(());
        }
        let key = launch_key(op, inputs, outputs);
        if !self.launches.contains_key(&key) {
            let plan = self.build(op, inputs, outputs)?;
            self.launches.insert(key.clone(), plan);
        }
        self.record(&key);
        Ok(())
    }

    fn preferred_weight_dtype(&self) -> DType {
        // Hugging Face checkpoints are mostly bf16: kept exactly, widened in the shaders.
        DType::BF16
    }

    fn flush(&mut self) -> Result<()> {
        self.submit()
    }
}

/// A WGSL backend on the best adapter wgpu finds (a CPU adapter such as lavapipe too).
#[cfg(not(target_arch = "wasm32"))]
pub fn create() -> Result<Box<dyn Backend>> {
    let ctx = WgslContext::new_blocking(super::WgslOptions::default())?;
    Ok(Box::new(WgslBackend::new(ctx)))
}

/// A WGSL backend on a GPU adapter; CPU adapters (lavapipe, SwiftShader) are refused,
/// since the cpu backend is faster there.
#[cfg(not(target_arch = "wasm32"))]
pub fn create_gpu_only() -> Result<Box<dyn Backend>> {
    use wgpu::DeviceType;
    let adapters = pollster::block_on(super::list_adapters(None));
    let rank = |t: DeviceType| match t {
        DeviceType::DiscreteGpu => 0,
        DeviceType::IntegratedGpu => 1,
        DeviceType::VirtualGpu => 2,
        DeviceType::Other => 3,
        DeviceType::Cpu => 4,
    };
    let best = adapters
        .iter()
        .filter(|a| a.info.device_type != DeviceType::Cpu)
        .min_by_key(|a| rank(a.info.device_type));
    match best {
        Some(a) => {
            let ctx = WgslContext::new_blocking(super::WgslOptions {
                adapter_name: Some(a.info.name.clone()),
                ..Default::default()
            })?;
            if ctx.info.device_type == DeviceType::Cpu {
                return Err(Error::backend(
                    "wgsl",
                    format!("adapter {:?} turned out to be a CPU device", ctx.info.name),
                ));
            }
            Ok(Box::new(WgslBackend::new(ctx)))
        }
        None if adapters.is_empty() => {
            // Opening the default adapter fails with the list of backends tried.
            WgslContext::new_blocking(super::WgslOptions::default())?;
            Err(Error::backend("wgsl", "no GPU adapter found"))
        }
        None => {
            let names: Vec<&str> = adapters.iter().map(|a| a.info.name.as_str()).collect();
            Err(Error::backend(
                "wgsl",
                format!(
                    "only CPU adapters were found ({}), which are slower than the cpu backend; install a \
                     GPU driver with Vulkan, Metal or DX12 support, or set device: wgsl to use them anyway",
                    names.join(", ")
                ),
            ))
        }
    }
}
