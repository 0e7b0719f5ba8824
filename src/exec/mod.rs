//! Compiles a graph for a backend and runs it.
//!
//! A graph holds every node of a training run (forward, backward, gradient accumulation,
//! optimizer). A *program* is the subset needed for some outputs and in-place effects:
//! the micro-step (forward + backward + accumulate), the optimizer step, evaluation.
//! Programs share the persistent tensors and one transient arena, sized for the largest
//! program, so the exact peak is known before anything runs.

pub mod host;
pub mod plan;

pub use host::{HostCalls, NoHostCalls};

use crate::backend::{Arg, Backend, BufferId, Loc};
use crate::graph::fuse::FuseOptions;
use crate::graph::{Graph, NodeId, Role, TensorId, TensorInfo};
use crate::ops::Op;
use crate::tensor::HostTensor;
use crate::{Error, Result};
use plan::Interval;
use std::collections::{BTreeSet, HashMap, HashSet};

/// What a program must produce.
#[derive(Clone, Debug)]
pub struct ProgramSpec {
    pub name: String,
    /// Tensors read back after the run.
    pub outputs: Vec<TensorId>,
    /// In-place nodes (optimizer update, gradient accumulation) that must run.
    pub effects: Vec<NodeId>,
}

impl ProgramSpec {
    pub fn new(name: &str, outputs: &[TensorId], effects: &[NodeId]) -> Self {
        ProgramSpec {
            name: name.into(),
            outputs: outputs.to_vec(),
            effects: effects.to_vec(),
        }
    }
}

/// Bytes per kind of persistent tensor.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PersistentBytes {
    pub frozen_weights: u64,
    pub trainable_parameters: u64,
    pub optimizer_state: u64,
    pub constants: u64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramPlan {
    pub name: String,
    pub nodes: usize,
    /// Peak of the transient arena while this program runs.
    pub transient_peak: u64,
    /// Sum of the transient tensors' sizes, as if nothing were reused.
    pub transient_sum: u64,
    /// The most bytes of host-call outputs live at once (sharded training: the gathered
    /// parameters in flight and the reduced gradient slices before they are accumulated).
    pub host_output_peak: u64,
}

/// The memory plan, known before the first step.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MemoryPlan {
    pub persistent: PersistentBytes,
    pub persistent_bytes: u64,
    /// The transient arena: the largest program's peak.
    pub transient_bytes: u64,
    pub programs: Vec<ProgramPlan>,
    /// Everything the executor allocates on the device.
    pub total_bytes: u64,
}

struct Compiled {
    spec: ProgramSpec,
    schedule: Vec<NodeId>,
    /// Transient locations of this program (persistent ones are shared).
    locs: HashMap<TensorId, Loc>,
    /// Input-role tensors the caller must upload.
    inputs: Vec<TensorId>,
    /// The program has host calls (so it is never captured as a CUDA graph).
    host_calls: bool,
}

pub struct Executor {
    graph: Graph,
    backend: Box<dyn Backend>,
    persistent: HashMap<TensorId, Loc>,
    /// Persistent tensors whose values were set (weights) or zeroed (state).
    initialized: HashSet<TensorId>,
    programs: Vec<Compiled>,
    plan: MemoryPlan,
}

/// Product epilogues are fused (`graph::fuse`) unless `FERROTUNE_FUSE=0`, which keeps
/// the graph as built (for comparisons and debugging).
fn fusion_enabled() -> bool {
    std::env::var("FERROTUNE_FUSE").map_or(true, |v| v != "0")
}

/// The switchable rewrites: `FERROTUNE_FUSE_LOW_RANK_SWIGLU=1` turns on `swiglu_low_rank`,
/// `FERROTUNE_FUSE_ROPED_DQ=1` turns on `roped_dq`, `FERROTUNE_FUSE_CE_WITH_GRAD=1` turns on
/// `cross_entropy_with_grad`, `FERROTUNE_FUSE_LOW_RANK_GRADS=0` turns off `low_rank_grads`.
fn fusion_options() -> FuseOptions {
    let var = |name: &str| std::env::var(name).ok();
    FuseOptions {
        low_rank_swiglu: var("FERROTUNE_FUSE_LOW_RANK_SWIGLU").as_deref() == Some("1"),
        low_rank_grads: var("FERROTUNE_FUSE_LOW_RANK_GRADS").as_deref() != Some("0"),
        roped_dq: var("FERROTUNE_FUSE_ROPED_DQ").as_deref() == Some("1"),
        cross_entropy_with_grad: var("FERROTUNE_FUSE_CE_WITH_GRAD").as_deref() == Some("1"),
    }
}

