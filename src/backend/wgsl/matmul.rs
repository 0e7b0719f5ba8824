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
    Coop {
        bm: u32,
        bn: u32,
        bk: u32,
        subgroup: u32,
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
        let warps = (256 / sg).min(8);
        let wn = if warps >= 2 { 2 } else { 1 };
        let wm = warps / wn;
        let (bm, bn) = (32 * wm, 64 * wn);
        let max_shared = ctx.limits.max_compute_workgroup_storage_size;
        let bk = [32u32, 16]
            .into_iter()
            .find(|&bk| coop_shared_bytes(bm, bn, bk, warps, args.trans_a, args.trans_b) <= max_shared);
        if let Some(bk) = bk {
            let worth_it = args.kernel == MatmulKernel::Coop || (args.m >= 16 && args.n >= 16 && args.k >= 16);
            if args.kernel != MatmulKernel::Simt && worth_it {
                return Ok(KernelChoice::Coop {
                    bm,
                    bn,
                    bk,
                    subgroup: sg,
                });
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
        Ok(KernelChoice::Simt {
            bm: 128,
            bn: 128,
            bk: 8,
            tm: 8,
            tn: 8,
        })
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
        KernelChoice::Coop { bm, bn, bk, subgroup } => {
            coop_spec(bm, bn, bk, subgroup, args.trans_a, args.trans_b, vec_a && vec_b)
        }
    }
}

fn coop_spec(bm: u32, bn: u32, bk: u32, subgroup: u32, trans_a: bool, trans_b: bool, vec: bool) -> ShaderSpec {
    let warps = (256 / subgroup).min(8);
    let wn = if warps >= 2 { 2 } else { 1 };
    let wm = warps / wn;
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
    ShaderSpec {
        name: "matmul_coop",
        source: COOP_SRC,
        enables: vec!["f16", "wgpu_cooperative_matrix"],
        prelude,
        entry: "main",
        overrides: vec![],
    }
}

/// The full WGSL text of a coop-kernel variant (128 x 128 tiles for subgroups of 32), for
/// validating it offline on machines without cooperative matrices.
pub fn coop_shader_source(subgroup: u32, bk: u32, trans_a: bool, trans_b: bool, vec: bool) -> String {
    let warps = (256 / subgroup).min(8);
    let wn = if warps >= 2 { 2 } else { 1 };
    coop_spec(32 * (warps / wn), 64 * wn, bk, subgroup, trans_a, trans_b, vec).full_source()
}
