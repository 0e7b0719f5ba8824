//! Matrix products through cuBLASLt (src/ops/matmul.rs has the shapes and the CPU reference).
//!
//! Row-major `C [m, n] = op(A) op(B)` is the column-major product `C^T = op(B)^T op(A)^T`:
//! cuBLASLt gets B as its first operand and A as its second, each with the transpose the
//! row-major view asks for, and writes C^T column-major, which is C row-major. The batched
//! form sets a batch count and strides; the shared-2-D-B form is one product with A's rows
//! flattened into m.
//!
//! Compute type: bf16 x bf16 and f16 x f16 accumulate in f32 (CUBLAS_COMPUTE_32F); f32 x f32
//! is pure f32 (CUBLAS_COMPUTE_32F, never the TF32 variant), so f32 graphs match the CPU.
//! Mixed storage types are cast in a small kernel first: when A (and so C) is 16-bit and B
//! is f32, B is rounded to A's type (B is then a trainable f32 weight, e.g. LoRA, beside
//! 16-bit activations); otherwise the 16-bit operands are widened to f32 (exact) and the
//! product is f32, rounded to C's type at the end.

use super::gpu::Gpu;
use crate::ops::matmul::MatmulDims;
use crate::tensor::DType;
use crate::{Error, Result};
use cudarc::cublaslt::sys as lt;
use std::ffi::c_void;

pub const WORKSPACE_BYTES: u64 = 32 << 20;

fn blas(what: &str, s: lt::cublasStatus_t) -> Result<()> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::backend("cuda", format!("cuBLASLt {what}: {s:?}")))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatmulKey {
    pub dims: (usize, usize, usize, usize), // batch, m, n, k
    pub shared_b: bool,
    pub trans_a: bool,
    pub trans_b: bool,
    pub a: DType,
    pub b: DType,
    pub c: DType,
}

/// What a product computes in, and which operands need a cast first.
#[derive(Clone, Copy, Debug)]
pub struct Precision {
    pub compute: DType,
    pub cast_a: bool,
    pub cast_b: bool,
    pub cast_c: bool,
}

pub fn precision(a: DType, b: DType, c: DType) -> Result<Precision> {
    let ok = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
    if !ok(a) || !ok(b) || !ok(c) {
        return Err(Error::backend(
            "cuda",
            format!("matmul of {a} x {b} -> {c} is not supported (f32, bf16 and f16 are)"),
        ));
    }
    // Same types, or a 16-bit A with an f32 B: A's type. Otherwise f32.
    let compute = if a == b || b == DType::F32 { a } else { DType::F32 };
    Ok(Precision {
        compute,
        cast_a: a != compute,
        cast_b: b != compute,
        cast_c: c != compute,
    })
}

fn cuda_type(d: DType) -> lt::cudaDataType {
    match d {
        DType::BF16 => lt::cudaDataType::CUDA_R_16BF,
        DType::F16 => lt::cudaDataType::CUDA_R_16F,
        _ => lt::cudaDataType::CUDA_R_32F,
    }
}

/// Device pointers and scalars of one product `d = alpha op(a) op(b) + beta c`.
#[derive(Clone, Copy, Debug)]
pub struct Operands {
    pub a: u64,
    pub b: u64,
    pub c: u64,
    pub d: u64,
    pub alpha: f32,
    pub beta: f32,
}

impl Operands {
    /// `d = op(a) op(b)`.
    pub fn plain(a: u64, b: u64, d: u64) -> Operands {
        Operands {
            a,
            b,
            c: d,
            d,
            alpha: 1.0,
            beta: 0.0,
        }
    }
}

/// A prepared product: descriptors, the heuristic's candidate algorithms (best first by its
/// estimate) and the one in use (the first, or the fastest measured by `CudaBackend::tune`).
pub struct Plan {
    desc: lt::cublasLtMatmulDesc_t,
    layout_first: lt::cublasLtMatrixLayout_t,
    layout_second: lt::cublasLtMatrixLayout_t,
    layout_c: lt::cublasLtMatrixLayout_t,
    pub algo: lt::cublasLtMatmulAlgo_t,
    pub candidates: Vec<lt::cublasLtMatmulAlgo_t>,
}

