//! How one op launch becomes GPU work: the operands' binding windows, the split of large
//! tensors into slices that fit one storage binding, the per-dispatch uniform block, and
//! the recorded steps (dispatches, matmul plans, copies) that a static graph builds once
//! and replays every step.
//!
//! A storage binding covers at most `max_storage_buffer_binding_size` bytes (128 MiB on
//! lavapipe) and starts at a multiple of 256 bytes. An operand is bound either whole or
//! by *units* (rows of some fixed number of elements): a launch over `units` rows is split
//! into chunks whose windows all fit, chunk boundaries falling on 256-byte multiples of
//! every sliced operand, and each window's remainder below its aligned start is passed to
//! the kernel as an element offset in the uniform block.

use std::sync::Arc;

use crate::backend::Loc;
use crate::error::{Error, Result};
use crate::tensor::DType;

use super::context::WgslContext;
use super::kernels::{self, ShaderFile};
use super::matmul::MatmulPlan;
use super::pipelines::CachedPipeline;

/// Where an operand's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    /// An arena buffer the executor allocated.
    Arena(u32),
    /// The `n`th workspace buffer of this launch (partial sums).
    Work(usize),
}

/// How an operand is bound when a launch is split into chunks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    /// The whole tensor in every dispatch (it must fit one binding).
    Whole,
    /// Sliced along with the launch: this many elements per unit.
    Rows(u64),
}

/// One tensor of a launch as the kernels see it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Operand {
    /// The binding name in the shader file.
    pub name: &'static str,
    pub src: Src,
    /// Byte offset and size in the buffer.
    pub offset: u64,
    pub bytes: u64,
    pub dtype: DType,
    pub part: Part,
}

impl Operand {
    pub fn arena(name: &'static str, loc: Loc, dtype: DType, part: Part) -> Self {
        Operand {
            name,
            src: Src::Arena(loc.buffer.0),
            offset: loc.offset,
            bytes: loc.bytes,
            dtype,
            part,
        }
    }

    pub fn with_part(mut self, part: Part) -> Self {
        self.part = part;
        self
    }

    pub fn rename(mut self, name: &'static str) -> Self {
        self.name = name;
        self
    }
}

/// The byte range one binding covers and the element offset of the operand's first
/// element (of the chunk) inside it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bound {
    pub name: &'static str,
    pub src: Src,
    pub offset: u64,
    pub size: u64,
    pub elem: u32,
}

/// The uniform block every op kernel reads (`Params` in shaders/common.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct Params {
    pub eo: [u32; 16],
    pub u: [u32; 16],
    pub f: [f32; 4],
}

/// Op-specific uniforms of one dispatch.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Uniforms {
    pub u: [u32; 16],
    pub f: [f32; 4],
}

impl Uniforms {
    pub fn new(u: &[u32], f: &[f32]) -> Self {
        let mut x = Uniforms::default();
        x.u[..u.len()].copy_from_slice(u);
        x.f[..f.len()].copy_from_slice(f);
        x
    }
}

/// A step as planned, before buffers are resolved.
pub(crate) enum Pending {
    Dispatch {
        pipe: Arc<CachedPipeline>,
        file: &'static ShaderFile,
        binds: Vec<Bound>,
        uniforms: Uniforms,
        groups: [u32; 3],
    },
    Matmul(MatmulPlan),
    /// Copies `size` bytes from the start of `src` (the matmul scratch) into an arena buffer.
    Copy {
        src: wgpu::Buffer,
        dst: u32,
        offset: u64,
        size: u64,
    },
}

/// A recorded step of a launch.
pub(crate) enum Step {
    Dispatch {
        pipe: Arc<CachedPipeline>,
        group: wgpu::BindGroup,
        groups: [u32; 3],
    },
    Matmul(MatmulPlan),
    Copy {
        src: wgpu::Buffer,
        dst: wgpu::Buffer,
        offset: u64,
        size: u64,
    },
}

