//! One rank's part of a data-parallel step, between the trainer's executor and a
//! [`Collective`]: its slice of the step's micro-batches, sums of scalars across ranks,
//! gradient reduction (all-reduce in buckets; under ZeRO reduce-scatter of slices to their
//! owners) and the all-gather of updated or sharded parameters.
//!
//! Packed buffers: a collective over trainable tensors `ts` gives every rank one chunk of
//! `sum(chunk(i) for i in ts)` elements, in which tensor `ts[k]` has the slot of
//! `chunk(ts[k])` elements at the sum of the chunks before it; rank r's slice of the tensor
//! fills the start of its slot (the rest is zero padding).
//!
//! On the host path every collective waits for the executor's queued work and then runs
//! synchronously: overlapping communication with compute needs device streams.

use super::collective::Collective;
use super::sharding::{ShardCall, ShardLayout, ShardingConfig, Stage};
use crate::exec::{Executor, HostCalls};
use crate::graph::{TensorId, TensorInfo};
use crate::tensor::HostTensor;
use crate::Result;

/// PyTorch DDP's default bucket (25 MB of f32).
pub const DEFAULT_BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

pub struct DataParallel {
    coll: Box<dyn Collective>,
    pub sharding: ShardingConfig,
    bucket_elems: usize,
    layout: Option<ShardLayout>,
}

impl DataParallel {
    pub fn new(coll: Box<dyn Collective>, sharding: ShardingConfig) -> Self {
        DataParallel {
            coll,
            sharding,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
            layout: None,
        }
    }

    /// Bucket size of the whole-model collectives, in elements.
    pub fn with_bucket_elems(mut self, n: usize) -> Self {
        self.bucket_elems = n.max(1);
        self
    }

    pub fn rank(&self) -> usize {
        self.coll.rank()
    }
    pub fn world_size(&self) -> usize {
        self.coll.world_size()
    }
    pub fn stage(&self) -> Stage {
        self.sharding.stage
    }
    pub fn is_sharded(&self) -> bool {
        self.sharding.stage != Stage::DataParallel
    }
    pub fn collective(&mut self) -> &mut dyn Collective {
        self.coll.as_mut()
    }

    /// Lays the trainable tensors (element counts, in the trainer's order) out in slices
    /// over the ranks and returns the layout.
    pub fn assign(&mut self, sizes: &[usize]) -> ShardLayout {
        let l = ShardLayout::new(sizes, self.rank(), self.world_size());
        self.layout = Some(l.clone());
        l
    }

    pub fn layout(&self) -> Result<&ShardLayout> {
        self.layout
            .as_ref()
            .ok_or_else(|| crate::msg!("data parallel: assign() must see the trainer's tensors first"))
    }

    /// This rank's contiguous share of a step's `per_rank * world` micro-batches.
    pub fn my_share<T>(&self, items: Vec<T>, per_rank: usize) -> Vec<T> {
        let start = self.rank() * per_rank;
        items.into_iter().skip(start).take(per_rank).collect()
    }

    /// Sums small values over ranks (exact for counts below 2^24).
    pub fn sum(&mut self, v: &mut [f64]) -> Result<()> {
        let mut b: Vec<f32> = v.iter().map(|&x| x as f32).collect();
        self.coll.all_reduce(&mut b)?;
        v.iter_mut().zip(b).for_each(|(x, y)| *x = y as f64);
        Ok(())
    }

    /// True on every rank when it is true on any rank (a stop request, for instance).
    pub fn any(&mut self, flag: bool) -> Result<bool> {
        let mut v = [flag as u8 as f64];
        self.sum(&mut v)?;
        Ok(v[0] > 0.0)
    }

    pub fn barrier(&mut self) -> Result<()> {
        self.coll.barrier()
    }

    /// Slot offsets of tensors `ts` in a packed chunk, and the chunk's length.
    fn slots(l: &ShardLayout, ts: &[usize]) -> (Vec<usize>, usize) {
        let mut at = 0;
        let offs = ts
            .iter()
            .map(|&i| {
                let o = at;
                at += l.chunk(i);
                o
            })
            .collect();
        (offs, at)
    }

    /// The full values of tensors `ts` from every rank's slice: `own[k]` is this rank's
    /// slice of tensor `ts[k]` (empty where it owns none). One all-gather.
    pub fn gather_slices(&mut self, ts: &[usize], own: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let l = self.layout()?.clone();
        self.gather_in(&l, ts, own)
    }