/// Follows reshapes back to the tensor that owns the memory.
fn storage_root(g: &Graph, t: TensorId) -> TensorId {
    root_and_offset(g, t).0
}

/// The tensor that owns `t`'s memory and where `t` starts in it, in bytes (views start
/// inside their input).
fn root_and_offset(g: &Graph, mut t: TensorId) -> (TensorId, u64) {
    let mut offset = 0u64;
    while let Some(node) = g.alias_producer(t) {
        t = node.inputs[0];
        offset += (node.op.alias_offset() * g.dtype(t).size()) as u64;
    }
    (t, offset)
}

/// Nodes needed for `spec`, in graph (= topological) order: what its program runs.
pub fn select_nodes(g: &Graph, spec: &ProgramSpec) -> Result<Vec<NodeId>> {
    let mut needed: BTreeSet<u32> = BTreeSet::new();
    let mut stack: Vec<TensorId> = spec.outputs.clone();
    for &n in &spec.effects {
        if n.idx() >= g.nodes.len() {
            return Err(crate::msg!("program {}: node {} does not exist", spec.name, n.0));
        }
        needed.insert(n.0);
        stack.extend(&g.node(n).inputs);
    }
    let mut seen: HashSet<TensorId> = HashSet::new();
    while let Some(t) = stack.pop() {
        if !seen.insert(t) {
            continue;
        }
        if let Some(n) = g.producer[t.idx()] {
            if needed.insert(n.0) {
                stack.extend(&g.node(n).inputs);
            }
        }
    }
    Ok(needed.into_iter().map(NodeId).collect())
}