/// Everything one launch records, built once per (op, operand locations).
pub(crate) struct LaunchPlan {
    pub steps: Vec<Step>,
    /// Kept alive with the bind groups that reference them.
    pub _uniforms: Option<wgpu::Buffer>,
    pub _work: Vec<wgpu::Buffer>,
}

/// Collects the steps of one launch. In a dry run (at `prepare`, without buffers) it only
/// builds pipelines and checks that the launch can be split to fit the device.
pub(crate) struct Builder<'a> {
    pub ctx: &'a WgslContext,
    /// The arena buffers, by `BufferId` (empty in a dry run).
    pub arena: &'a [wgpu::Buffer],
    scratch: &'a mut Scratch,
    pub dry: bool,
    /// The largest binding this backend uses, in bytes.
    pub max_binding: u64,
    pub align: u64,
    pub steps: Vec<Pending>,
    /// Sizes of the workspace buffers requested.
    pub work: Vec<u64>,
}

/// The matmul output buffer shared by all launches (see `kernels::matmul_op`).
#[derive(Default)]
pub(crate) struct Scratch {
    pub buffer: Option<wgpu::Buffer>,
    /// The largest size any prepared launch asked for.
    pub want: u64,
}

/// Largest workgroup count in one grid dimension (WebGPU's limit).
pub(crate) const MAX_GROUPS: u64 = 65535;