    /// [`Self::gather_slices`] of tensors `ts` of layout `l`.
    pub fn gather_in(&mut self, l: &ShardLayout, ts: &[usize], own: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let (offs, chunk) = Self::slots(l, ts);
        let mut send = vec![0f32; chunk];
        for ((&i, &o), v) in ts.iter().zip(&offs).zip(own) {
            if v.len() != l.mine(i).len() {
                return Err(crate::msg!(
                    "gather: tensor {i}: {} values for a slice of {}",
                    v.len(),
                    l.mine(i).len()
                ));
            }
            send[o..o + v.len()].copy_from_slice(v);
        }
        let mut all = vec![0f32; chunk * l.world];
        self.coll.all_gather(&send, &mut all)?;
        Ok(ts
            .iter()
            .zip(&offs)
            .map(|(&i, &o)| {
                (0..l.world)
                    .flat_map(|r| {
                        let at = r * chunk + o;
                        all[at..at + l.range(i, r).len()].iter().copied()
                    })
                    .collect()
            })
            .collect())
    }

    /// This rank's slices of the sums over ranks of tensors `ts`, whose full values on this
    /// rank are `full[k]`. One reduce-scatter.
    pub fn reduce_scatter_slices(&mut self, ts: &[usize], full: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        let l = self.layout()?.clone();
        let (offs, chunk) = Self::slots(&l, ts);
        let mut send = vec![0f32; chunk * l.world];
        for ((&i, &o), v) in ts.iter().zip(&offs).zip(full) {
            if v.len() != l.numel(i) {
                return Err(crate::msg!(
                    "reduce-scatter: tensor {i}: {} values for {}",
                    v.len(),
                    l.numel(i)
                ));
            }
            for r in 0..l.world {
                let s = l.range(i, r);
                let at = r * chunk + o;
                send[at..at + s.len()].copy_from_slice(&v[s]);
            }
        }
        let mut mine = vec![0f32; chunk];
        self.coll.reduce_scatter(&send, &mut mine)?;
        Ok(ts
            .iter()
            .zip(&offs)
            .map(|(&i, &o)| mine[o..o + l.mine(i).len()].to_vec())
            .collect())
    }

    /// Tensors `0..n` in consecutive groups whose packed buffers over all ranks stay within
    /// the bucket size (a larger tensor is a group by itself).
    fn buckets(&self, n: usize) -> Result<Vec<Vec<usize>>> {
        let l = self.layout()?;
        let mut out: Vec<Vec<usize>> = Vec::new();
        let mut size = 0;
        for i in 0..n {
            let s = l.chunk(i) * l.world;
            match out.last_mut() {
                Some(b) if size + s <= self.bucket_elems => b.push(i),
                _ => {
                    out.push(vec![i]);
                    size = 0;
                }
            }
            size += s;
        }
        Ok(out)
    }

    /// [`DataParallel::gather_slices`] of every trainable tensor, in buckets.
    pub fn gather_all(&mut self, own: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        self.check_len(own.len())?;
        let mut out = Vec::with_capacity(own.len());
        for b in self.buckets(own.len())? {
            let part: Vec<Vec<f32>> = b.iter().map(|&i| own[i].clone()).collect();
            out.extend(self.gather_slices(&b, &part)?);
        }
        Ok(out)
    }

    /// Makes the accumulated gradients (`grads[i]` of trainable tensor i) global sums:
    /// all-reduced in buckets, or under ZeRO-1 reduce-scattered so each rank's accumulator
    /// holds the sum in its slice and zeros elsewhere. Under ZeRO-2 and 3 the step graph
    /// reduced them after each micro-batch already.
    pub async fn reduce_gradients(&mut self, ex: &mut Executor, grads: &[TensorId]) -> Result<()> {
        match self.stage() {
            Stage::Zero2 | Stage::Zero3 => return Ok(()),
            Stage::DataParallel | Stage::Zero1 => {}
        }
        self.check_len(grads.len())?;
        for b in self.buckets(grads.len())? {
            let ids: Vec<TensorId> = b.iter().map(|&i| grads[i]).collect();
            let vals = ex.get_tensors_async(&ids).await?;
            let full: Vec<Vec<f32>> = vals.iter().map(|v| v.to_f32()).collect();
            if self.stage() == Stage::DataParallel {
                let mut flat: Vec<f32> = full.concat();
                self.coll.all_reduce(&mut flat)?;
                let mut at = 0;
                for (t, v) in ids.iter().zip(&vals) {
                    let k = v.numel();
                    ex.set_tensor(*t, &HostTensor::from_f32(&v.shape, &flat[at..at + k]).cast(v.dtype))?;
                    at += k;
                }
                continue;
            }
            let mine = self.reduce_scatter_slices(&b, &full)?;
            let l = self.layout()?;
            for ((&i, t), (v, m)) in b.iter().zip(&ids).zip(vals.iter().zip(mine)) {
                let mut whole = vec![0f32; v.numel()];
                whole[l.mine(i)].copy_from_slice(&m);
                ex.set_tensor(*t, &HostTensor::from_f32(&v.shape, &whole).cast(v.dtype))?;
            }
        }
        Ok(())
    }

