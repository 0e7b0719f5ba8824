//! Forward+backward time of fused and eager attention on the CPU (f32, SmolLM2-135M heads:
//! 9 query / 3 key-value heads of 64, one causal row): `cargo run --release --example attention_cpu`.

use ferrotune::backend::cpu::CpuBackend;
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::graph::{self, Graph};
use ferrotune::ops::{attn_eager, AttnSpec, FlexMask, Op};
use ferrotune::{DType, HostTensor};
fn main() {
    for t in [1024usize, 2048, 4096] {
        for eager in [false, true] {
            if eager && t > 2048 {
                continue;
            }
            let s = AttnSpec {
                n_heads: 9,
                n_kv_heads: 3,
                head_dim: 64,
                seq_len: t,
                causal: true,
                window: None,
                scale: 0.125,
                flex: FlexMask::default(),
            };
            let mut g = Graph::new();
            let q = g.parameter("q", &[t, 576], DType::F32);
            let k = g.parameter("k", &[t, 192], DType::F32);
            let v = g.parameter("v", &[t, 192], DType::F32);
            let seg = g.input("seg", &[t], DType::I32);
            let o = if eager {
                attn_eager::build(&mut g, &s, &[q, k, v, seg]).unwrap()
            } else {
                g.apply(Op::Attention(s.clone()), &[q, k, v, seg]).unwrap()[0]
            };
            let l = g.sum(o).unwrap();
            let one = g.input("one", &[1], DType::F32);
            let gr = graph::backward(&mut g, l, one, &[q, k, v]).unwrap();
            let outs = vec![gr[&q], gr[&k], gr[&v]];
            let mut ex = Executor::new(g, Box::new(CpuBackend::new()), &[ProgramSpec::new("a", &outs, &[])]).unwrap();
            for (p, w) in [(q, 576), (k, 192), (v, 192)] {
                let d: Vec<f32> = (0..t * w).map(|i| (i * 7919 % 1000) as f32 / 1000.0 - 0.5).collect();
                ex.set_tensor(p, &HostTensor::from_f32(&[t, w], &d)).unwrap();
            }
            let segv = HostTensor::from_i32(&[t], &vec![1; t]);
            let onev = HostTensor::from_f32(&[1], &[1.0]);
            let mut best = f64::MAX;
            for _ in 0..2 {
                let st = std::time::Instant::now();
                ex.run(0, &[(seg, &segv), (one, &onev)]).unwrap();
                best = best.min(st.elapsed().as_secs_f64());
            }
            println!("T={t} {}: fwd+bwd {:.3} s", if eager { "eager" } else { "fused" }, best);
        }
    }
}
