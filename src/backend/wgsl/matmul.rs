//! Matrix multiply: `C[z] = alpha * op(A[z]) op(B[z]) (+ C[z])` with f32 accumulation.
//!
//! A and B may be stored as f32, f16 or bf16 (bf16 and, without `shader-f16`, f16 are read
//! as packed u32 pairs and widened in the shader); C is f32. `op` is an optional transpose
//! of the stored row-major matrix. Two kernels:
//! - `shaders/matmul_simt.wgsl`: register-tiled f32 FMA kernel, runs everywhere;
//! - `shaders/matmul_coop.wgsl`: cooperative matrices (tensor cores), f16 A and B, used
//!   when the device offers 16x16x16 f16 -> f32 configurations.
//!
//! Device limits are respected by planning: a storage binding covers at most
//! `max_storage_buffer_binding_size` bytes (128 MiB on lavapipe), so a large operand is
//! bound as several windows, one per dispatch, splitting the work over batches, rows of C,
//! columns of C and (accumulating) slices of K; no dispatch exceeds 65535 workgroups per
//! dimension. A [`MatmulPlan`] holds the bind groups, so a static graph plans once and
//! records the same dispatches every step.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::tensor::DType;

use super::buffers::BufSlice;
use super::context::WgslContext;
use super::pipelines::{CachedPipeline, ShaderSpec};

const SIMT4_SRC: &str = concat!(
    include_str!("../../../shaders/matmul_simt.wgsl"),
    include_str!("../../../shaders/matmul_simt_4x4.wgsl")
);
const SIMT8_SRC: &str = concat!(
    include_str!("../../../shaders/matmul_simt.wgsl"),
    include_str!("../../../shaders/matmul_simt_8x8.wgsl")
);
const COOP_SRC: &str = include_str!("../../../shaders/matmul_coop.wgsl");

/// Which kernel to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// Cooperative matrices when possible (f16 A and B on a device with them), else SIMT.
    Auto,
    /// The SIMT kernel.
    Simt,
    /// The cooperative-matrix kernel; an error where it cannot run.
    Coop,
}

/// One matrix multiply. Dimensions are of op(A) [m, k], op(B) [k, n] and C [m, n]; batch
/// strides are in elements (`None`: packed, e.g. m*k for A; `Some(0)` broadcasts A or B).
#[derive(Clone, Copy, Debug)]
pub struct MatmulArgs<'a> {
    pub a: BufSlice<'a>,
    pub b: BufSlice<'a>,
    pub c: BufSlice<'a>,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    pub batch_stride_a: Option<u64>,
    pub batch_stride_b: Option<u64>,
    pub batch_stride_c: Option<u64>,
    /// A is stored [k, m] (so op(A) = Aᵀ) instead of [m, k].
    pub trans_a: bool,
    /// B is stored [n, k] instead of [k, n].
    pub trans_b: bool,
    pub a_dtype: DType,
    pub b_dtype: DType,
    pub alpha: f32,
    /// Add to C instead of overwriting it.
    pub accumulate: bool,
    pub kernel: MatmulKernel,
}

impl<'a> MatmulArgs<'a> {
    /// `C = A B` in f32, one batch, no transposes.
    pub fn new(a: BufSlice<'a>, b: BufSlice<'a>, c: BufSlice<'a>, m: usize, n: usize, k: usize) -> Self {
        MatmulArgs {
            a,
            b,
            c,
            m,
            n,
            k,
            batch: 1,
            batch_stride_a: None,
            batch_stride_b: None,
            batch_stride_c: None,
            trans_a: false,
            trans_b: false,
            a_dtype: DType::F32,
            b_dtype: DType::F32,
            alpha: 1.0,
            accumulate: false,
            kernel: MatmulKernel::Auto,
        }
    }

    /// Floating-point operations (multiply and add counted separately).
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }
}

/// The kernel and tiling a plan uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelChoice {
    Simt {
        bm: u32,
        bn: u32,
        bk: u32,
        tm: u32,
        tn: u32,
    },
    /// `wm x wn` subgroups of `subgroup` invocations, each owning a `bm/wm x bn/wn` block
    /// (a multiple of 16 x 16).
    Coop {
        bm: u32,
        bn: u32,
        bk: u32,
        subgroup: u32,
        wm: u32,
        wn: u32,
    },
}

impl KernelChoice {
    pub fn name(&self) -> &'static str {
        match self {
            KernelChoice::Simt { .. } => "simt",
            KernelChoice::Coop { .. } => "coop",
        }
    }
    fn tile(&self) -> (u64, u64, u64) {
        match *self {
            KernelChoice::Simt { bm, bn, bk, .. } | KernelChoice::Coop { bm, bn, bk, .. } => {
                (bm as u64, bn as u64, bk as u64)
            }
        }
    }
}

/// The uniform block both shaders read (`Params` in the WGSL files).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    m: u32,
    n: u32,
    k: u32,
    _p0: u32,
    a_off: u32,
    lda: u32,
    a_bstride: u32,
    _p1: u32,
    b_off: u32,
    ldb: u32,
    b_bstride: u32,
    _p2: u32,
    c_off: u32,
    ldc: u32,
    c_bstride: u32,
    accumulate: u32,
    alpha: f32,
    _p3: [u32; 3],
}