/// A grid of `groups` workgroups split over x and y; kernels index them with
/// `group_index` and ignore the surplus of the last row.
pub(crate) fn grid(groups: u64) -> Result<[u32; 3]> {
    if groups == 0 {
        return Ok([0, 1, 1]);
    }
    let x = groups.min(MAX_GROUPS);
    let y = groups.div_ceil(x);
    if y > MAX_GROUPS {
        return Err(Error::backend(
            "wgsl",
            format!("{groups} workgroups do not fit a {MAX_GROUPS} x {MAX_GROUPS} grid"),
        ));
    }
    Ok([x as u32, y as u32, 1])
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Bytes per stored element (f16 and bf16 count as 2 even though words hold pairs).
pub(crate) fn elem_bytes(d: DType) -> u64 {
    d.size() as u64
}

impl<'a> Builder<'a> {
    pub fn new(
        ctx: &'a WgslContext,
        arena: &'a [wgpu::Buffer],
        scratch: &'a mut Scratch,
        dry: bool,
        max_binding: u64,
    ) -> Self {
        Builder {
            ctx,
            arena,
            scratch,
            dry,
            max_binding,
            align: ctx.limits.min_storage_buffer_offset_alignment as u64,
            steps: Vec::new(),
            work: Vec::new(),
        }
    }

    /// Records that some launch needs `bytes` of matmul scratch.
    pub fn want_scratch(&mut self, bytes: u64) {
        self.scratch.want = self.scratch.want.max(bytes);
    }

    /// The matmul scratch buffer, created (or replaced by a larger one) as needed. Launches
    /// planned earlier keep the buffer they were planned with.
    pub fn scratch_buffer(&mut self, bytes: u64) -> Result<wgpu::Buffer> {
        self.want_scratch(bytes);
        let size = self.scratch.want;
        match &self.scratch.buffer {
            Some(b) if b.size() >= size => Ok(b.clone()),
            _ => {
                let b = self.ctx.create_buffer("matmul scratch", size)?;
                self.scratch.buffer = Some(b.clone());
                Ok(b)
            }
        }
    }

    /// The pipeline of `entry` in `file`, specialized for the operands' dtypes.
    pub fn pipeline(
        &self,
        file: &'static ShaderFile,
        entry: &'static str,
        dtypes: &[(&'static str, DType)],
        consts: &str,
    ) -> Result<Arc<CachedPipeline>> {
        self.ctx.pipeline(&kernels::shader_spec(file, entry, dtypes, consts)?)
    }

    /// Bytes a window may cover beyond its operand's range: the aligned start and the
    /// rounded end.
    fn slack(&self) -> u64 {
        self.align + 16
    }

    /// Splits `units` rows into chunks whose windows all fit one binding, at most
    /// `max_units` rows each. Returns (first unit, count) pairs.
    pub fn chunks(&self, units: u64, ops: &[Operand], max_units: u64) -> Result<Vec<(u64, u64)>> {
        let budget = self.max_binding.saturating_sub(self.slack());
        let mut fit = max_units.max(1);
        let mut step = 1u64;
        for o in ops {
            match o.part {
                Part::Whole => {
                    if o.bytes > budget {
                        return Err(Error::backend(
                            "wgsl",
                            format!(
                                "operand {} ({} bytes) must be bound whole, but the device binds at most {} \
                                 bytes at once; this op cannot be split along it",
                                o.name, o.bytes, self.max_binding
                            ),
                        ));
                    }
                }
                Part::Rows(e) => {
                    let per = e * elem_bytes(o.dtype);
                    if per == 0 {
                        continue;
                    }
                    if per > budget {
                        return Err(Error::backend(
                            "wgsl",
                            format!(
                                "one row of {} is {per} bytes, more than the device binds at once ({} bytes)",
                                o.name, self.max_binding
                            ),
                        ));
                    }
                    fit = fit.min(budget / per);
                    // Rows per chunk that keep every chunk start 256-byte aligned.
                    let g = self.align / gcd(per, self.align);
                    step = step / gcd(step, g) * g;
                }
            }
        }
        if units <= fit {
            return Ok(vec![(0, units)]);
        }
        let mut size = fit / step * step;
        if size == 0 {
            // Aligned chunks do not fit: fall back to unaligned starts (element offsets),
            // kept even so packed f16/bf16 outputs are still written in whole words.
            size = if fit >= 2 { fit / 2 * 2 } else { fit };
        }
        Ok((0..units)
            .step_by(size as usize)
            .map(|u0| (u0, size.min(units - u0)))
            .collect())
    }

    /// The window of `o` for units `[u0, u0 + nu)` (the whole tensor for `Part::Whole`).
    pub fn window(&self, o: &Operand, u0: u64, nu: u64) -> Bound {
        let es = elem_bytes(o.dtype);
        let (start, len) = match o.part {
            Part::Whole => (o.offset, o.bytes),
            Part::Rows(e) => (o.offset + u0 * e * es, nu * e * es),
        };
        let off = start - start % self.align;
        let end = (start + len).next_multiple_of(4).max(off + 4);
        Bound {
            name: o.name,
            src: o.src,
            offset: off,
            size: end - off,
            elem: ((start - off) / es.max(1)) as u32,
        }
    }

    /// Windows of all operands for one chunk.
    pub fn windows(&self, ops: &[Operand], u0: u64, nu: u64) -> Vec<Bound> {
        ops.iter().map(|o| self.window(o, u0, nu)).collect()
    }

    /// A workspace buffer of `bytes` for this launch (zero-initialised by wgpu).
    pub fn workspace(&mut self, name: &'static str, bytes: u64) -> Operand {
        self.work.push(bytes.max(16));
        Operand {
            name,
            src: Src::Work(self.work.len() - 1),
            offset: 0,
            bytes,
            dtype: DType::F32,
            part: Part::Whole,
        }
    }

    pub fn dispatch(
        &mut self,
        pipe: &Arc<CachedPipeline>,
        file: &'static ShaderFile,
        binds: Vec<Bound>,
        uniforms: Uniforms,
        groups: [u32; 3],
    ) {
        if self.dry || groups.contains(&0) {
            return;
        }
        self.steps.push(Pending::Dispatch {
            pipe: pipe.clone(),
            file,
            binds,
            uniforms,
            groups,
        });
    }
}
