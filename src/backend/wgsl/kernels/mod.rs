//! The op kernels of the WGSL executor backend: one `shaders/*.wgsl` file per op family
//! (each prefixed with `shaders/common.wgsl`) and, per family, the host code that checks
//! dtypes, splits a launch to fit the device and fills the uniforms.
//!
//! Every binding of a shader file has a fixed name and slot. The host declares all of a
//! file's bindings in the prelude with the storage type of this launch's operand (f32 when
//! the entry point does not use it), and binds only those the entry point uses (wgpu
//! derives each pipeline's layout from the bindings its entry point reaches). Every
//! storage binding is `read_write`: an op's inputs and outputs often share one arena
//! buffer, and a buffer may not be bound read-only and writable in one dispatch.

mod attention;
mod attn_eager;
mod elementwise;
mod embedding;
mod loss;
mod matmul_op;
mod norm;
mod optim;
mod reduce;

use crate::backend::Arg;
use crate::error::{Error, Result};
use crate::graph::TensorInfo;
use crate::ops::Op;
use crate::tensor::DType;

use super::launch::{Builder, Operand, Part};
use super::pipelines::ShaderSpec;

/// What a binding holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// f32, f16 or bf16 (the latter two as packed u32 pairs).
    Float,
    I32,
    U32,
}

/// A shader file and its bindings, in slot order (slot 0 is the uniform block).
pub(crate) struct ShaderFile {
    pub name: &'static str,
    pub source: &'static str,
    pub names: &'static [(&'static str, Kind)],
}

macro_rules! shader_source {
    ($file:literal) => {
        concat!(
            include_str!("../../../../shaders/common.wgsl"),
            include_str!(concat!("../../../../shaders/", $file))
        )
    };
}

use Kind::{Float, I32, U32};

pub(crate) static ELEMENTWISE: ShaderFile = ShaderFile {
    name: "elementwise",
    source: shader_source!("elementwise.wgsl"),
    names: &[
        ("a", Float),
        ("b", Float),
        ("x", Float),
        ("y", Float),
        ("seed", U32),
        ("p", Float),
        ("g", Float),
        ("u", Float),
        ("dy", Float),
        ("dg", Float),
        ("du", Float),
        ("acc", Float),
    ],
};

pub(crate) static REDUCE: ShaderFile = ShaderFile {
    name: "reduce",
    source: shader_source!("reduce.wgsl"),
    names: &[("x", Float), ("y", Float), ("part", Float)],
};

pub(crate) static RMSNORM: ShaderFile = ShaderFile {
    name: "rmsnorm",
    source: shader_source!("rmsnorm.wgsl"),
    names: &[
        ("x", Float),
        ("w", Float),
        ("y", Float),
        ("dy", Float),
        ("dx", Float),
        ("part", Float),
        ("acc", Float),
    ],
};

pub(crate) static ROPE: ShaderFile = ShaderFile {
    name: "rope",
    source: shader_source!("rope.wgsl"),
    names: &[("x", Float), ("pos", I32), ("inv", Float), ("y", Float)],
};

/// `shaders/common.wgsl`, the mask rules and an attention file.
macro_rules! masked_source {
    ($file:literal) => {
        concat!(
            include_str!("../../../../shaders/common.wgsl"),
            include_str!("../../../../shaders/attn_mask.wgsl"),
            include_str!(concat!("../../../../shaders/", $file))
        )
    };
}

pub(crate) static ATTENTION: ShaderFile = ShaderFile {
    name: "attention",
    source: masked_source!("attention.wgsl"),
    names: &[
        ("q", Float),
        ("k", Float),
        ("v", Float),
        ("seg", I32),
        ("o", Float),
        ("lse", Float),
        ("dout", Float),
        ("dq", Float),
        ("dk", Float),
        ("dv", Float),
        ("pos", I32),
        ("cache", Float),
        ("x", Float),
        ("slot", I32),
        ("prefix", I32),
        ("rs", I32),
    ],
};

pub(crate) static ATTN_EAGER: ShaderFile = ShaderFile {
    name: "attn_eager",
    source: masked_source!("attn_eager.wgsl"),
    names: &[
        ("x", Float),
        ("y", Float),
        ("seg", I32),
        ("prefix", I32),
        ("rs", I32),
        ("p", Float),
        ("dp", Float),
        ("ds", Float),
    ],
};

pub(crate) static CROSS_ENTROPY: ShaderFile = ShaderFile {
    name: "cross_entropy",
    source: shader_source!("cross_entropy.wgsl"),
    names: &[
        ("logits", Float),
        ("labels", I32),
        ("lse", Float),
        ("loss", Float),
        ("count", Float),
        ("dloss", Float),
        ("dlogits", Float),
    ],
};

pub(crate) static EMBEDDING: ShaderFile = ShaderFile {
    name: "embedding",
    source: shader_source!("embedding.wgsl"),
    names: &[
        ("table", Float),
        ("ids", I32),
        ("y", Float),
        ("dy", Float),
        ("dtable", Float),
    ],
};

