//! One rank's part of a data-parallel step, between the trainer's executor and a
//! [`Collective`]: its slice of the step's micro-batches, sums of scalars across ranks,
//! gradient reduction (all-reduce in buckets, or reduce-scatter to each tensor's owner
//! under ZeRO) and the all-gather of updated parameters.
//!
//! On the host path the gradients are reduced after the last micro-batch's backward, one
//! bucket at a time (read from the executor, reduced, written back); overlapping the
//! reduction with the backward pass needs device streams.

use super::collective::Collective;
use super::sharding::{assign_owners, ShardingConfig, Stage};
use crate::exec::Executor;
use crate::graph::TensorId;
use crate::tensor::HostTensor;
use crate::Result;

/// PyTorch DDP's default bucket (25 MB of f32).
pub const DEFAULT_BUCKET_ELEMS: usize = 25 * 1024 * 1024 / 4;

#[derive(Clone, Debug)]
struct Owned {
    numel: usize,
    owner: usize,
    /// Where the tensor sits in its owner's segment of a packed buffer.
    offset: usize,
}

pub struct DataParallel {
    coll: Box<dyn Collective>,
    pub sharding: ShardingConfig,
    bucket_elems: usize,
    tensors: Vec<Owned>,
    /// The longest owner segment (at least 1): every rank's chunk of a packed buffer.
    chunk: usize,
}

impl DataParallel {
    pub fn new(coll: Box<dyn Collective>, sharding: ShardingConfig) -> Self {
        DataParallel {
            coll,
            sharding,
            bucket_elems: DEFAULT_BUCKET_ELEMS,
            tensors: Vec::new(),
            chunk: 1,
        }
    }

    /// Gradient all-reduce bucket size in elements.
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

    /// Assigns the trainable tensors (element counts, in the trainer's order) to owners and
    /// returns which of them this rank owns (all, without sharding).
    pub fn assign(&mut self, sizes: &[usize]) -> Vec<bool> {
        let world = self.world_size();
        let owners = if self.is_sharded() {
            assign_owners(sizes, world)
        } else {
            vec![self.rank(); sizes.len()]
        };
        let mut fill = vec![0usize; world];
        self.tensors = sizes
            .iter()
            .zip(&owners)
            .map(|(&numel, &owner)| {
                let offset = fill[owner];
                fill[owner] += numel;
                Owned { numel, owner, offset }
            })
            .collect();
        self.chunk = fill.into_iter().max().unwrap_or(0).max(1);
        let me = self.rank();
        owners.iter().map(|&o| o == me).collect()
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

    /// Makes the accumulated gradients (`grads[i]` of trainable tensor i) global sums:
    /// all-reduced in buckets, or under ZeRO reduce-scattered so each owner holds the sum
    /// of its tensors and the others' copies are zeroed for the next step.
    pub async fn reduce_gradients(&mut self, ex: &mut Executor, grads: &[TensorId]) -> Result<()> {
        self.check_len(grads.len())?;
        if !self.is_sharded() {
            let mut start = 0;
            while start < grads.len() {
                let mut end = start + 1;
                let mut n = self.tensors[start].numel;
                while end < grads.len() && n + self.tensors[end].numel <= self.bucket_elems {
                    n += self.tensors[end].numel;
                    end += 1;
                }
                let vals = ex.get_tensors_async(&grads[start..end]).await?;
                let mut flat: Vec<f32> = vals.iter().flat_map(|t| t.to_f32()).collect();
                self.coll.all_reduce(&mut flat)?;
                let mut at = 0;
                for (t, v) in grads[start..end].iter().zip(&vals) {
                    let k = v.numel();
                    ex.set_tensor(*t, &HostTensor::from_f32(&v.shape, &flat[at..at + k]).cast(v.dtype))?;
                    at += k;
                }
                start = end;
            }
            return Ok(());
        }
        let vals = ex.get_tensors_async(grads).await?;
        let (world, chunk, me) = (self.world_size(), self.chunk, self.rank());
        let mut send = vec![0f32; world * chunk];
        for (o, v) in self.tensors.iter().zip(&vals) {
            let at = o.owner * chunk + o.offset;
            send[at..at + o.numel].copy_from_slice(&v.to_f32());
        }
        let mut mine = vec![0f32; chunk];
        self.coll.reduce_scatter(&send, &mut mine)?;
        for ((o, v), &t) in self.tensors.iter().zip(&vals).zip(grads) {
            let new = if o.owner == me {
                HostTensor::from_f32(&v.shape, &mine[o.offset..o.offset + o.numel]).cast(v.dtype)
            } else {
                HostTensor::zeros(&v.shape, v.dtype)
            };
            ex.set_tensor(t, &new)?;
        }
        Ok(())
    }

    /// Every rank's copy of every trainable tensor becomes its owner's (after the owners'
    /// updates). Without sharding there is nothing to do: all ranks updated identically.
    pub async fn gather_parameters(&mut self, ex: &mut Executor, params: &[TensorId]) -> Result<()> {
        self.check_len(params.len())?;
        if !self.is_sharded() {
            return Ok(());
        }
        let me = self.rank();
        let owned: Vec<usize> = (0..params.len()).filter(|&i| self.tensors[i].owner == me).collect();
        let ids: Vec<TensorId> = owned.iter().map(|&i| params[i]).collect();
        let vals = ex.get_tensors_async(&ids).await?;
        let values: Vec<Option<Vec<f32>>> = {
            let mut v: Vec<Option<Vec<f32>>> = vec![None; params.len()];
            for (&i, t) in owned.iter().zip(&vals) {
                v[i] = Some(t.to_f32());
            }
            v
        };
        let all = self.gather_by_owner(&values)?;
        for (i, &t) in params.iter().enumerate() {
            if self.tensors[i].owner != me {
                let info = ex.graph().info(t).clone();
                ex.set_tensor(t, &HostTensor::from_f32(&info.shape, &all[i]).cast(info.dtype))?;
            }
        }
        Ok(())
    }

    /// Every tensor's values from its owner: `own[i]` is `Some` for the tensors this rank owns.
    pub fn gather_by_owner(&mut self, own: &[Option<Vec<f32>>]) -> Result<Vec<Vec<f32>>> {
        self.check_len(own.len())?;
        let (world, chunk, me) = (self.world_size(), self.chunk, self.rank());
        let mut send = vec![0f32; chunk];
        for (o, v) in self.tensors.iter().zip(own) {
            if o.owner == me {
                let v = v
                    .as_ref()
                    .ok_or_else(|| crate::msg!("gather: rank {me} lacks a tensor it owns"))?;
                send[o.offset..o.offset + o.numel].copy_from_slice(v);
            }
        }
        let mut all = vec![0f32; world * chunk];
        self.coll.all_gather(&send, &mut all)?;
        Ok(self
            .tensors
            .iter()
            .map(|o| {
                let at = o.owner * chunk + o.offset;
                all[at..at + o.numel].to_vec()
            })
            .collect())
    }

    /// The owner of trainable tensor `i`.
    pub fn owner(&self, i: usize) -> usize {
        self.tensors[i].owner
    }

    fn check_len(&self, n: usize) -> Result<()> {
        if n != self.tensors.len() {
            return Err(crate::msg!(
                "data parallel: {n} tensors given, {} assigned; assign() must see the trainer's tensors",
                self.tensors.len()
            ));
        }
        Ok(())
    }
}
