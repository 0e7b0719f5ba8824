//! Attention launches: the tensor-core kernels of cuda/flash_attn.cu for bf16/f16 with head
//! dim 64, 96 or 128 on compute capability 8.0+, the general kernels of cuda/attention.cu
//! for everything else (any storage type, head dims up to 256).

use super::gpu::Args;
use super::kernels::Family;
use super::ops::{blocks, dt_code, Rotation};
use super::CudaBackend;
use crate::backend::Arg;
use crate::graph::TensorInfo;
use crate::ops::AttnSpec;
use crate::tensor::DType;
use crate::{Error, Result};

/// `struct AttnDims` of cuda/attention.cu.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct AttnDims {
    b: i64,
    t: i64,
    hq: i32,
    hkv: i32,
    d: i32,
    causal: i32,
    window: i32,
    scale: f32,
}

/// `struct FlashParams` of cuda/flash_attn.cu.
#[repr(C)]
#[derive(Clone, Copy, Default, bytemuck::Pod, bytemuck::Zeroable)]
struct FlashParams {
    q: u64,
    k: u64,
    v: u64,
    o: u64,
    lse: u64,
    seg: u64,
    d_o: u64,
    di: u64,
    dq_acc: u64,
    dk: u64,
    dv: u64,
    rng: u64,
    b: i64,
    t: i64,
    hq: i32,
    hkv: i32,
    causal: i32,
    window: i32,
    scale: f32,
    scale_log2: f32,
    ngr: i32,
    pad: i32,
}

/// Tokens per entry of the segment-range table (GRAN in cuda/flash_attn.cu).
const GRAN: usize = 32;

fn granules(seq_len: usize) -> usize {
    seq_len.div_ceil(GRAN)
}

pub(super) fn window(s: &AttnSpec) -> Result<i32> {
    match s.window {
        None => Ok(0),
        Some(0) => Err(Error::backend("cuda", "an attention window of 0 hides every key")),
        Some(w) if w >= s.seq_len => Ok(0),
        Some(w) => Ok(w as i32),
    }
}

fn dims(s: &AttnSpec, n: usize) -> Result<AttnDims> {
    Ok(AttnDims {
        b: (n / s.seq_len) as i64,
        t: s.seq_len as i64,
        hq: s.n_heads as i32,
        hkv: s.n_kv_heads as i32,
        d: s.head_dim as i32,
        causal: s.causal as i32,
        window: window(s)?,
        scale: s.scale as f32,
    })
}

/// Dim chunks per lane for the general kernels (instantiated for 1, 2, 4, 8).
fn dc(d: usize) -> Result<usize> {
    match d {
        0..=32 => Ok(1),
        33..=64 => Ok(2),
        65..=128 => Ok(4),
        129..=256 => Ok(8),
        _ => Err(Error::backend(
            "cuda",
            format!("attention with head dim {d} is not supported (at most 256)"),
        )),
    }
}

fn half(d: DType) -> bool {
    matches!(d, DType::BF16 | DType::F16)
}

/// Tile shapes of the tensor-core kernels (template parameters of cuda/flash_attn.cu):
/// forward `mw` m16 tiles per warp (4 warps, 64 mw query rows) and key tiles of `bn`;
/// backward `nw` warps (16 nw keys) and query tiles of `bm`, with the warps in pairs that
/// share 32 keys when `pairs` (flash_bwd_pairs) or each owning 16 keys (flash_bwd).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlashTiles {
    pub mw: usize,
    pub bn: usize,
    pub nw: usize,
    pub bm: usize,
    pub pairs: bool,
}

impl FlashTiles {
    /// The shapes used unless [`super::CudaOptions::flash_tiles`] overrides them.
    pub fn default_for(head_dim: usize) -> FlashTiles {
        // Fastest measured on the H200 (docs/benchmarks.md): 128 queries per backward step in
        // pairs for every head dim; 128 keys per forward tile at head dim 64 (above it the
        // forward's accumulators would spill).
        FlashTiles {
            mw: 2,
            bn: if head_dim == 64 { 128 } else { 64 },
            nw: 8,
            bm: 128,
            pairs: true,
        }
    }