pub(crate) static OPTIM: ShaderFile = ShaderFile {
    name: "optim",
    source: shader_source!("optim.wgsl"),
    names: &[
        ("p", Float),
        ("g", Float),
        ("m", Float),
        ("v", Float),
        ("hyper", Float),
        ("coef", Float),
        ("sumsq", Float),
        ("norm", Float),
    ],
};

/// Every shader file, for tests that compile them all.
pub fn shader_files() -> Vec<(&'static str, &'static str)> {
    [
        &ELEMENTWISE,
        &REDUCE,
        &RMSNORM,
        &ROPE,
        &ATTENTION,
        &ATTN_EAGER,
        &CROSS_ENTROPY,
        &EMBEDDING,
        &OPTIM,
    ]
    .iter()
    .map(|f| (f.name, f.source))
    .collect()
}

/// The binding slot of `name` in `file`.
pub(crate) fn slot(file: &ShaderFile, name: &str) -> Result<u32> {
    file.names
        .iter()
        .position(|(n, _)| *n == name)
        .map(|i| i as u32 + 1)
        .ok_or_else(|| Error::backend("wgsl", format!("shader {} has no binding {name}", file.name)))
}

/// The declaration and accessors of one storage binding (see shaders/common.wgsl).
fn declare(slot: usize, name: &str, kind: Kind, dtype: DType) -> String {
    let k = slot - 1;
    let var = |ty: &str| format!("@group(0) @binding({slot}) var<storage, read_write> {name}_buf: array<{ty}>;\n");
    match kind {
        Kind::I32 => {
            var("i32")
                + &format!(
                    "fn ldi_{name}(i: u32) -> i32 {{ return {name}_buf[eo({k}u) + i]; }}\n\
                     fn sti_{name}(i: u32, v: i32) {{ {name}_buf[eo({k}u) + i] = v; }}\n"
                )
        }
        Kind::U32 => var("u32") + &format!("fn ldu_{name}(i: u32) -> u32 {{ return {name}_buf[eo({k}u) + i]; }}\n"),
        Kind::Float => match dtype {
            DType::F16 | DType::BF16 => {
                let (to, from) = if dtype == DType::F16 {
                    ("f16_to_f32", "f32_to_f16")
                } else {
                    ("bf16_to_f32", "f32_to_bf16")
                };
                var("u32")
                    + &format!(
                        "fn ld_{name}(i: u32) -> f32 {{ let e = eo({k}u) + i; \
                         return {to}(({name}_buf[e >> 1u] >> ((e & 1u) << 4u)) & 0xffffu); }}\n\
                         fn st2_{name}(i: u32, v0: f32, v1: f32, both: bool) {{ let e = eo({k}u) + i; \
                         {name}_buf[e >> 1u] = {from}(v0) | select(0u, {from}(v1) << 16u, both); }}\n"
                    )
            }
            _ => {
                var("f32")
                    + &format!(
                        "fn ld_{name}(i: u32) -> f32 {{ return {name}_buf[eo({k}u) + i]; }}\n\
                         fn st_{name}(i: u32, v: f32) {{ {name}_buf[eo({k}u) + i] = v; }}\n\
                         fn st2_{name}(i: u32, v0: f32, v1: f32, both: bool) {{ let e = eo({k}u) + i; \
                         {name}_buf[e] = v0; if (both) {{ {name}_buf[e + 1u] = v1; }} }}\n"
                    )
            }
        },
    }
}