    /// ZeRO-1 and 2: every rank's copy of every trainable tensor (`params`, full on each
    /// rank) becomes the owners' updated slices put together. Nothing to do without
    /// sharding (all ranks updated identically) or under ZeRO-3 (parameters stay sharded).
    pub async fn gather_parameters(&mut self, ex: &mut Executor, params: &[TensorId]) -> Result<()> {
        match self.stage() {
            Stage::DataParallel | Stage::Zero3 => return Ok(()),
            Stage::Zero1 | Stage::Zero2 => {}
        }
        self.check_len(params.len())?;
        for b in self.buckets(params.len())? {
            let ids: Vec<TensorId> = b.iter().map(|&i| params[i]).collect();
            let vals = ex.get_tensors_async(&ids).await?;
            let l = self.layout()?;
            let own: Vec<Vec<f32>> = b
                .iter()
                .zip(&vals)
                .map(|(&i, v)| v.to_f32()[l.mine(i)].to_vec())
                .collect();
            let full = self.gather_slices(&b, &own)?;
            for ((t, v), f) in ids.iter().zip(&vals).zip(full) {
                ex.set_tensor(*t, &HostTensor::from_f32(&v.shape, &f).cast(v.dtype))?;
            }
        }
        Ok(())
    }

    fn check_len(&self, n: usize) -> Result<()> {
        let have = self.layout()?.tensors();
        if n != have {
            return Err(crate::msg!(
                "data parallel: {n} tensors given, {have} assigned; assign() must see the trainer's tensors"
            ));
        }
        Ok(())
    }
}

/// This rank's slices of tensors `ts` of layout `l` (an input for each non-empty one),
/// all-gathered into full tensors of the outputs' shapes and types.
fn gather(
    dp: &mut DataParallel,
    l: &ShardLayout,
    ts: &[usize],
    inputs: Vec<HostTensor>,
    outputs: &[&TensorInfo],
) -> Result<Vec<HostTensor>> {
    let mut inputs = inputs.into_iter();
    let own: Vec<Vec<f32>> = ts
        .iter()
        .map(|&i| match l.mine(i).is_empty() {
            true => Vec::new(),
            false => inputs.next().map(|t| t.to_f32()).unwrap_or_default(),
        })
        .collect();
    let full = dp.gather_in(l, ts, &own)?;
    Ok(full
        .iter()
        .zip(outputs)
        .map(|(v, o)| HostTensor::from_f32(&o.shape, v).cast(o.dtype))
        .collect())
}

/// The host calls of a sharded step graph ([`ShardCall`]s), run on this rank's collective.
pub struct ShardCalls<'a> {
    pub dp: &'a mut DataParallel,
    pub calls: &'a [ShardCall],
}

impl HostCalls for ShardCalls<'_> {
    fn call(&mut self, id: u32, inputs: Vec<HostTensor>, outputs: &[&TensorInfo]) -> Result<Vec<HostTensor>> {
        let call = self
            .calls
            .get(id as usize)
            .ok_or_else(|| crate::msg!("host call {id}: the step graph has {} calls", self.calls.len()))?;
        let l = self.dp.layout()?.clone();
        match call {
            ShardCall::Gather(ts) => gather(self.dp, &l, ts, inputs, outputs),
            ShardCall::GatherFrozen(sizes) => {
                let frozen = ShardLayout::new(sizes, l.rank, l.world);
                gather(self.dp, &frozen, &(0..sizes.len()).collect::<Vec<_>>(), inputs, outputs)
            }
            ShardCall::ReduceScatter(ts) => {
                let full: Vec<Vec<f32>> = inputs.iter().map(|t| t.to_f32()).collect();
                let mine = self.dp.reduce_scatter_slices(ts, &full)?;
                let kept = ts.iter().zip(mine).filter(|(&i, _)| !l.mine(i).is_empty());
                Ok(kept
                    .zip(outputs)
                    .map(|((_, v), o)| HostTensor::from_f32(&o.shape, &v).cast(o.dtype))
                    .collect())
            }
        }
    }
}