/// A matmul ready to record: pipeline, bind groups and workgroup counts.
pub struct MatmulPlan {
    pipeline: Option<Arc<CachedPipeline>>,
    dispatches: Vec<(wgpu::BindGroup, [u32; 3])>,
    _params: Option<wgpu::Buffer>,
    pub kernel: KernelChoice,
    pub flops: f64,
}

impl std::fmt::Debug for MatmulPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MatmulPlan")
            .field("kernel", &self.kernel)
            .field("dispatches", &self.dispatches.iter().map(|d| d.1).collect::<Vec<_>>())
            .finish()
    }
}

impl MatmulPlan {
    /// Record the dispatches into a compute pass.
    pub fn encode(&self, pass: &mut wgpu::ComputePass<'_>) {
        let Some(pipeline) = &self.pipeline else {
            return;
        };
        pass.set_pipeline(&pipeline.pipeline);
        for (bg, [x, y, z]) in &self.dispatches {
            pass.set_bind_group(0, bg, &[]);
            pass.dispatch_workgroups(*x, *y, *z);
        }
    }

    /// Number of dispatches (more than one when operands are bound in slices).
    pub fn dispatch_count(&self) -> usize {
        self.dispatches.len()
    }
}

/// Plan and record one matmul into `pass`.
pub fn encode_matmul(ctx: &WgslContext, pass: &mut wgpu::ComputePass<'_>, args: &MatmulArgs) -> Result<()> {
    plan_matmul(ctx, args)?.encode(pass);
    Ok(())
}

fn err(msg: impl Into<String>) -> Error {
    Error::shape("matmul", msg)
}

/// Storage of one operand as the planner sees it.
#[derive(Clone, Copy, Debug)]
struct Operand {
    /// Bytes per element.
    es: u64,
    /// Rows and leading dimension of the stored matrix.
    rows: u64,
    ld: u64,
    bstride: u64,
}

impl Operand {
    /// Elements from the first to one past the last touched by a block of `nb` batches,
    /// `r` stored rows and `c` stored columns.
    fn span(&self, nb: u64, r: u64, c: u64) -> u64 {
        (nb - 1) * self.bstride + (r - 1) * self.ld + c
    }
}

fn elem_size(d: DType, which: &str) -> Result<u64> {
    match d {
        DType::F32 => Ok(4),
        DType::F16 | DType::BF16 => Ok(2),
        other => Err(err(format!("{which} has dtype {other}; matmul reads f32, f16 or bf16"))),
    }
}