/// In-place writes must come after every other read of the tensor they write.
fn check_write_order(g: &Graph, name: &str, schedule: &[NodeId]) -> Result<()> {
    for (p, &n) in schedule.iter().enumerate() {
        let node = g.node(n);
        for &w in node.op.writes() {
            let t = node.inputs[w];
            for &later in &schedule[p + 1..] {
                if g.node(later).inputs.contains(&t) {
                    return Err(crate::msg!(
                        "program {name}: {} writes {} in place before {} reads it",
                        node.op.name(),
                        g.info(t).name,
                        g.node(later).op.name()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A tensor larger than the device's largest buffer cannot be placed: names it and says
/// what makes it smaller.
fn check_fits(g: &Graph, t: TensorId, chunk: u64, backend: &'static str) -> Result<()> {
    let info = g.info(t);
    let bytes = info.bytes() as u64;
    if bytes <= chunk {
        return Ok(());
    }
    let size = |b: u64| match b {
        b if b >= 1 << 30 => format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64),
        b => format!("{b} bytes"),
    };
    let hint = if info.name.starts_with("attn_") {
        "; eager attention's scores grow with the square of sequence_len: \
         `attn_implementation: sdpa` keeps attention memory linear in it"
    } else {
        ""
    };
    Err(Error::backend(
        backend,
        format!(
            "tensor `{}` {:?} {} needs {}, more than the largest buffer this device allows \
             ({}): shorten sequence_len or micro_batch_size{hint}",
            info.name,
            info.shape,
            info.dtype,
            size(bytes),
            size(chunk)
        ),
    ))
}

impl Executor {
    /// Plans memory for all programs, allocates it, and prepares every kernel.
    pub fn new(graph: Graph, backend: Box<dyn Backend>, specs: &[ProgramSpec]) -> Result<Self> {
        Self::with_fusion(graph, backend, specs, fusion_enabled().then(fusion_options))
    }

    /// [`Executor::new`], fusing product epilogues (`graph::fuse`, with these options) only
    /// when `fuse` is given and the backend runs the fused products.
    pub fn with_fusion(
        mut graph: Graph,
        mut backend: Box<dyn Backend>,
        specs: &[ProgramSpec],
        fuse: Option<FuseOptions>,
    ) -> Result<Self> {
        if let Some(opts) = fuse.filter(|_| backend.fuses_matmul_epilogues()) {
            let keep: HashSet<TensorId> = specs.iter().flat_map(|s| s.outputs.iter().copied()).collect();
            let programs = specs
                .iter()
                .map(|s| Ok(select_nodes(&graph, s)?.iter().map(|n| n.idx()).collect()))
                .collect::<Result<Vec<HashSet<usize>>>>()?;
            crate::graph::fuse::matmul_epilogues_in(&mut graph, &keep, &programs, opts);
        }
        let g = &graph;
        let align = backend.alignment();
        let chunk = backend.max_buffer_bytes();
        let mut schedules = Vec::new();
        for spec in specs {
            for &o in &spec.outputs {
                if o.idx() >= g.tensors.len() {
                    return Err(crate::msg!(
                        "program {}: output tensor {} does not exist",
                        spec.name,
                        o.0
                    ));
                }
            }
            let s = select_nodes(g, spec)?;
            check_write_order(g, &spec.name, &s)?;
            schedules.push(s);
        }

        // Persistent tensors touched by any program, laid out once.
        let mut persist: BTreeSet<TensorId> = BTreeSet::new();
        for s in &schedules {
            for &n in s {
                for &t in g.node(n).inputs.iter() {
                    if g.info(t).role.is_persistent() {
                        persist.insert(t);
                    }
                }
            }
        }
        for spec in specs {
            persist.extend(spec.outputs.iter().filter(|t| g.info(**t).role.is_persistent()));
        }
        let persist: Vec<TensorId> = persist.into_iter().collect();
        for &t in &persist {
            if g.producer[t.idx()].is_some() {
                return Err(crate::msg!(
                    "tensor {} has a persistent role but is produced by an op",
                    g.info(t).name
                ));
            }
        }
        for &t in &persist {
            check_fits(g, t, chunk, backend.name())?;
        }
        let sizes: Vec<u64> = persist.iter().map(|&t| g.info(t).bytes() as u64).collect();
        let (p_off, p_total) = plan::layout_sequential(&sizes, align, chunk);
        let mut breakdown = PersistentBytes::default();
        for (&t, &b) in persist.iter().zip(&sizes) {
            match g.info(t).role {
                Role::Frozen => breakdown.frozen_weights += b,
                Role::Parameter => breakdown.trainable_parameters += b,
                Role::OptimizerState => breakdown.optimizer_state += b,
                _ => breakdown.constants += b,
            }
        }

        // Transient tensors per program, planned from their live intervals.
        let mut transient_plans = Vec::new();
        let mut program_plans = Vec::new();
        let mut t_total = 0u64;
        for (spec, sched) in specs.iter().zip(&schedules) {
            let end = sched.len() + 1;
            let mut live: HashMap<TensorId, (usize, usize)> = HashMap::new();
            let mut touch = |t: TensorId, time: usize, def: bool| {
                let r = storage_root(g, t);
                if g.info(r).role.is_persistent() {
                    return;
                }
                let first = if def || g.info(r).role != Role::Input { time } else { 0 };
                let e = live.entry(r).or_insert((first, time));
                e.0 = e.0.min(first);
                e.1 = e.1.max(time);
            };
            for (p, &n) in sched.iter().enumerate() {
                let node = g.node(n);
                for &i in &node.inputs {
                    touch(i, p + 1, false);
                }
                for &o in &node.outputs {
                    touch(o, p + 1, true);
                }
            }
            for &o in &spec.outputs {
                touch(o, end, false);
            }
            let mut roots: Vec<TensorId> = live.keys().copied().collect();
            roots.sort();
            for &r in &roots {
                check_fits(g, r, chunk, backend.name())?;
            }
            let items: Vec<Interval> = roots
                .iter()
                .map(|r| Interval {
                    bytes: g.info(*r).bytes() as u64,
                    first: live[r].0,
                    last: live[r].1,
                })
                .collect();
            let (offs, peak) = plan::layout_intervals(&items, align, chunk);
            t_total = t_total.max(peak);
            let host_out: Vec<&Interval> = roots
                .iter()
                .zip(&items)
                .filter(|(r, _)| g.producer[r.idx()].is_some_and(|n| matches!(g.node(n).op, Op::HostCall { .. })))
                .map(|(_, i)| i)
                .collect();
            let host_output_peak = (0..=end)
                .map(|time| {
                    host_out
                        .iter()
                        .filter(|i| i.first <= time && time <= i.last)
                        .map(|i| i.bytes)
                        .sum::<u64>()
                })
                .max()
                .unwrap_or(0);
            program_plans.push(ProgramPlan {
                name: spec.name.clone(),
                nodes: sched.len(),
                transient_peak: peak,
                transient_sum: items.iter().map(|i| plan::align_up(i.bytes.max(1), align)).sum(),
                host_output_peak,
            });
            transient_plans.push((roots, offs));
        }

        // Allocate the arenas as buffers of at most `chunk` bytes.
        let mut alloc_arena = |total: u64| -> Result<Vec<BufferId>> {
            let mut bufs = Vec::new();
            let mut left = total;
            while left > 0 {
                let b = left.min(chunk);
                bufs.push(backend.alloc(b)?);
                left -= b;
            }
            Ok(bufs)
        };
        let p_bufs = alloc_arena(p_total)?;
        let t_bufs = alloc_arena(t_total)?;
        let at = |bufs: &[BufferId], off: u64, bytes: u64| Loc {
            buffer: bufs[(off / chunk) as usize],
            offset: off % chunk,
            bytes,
        };

        let persistent: HashMap<TensorId, Loc> = persist
            .iter()
            .zip(&p_off)
            .map(|(&t, &o)| (t, at(&p_bufs, o, g.info(t).bytes() as u64)))
            .collect();

        let mut programs = Vec::new();
        for ((spec, sched), (roots, offs)) in specs.iter().zip(schedules).zip(transient_plans) {
            let mut locs: HashMap<TensorId, Loc> = roots
                .iter()
                .zip(&offs)
                .map(|(&t, &o)| (t, at(&t_bufs, o, g.info(t).bytes() as u64)))
                .collect();
            // Aliases point at their root's bytes.
            let mut inputs = BTreeSet::new();
            for &n in &sched {
                let node = g.node(n);
                for &t in node.inputs.iter().chain(&node.outputs) {
                    let (r, off) = root_and_offset(g, t);
                    if off % align != 0 {
                        return Err(crate::msg!(
                            "program {}: {} starts {off} bytes into {}, not a multiple of the {} backend's \
                             alignment ({align} bytes)",
                            spec.name,
                            g.info(t).name,
                            g.info(r).name,
                            backend.name()
                        ));
                    }
                    if let Some(&l) = locs.get(&r).or(persistent.get(&r)) {
                        locs.insert(
                            t,
                            Loc {
                                offset: l.offset + off,
                                bytes: g.info(t).bytes() as u64,
                                ..l
                            },
                        );
                    }
                    if g.info(t).role == Role::Input {
                        inputs.insert(t);
                    }
                }
            }
            for &o in &spec.outputs {
                if g.info(o).role == Role::Input {
                    inputs.insert(o);
                }
            }
            let host_calls = sched.iter().any(|&n| matches!(g.node(n).op, Op::HostCall { .. }));
            programs.push(Compiled {
                spec: spec.clone(),
                schedule: sched,
                locs,
                inputs: inputs.into_iter().collect(),
                host_calls,
            });
        }

        // Kernels are created now, once per distinct op and operand shapes.
        let mut prepared: HashSet<String> = HashSet::new();
        for p in &programs {
            for &n in &p.schedule {
                let node = g.node(n);
                if node.op.is_view() || matches!(node.op, Op::HostCall { .. }) {
                    continue;
                }
                let ins: Vec<&TensorInfo> = node.inputs.iter().map(|&t| g.info(t)).collect();
                let outs: Vec<&TensorInfo> = node.outputs.iter().map(|&t| g.info(t)).collect();
                let key = format!(
                    "{:?}|{:?}|{:?}",
                    node.op,
                    ins.iter().map(|i| (&i.shape, i.dtype)).collect::<Vec<_>>(),
                    outs.iter().map(|i| (&i.shape, i.dtype)).collect::<Vec<_>>()
                );
                if prepared.insert(key) {
                    backend.prepare(&node.op, &ins, &outs)?;
                }
            }
        }

        let plan = MemoryPlan {
            persistent: breakdown,
            persistent_bytes: p_total,
            transient_bytes: t_total,
            programs: program_plans,
            total_bytes: p_total + t_total,
        };
        let mut ex = Executor {
            graph,
            backend,
            persistent,
            initialized: HashSet::new(),
            programs,
            plan,
        };
        // Optimizer state starts at zero.
        let state: Vec<TensorId> = ex
            .persistent
            .keys()
            .copied()
            .filter(|&t| ex.graph.info(t).role == Role::OptimizerState)
            .collect();
        for t in state {
            let info = ex.graph.info(t);
            let zeros = HostTensor::zeros(&info.shape, info.dtype);
            ex.set_tensor(t, &zeros)?;
        }
        Ok(ex)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }
    pub fn plan(&self) -> &MemoryPlan {
        &self.plan
    }
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }
    /// Bytes the backend actually allocated (equals `plan().total_bytes`).
    pub fn allocated_bytes(&self) -> u64 {
        self.backend.allocated_bytes()
    }

    pub fn program_index(&self, name: &str) -> Result<usize> {
        self.programs
            .iter()
            .position(|p| p.spec.name == name)
            .ok_or_else(|| crate::msg!("no program named {name:?}"))
    }

    /// Whether a persistent tensor is used by some program (and so has device memory).
    pub fn holds(&self, t: TensorId) -> bool {
        self.persistent.contains_key(&t)
    }

    /// Checks that `v` has tensor `t`'s shape and dtype.
    pub fn check_host(&self, t: TensorId, v: &HostTensor) -> Result<()> {
        let info = self.graph.info(t);
        if v.shape != info.shape || v.dtype != info.dtype {
            return Err(Error::shape(
                "set_tensor",
                format!(
                    "{} is {:?} {}, got {:?} {}",
                    info.name, info.shape, info.dtype, v.shape, v.dtype
                ),
            ));
        }
        Ok(())
    }

    /// Sets a persistent tensor (weights, state) from host values.
    pub fn set_tensor(&mut self, t: TensorId, v: &HostTensor) -> Result<()> {
        self.check_host(t, v)?;
        let loc = *self.persistent.get(&t).ok_or_else(|| {
            crate::msg!(
                "{} is not used by any program, so it has no memory",
                self.graph.info(t).name
            )
        })?;
        self.backend.write(loc, &v.data)?;
        self.initialized.insert(t);
        Ok(())
    }

    /// Reads persistent tensors back to the host.
    pub async fn get_tensors_async(&mut self, ts: &[TensorId]) -> Result<Vec<HostTensor>> {
        let mut locs = Vec::new();
        for &t in ts {
            locs.push(
                *self
                    .persistent
                    .get(&t)
                    .ok_or_else(|| crate::msg!("{} has no device memory", self.graph.info(t).name))?,
            );
        }
        self.backend.flush()?;
        let data = self.backend.read_async(&locs).await?;
        Ok(ts
            .iter()
            .zip(data)
            .map(|(&t, d)| {
                let i = self.graph.info(t);
                HostTensor {
                    shape: i.shape.clone(),
                    dtype: i.dtype,
                    data: d,
                }
            })
            .collect())
    }

    /// [`Executor::get_tensors_async`], blocking.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn get_tensors(&mut self, ts: &[TensorId]) -> Result<Vec<HostTensor>> {
        pollster::block_on(self.get_tensors_async(ts))
    }

    /// [`Executor::run_async`], blocking.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run(&mut self, program: usize, inputs: &[(TensorId, &HostTensor)]) -> Result<Vec<HostTensor>> {
        pollster::block_on(self.run_async(program, inputs))
    }

    /// [`Executor::run_with_async`], blocking.
    #[cfg(not(target_arch = "wasm32"))]
    pub fn run_with(
        &mut self,
        program: usize,
        inputs: &[(TensorId, &HostTensor)],
        host: &mut dyn HostCalls,
    ) -> Result<Vec<HostTensor>> {
        pollster::block_on(self.run_with_async(program, inputs, host))
    }

    /// Runs one program: uploads `inputs`, runs every node, reads back the outputs.
    pub async fn run_async(&mut self, program: usize, inputs: &[(TensorId, &HostTensor)]) -> Result<Vec<HostTensor>> {
        self.run_with_async(program, inputs, &mut NoHostCalls).await
    }

    /// Whether program `program` has host calls (and so must be run with [`Executor::run_with`]).
    pub fn has_host_calls(&self, program: usize) -> bool {
        self.programs[program].host_calls
    }

    /// [`Executor::run_async`] for a program with host calls, which `host` computes.
    pub async fn run_with_async(
        &mut self,
        program: usize,
        inputs: &[(TensorId, &HostTensor)],
        host: &mut dyn HostCalls,
    ) -> Result<Vec<HostTensor>> {
        let p = &self.programs[program];
        let g = &self.graph;
        let given: HashMap<TensorId, &HostTensor> = inputs.iter().map(|(t, v)| (*t, *v)).collect();
        for &t in &p.inputs {
            let Some(v) = given.get(&t) else {
                return Err(crate::msg!(
                    "program {}: input {} was not given",
                    p.spec.name,
                    g.info(t).name
                ));
            };
            self.check_host(t, v)?;
        }
        for &n in &p.schedule {
            for t in &g.node(n).inputs {
                if g.info(*t).role.is_persistent() && !self.initialized.contains(t) {
                    return Err(crate::msg!(
                        "program {}: {} was never set",
                        p.spec.name,
                        g.info(*t).name
                    ));
                }
            }
        }
        for &t in &p.inputs {
            self.backend.write(p.locs[&t], &given[&t].data)?;
        }
        // A backend that recorded this program's launches before (a CUDA graph) replays them.
        // Programs with host calls are never recorded: the host work happens between launches.
        let replayed = !p.host_calls && self.backend.begin_program(program)?;
        for &n in &p.schedule {
            if replayed {
                break;
            }
            let node = g.node(n);
            if node.op.is_view() {
                continue;
            }
            let loc = |t: &TensorId| -> Loc {
                self.persistent
                    .get(t)
                    .or_else(|| p.locs.get(t))
                    .copied()
                    .expect("planned")
            };
            if let Op::HostCall { id, .. } = node.op {
                // The queued work must be done before its results are read, and before
                // the outputs' bytes (which earlier tensors may have used) are overwritten.
                self.backend.flush()?;
                let in_locs: Vec<Loc> = node.inputs.iter().map(loc).collect();
                let data = self.backend.read_async(&in_locs).await?;
                let values: Vec<HostTensor> = node
                    .inputs
                    .iter()
                    .zip(data)
                    .map(|(&t, d)| HostTensor {
                        shape: g.info(t).shape.clone(),
                        dtype: g.info(t).dtype,
                        data: d,
                    })
                    .collect();
                let outs: Vec<&TensorInfo> = node.outputs.iter().map(|&t| g.info(t)).collect();
                let results = host.call(id, values, &outs)?;
                host::check_outputs(id, &results, &outs)?;
                for (t, v) in node.outputs.iter().zip(&results) {
                    self.backend.write(loc(t), &v.data)?;
                }
                continue;
            }
            let ins: Vec<Arg> = node
                .inputs
                .iter()
                .map(|t| Arg {
                    loc: loc(t),
                    info: g.info(*t),
                })
                .collect();
            let outs: Vec<Arg> = node
                .outputs
                .iter()
                .map(|t| Arg {
                    loc: loc(t),
                    info: g.info(*t),
                })
                .collect();
            self.backend.launch(&node.op, &ins, &outs).map_err(|e| match e {
                Error::Backend { backend, msg } => Error::Backend {
                    backend,
                    msg: format!("{} (node {}): {msg}", node.op.name(), n.0),
                },
                e => e,
            })?;
        }
        if !p.host_calls {
            self.backend.end_program(program)?;
        }
        self.backend.flush()?;
        let locs: Vec<Loc> = p
            .spec
            .outputs
            .iter()
            .map(|t| {
                self.persistent
                    .get(t)
                    .or_else(|| p.locs.get(t))
                    .copied()
                    .expect("planned")
            })
            .collect();
        let data = self.backend.read_async(&locs).await?;
        Ok(p.spec
            .outputs
            .iter()
            .zip(data)
            .map(|(&t, d)| {
                let i = g.info(t);
                HostTensor {
                    shape: i.shape.clone(),
                    dtype: i.dtype,
                    data: d,
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::plan::PlanBackend;
    use crate::tensor::DType;

    #[test]
    fn a_tensor_larger_than_the_largest_buffer_is_named() {
        let mut g = Graph::new();
        let x = g.input("x", &[64, 32], DType::F32);
        let y = g.matmul(x, x, false, true).unwrap();
        g.set_name(y, "attn_scores.7".to_string());
        let spec = ProgramSpec::new("p", &[y], &[]);
        let small = Box::new(PlanBackend::new("wgsl", 256, 8192));
        let e = Executor::new(g.clone(), small, std::slice::from_ref(&spec))
            .err()
            .expect("16 KiB > 8 KiB")
            .to_string();
        assert!(
            e.contains("tensor `attn_scores.7` [64, 64] f32 needs 16384 bytes, more than the largest buffer this device allows (8192 bytes)")
                && e.contains("attn_implementation: sdpa"),
            "{e}"
        );
        Executor::new(g, Box::new(PlanBackend::new("wgsl", 256, 16384)), &[spec]).unwrap();
    }
}
