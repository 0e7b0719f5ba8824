//! Host calls: nodes of a program computed by the caller instead of a kernel.
//!
//! A [`crate::ops::Op::HostCall`] node is scheduled and planned like any other node: its
//! inputs live until it runs and its outputs are ordinary transient tensors, live from the
//! call to their last reader. When a run reaches one, the executor submits the work queued
//! so far, reads the inputs back, hands them to [`HostCalls::call`] and writes the returned
//! values into the outputs' planned locations before the next node. Sharded training fills
//! gathered parameters and drains gradients into their owners' shards this way.

use crate::graph::TensorInfo;
use crate::tensor::HostTensor;
use crate::Result;

/// The caller's side of the host calls of a program run.
pub trait HostCalls {
    /// Computes the outputs of host call `id` from its inputs; `outputs` gives the shape and
    /// dtype each returned tensor must have.
    fn call(&mut self, id: u32, inputs: Vec<HostTensor>, outputs: &[&TensorInfo]) -> Result<Vec<HostTensor>>;
}

/// For runs without host calls: reaching one is an error naming the program.
pub struct NoHostCalls;

impl HostCalls for NoHostCalls {
    fn call(&mut self, id: u32, _inputs: Vec<HostTensor>, _outputs: &[&TensorInfo]) -> Result<Vec<HostTensor>> {
        Err(crate::msg!(
            "host call {id} was reached, but this run was given no host calls (use Executor::run_with)"
        ))
    }
}

/// Checks that `values` match the outputs of a host call.
pub(crate) fn check_outputs(id: u32, values: &[HostTensor], outputs: &[&TensorInfo]) -> Result<()> {
    if values.len() != outputs.len() {
        return Err(crate::msg!(
            "host call {id} returned {} tensors for {} outputs",
            values.len(),
            outputs.len()
        ));
    }
    for (v, o) in values.iter().zip(outputs) {
        if v.shape != o.shape || v.dtype != o.dtype {
            return Err(crate::msg!(
                "host call {id}: output {} is {:?} {}, the call returned {:?} {}",
                o.name,
                o.shape,
                o.dtype,
                v.shape,
                v.dtype
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::exec::{Executor, ProgramSpec};
    use crate::graph::{Graph, NodeId};
    use crate::ops::Op;
    use crate::tensor::DType;

    /// Returns `[k, k + 1, ...]` for call k, after checking its inputs.
    struct Counting(Vec<Vec<f32>>);
    impl HostCalls for Counting {
        fn call(&mut self, id: u32, inputs: Vec<HostTensor>, outputs: &[&TensorInfo]) -> Result<Vec<HostTensor>> {
            self.0.push(inputs.iter().flat_map(|t| t.to_f32()).collect());
            Ok(outputs
                .iter()
                .map(|o| {
                    let v: Vec<f32> = (0..o.numel()).map(|i| (id as usize + i) as f32).collect();
                    HostTensor::from_f32(&o.shape, &v)
                })
                .collect())
        }
    }

    #[test]
    fn host_calls_fill_transient_tensors_where_the_schedule_reaches_them() {
        // y = x @ w0^T @ w1^T with both weights filled by host calls, each just before use.
        let mut g = Graph::new();
        let x = g.input("x", &[2, 4], DType::F32);
        let out = vec![(vec![4, 4], DType::F32)];
        let w0 = g
            .apply1(
                Op::HostCall {
                    id: 0,
                    outputs: out.clone(),
                },
                &[x],
            )
            .unwrap();
        let h = g.linear(x, w0).unwrap();
        let w1 = g.apply1(Op::HostCall { id: 1, outputs: out }, &[h]).unwrap();
        let y = g.linear(h, w1).unwrap();
        let spec = ProgramSpec::new("p", &[y], &[]);
        let mut ex = Executor::new(g, Box::new(CpuBackend::new()), &[spec]).unwrap();
        assert!(ex.has_host_calls(0));
        let xv: Vec<f32> = (0..8).map(|i| i as f32 * 0.5).collect();
        let xt = HostTensor::from_f32(&[2, 4], &xv);
        let e = ex.run(0, &[(x, &xt)]).unwrap_err().to_string();
        assert!(e.contains("host call 0 was reached"), "{e}");
        let mut calls = Counting(Vec::new());
        let got = ex.run_with(0, &[(x, &xt)], &mut calls).unwrap()[0].to_f32();
        // The second call saw the first product, so it ran after it.
        let lin = |a: &[f32], k: usize| -> Vec<f32> {
            let w: Vec<f32> = (0..16).map(|i| (k + i) as f32).collect();
            (0..2)
                .flat_map(|r| (0..4).map(move |o| (r, o)))
                .map(|(r, o)| (0..4).map(|i| a[r * 4 + i] * w[o * 4 + i]).sum())
                .collect()
        };
        let h_ref = lin(&xv, 0);
        assert_eq!(calls.0, vec![xv.clone(), h_ref.clone()]);
        assert_eq!(got, lin(&h_ref, 1));
        // w0 is dead once h exists, so w1 may reuse its bytes: the peak holds one weight.
        let plan = &ex.plan().programs[0];
        assert_eq!(plan.host_output_peak, 64);
    }

    #[test]
    fn a_view_updates_a_slice_of_a_persistent_tensor_in_place() {
        let mut g = Graph::new();
        let acc = g.state("acc", &[40], DType::F32);
        let d = g.input("d", &[8], DType::F32);
        let view = g
            .apply1(
                Op::View {
                    offset: 16,
                    shape: vec![8],
                },
                &[acc],
            )
            .unwrap();
        g.apply(Op::AccumulateGrad, &[view, d]).unwrap();
        let spec = ProgramSpec::new("p", &[], &[NodeId(1)]);
        let mut ex = Executor::new(g.clone(), Box::new(CpuBackend::new()), std::slice::from_ref(&spec)).unwrap();
        let dv = HostTensor::from_f32(&[8], &[1.0; 8]);
        ex.run(0, &[(d, &dv)]).unwrap();
        let v = ex.get_tensors(&[acc]).unwrap()[0].to_f32();
        let want: Vec<f32> = (0..40).map(|i| if (16..24).contains(&i) { 1.0 } else { 0.0 }).collect();
        assert_eq!(v, want);
        // 3 elements are 12 bytes: not a multiple of the CPU's 64-byte alignment.
        g.nodes[0].op = Op::View {
            offset: 3,
            shape: vec![8],
        };
        let e = Executor::new(g, Box::new(CpuBackend::new()), &[spec])
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("starts 12 bytes into acc, not a multiple"), "{e}");
    }
}