/// Validate `args` and build the plan (pipelines are cached on the context).
pub fn plan_matmul(ctx: &WgslContext, args: &MatmulArgs) -> Result<MatmulPlan> {
    let (m, n, k, batch) = (args.m as u64, args.n as u64, args.k as u64, args.batch as u64);
    let es_a = elem_size(args.a_dtype, "A")?;
    let es_b = elem_size(args.b_dtype, "B")?;
    if k == 0 {
        return Err(err("k = 0: the product is empty; clear C instead of multiplying"));
    }
    for (name, v) in [("m", m), ("n", n), ("k", k), ("batch", batch)] {
        if v > u32::MAX as u64 / 2 {
            return Err(err(format!("{name} = {v} is too large (at most {})", u32::MAX / 2)));
        }
    }
    let a = Operand {
        es: es_a,
        rows: if args.trans_a { k } else { m },
        ld: if args.trans_a { m } else { k },
        bstride: args.batch_stride_a.unwrap_or(m * k),
    };
    let b = Operand {
        es: es_b,
        rows: if args.trans_b { n } else { k },
        ld: if args.trans_b { k } else { n },
        bstride: args.batch_stride_b.unwrap_or(k * n),
    };
    let c = Operand {
        es: 4,
        rows: m,
        ld: n,
        bstride: args.batch_stride_c.unwrap_or(m * n),
    };
    if batch > 1 && c.bstride < m * n {
        return Err(err(format!(
            "batch stride of C ({}) is smaller than m*n = {}: batches would overwrite each other",
            c.bstride,
            m * n
        )));
    }
    if args.c.buffer == args.a.buffer || args.c.buffer == args.b.buffer {
        return Err(err(
            "C must be in a different buffer than A and B (a buffer cannot be read-only and written in one dispatch)",
        ));
    }
    let empty = m == 0 || n == 0 || batch == 0;
    for (name, op, s) in [("A", &a, &args.a), ("B", &b, &args.b), ("C", &c, &args.c)] {
        if s.offset % op.es != 0 {
            return Err(err(format!(
                "{name}: byte offset {} is not a multiple of its element size {}",
                s.offset, op.es
            )));
        }
        if s.offset + s.size > s.buffer.size() {
            return Err(err(format!(
                "{name}: slice {}..{} runs past the end of its {}-byte buffer",
                s.offset,
                s.offset + s.size,
                s.buffer.size()
            )));
        }
        if !empty {
            let need = op.span(batch, op.rows, op.ld) * op.es;
            if s.size < need {
                return Err(err(format!(
                    "{name} needs {need} bytes for m={m} n={n} k={k} batch={batch} but its slice has {}",
                    s.size
                )));
            }
        }
    }
    let kernel = choose_kernel(ctx, args)?;
    let (bm, bn, bk) = kernel.tile();
    if empty {
        return Ok(MatmulPlan {
            pipeline: None,
            dispatches: vec![],
            _params: None,
            kernel,
            flops: 0.0,
        });
    }

    // Binding windows: the aligned start costs up to `align` bytes, the end is rounded to 16.
    let align = ctx.limits.min_storage_buffer_offset_alignment as u64;
    let budget = ctx.max_storage_binding();
    let fits = |op: &Operand, nb: u64, r: u64, c: u64| op.span(nb, r, c) * op.es + align + 16 <= budget;
    let fit_a = |nb: u64, mc: u64, kc: u64| {
        if args.trans_a {
            fits(&a, nb, kc, mc)
        } else {
            fits(&a, nb, mc, kc)
        }
    };
    let fit_b = |nb: u64, kc: u64, nc: u64| {
        if args.trans_b {
            fits(&b, nb, nc, kc)
        } else {
            fits(&b, nb, kc, nc)
        }
    };
    let fit_c = |nb: u64, mc: u64, nc: u64| fits(&c, nb, mc, nc);

    let max_wg = ctx.limits.max_compute_workgroups_per_dimension.min(65535) as u64;
    let (mut mc, mut nc, mut kc) = (m.min(max_wg * bm), n.min(max_wg * bn), k);
    let halve = |x: u64, g: u64| {
        if x > 2 * g {
            (x / 2).div_ceil(g) * g
        } else if x > g {
            g
        } else {
            x.div_ceil(2)
        }
    };
    // Shrink the chunk until every window fits: first the dimension that indexes the
    // operand's stored rows (that is what makes a window long), then the other one.
    loop {
        if !fit_a(1, mc, kc) {
            let shrink_k = if args.trans_a { kc > 1 } else { mc <= 1 };
            if shrink_k {
                kc = halve(kc, bk);
            } else {
                mc = halve(mc, bm);
            }
            continue;
        }
        if !fit_b(1, kc, nc) {
            let shrink_n = if args.trans_b { nc > 1 } else { kc <= 1 };
            if shrink_n {
                nc = halve(nc, bn);
            } else {
                kc = halve(kc, bk);
            }
            continue;
        }
        if !fit_c(1, mc, nc) {
            if mc > 1 {
                mc = halve(mc, bm);
            } else {
                nc = halve(nc, bn);
            }
            continue;
        }
        break;
    }
    // Whole matrices per dispatch: take as many batches as fit (at most max_wg).
    let mut nb = 1;
    if mc == m && nc == n && kc == k {
        let (mut lo, mut hi) = (1u64, batch.min(max_wg));
        while lo < hi {
            let mid = (lo + hi).div_ceil(2);
            if fit_a(mid, m, k) && fit_b(mid, k, n) && fit_c(mid, m, n) {
                lo = mid
            } else {
                hi = mid - 1
            }
        }
        nb = lo;
    }

    // Vector loads need every chunk's contiguous extent, leading dimension and offsets to be
    // multiples of the group (4 for the SIMT kernel, 8 halves for the coop kernel).
    let group = match kernel {
        KernelChoice::Simt { .. } => 4,
        KernelChoice::Coop { .. } => 8,
    };
    let contiguous_ok = |op: &Operand, s: &BufSlice, extent: u64, chunk: u64| {
        extent.is_multiple_of(group)
            && chunk.is_multiple_of(group)
            && op.ld.is_multiple_of(group)
            && (batch == 1 || op.bstride.is_multiple_of(group))
            && (s.offset / op.es).is_multiple_of(group)
    };
    let vec_a = if args.trans_a {
        contiguous_ok(&a, &args.a, m, mc)
    } else {
        contiguous_ok(&a, &args.a, k, kc)
    };
    let vec_b = if args.trans_b {
        contiguous_ok(&b, &args.b, k, kc)
    } else {
        contiguous_ok(&b, &args.b, n, nc)
    };
    let (vec_a, vec_b) = match kernel {
        KernelChoice::Coop { .. } => (vec_a && vec_b, vec_a && vec_b),
        KernelChoice::Simt { .. } => (vec_a, vec_b),
    };
    let pipeline = ctx.pipeline(&shader_spec(ctx, args, kernel, vec_a, vec_b))?;

    // One Params block per dispatch, each at a uniform-offset-aligned position.
    let stride =
        (std::mem::size_of::<Params>() as u64).next_multiple_of(ctx.limits.min_uniform_buffer_offset_alignment as u64);
    struct Chunk {
        params: Params,
        windows: [(u64, u64); 3],
        groups: [u32; 3],
    }
    let mut chunks = Vec::new();
    let window = |op: &Operand, s: &BufSlice, first: u64, span: u64, vec: bool| -> Result<((u64, u64), u32)> {
        let start = s.offset + first * op.es;
        let off = start - start % align;
        let round = if vec { 16 } else { 4 };
        let end = (start + span * op.es).next_multiple_of(round).min(s.buffer.size());
        if end % 4 != 0 {
            return Err(err(format!(
                "a buffer of {} bytes cannot be bound: sizes must be multiples of 4",
                s.buffer.size()
            )));
        }
        Ok(((off, end - off), ((start - off) / op.es) as u32))
    };
    for b0 in (0..batch).step_by(nb as usize) {
        let nbc = nb.min(batch - b0);
        for m0 in (0..m).step_by(mc as usize) {
            let mcc = mc.min(m - m0);
            for n0 in (0..n).step_by(nc as usize) {
                let ncc = nc.min(n - n0);
                for k0 in (0..k).step_by(kc as usize) {
                    let kcc = kc.min(k - k0);
                    let (a_first, a_span) = if args.trans_a {
                        (b0 * a.bstride + k0 * a.ld + m0, a.span(nbc, kcc, mcc))
                    } else {
                        (b0 * a.bstride + m0 * a.ld + k0, a.span(nbc, mcc, kcc))
                    };
                    let (b_first, b_span) = if args.trans_b {
                        (b0 * b.bstride + n0 * b.ld + k0, b.span(nbc, ncc, kcc))
                    } else {
                        (b0 * b.bstride + k0 * b.ld + n0, b.span(nbc, kcc, ncc))
                    };
                    let (c_first, c_span) = (b0 * c.bstride + m0 * c.ld + n0, c.span(nbc, mcc, ncc));
                    let (wa, a_off) = window(&a, &args.a, a_first, a_span, vec_a)?;
                    let (wb, b_off) = window(&b, &args.b, b_first, b_span, vec_b)?;
                    let (wc, c_off) = window(&c, &args.c, c_first, c_span, false)?;
                    let params = Params {
                        m: mcc as u32,
                        n: ncc as u32,
                        k: kcc as u32,
                        a_off,
                        lda: a.ld as u32,
                        a_bstride: if nbc > 1 { a.bstride as u32 } else { 0 },
                        b_off,
                        ldb: b.ld as u32,
                        b_bstride: if nbc > 1 { b.bstride as u32 } else { 0 },
                        c_off,
                        ldc: c.ld as u32,
                        c_bstride: if nbc > 1 { c.bstride as u32 } else { 0 },
                        accumulate: (args.accumulate || k0 > 0) as u32,
                        alpha: args.alpha,
                        ..Default::default()
                    };
                    let groups = [ncc.div_ceil(bn) as u32, mcc.div_ceil(bm) as u32, nbc as u32];
                    chunks.push(Chunk {
                        params,
                        windows: [wa, wb, wc],
                        groups,
                    });
                }
            }
        }
    }

    let params_buf = ctx.device.create_buffer(&wgpu::BufferDescriptor {
        label: Some("matmul params"),
        size: stride * chunks.len() as u64,
        usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut bytes = vec![0u8; (stride * chunks.len() as u64) as usize];
    for (i, ch) in chunks.iter().enumerate() {
        let o = i * stride as usize;
        bytes[o..o + std::mem::size_of::<Params>()].copy_from_slice(bytemuck::bytes_of(&ch.params));
    }
    ctx.queue.write_buffer(&params_buf, 0, &bytes);

    let bufs = [args.a.buffer, args.b.buffer, args.c.buffer];
    let dispatches = chunks
        .iter()
        .enumerate()
        .map(|(i, ch)| {
            let mut entries: Vec<wgpu::BindGroupEntry> = (0..3)
                .map(|j| wgpu::BindGroupEntry {
                    binding: j as u32,
                    resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                        buffer: bufs[j],
                        offset: ch.windows[j].0,
                        size: wgpu::BufferSize::new(ch.windows[j].1),
                    }),
                })
                .collect();
            entries.push(wgpu::BindGroupEntry {
                binding: 3,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: &params_buf,
                    offset: i as u64 * stride,
                    size: wgpu::BufferSize::new(std::mem::size_of::<Params>() as u64),
                }),
            });
            let bg = ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some("matmul"),
                layout: &pipeline.layout,
                entries: &entries,
            });
            (bg, ch.groups)
        })
        .collect();
    Ok(MatmulPlan {
        pipeline: Some(pipeline),
        dispatches,
        _params: Some(params_buf),
        kernel,
        flops: args.flops(),
    })
}