    /// The tile shapes the attention tests check and `FERROTUNE_BENCH_TILES=all` times
    /// (each valid only for some head dims, see [`FlashTiles::valid`]).
    pub fn known() -> Vec<FlashTiles> {
        [
            (1, 64, 4, 64, false),
            (2, 64, 8, 64, false),
            (2, 32, 4, 32, false),
            (2, 32, 8, 32, false),
            (2, 64, 4, 64, false),
            (1, 64, 4, 64, true),
            (2, 64, 8, 64, true),
            (2, 64, 4, 64, true),
            (2, 32, 4, 32, true),
            (2, 32, 8, 32, true),
            (1, 128, 8, 64, true),
            (2, 128, 8, 64, true),
            (2, 128, 8, 128, true),
            (2, 64, 8, 128, true),
        ]
        .map(|(mw, bn, nw, bm, pairs)| FlashTiles { mw, bn, nw, bm, pairs })
        .to_vec()
    }

    /// Parses "mw,bn,nw,bm" with an optional fifth field "p" (backward warps in pairs).
    pub fn parse(text: &str) -> Result<FlashTiles> {
        let bad = || {
            Error::backend(
                "cuda",
                format!("flash tile shape `{text}`: expected four numbers mw,bn,nw,bm and an optional `,p`, e.g. `1,64,4,64,p`"),
            )
        };
        let f: Vec<&str> = text.split(',').map(str::trim).collect();
        if !(4..=5).contains(&f.len()) || f.get(4).is_some_and(|x| *x != "p") {
            return Err(bad());
        }
        let n = f[..4]
            .iter()
            .map(|x| x.parse::<usize>())
            .collect::<std::result::Result<Vec<_>, _>>();
        let n = n.map_err(|_| bad())?;
        Ok(FlashTiles {
            mw: n[0],
            bn: n[1],
            nw: n[2],
            bm: n[3],
            pairs: f.len() == 5,
        })
    }

    /// Whether the kernels support these shapes for `head_dim` (the static_asserts of
    /// flash_bwd and flash_bwd_pairs, and tiles the loops can walk).
    pub fn valid(&self, head_dim: usize) -> bool {
        let common = matches!(self.mw, 1 | 2)
            && matches!(self.bn, 32 | 64 | 128)
            && matches!(self.nw, 4 | 8)
            // 128 queries per step: only the pair layout (flash_bwd's accumulators would
            // spill).
            && (matches!(self.bm, 32 | 64) || self.pairs && self.bm == 128);
        if self.pairs {
            // dQ phase: bm / 32 query groups, nw / groups column groups of 16k columns.
            let groups = self.bm / 32;
            let cw = self.nw / groups;
            common
                && self.nw.is_multiple_of(groups)
                && head_dim.is_multiple_of(cw)
                && (head_dim / cw).is_multiple_of(16)
                && (head_dim / 2).is_multiple_of(16)
        } else {
            let (dn, mk) = (head_dim / 8, self.bm / 16);
            common
                && self.nw.is_multiple_of(mk)
                && dn.is_multiple_of(self.nw / mk)
                && (dn / (self.nw / mk)).is_multiple_of(2)
        }
    }

    /// Dynamic shared memory of the forward or backward kernel for rows of `seq_len`.
    fn smem(&self, d: usize, seq_len: usize, bwd: bool) -> u32 {
        let (s, g) = (d + 8, granules(seq_len));
        // The granule ranges (8 bytes each), then one flag byte per tile (at most G tiles).
        if bwd {
            let (bn, tiles) = (16 * self.nw, if self.pairs { 2 } else { 1 });
            // Query-side buffers (Q, dO, lse, Di, segment ids): one for 128 queries above
            // head dim 64, else two.
            let qb = if self.pairs && self.bm == 128 && d > 64 { 1 } else { 2 };
            let (qtiles, qrows) = (2 * qb * self.bm * s * 2, 3 * qb * self.bm * 4);
            (2 * bn * s * 2 + qtiles + tiles * bn * (self.bm + 8) * 2 + qrows + 9 * g) as u32
        } else {
            ((64 * self.mw + 4 * self.bn) * s * 2 + 2 * self.bn * 4 + 9 * g) as u32
        }
    }
}

