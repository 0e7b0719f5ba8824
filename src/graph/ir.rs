//! The dataflow graph: tensors (shape, dtype, role) and op nodes.
//!
//! Nodes are appended in dependency order (an op's inputs exist before it), so the node
//! index order is always a valid topological schedule. In-place ops (the optimizer update,
//! gradient accumulation) name the tensors they write in `Op::writes`; they have no outputs.

use crate::ops::Op;
use crate::tensor::{numel, DType};
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorId(pub u32);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub u32);

impl TensorId {
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}
impl NodeId {
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

/// What a tensor is for; decides where the executor keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    /// Uploaded every step (token ids, labels, positions, segment ids, scalars).
    Input,
    /// Trainable weight (LoRA A/B, or every weight in a full fine-tune).
    Parameter,
    /// Weight that is read but never trained (the base model under LoRA).
    Frozen,
    /// Fixed values that are not weights (rotary inverse frequencies).
    Constant,
    /// Optimizer state and gradient accumulators: live across steps.
    OptimizerState,
    /// Produced by a forward op.
    Activation,
    /// Produced by a backward op.
    Gradient,
}

impl Role {
    /// Persistent tensors keep their values between steps and programs.
    pub fn is_persistent(self) -> bool {
        matches!(
            self,
            Role::Parameter | Role::Frozen | Role::Constant | Role::OptimizerState
        )
    }
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub role: Role,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub op: Op,
    pub inputs: Vec<TensorId>,
    pub outputs: Vec<TensorId>,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    pub tensors: Vec<TensorInfo>,
    pub nodes: Vec<Node>,
    /// The node that produces each tensor (None for leaves).
    pub producer: Vec<Option<NodeId>>,
    /// Role given to the outputs of new nodes (switched to Gradient by autodiff).
    pub(crate) output_role: Option<Role>,
}

impl Graph {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn info(&self, t: TensorId) -> &TensorInfo {
        &self.tensors[t.idx()]
    }
    pub fn shape(&self, t: TensorId) -> &[usize] {
        &self.tensors[t.idx()].shape
    }
    pub fn dtype(&self, t: TensorId) -> DType {
        self.tensors[t.idx()].dtype
    }
    pub fn node(&self, n: NodeId) -> &Node {
        &self.nodes[n.idx()]
    }

    /// Adds a leaf tensor (input, weight, constant or state).
    pub fn leaf(&mut self, name: impl Into<String>, shape: &[usize], dtype: DType, role: Role) -> TensorId {
        let id = TensorId(self.tensors.len() as u32);
        self.tensors.push(TensorInfo {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            role,
        });
        self.producer.push(None);
        id
    }

    /// Appends an op node after checking its inputs with the op's shape rule.
    pub fn apply(&mut self, op: Op, inputs: &[TensorId]) -> Result<Vec<TensorId>> {
        for &t in inputs {
            if t.idx() >= self.tensors.len() {
                return Err(Error::shape(op.name(), format!("input tensor {t:?} does not exist")));
            }
        }
        let infos: Vec<&TensorInfo> = inputs.iter().map(|&t| self.info(t)).collect();
        let outs = op.infer(&infos).map_err(|msg| {
            let desc: Vec<String> = infos
                .iter()
                .map(|i| format!("{} {:?} {}", i.name, i.shape, i.dtype))
                .collect();
            Error::shape(op.name(), format!("{msg} (inputs: {})", desc.join(", ")))
        })?;
        let nid = NodeId(self.nodes.len() as u32);
        let role = self.output_role.unwrap_or(Role::Activation);
        let mut out_ids = Vec::with_capacity(outs.len());
        for (k, (shape, dtype)) in outs.into_iter().enumerate() {
            let name = format!(
                "{}.{}{}",
                op.name(),
                nid.0,
                if k > 0 { format!(".{k}") } else { String::new() }
            );
            let id = self.leaf(name, &shape, dtype, role);
            self.producer[id.idx()] = Some(nid);
            out_ids.push(id);
        }
        self.nodes.push(Node {
            op,
            inputs: inputs.to_vec(),
            outputs: out_ids.clone(),
        });
        Ok(out_ids)
    }

    /// Like [`Graph::apply`] for ops with exactly one output.
    pub fn apply1(&mut self, op: Op, inputs: &[TensorId]) -> Result<TensorId> {
        let name = op.name();
        let outs = self.apply(op, inputs)?;
        match outs.as_slice() {
            [one] => Ok(*one),
            _ => Err(Error::shape(
                name,
                format!("expected one output, op has {}", outs.len()),
            )),
        }
    }

    /// The node whose input 0's buffer `t` is (`Op::is_alias` for the output `t` is), or
    /// `None` when `t` owns its memory.
    pub fn alias_producer(&self, t: TensorId) -> Option<&Node> {
        let node = self.node(self.producer[t.idx()]?);
        let k = node.outputs.iter().position(|&o| o == t).unwrap_or(0);
        node.op.is_alias(k).then_some(node)
    }

    /// Renames a tensor (model code names activations it wants to find again).
    pub fn set_name(&mut self, t: TensorId, name: impl Into<String>) {
        self.tensors[t.idx()].name = name.into();
    }

    pub fn find(&self, name: &str) -> Option<TensorId> {
        self.tensors
            .iter()
            .position(|t| t.name == name)
            .map(|i| TensorId(i as u32))
    }

    /// All tensors with a given role, in creation order.
    pub fn with_role(&self, role: Role) -> Vec<TensorId> {
        (0..self.tensors.len() as u32)
            .map(TensorId)
            .filter(|&t| self.info(t).role == role)
            .collect()
    }

    /// Puts the nodes in `order` (each node once, after the producers of its inputs), so
    /// index order stays a valid schedule, and returns the new id of each old node.
    pub fn reorder(&mut self, order: &[NodeId]) -> Result<Vec<NodeId>> {
        let n = self.nodes.len();
        let mut new_id = vec![None; n];
        for (k, &old) in order.iter().enumerate() {
            if old.idx() >= n || new_id[old.idx()].is_some() {
                return Err(crate::msg!("reorder: node {} is missing or given twice", old.0));
            }
            new_id[old.idx()] = Some(NodeId(k as u32));
        }
        let new_id: Vec<NodeId> = new_id
            .into_iter()
            .collect::<Option<_>>()
            .ok_or_else(|| crate::msg!("reorder: {} nodes given for {n}", order.len()))?;
        for (k, &old) in order.iter().enumerate() {
            for t in &self.nodes[old.idx()].inputs {
                if let Some(p) = self.producer[t.idx()] {
                    if new_id[p.idx()].idx() >= k {
                        return Err(crate::msg!(
                            "reorder: {} would run before {}, which produces its input {}",
                            self.nodes[old.idx()].op.name(),
                            self.nodes[p.idx()].op.name(),
                            self.info(*t).name
                        ));
                    }
                }
            }
        }
        let mut old_nodes: Vec<Option<Node>> = std::mem::take(&mut self.nodes).into_iter().map(Some).collect();
        self.nodes = order
            .iter()
            .map(|o| old_nodes[o.idx()].take().expect("each node once"))
            .collect();
        for p in self.producer.iter_mut().flatten() {
            *p = new_id[p.idx()];
        }
        Ok(new_id)
    }

    /// The last node index, for marking where a phase (forward, backward) ends.
    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }
}