/// Workgroup memory the coop kernel needs for a tile, in bytes.
fn coop_shared_bytes(bm: u32, bn: u32, bk: u32, warps: u32, ta: bool, tb: bool) -> u32 {
    let (_, _, _, a_stage) = staged(bm, bk, ta);
    let (_, _, _, b_stage) = staged(bk, bn, tb);
    2 * 2 * (a_stage + b_stage) + warps * 256 * 4
}

/// (rows, cols, padded row stride, elements per stage) of an op-operand tile `r x c`,
/// staged as stored: transposed operands are staged `c x r`.
fn staged(r: u32, c: u32, trans: bool) -> (u32, u32, u32, u32) {
    let (rows, cols) = if trans { (c, r) } else { (r, c) };
    let ld = cols + 8;
    (rows, cols, ld, rows * ld)
}

fn choose_kernel(ctx: &WgslContext, args: &MatmulArgs) -> Result<KernelChoice> {
    let sg = ctx.info.subgroup_max_size;
    let coop_possible = ctx.has_coop_matrix
        && args.a_dtype == DType::F16
        && args.b_dtype == DType::F16
        && ctx.info.subgroup_min_size == sg
        && (8..=128).contains(&sg);
    if coop_possible {
        let max_shared = ctx.limits.max_compute_workgroup_storage_size;
        let fits = |c: &KernelChoice| match *c {
            KernelChoice::Coop { bm, bn, bk, wm, wn, .. } => {
                coop_shared_bytes(bm, bn, bk, wm * wn, args.trans_a, args.trans_b) <= max_shared
            }
            KernelChoice::Simt { .. } => false,
        };
        let choice = match tile_override() {
            Some(c @ KernelChoice::Coop { subgroup, .. }) if subgroup == sg && fits(&c) => Some(c),
            _ => coop_tiles(sg).into_iter().find(fits),
        };
        if let Some(choice) = choice {
            let worth_it = args.kernel == MatmulKernel::Coop || (args.m >= 16 && args.n >= 16 && args.k >= 16);
            if args.kernel != MatmulKernel::Simt && worth_it {
                return Ok(choice);
            }
        }
    }
    if args.kernel == MatmulKernel::Coop {
        return Err(Error::backend(
            "wgsl",
            format!(
                "the cooperative-matrix matmul needs f16 A and B (got {} and {}) on a device with \
                 16x16x16 f16->f32 cooperative matrices and a fixed subgroup size; adapter {:?} \
                 has cooperative matrices: {}, subgroup sizes {}..{}",
                args.a_dtype,
                args.b_dtype,
                ctx.info.name,
                ctx.has_coop_matrix,
                ctx.info.subgroup_min_size,
                ctx.info.subgroup_max_size
            ),
        ));
    }
    // Skinny products (a few rows or columns, e.g. LoRA's rank-r factors) get thin tiles so
    // little work is wasted on padding; big outputs get 128 x 128 tiles with 8 x 8 outputs
    // per invocation; everything else 64 x 64 tiles with 4 x 4 each.
    let (m, n) = (args.m, args.n);
    if m <= 4 && n > 64 {
        Ok(KernelChoice::Simt {
            bm: 4,
            bn: 256,
            bk: 8,
            tm: 4,
            tn: 4,
        })
    } else if n <= 4 && m > 64 {
        Ok(KernelChoice::Simt {
            bm: 256,
            bn: 4,
            bk: 8,
            tm: 4,
            tn: 4,
        })
    } else if m <= 16 && n > 64 {
        Ok(KernelChoice::Simt {
            bm: 16,
            bn: 256,
            bk: 8,
            tm: 4,
            tn: 4,
        })
    } else if n <= 16 && m > 64 {
        Ok(KernelChoice::Simt {
            bm: 256,
            bn: 16,
            bk: 8,
            tm: 4,
            tn: 4,
        })
    } else if m >= 128 && n >= 128 && m * n * args.batch >= 512 * 512 {
        match tile_override() {
            Some(c @ KernelChoice::Simt { .. }) => Ok(c),
            _ => Ok(KernelChoice::Simt {
                bm: 128,
                bn: 128,
                bk: 8,
                tm: 8,
                tn: 8,
            }),
        }
    } else {
        Ok(KernelChoice::Simt {
            bm: 64,
            bn: 64,
            bk: 16,
            tm: 4,
            tn: 4,
        })
    }
}