/// A string that lives for the rest of the process (kernel names and defines are few).
fn intern(s: String) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{Mutex, OnceLock};
    static SET: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut set = SET.get_or_init(|| Mutex::new(HashSet::new())).lock().expect("intern");
    if let Some(&x) = set.get(s.as_str()) {
        return x;
    }
    let x: &'static str = Box::leak(s.into_boxed_str());
    set.insert(x);
    x
}

/// Kernel name and the preprocessor defines of the module that holds it.
fn flash_kernel(d: DType, hd: usize, t: FlashTiles, bwd: bool) -> (&'static str, Vec<&'static str>) {
    let name = if d == DType::F16 { "f16" } else { "bf16" };
    let kernel = if bwd {
        format!("flash_bwd_{name}_{hd}_w{}_m{}_p{}", t.nw, t.bm, t.pairs as u8)
    } else {
        format!("flash_fwd_{name}_{hd}_m{}_n{}", t.mw, t.bn)
    };
    let defines = [
        format!("FLASH_D={hd}"),
        format!("FLASH_MW={}", t.mw),
        format!("FLASH_BN={}", t.bn),
        format!("FLASH_NW={}", t.nw),
        format!("FLASH_BM={}", t.bm),
        format!("FLASH_F16={}", d == DType::F16),
        format!("FLASH_NAME={name}"),
        format!("FLASH_PAIRS={}", t.pairs as u8),
    ];
    let mut defines: Vec<&'static str> = defines.into_iter().map(intern).collect();
    defines.extend(tuning_defines());
    (intern(kernel), defines)
}

/// Kernel tuning switches from the environment, for measuring alternatives on a device
/// (read once; the kernel's default applies when unset): `FERROTUNE_FLASH_LPT_MAX`, the
/// largest backward grid (in blocks) that runs longest-first.
fn tuning_defines() -> &'static [&'static str] {
    use std::sync::OnceLock;
    static DEFS: OnceLock<Vec<&'static str>> = OnceLock::new();
    DEFS.get_or_init(|| {
        let mut v = Vec::new();
        if let Some(n) = std::env::var("FERROTUNE_FLASH_LPT_MAX")
            .ok()
            .and_then(|x| x.trim().parse::<u64>().ok())
        {
            v.push(intern(format!("FLASH_LPT_MAX={n}")));
        }
        v
    })
}

/// Whether `attn_bwd_prep` takes this head dim: rows of D / 8 threads that tile a warp.
fn prep_fits(head_dim: usize) -> bool {
    head_dim.is_multiple_of(8) && 32 % (head_dim / 8) == 0
}

fn generic_name(kind: &str, dc: usize) -> &'static str {
    match (kind, dc) {
        ("fwd", 1) => "attn_fwd_1",
        ("fwd", 2) => "attn_fwd_2",
        ("fwd", 4) => "attn_fwd_4",
        ("fwd", _) => "attn_fwd_8",
        ("dot", 1) => "attn_bwd_dot_1",
        ("dot", 2) => "attn_bwd_dot_2",
        ("dot", 4) => "attn_bwd_dot_4",
        ("dot", _) => "attn_bwd_dot_8",
        ("dq", 1) => "attn_bwd_dq_1",
        ("dq", 2) => "attn_bwd_dq_2",
        ("dq", 4) => "attn_bwd_dq_4",
        ("dq", _) => "attn_bwd_dq_8",
        ("dkv", 1) => "attn_bwd_dkv_1",
        ("dkv", 2) => "attn_bwd_dkv_2",
        ("dkv", 4) => "attn_bwd_dkv_4",
        ("dkv", _) => "attn_bwd_dkv_8",
        (_, 1) => "attn_cached_1",
        (_, 2) => "attn_cached_2",
        (_, 4) => "attn_cached_4",
        _ => "attn_cached_8",
    }
}