/// The pipeline description of `entry` in `file`: every binding declared with the dtype
/// given for it (f32 otherwise), after the host constants `consts`.
pub(crate) fn shader_spec(
    file: &'static ShaderFile,
    entry: &'static str,
    dtypes: &[(&'static str, DType)],
    consts: &str,
) -> Result<ShaderSpec> {
    let mut prelude = String::from(consts);
    for (i, &(name, kind)) in file.names.iter().enumerate() {
        let dt = dtypes
            .iter()
            .find(|(n, _)| *n == name)
            .map(|x| x.1)
            .unwrap_or(DType::F32);
        prelude += &declare(i + 1, name, kind, dt);
    }
    for (name, _) in dtypes {
        slot(file, name)?;
    }
    Ok(ShaderSpec {
        name: file.name,
        source: file.source,
        enables: vec![],
        prelude,
        entry,
        overrides: vec![],
    })
}

fn err(op: &Op, msg: impl Into<String>) -> Error {
    Error::backend("wgsl", format!("{}: {}", op.name(), msg.into()))
}

/// Floats the kernels read: f32, and f16/bf16 widened in the shader.
fn check_float_in(op: &Op, what: &str, d: DType) -> Result<()> {
    match d {
        DType::F32 | DType::F16 | DType::BF16 => Ok(()),
        DType::F64 => Err(err(
            op,
            format!("{what} is f64; the wgsl backend computes in f32 (f64 graphs run on the cpu backend)"),
        )),
        other => Err(err(op, format!("{what} has dtype {other}, expected a float"))),
    }
}

/// Outputs of most kernels are f32.
fn check_f32_out(op: &Op, what: &str, d: DType) -> Result<()> {
    if d == DType::F32 {
        Ok(())
    } else {
        Err(err(
            op,
            format!(
                "{what} is stored as {d}; this wgsl kernel writes f32 only (cast the result, or keep \
                 activations in f32)"
            ),
        ))
    }
}

/// Outputs of the elementwise kernels may also be f16 or bf16 (written as whole words).
fn check_any_out(op: &Op, what: &str, d: DType) -> Result<()> {
    check_float_in(op, what, d)
}

fn check_int(op: &Op, what: &str, d: DType, want: DType) -> Result<()> {
    if d == want {
        Ok(())
    } else {
        Err(err(op, format!("{what} must be {want}, got {d}")))
    }
}

/// Tensors whose element indices must fit the kernels' 32-bit arithmetic.
fn check_len(op: &Op, x: &TensorInfo) -> Result<()> {
    if x.numel() as u64 >= (1u64 << 32) {
        return Err(err(
            op,
            format!("{} has {} elements; at most 2^32 - 1 are supported", x.name, x.numel()),
        ));
    }
    Ok(())
}

/// An operand of the launch.
fn opnd(name: &'static str, a: &Arg, part: Part) -> Operand {
    Operand::arena(name, a.loc, a.info.dtype, part)
}

/// Records `op` into `b` (or, in a dry run, checks it and builds its pipelines).
pub(crate) fn plan(b: &mut Builder, op: &Op, i: &[Arg], o: &[Arg]) -> Result<()> {
    for a in i.iter().chain(o) {
        check_len(op, a.info)?;
    }
    match op {
        Op::Reshape { .. } | Op::View { .. } | Op::Merged => Ok(()),
        Op::HostCall { .. } => Err(Error::backend("wgsl", "host calls are computed by the executor")),
        Op::MatMul { trans_a, trans_b } => matmul_op::plan(b, op, i, o, *trans_a, *trans_b),
        Op::Add | Op::Mul => elementwise::binary(b, op, i, o),
        Op::Scale { factor } => elementwise::unary(b, op, "scale", i, o, *factor as f32),
        Op::Cast { .. } => elementwise::unary(b, op, "convert", i, o, 0.0),
        Op::Broadcast { .. } => elementwise::broadcast(b, op, i, o),
        Op::Dropout { salt } => elementwise::dropout(b, op, i, o, *salt),
        Op::Swiglu => elementwise::swiglu(b, op, i, o),
        Op::SwigluBackward => elementwise::swiglu_backward(b, op, i, o),
        Op::AccumulateGrad => elementwise::accumulate(b, op, i),
        Op::ReduceSum { .. } => reduce::reduce_sum(b, op, i, o),
        Op::SumSquares => reduce::sum_squares(b, op, i, o),
        Op::RmsNorm { eps } => norm::rms_norm(b, op, i, o, *eps),
        Op::RmsNormBackward { eps, .. } => norm::rms_norm_backward(b, op, i, o, *eps),
        Op::Rope {
            head_dim,
            inverse,
            scale,
        } => norm::rope(b, op, i, o, *head_dim, *inverse, *scale),
        Op::Attention(s) => attention::forward(b, op, s, i, o),
        Op::AttentionBackward(s) => attention::backward(b, op, s, i, o),
        Op::AttentionCached(s) => attention::cached(b, op, s, i, o),
        Op::CacheWrite => attention::cache_write(b, op, i),
        Op::SplitHeads(l) => attn_eager::split_heads(b, op, l, i, o),
        Op::MergeHeads(l) => attn_eager::merge_heads(b, op, l, i, o),
        Op::MaskedSoftmax(s) => attn_eager::masked_softmax(b, op, s, i, o),
        Op::SoftmaxBackward => attn_eager::softmax_backward(b, op, i, o),
        Op::CrossEntropy { ignore_index } => loss::cross_entropy(b, op, i, o, *ignore_index),
        Op::CrossEntropyBackward { ignore_index } => loss::cross_entropy_backward(b, op, i, o, *ignore_index),
        Op::Embedding => embedding::forward(b, op, i, o),
        Op::EmbeddingBackward { .. } => embedding::backward(b, op, i, o),
        Op::ClipCoef { max_norm } => optim::clip_coef(b, op, i, o, *max_norm),
        Op::AdamW(s) => optim::adamw(b, op, s, i),
        Op::MatMulFused { .. }
        | Op::MatMulAccumulate { .. }
        | Op::LowRankGrads { .. }
        | Op::SwigluLowRank { .. }
        | Op::SwigluLowRankBackward { .. }
        | Op::AttentionBackwardRope { .. }
        | Op::CrossEntropyWithGrad { .. } => Err(Error::backend(
            "wgsl",
            format!(
                "{} is not implemented here (the executor fuses product epilogues only on \
                 devices that report them)",
                op.name()
            ),
        )),
    }
}