/// Binding and widening functions for operand `x` (`a` or `b`) of the SIMT kernel:
/// `load_x1(i) -> f32` and `load_x4(i) -> vec4<f32>` (i a multiple of 4), i in elements.
fn simt_operand(x: &str, binding: u32, dtype: DType, vec: bool, native_f16: bool) -> String {
    let decl = |ty: &str| format!("@group(0) @binding({binding}) var<storage, read> {x}_buf: array<{ty}>;\n");
    match (dtype, vec, native_f16) {
        (DType::F32, true, _) => format!(
            "{}fn load_{x}1(i: u32) -> f32 {{ return {x}_buf[i >> 2u][i & 3u]; }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ return {x}_buf[i >> 2u]; }}\n",
            decl("vec4<f32>")
        ),
        (DType::F32, false, _) => format!(
            "{}fn load_{x}1(i: u32) -> f32 {{ return {x}_buf[i]; }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ return vec4<f32>({x}_buf[i], {x}_buf[i + 1u], {x}_buf[i + 2u], {x}_buf[i + 3u]); }}\n",
            decl("f32")
        ),
        (DType::F16, true, true) => format!(
            "{}fn load_{x}1(i: u32) -> f32 {{ return f32({x}_buf[i >> 2u][i & 3u]); }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ return vec4<f32>({x}_buf[i >> 2u]); }}\n",
            decl("vec4<f16>")
        ),
        (DType::F16, false, true) => format!(
            "{}fn load_{x}1(i: u32) -> f32 {{ return f32({x}_buf[i]); }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ return vec4<f32>(f32({x}_buf[i]), f32({x}_buf[i + 1u]), f32({x}_buf[i + 2u]), f32({x}_buf[i + 3u])); }}\n",
            decl("f16")
        ),
        // f16 without shader-f16: pairs packed in u32, element 2j in the low half.
        (DType::F16, true, false) => format!(
            "{}fn load_{x}1(i: u32) -> f32 {{ return unpack2x16float({x}_buf[i >> 2u][(i >> 1u) & 1u])[i & 1u]; }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ let w = {x}_buf[i >> 2u]; return vec4<f32>(unpack2x16float(w.x), unpack2x16float(w.y)); }}\n",
            decl("vec2<u32>")
        ),
        (DType::F16, false, false) => format!(
            "{}fn load_{x}1(i: u32) -> f32 {{ return unpack2x16float({x}_buf[i >> 1u])[i & 1u]; }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ return vec4<f32>(load_{x}1(i), load_{x}1(i + 1u), load_{x}1(i + 2u), load_{x}1(i + 3u)); }}\n",
            decl("u32")
        ),
        // bf16 is the upper half of an f32: widen by shifting into the high 16 bits.
        (_, true, _) => format!(
            "{}fn bf16_{x}(w: u32, hi: bool) -> f32 {{ return bitcast<f32>(select(w << 16u, w & 0xffff0000u, hi)); }}\n\
             fn load_{x}1(i: u32) -> f32 {{ return bf16_{x}({x}_buf[i >> 2u][(i >> 1u) & 1u], (i & 1u) == 1u); }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ let w = {x}_buf[i >> 2u]; return vec4<f32>(bf16_{x}(w.x, false), bf16_{x}(w.x, true), bf16_{x}(w.y, false), bf16_{x}(w.y, true)); }}\n",
            decl("vec2<u32>")
        ),
        (_, false, _) => format!(
            "{}fn bf16_{x}(w: u32, hi: bool) -> f32 {{ return bitcast<f32>(select(w << 16u, w & 0xffff0000u, hi)); }}\n\
             fn load_{x}1(i: u32) -> f32 {{ return bf16_{x}({x}_buf[i >> 1u], (i & 1u) == 1u); }}\n\
             fn load_{x}4(i: u32) -> vec4<f32> {{ return vec4<f32>(load_{x}1(i), load_{x}1(i + 1u), load_{x}1(i + 2u), load_{x}1(i + 3u)); }}\n",
            decl("u32")
        ),
    }
}