// SAFETY: opaque cuBLASLt handles, used from one thread at a time with the owning backend.
unsafe impl Send for Plan {}

fn layout(
    dt: DType,
    rows: usize,
    cols: usize,
    ld: usize,
    batch: usize,
    stride: i64,
) -> Result<lt::cublasLtMatrixLayout_t> {
    let l = cudarc::cublaslt::result::create_matrix_layout(cuda_type(dt), rows as u64, cols as u64, ld as i64)
        .map_err(|e| Error::backend("cuda", format!("cuBLASLt matrix layout: {e:?}")))?;
    if batch > 1 {
        let count = batch as i32;
        // SAFETY: a live layout; the values have the attribute's type.
        unsafe {
            blas(
                "batch count",
                lt::cublasLtMatrixLayoutSetAttribute(
                    l,
                    lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                    &count as *const i32 as *const c_void,
                    4,
                ),
            )?;
            blas(
                "batch stride",
                lt::cublasLtMatrixLayoutSetAttribute(
                    l,
                    lt::cublasLtMatrixLayoutAttribute_t::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                    &stride as *const i64 as *const c_void,
                    8,
                ),
            )?;
        }
    }
    Ok(l)
}

impl Plan {
    /// `candidates`: how many of the heuristic's algorithms to keep (at most 64).
    pub fn new(handle: lt::cublasLtHandle_t, key: MatmulKey, candidates: usize) -> Result<Plan> {
        let prec = precision(key.a, key.b, key.c)?;
        let (batch, m, n, k) = key.dims;
        let ct = prec.compute;
        let desc = cudarc::cublaslt::result::create_matmul_desc(
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::cudaDataType::CUDA_R_32F,
        )
        .map_err(|e| Error::backend("cuda", format!("cuBLASLt matmul descriptor: {e:?}")))?;
        // Column-major operands: first = B (op = trans_b), second = A (op = trans_a).
        let (op_first, op_second) = (key.trans_b as i32, key.trans_a as i32);
        // SAFETY: a live descriptor; the values are cublasOperation_t (i32).
        unsafe {
            blas(
                "transa",
                lt::cublasLtMatmulDescSetAttribute(
                    desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &op_first as *const i32 as *const c_void,
                    4,
                ),
            )?;
            blas(
                "transb",
                lt::cublasLtMatmulDescSetAttribute(
                    desc,
                    lt::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &op_second as *const i32 as *const c_void,
                    4,
                ),
            )?;
        }
        // B stored row-major [k, n] is column-major [n, k] (ld n); transposed storage [n, k]
        // is column-major [k, n] (ld k). Likewise A: [m, k] -> col [k, m]; [k, m] -> col [m, k].
        let b_batch = if key.shared_b { 1 } else { batch };
        let first = if key.trans_b {
            layout(ct, k, n, k, b_batch, (k * n) as i64)?
        } else {
            layout(ct, n, k, n, b_batch, (k * n) as i64)?
        };
        let second = if key.trans_a {
            layout(ct, m, k, m, batch, (m * k) as i64)?
        } else {
            layout(ct, k, m, k, batch, (m * k) as i64)?
        };
        // C and D: the compute type, or f32 for a 16-bit product summed into f32.
        let c = layout(key.c, n, m, n, batch, (m * n) as i64)?;
        let pref = cudarc::cublaslt::result::create_matmul_pref()
            .map_err(|e| Error::backend("cuda", format!("cuBLASLt preference: {e:?}")))?;
        let ws = WORKSPACE_BYTES;
        let mut results: [lt::cublasLtMatmulHeuristicResult_t; 64] = unsafe { std::mem::zeroed() };
        let want = candidates.clamp(1, 64) as i32;
        let mut count = 0i32;
        // SAFETY: live descriptors; `results` has room for the `want` (at most 64) requested.
        let r = unsafe {
            blas(
                "workspace preference",
                lt::cublasLtMatmulPreferenceSetAttribute(
                    pref,
                    lt::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const c_void,
                    8,
                ),
            )?;
            lt::cublasLtMatmulAlgoGetHeuristic(
                handle,
                desc,
                first,
                second,
                c,
                c,
                pref,
                want,
                results.as_mut_ptr(),
                &mut count,
            )
        };
        // SAFETY: created above.
        unsafe {
            let _ = lt::cublasLtMatmulPreferenceDestroy(pref);
        }
        blas("algorithm heuristic", r)?;
        if count == 0 {
            return Err(Error::backend(
                "cuda",
                format!("cuBLASLt has no algorithm for a {ct} matmul of batch {batch}, m {m}, n {n}, k {k}"),
            ));
        }
        Ok(Plan {
            desc,
            layout_first: first,
            layout_second: second,
            layout_c: c,
            algo: results[0].algo,
            candidates: results[..count as usize]
                .iter()
                .filter(|r| r.state == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
                .map(|r| r.algo)
                .collect(),
        })
    }

    /// `d = alpha op(a) op(b) + beta c` on device pointers, `a` and `b` already in the
    /// compute type, `c` and `d` in the key's `c` type (`c` may be `d`: in place).
    #[allow(clippy::too_many_arguments)]
    pub fn run(&self, handle: lt::cublasLtHandle_t, gpu: &Gpu, ops: Operands, workspace: u64) -> Result<()> {
        self.run_algo(&self.algo, handle, gpu, ops, workspace)
    }

    /// The same with a given algorithm (one of `candidates`).
    pub fn run_algo(
        &self,
        algo: &lt::cublasLtMatmulAlgo_t,
        handle: lt::cublasLtHandle_t,
        gpu: &Gpu,
        ops: Operands,
        workspace: u64,
    ) -> Result<()> {
        let Operands {
            a,
            b,
            c,
            d,
            alpha,
            beta,
        } = ops;
        // SAFETY: the pointers address tensors of the planned shapes and types; the
        // workspace holds WORKSPACE_BYTES.
        let s = unsafe {
            lt::cublasLtMatmul(
                handle,
                self.desc,
                &alpha as *const f32 as *const c_void,
                b as *const c_void,
                self.layout_first,
                a as *const c_void,
                self.layout_second,
                &beta as *const f32 as *const c_void,
                c as *const c_void,
                self.layout_c,
                d as *mut c_void,
                self.layout_c,
                algo,
                workspace as *mut c_void,
                WORKSPACE_BYTES as usize,
                gpu.stream as lt::cudaStream_t,
            )
        };
        blas("matmul", s)
    }
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: created in `new`, used by nothing after this.
        unsafe {
            let _ = lt::cublasLtMatrixLayoutDestroy(self.layout_first);
            let _ = lt::cublasLtMatrixLayoutDestroy(self.layout_second);
            let _ = lt::cublasLtMatrixLayoutDestroy(self.layout_c);
            let _ = lt::cublasLtMatmulDescDestroy(self.desc);
        }
    }
}

/// Operand bytes of a product: (a, b) in the compute type, c in its own.
pub fn operand_bytes(key: &MatmulKey) -> Result<(u64, u64, u64)> {
    let e = precision(key.a, key.b, key.c)?.compute.size() as u64;
    let ec = key.c.size() as u64;
    let (batch, m, n, k) = (
        key.dims.0 as u64,
        key.dims.1 as u64,
        key.dims.2 as u64,
        key.dims.3 as u64,
    );
    let b_batch = if key.shared_b { 1 } else { batch };
    Ok((batch * m * k * e, b_batch * k * n * e, batch * m * n * ec))
}

pub fn key(d: MatmulDims, trans_a: bool, trans_b: bool, a: DType, b: DType, c: DType) -> MatmulKey {
    MatmulKey {
        dims: (d.batch, d.m, d.n, d.k),
        shared_b: d.shared_b,
        trans_a,
        trans_b,
        a,
        b,
        c,
    }
}
