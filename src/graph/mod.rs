//! The static dataflow graph: IR, builder helpers, and reverse-mode autodiff as a
//! graph transformation (backward graphs are ordinary graphs).

pub mod autodiff;
pub mod builder;
pub mod fuse;
pub mod ir;

pub use autodiff::backward;
pub use ir::{Graph, Node, NodeId, Role, TensorId, TensorInfo};