/// Binding and loads for operand `x` of the coop kernel (f16 storage): `load_x8(i)` returns
/// 8 halves packed in a vec4<u32> (i a multiple of 8), `load_x1(i)` one half.
fn coop_operand(x: &str, binding: u32, vec: bool) -> String {
    if vec {
        format!(
            "@group(0) @binding({binding}) var<storage, read> {x}_buf: array<vec4<u32>>;\n\
             fn load_{x}8(i: u32) -> vec4<u32> {{ return {x}_buf[i >> 3u]; }}\n\
             fn load_{x}1(i: u32) -> f16 {{ return f16(unpack2x16float({x}_buf[i >> 3u][(i >> 1u) & 3u])[i & 1u]); }}\n"
        )
    } else {
        format!(
            "@group(0) @binding({binding}) var<storage, read> {x}_buf: array<f16>;\n\
             fn load_{x}1(i: u32) -> f16 {{ return {x}_buf[i]; }}\n\
             fn load_{x}8(i: u32) -> vec4<u32> {{ return vec4<u32>(\
             pack2x16float(vec2<f32>(f32({x}_buf[i]), f32({x}_buf[i + 1u]))), \
             pack2x16float(vec2<f32>(f32({x}_buf[i + 2u]), f32({x}_buf[i + 3u]))), \
             pack2x16float(vec2<f32>(f32({x}_buf[i + 4u]), f32({x}_buf[i + 5u]))), \
             pack2x16float(vec2<f32>(f32({x}_buf[i + 6u]), f32({x}_buf[i + 7u])))); }}\n"
        )
    }
}

fn shader_spec(ctx: &WgslContext, args: &MatmulArgs, kernel: KernelChoice, vec_a: bool, vec_b: bool) -> ShaderSpec {
    match kernel {
        KernelChoice::Simt { bm, bn, bk, tm, tn } => {
            let native = ctx.has_f16;
            let needs_f16 = native && (args.a_dtype == DType::F16 || args.b_dtype == DType::F16);
            let mut prelude = format!(
                "const BM: u32 = {bm}u;\nconst BN: u32 = {bn}u;\nconst BK: u32 = {bk}u;\n\
                 const TM: u32 = {tm}u;\nconst TN: u32 = {tn}u;\n\
                 const TRANS_A: bool = {};\nconst TRANS_B: bool = {};\n\
                 const VEC_A: bool = {vec_a};\nconst VEC_B: bool = {vec_b};\n",
                args.trans_a, args.trans_b
            );
            prelude += &simt_operand("a", 0, args.a_dtype, vec_a, native);
            prelude += &simt_operand("b", 1, args.b_dtype, vec_b, native);
            ShaderSpec {
                name: if tm == 8 { "matmul_simt_8x8" } else { "matmul_simt_4x4" },
                source: if tm == 8 { SIMT8_SRC } else { SIMT4_SRC },
                enables: if needs_f16 { vec!["f16"] } else { vec![] },
                prelude,
                entry: "main",
                overrides: vec![],
            }
        }
        c @ KernelChoice::Coop { .. } => coop_spec(c, args.trans_a, args.trans_b, vec_a && vec_b),
    }
}

/// Coop tilings to try, best first, for subgroups of `sg` invocations. Measured on the H200
/// over Vulkan at 4096 (docs/benchmarks.md): 2 x 4 subgroups of 64 x 64 blocks (a 128 x 256
/// tile, 16 deep to fit 48 KiB of workgroup memory) 162 TFLOP/s, 4 x 2 of 32 x 64 (128 x 128,
/// 32 deep) 154, 2 x 2 of 64 x 64 134.
fn coop_tiles(sg: u32) -> Vec<KernelChoice> {
    let warps = (256 / sg).clamp(1, 8);
    let mut v = Vec::new();
    if warps == 8 {
        v.push(coop_choice(sg, 2, 4, 4, 4, 16));
    }
    let wn = if warps >= 2 { 2 } else { 1 };
    for bk in [32, 16] {
        v.push(coop_choice(sg, warps / wn, wn, 2, 4, bk));
    }
    v
}