impl CudaBackend {
    /// Which kernels attention with `spec` on `dtype` operands runs: `"tensor-core"` or
    /// `"general"`.
    pub fn attention_path(&self, spec: &AttnSpec, dtype: DType) -> &'static str {
        if self.flash_capable(spec, dtype) {
            "tensor-core"
        } else {
            "general"
        }
    }

    /// The tile shapes for `s`: the configured ones, else the defaults, made smaller (64 keys
    /// and 64 queries per step) where the defaults need more shared memory than the device has.
    fn tiles(&self, s: &AttnSpec) -> FlashTiles {
        if let Some(t) = self.opts.flash_tiles {
            return t;
        }
        let t = FlashTiles::default_for(s.head_dim);
        if self.smem_fits(t, s) {
            return t;
        }
        // Warps in pairs where that layout is valid for the head dim, else alone.
        let small = FlashTiles { bn: 64, bm: 64, ..t };
        let pairs = small.valid(s.head_dim);
        FlashTiles { pairs, ..small }
    }

    fn smem_fits(&self, t: FlashTiles, s: &AttnSpec) -> bool {
        let need = t
            .smem(s.head_dim, s.seq_len, true)
            .max(t.smem(s.head_dim, s.seq_len, false));
        need as u64 <= self.gpu.smem_optin as u64
    }

    fn flash_capable(&self, s: &AttnSpec, dt: DType) -> bool {
        let t = self.tiles(s);
        self.opts.flash_attention
            && self.gpu.cc >= (8, 0)
            && half(dt)
            && matches!(s.head_dim, 64 | 96 | 128)
            && t.valid(s.head_dim)
            && self.smem_fits(t, s)
    }

    pub(super) fn flash_ok_fwd(&self, s: &AttnSpec, i: &[&TensorInfo], o: &[&TensorInfo]) -> bool {
        self.flash_capable(s, i[0].dtype) && o[0].dtype == i[0].dtype && o[1].dtype == DType::F32
    }

    /// The flash backward needs every 16-bit operand in one type and an f32 lse.
    pub(super) fn flash_ok_bwd(&self, s: &AttnSpec, i: &[&TensorInfo], o: &[&TensorInfo]) -> bool {
        let d = i[0].dtype;
        self.flash_capable(s, d)
            && i[4].dtype == d
            && i[5].dtype == DType::F32
            && i[6].dtype == d
            && o.iter().all(|t| t.dtype == d)
    }

    pub(super) fn prepare_attention(
        &mut self,
        s: &AttnSpec,
        i: &[&TensorInfo],
        o: &[&TensorInfo],
        bwd: bool,
    ) -> Result<()> {
        window(s)?;
        dc(s.head_dim)?;
        self.mods.load(Family::Attention)?;
        self.mods.load(Family::Elementwise)?;
        let flash = if bwd {
            self.flash_ok_bwd(s, i, o)
        } else {
            self.flash_ok_fwd(s, i, o)
        };
        if flash {
            let t = self.tiles(s);
            let (name, defs) = flash_kernel(i[0].dtype, s.head_dim, t, bwd);
            self.mods
                .get_with_smem(Family::FlashAttn, &defs, name, t.smem(s.head_dim, s.seq_len, bwd))?;
            self.mods.get_variant(Family::FlashAttn, &defs, "flash_seg_ranges")?;
        }
        Ok(())
    }

    /// Min and max segment id of every GRAN tokens: int2 [rows, granules] at `out`.
    pub(super) fn seg_ranges(&mut self, defs: &[&'static str], seg: u64, rows: i64, t: i64, out: u64) -> Result<()> {
        let k = self.mods.get_variant(Family::FlashAttn, defs, "flash_seg_ranges")?;
        let g = granules(t as usize) as i64;
        let args = Args::new().ptr(seg).i64(rows).i64(t).i32(g as i32).ptr(out);
        self.run(&k, (blocks((rows * g) as u64, 256), 1, 1), 256, 0, args)
    }

    /// Scratch bytes of the segment-range table.
    pub(super) fn seg_range_bytes(s: &AttnSpec, n: usize) -> u64 {
        (n / s.seq_len * granules(s.seq_len) * 8) as u64
    }

    pub(super) fn attention_fwd(&mut self, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
        let infos: Vec<&TensorInfo> = i.iter().map(|a| a.info).collect();
        let oinfos: Vec<&TensorInfo> = o.iter().map(|a| a.info).collect();
        if i[3].info.dtype != DType::I32 {
            return Err(Error::backend("cuda", "segment ids must be i32"));
        }
        let n = i[0].info.shape[0];
        let a = dims(s, n)?;
        let dt = dt_code(i[0].info.dtype)?;
        if self.flash_ok_fwd(s, &infos, &oinfos) {
            let t = self.tiles(s);
            let (name, defs) = flash_kernel(i[0].info.dtype, s.head_dim, t, false);
            let smem = t.smem(s.head_dim, s.seq_len, false);
            let k = self.mods.get_with_smem(Family::FlashAttn, &defs, name, smem)?;
            let sizes = self.scratch_sizes(&crate::ops::Op::Attention(s.clone()), &infos, &oinfos)?;
            let scratch = self.carve(&sizes)?[0];
            let rng = self.seg_range_table(&defs, &i[3], a.b, a.t, sizes[0], scratch)?;
            let prm = FlashParams {
                q: self.ptr(i[0].loc),
                k: self.ptr(i[1].loc),
                v: self.ptr(i[2].loc),
                seg: self.ptr(i[3].loc),
                o: self.ptr(o[0].loc),
                lse: self.ptr(o[1].loc),
                b: a.b,
                t: a.t,
                hq: a.hq,
                hkv: a.hkv,
                causal: a.causal,
                window: a.window,
                scale: a.scale,
                scale_log2: (s.scale * std::f64::consts::LOG2_E) as f32,
                rng,
                ngr: granules(s.seq_len) as i32,
                ..Default::default()
            };
            let grid = (s.seq_len.div_ceil(64 * t.mw) as u32, s.n_heads as u32, a.b as u32);
            self.gpu.launch(&k, grid, (128, 1, 1), smem, &Args::new().blob(&prm))?;
            if self.opts.sync_each_launch {
                self.gpu.sync()?;
            }
            return Ok(());
        }
        let c = dc(s.head_dim)?;
        let k = self.kernel(Family::Attention, generic_name("fwd", c))?;
        let warps = (a.b * a.hq as i64 * a.t) as u64;
        let args = Args::new()
            .ptr(self.ptr(i[0].loc))
            .ptr(self.ptr(i[1].loc))
            .ptr(self.ptr(i[2].loc))
            .i32(dt)
            .ptr(self.ptr(i[3].loc))
            .ptr(self.ptr(o[0].loc))
            .i32(dt_code(o[0].info.dtype)?)
            .ptr(self.ptr(o[1].loc))
            .i32(dt_code(o[1].info.dtype)?)
            .blob(&a);
        self.run(&k, (blocks(warps, 4), 1, 1), 128, 0, args)
    }

    /// Attention of new queries over a KV cache (`Op::AttentionCached`): the general kernel
    /// for every storage type and head dim up to 256.
    pub(super) fn attention_cached(&mut self, s: &AttnSpec, i: &[Arg], o: &[Arg]) -> Result<()> {
        if i[3].info.dtype != DType::I32 {
            return Err(Error::backend("cuda", "cache positions must be i32"));
        }
        let dt = i[0].info.dtype;
        if i[1].info.dtype != dt || i[2].info.dtype != dt {
            return Err(Error::backend(
                "cuda",
                format!(
                    "attention over a cache needs q and the caches in one storage type, got {}, {} and {}",
                    dt, i[1].info.dtype, i[2].info.dtype
                ),
            ));
        }
        let (rows, cache_len) = (i[0].info.shape[0], i[1].info.shape[1]);
        let mut a = dims(s, rows)?;
        // The window counts cache positions here, not query rows: pass it unclipped.
        a.window = match s.window {
            Some(0) => return Err(Error::backend("cuda", "an attention window of 0 hides every key")),
            Some(w) => w.min(i32::MAX as usize) as i32,
            None => 0,
        };
        let c = dc(s.head_dim)?;
        let k = self.kernel(Family::Attention, generic_name("cached", c))?;
        let warps = (rows * s.n_heads) as u64;
        let args = Args::new()
            .ptr(self.ptr(i[0].loc))
            .ptr(self.ptr(i[1].loc))
            .ptr(self.ptr(i[2].loc))
            .i32(dt_code(dt)?)
            .ptr(self.ptr(i[3].loc))
            .ptr(self.ptr(o[0].loc))
            .i32(dt_code(o[0].info.dtype)?)
            .i64(cache_len as i64)
            .blob(&a);
        self.run(&k, (blocks(warps, 4), 1, 1), 128, 0, args)
    }

    /// The attention backward; with `rope`, `dq` is written rotated by it (the scaled f32
    /// accumulator of the flash kernel goes through the rotation in place of a plain scale).
    pub(super) fn attention_bwd(&mut self, s: &AttnSpec, i: &[Arg], o: &[Arg], rope: Option<Rotation>) -> Result<()> {
        let infos: Vec<&TensorInfo> = i.iter().map(|a| a.info).collect();
        let oinfos: Vec<&TensorInfo> = o.iter().map(|a| a.info).collect();
        if i[3].info.dtype != DType::I32 {
            return Err(Error::backend("cuda", "segment ids must be i32"));
        }
        let n = i[0].info.shape[0];
        let a = dims(s, n)?;
        let c = dc(s.head_dim)?;
        let flash = self.flash_ok_bwd(s, &infos, &oinfos);
        let sizes = self.scratch_sizes(&crate::ops::Op::AttentionBackward(s.clone()), &infos, &oinfos)?;
        let sc = self.carve(&sizes)?;
        let di = sc[0];
        let (q, k, v, seg) = (
            self.ptr(i[0].loc),
            self.ptr(i[1].loc),
            self.ptr(i[2].loc),
            self.ptr(i[3].loc),
        );
        let (out, lse, d_o) = (self.ptr(i[4].loc), self.ptr(i[5].loc), self.ptr(i[6].loc));
        let (dq, dk, dv) = (self.ptr(o[0].loc), self.ptr(o[1].loc), self.ptr(o[2].loc));
        let rows = (a.b * a.hq as i64 * a.t) as u64;
        let (dto, dtdo) = (dt_code(i[4].info.dtype)?, dt_code(i[6].info.dtype)?);
        // The flash kernel sums dQ into an f32 accumulator that starts at zero.
        let qn = (n * s.n_heads * s.head_dim) as u64;
        let dq_acc = flash.then(|| sc[1]);
        if let (Some(acc), true) = (dq_acc, prep_fits(s.head_dim)) {
            // Di = rowsum(dO * O) and the zeroed accumulator, in one pass.
            let kp = self.kernel(Family::Attention, "attn_bwd_prep")?;
            let args = Args::new()
                .ptr(out)
                .i32(dto)
                .ptr(d_o)
                .i32(dtdo)
                .ptr(di)
                .ptr(acc)
                .i64(a.b)
                .i64(a.t)
                .i32(a.hq)
                .i32(s.head_dim as i32);
            self.run(&kp, (blocks(qn / 8, 256), 1, 1), 256, 0, args)?;
        } else {
            // Di = rowsum(dO * O)
            let kd = self.kernel(Family::Attention, generic_name("dot", c))?;
            let args = Args::new().ptr(out).i32(dto).ptr(d_o).i32(dtdo).ptr(di).blob(&a);
            self.run(&kd, (blocks(rows, 4), 1, 1), 128, 0, args)?;
            if let Some(acc) = dq_acc {
                self.gpu.memset32(acc, 0, qn as usize)?;
            }
        }
        if let Some(dq_acc) = dq_acc {
            let t = self.tiles(s);
            let (name, defs) = flash_kernel(i[0].info.dtype, s.head_dim, t, true);
            let smem = t.smem(s.head_dim, s.seq_len, true);
            let kf = self.mods.get_with_smem(Family::FlashAttn, &defs, name, smem)?;
            let rng = self.seg_range_table(&defs, &i[3], a.b, a.t, sizes[2], sc[2])?;
            let prm = FlashParams {
                q,
                k,
                v,
                o: out,
                lse,
                seg,
                d_o,
                di,
                dq_acc,
                dk,
                dv,
                rng,
                b: a.b,
                t: a.t,
                hq: a.hq,
                hkv: a.hkv,
                causal: a.causal,
                window: a.window,
                scale: a.scale,
                scale_log2: (s.scale * std::f64::consts::LOG2_E) as f32,
                ngr: granules(s.seq_len) as i32,
                pad: 0,
            };
            let grid = (s.seq_len.div_ceil(16 * t.nw) as u32, s.n_kv_heads as u32, a.b as u32);
            self.gpu
                .launch(&kf, grid, ((t.nw * 32) as u32, 1, 1), smem, &Args::new().blob(&prm))?;
            if self.opts.sync_each_launch {
                self.gpu.sync()?;
            }
            return match rope {
                // dq = rope(scale * dq_acc), in dq's type: the rotation is linear, so the
                // softmax scale joins its own.
                Some(r) => {
                    let r = Rotation {
                        scale: r.scale * s.scale,
                        ..r
                    };
                    self.rope_raw(&r, &o[0].info.shape, (dq_acc, DType::F32), (dq, o[0].info.dtype))
                }
                // dq = scale * dq_acc, in dq's type.
                None => self.scale_raw(dq_acc, DType::F32, dq, o[0].info.dtype, qn, s.scale as f32),
            };
        }
        let dt = dt_code(i[0].info.dtype)?;
        let (dtl, dtdo) = (dt_code(i[5].info.dtype)?, dt_code(i[6].info.dtype)?);
        let kq = self.kernel(Family::Attention, generic_name("dq", c))?;
        let args = Args::new()
            .ptr(q)
            .ptr(k)
            .ptr(v)
            .i32(dt)
            .ptr(seg)
            .ptr(lse)
            .i32(dtl)
            .ptr(d_o)
            .i32(dtdo)
            .ptr(di)
            .ptr(dq)
            .i32(dt_code(o[0].info.dtype)?)
            .blob(&a);
        self.run(&kq, (blocks(rows, 4), 1, 1), 128, 0, args)?;
        if let Some(r) = rope {
            let dt = o[0].info.dtype;
            self.rope_raw(&r, &o[0].info.shape, (dq, dt), (dq, dt))?;
        }
        let kk = self.kernel(Family::Attention, generic_name("dkv", c))?;
        let kv_rows = (a.b * a.hkv as i64 * a.t) as u64;
        let args = Args::new()
            .ptr(q)
            .ptr(k)
            .ptr(v)
            .i32(dt)
            .ptr(seg)
            .ptr(lse)
            .i32(dtl)
            .ptr(d_o)
            .i32(dtdo)
            .ptr(di)
            .ptr(dk)
            .i32(dt_code(o[1].info.dtype)?)
            .ptr(dv)
            .i32(dt_code(o[2].info.dtype)?)
            .blob(&a);
        self.run(&kk, (blocks(kv_rows, 4), 1, 1), 128, 0, args)
    }
}