/// `wm x wn` subgroups of `fm x fn_` accumulators each, `bk` deep.
fn coop_choice(sg: u32, wm: u32, wn: u32, fm: u32, fn_: u32, bk: u32) -> KernelChoice {
    KernelChoice::Coop {
        bm: 16 * fm * wm,
        bn: 16 * fn_ * wn,
        bk,
        subgroup: sg,
        wm,
        wn,
    }
}

/// A tiling forced by `FERROTUNE_WGSL_MATMUL_TILES` (for tuning on a new device; read once):
/// `coop:WMxWN:FMxFN:BK` (subgroups, accumulators per subgroup, depth; subgroups of 32) or
/// `simt:BMxBNxBK:T` (workgroup tile and T x T outputs per invocation, T = 4 or 8) for the
/// large products. A coop tiling that does not fit the adapter (subgroup size, workgroup
/// memory) is passed over for the defaults.
pub fn tile_override() -> Option<KernelChoice> {
    static CHOICE: std::sync::OnceLock<Option<KernelChoice>> = std::sync::OnceLock::new();
    *CHOICE.get_or_init(|| {
        let text = std::env::var("FERROTUNE_WGSL_MATMUL_TILES")
            .ok()
            .filter(|t| !t.is_empty())?;
        let parsed = parse_tiles(&text);
        if parsed.is_none() {
            eprintln!("FERROTUNE_WGSL_MATMUL_TILES={text:?} is not coop:WMxWN:FMxFN:BK or simt:BMxBNxBK:T; ignored");
        }
        parsed
    })
}

fn parse_tiles(text: &str) -> Option<KernelChoice> {
    let pair = |s: &str| -> Option<(u32, u32)> {
        let (a, b) = s.split_once('x')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    };
    let parts: Vec<&str> = text.split(':').collect();
    match parts.as_slice() {
        ["coop", w, f, bk] => {
            let ((wm, wn), (fm, fn_), bk) = (pair(w)?, pair(f)?, bk.parse::<u32>().ok()?);
            let ok = wm * wn * 32 <= 256 && fm * fn_ > 0 && bk > 0 && bk.is_multiple_of(16);
            ok.then(|| coop_choice(32, wm, wn, fm, fn_, bk))
        }
        ["simt", tile, t] => {
            let mut it = tile.split('x').map(|v| v.parse::<u32>().ok());
            let (bm, bn, bk) = (it.next()??, it.next()??, it.next()??);
            let t: u32 = t.parse().ok()?;
            let ok = (t == 4 || t == 8)
                && bm.is_multiple_of(t)
                && bn.is_multiple_of(2 * t)
                && (bm / t) * (bn / t) <= 256
                && bk.is_multiple_of(4);
            ok.then_some(KernelChoice::Simt {
                bm,
                bn,
                bk,
                tm: t,
                tn: t,
            })
        }
        _ => None,
    }
}

fn coop_spec(choice: KernelChoice, trans_a: bool, trans_b: bool, vec: bool) -> ShaderSpec {
    let KernelChoice::Coop {
        bm,
        bn,
        bk,
        subgroup,
        wm,
        wn,
    } = choice
    else {
        unreachable!("coop_spec takes a coop choice")
    };
    let (ar, ac, ald, ast) = staged(bm, bk, trans_a);
    let (br, bc, bld, bst) = staged(bk, bn, trans_b);
    let mut prelude = format!(
        "const BM: u32 = {bm}u;\nconst BN: u32 = {bn}u;\nconst BK: u32 = {bk}u;\n\
         const WM: u32 = {wm}u;\nconst WN: u32 = {wn}u;\nconst SG: u32 = {subgroup}u;\n\
         const TRANS_A: bool = {trans_a};\nconst TRANS_B: bool = {trans_b};\nconst VEC: bool = {vec};\n\
         const A_ROWS: u32 = {ar}u;\nconst A_COLS: u32 = {ac}u;\nconst A_LD: u32 = {ald}u;\nconst A_STAGE: u32 = {ast}u;\n\
         const B_ROWS: u32 = {br}u;\nconst B_COLS: u32 = {bc}u;\nconst B_LD: u32 = {bld}u;\nconst B_STAGE: u32 = {bst}u;\n"
    );
    prelude += &coop_operand("a", 0, vec);
    prelude += &coop_operand("b", 1, vec);
    prelude += &coop_entry(bm / (16 * wm), bn / (16 * wn));
    ShaderSpec {
        name: "matmul_coop",
        source: COOP_SRC,
        enables: vec!["f16", "wgpu_cooperative_matrix"],
        prelude,
        entry: "main",
        overrides: vec![],
    }
}

/// The coop kernel's entry point for `fm x fn_` accumulators per subgroup, written out so
/// every accumulator is a named variable (no indexed arrays of cooperative matrices).
fn coop_entry(fm: u32, fn_: u32) -> String {
    let each = |f: &dyn Fn(u32, u32) -> String| -> String {
        (0..fm)
            .flat_map(|i| (0..fn_).map(move |j| (i, j)))
            .map(|(i, j)| f(i, j))
            .collect()
    };
    let decl = each(&|i, j| format!("    var c{i}_{j} = zero;\n"));
    let loads_a: String = (0..fm)
        .map(|i| format!("            let a{i} = frag_a(s, wm + {}u, kk);\n", 16 * i))
        .collect();
    let loads_b: String = (0..fn_)
        .map(|j| format!("            let b{j} = frag_b(s, kk, wn + {}u);\n", 16 * j))
        .collect();
    let mma = each(&|i, j| format!("            c{i}_{j} = coopMultiplyAdd(a{i}, b{j}, c{i}_{j});\n"));
    let store = each(&|i, j| {
        format!(
            "    store_frag(c{i}_{j}, warp, lane, c_base, row0 + wm + {}u, col0 + wn + {}u);\n",
            16 * i,
            16 * j
        )
    });
    format!(
        r#"
@compute @workgroup_size(THREADS)
fn main(@builtin(local_invocation_index) t: u32, @builtin(workgroup_id) wg: vec3<u32>) {{
    let row0 = wg.y * BM;
    let col0 = wg.x * BN;
    let a_base = p.a_off + wg.z * p.a_bstride;
    let b_base = p.b_off + wg.z * p.b_bstride;
    let c_base = p.c_off + wg.z * p.c_bstride;
    let warp = t / SG;
    let lane = t % SG;
    let wm = (warp / WN) * {sm}u;
    let wn = (warp % WN) * {sn}u;

    // Zero accumulators, loaded from zeroed scratch.
    for (var e = t; e < WM * WN * 256u; e += THREADS) {{
        c_sh[e] = 0.0;
    }}
    workgroupBarrier();
    let zero = coopLoadT<coop_mat16x16<f32, C>>(&c_sh[0], 16u);
{decl}
    let nk = (p.k + BK - 1u) / BK;
    var ra: array<vec4<u32>, A_PER_T>;
    var rb: array<vec4<u32>, B_PER_T>;
    for (var i = 0u; i < A_PER_T; i++) {{
        let g = t + i * THREADS;
        if g < A_GROUPS {{ put_a(0u, g, fetch_a(g, a_base, row0, 0u)); }}
    }}
    for (var i = 0u; i < B_PER_T; i++) {{
        let g = t + i * THREADS;
        if g < B_GROUPS {{ put_b(0u, g, fetch_b(g, b_base, col0, 0u)); }}
    }}
    workgroupBarrier();

    for (var kt = 0u; kt < nk; kt++) {{
        let s = kt & 1u;
        let more = kt + 1u < nk;
        if more {{
            let k1 = (kt + 1u) * BK;
            for (var i = 0u; i < A_PER_T; i++) {{
                let g = t + i * THREADS;
                if g < A_GROUPS {{ ra[i] = fetch_a(g, a_base, row0, k1); }}
            }}
            for (var i = 0u; i < B_PER_T; i++) {{
                let g = t + i * THREADS;
                if g < B_GROUPS {{ rb[i] = fetch_b(g, b_base, col0, k1); }}
            }}
        }}
        for (var kk = 0u; kk < BK; kk += 16u) {{
{loads_a}{loads_b}{mma}        }}
        if more {{
            for (var i = 0u; i < A_PER_T; i++) {{
                let g = t + i * THREADS;
                if g < A_GROUPS {{ put_a(s ^ 1u, g, ra[i]); }}
            }}
            for (var i = 0u; i < B_PER_T; i++) {{
                let g = t + i * THREADS;
                if g < B_GROUPS {{ put_b(s ^ 1u, g, rb[i]); }}
            }}
        }}
        workgroupBarrier();
    }}

{store}}}
"#,
        sm = 16 * fm,
        sn = 16 * fn_,
    )
}

/// The full WGSL text of the coop kernel for subgroups of `subgroup`, in each of its default
/// tilings with depth `bk`, for validating it offline on machines without cooperative
/// matrices.
pub fn coop_shader_sources(subgroup: u32, bk: u32, trans_a: bool, trans_b: bool, vec: bool) -> Vec<String> {
    let mut tilings: Vec<KernelChoice> = Vec::new();
    for c in coop_tiles(subgroup) {
        if let KernelChoice::Coop {
            bm,
            bn,
            subgroup,
            wm,
            wn,
            ..
        } = c
        {
            let c = KernelChoice::Coop {
                bm,
                bn,
                bk,
                subgroup,
                wm,
                wn,
            };
            if !tilings.contains(&c) {
                tilings.push(c);
            }
        }
    }
    tilings
        .into_iter()
        .map(|c| coop_spec(c, trans_a, trans_b, vec).full_source())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tile_overrides_parse_or_are_refused() {
        assert_eq!(
            parse_tiles("coop:2x4:4x4:16"),
            Some(KernelChoice::Coop {
                bm: 128,
                bn: 256,
                bk: 16,
                subgroup: 32,
                wm: 2,
                wn: 4
            })
        );
        assert_eq!(
            parse_tiles("simt:128x64x8:8"),
            Some(KernelChoice::Simt {
                bm: 128,
                bn: 64,
                bk: 8,
                tm: 8,
                tn: 8
            })
        );
        // More than 256 invocations, a depth that is not a multiple of 16 (coop) or 4
        // (simt), outputs per invocation other than 4 or 8, and malformed text.
        for bad in [
            "coop:4x4:2x2:16",
            "coop:2x2:4x4:24",
            "simt:128x128x8:4",
            "simt:128x128x6:8",
            "simt:64x64x8:2",
            "coop:2x2",
            "gemm:1x1x1:8",
            "",
        ] {
            assert_eq!(parse_tiles(bad), None, "{bad}");
        }
    }
}
