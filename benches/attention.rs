//! `cargo bench --bench attention [-- --tokens 2048,8192,16384] [--dims 64,128] [--heads 8]
//! [--reps 3]`: forward + backward time of the fused (flash) WGSL attention against eager
//! attention (scores as graph ops) on the default adapter, one causal row of `tokens`
//! tokens, f32. Each time is the median wall time of `reps` runs of one compiled program
//! (q, k, v gradients reduced to one number on the device, so no large read-back), after
//! a warm-up run. Eager runs that do not fit the device are reported with the reason.

use std::time::Instant;

use ferrotune::backend::wgsl::{WgslBackend, WgslContext, WgslOptions};
use ferrotune::exec::{Executor, ProgramSpec};
use ferrotune::graph::{self, Graph};
use ferrotune::ops::{attn_eager, AttnSpec, FlexMask, Op};
use ferrotune::{DType, HostTensor};

fn list(s: &str) -> Vec<usize> {
    s.split(',')
        .map(|x| x.trim().parse().unwrap_or_else(|_| panic!("not a number: {x:?}")))
        .collect()
}

/// Median seconds of one forward + backward step, or the error that stopped it.
fn time(ctx: &std::sync::Arc<WgslContext>, s: &AttnSpec, eager: bool, reps: usize) -> Result<f64, String> {
    let n = s.seq_len;
    let w = s.n_heads * s.head_dim;
    let mut g = Graph::new();
    let q = g.parameter("q", &[n, w], DType::F32);
    let k = g.parameter("k", &[n, w], DType::F32);
    let v = g.parameter("v", &[n, w], DType::F32);
    let seg = g.input("seg", &[n], DType::I32);
    let inputs = [q, k, v, seg];
    let o = if eager {
        attn_eager::build(&mut g, s, &inputs).map_err(|e| e.to_string())?
    } else {
        g.apply(Op::Attention(s.clone()), &inputs).map_err(|e| e.to_string())?[0]
    };
    let r = g.constant("r", &[n, w], DType::F32);
    let prod = g.mul(o, r).map_err(|e| e.to_string())?;
    let loss = g.sum(prod).map_err(|e| e.to_string())?;
    let one = g.input("one", &[1], DType::F32);
    let grads = graph::backward(&mut g, loss, one, &[q, k, v]).map_err(|e| e.to_string())?;
    let mut total = loss;
    for t in [q, k, v] {
        let s = g.sum(grads[&t]).map_err(|e| e.to_string())?;
        total = g.add(total, s).map_err(|e| e.to_string())?;
    }
    let backend = Box::new(WgslBackend::with_context(ctx.clone()));
    let mut ex = Executor::new(g, backend, &[ProgramSpec::new("step", &[total], &[])]).map_err(|e| e.to_string())?;
    let vals: Vec<f32> = (0..n * w).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
    let x = HostTensor::from_f32(&[n, w], &vals);
    for t in [q, k, v, r] {
        ex.set_tensor(t, &x).map_err(|e| e.to_string())?;
    }
    let seg_t = HostTensor::from_i32(&[n], &vec![1; n]);
    let one_t = HostTensor::from_f32(&[1], &[1.0]);
    let feed = [(seg, &seg_t), (one, &one_t)];
    ex.run(0, &feed).map_err(|e| e.to_string())?;
    let mut times = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        let out = ex.run(0, &feed).map_err(|e| e.to_string())?;
        times.push(t0.elapsed().as_secs_f64());
        if !out[0].to_f64()[0].is_finite() {
            return Err("non-finite result".into());
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

fn main() {
    let (mut tokens, mut dims, mut heads, mut reps) = (vec![2048, 8192, 16384], vec![64, 128], 8, 3);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| panic!("{a} takes a value"));
        match a.as_str() {
            "--tokens" => tokens = list(&val()),
            "--dims" => dims = list(&val()),
            "--heads" => heads = list(&val())[0],
            "--reps" => reps = list(&val())[0].max(1),
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    let ctx = match WgslContext::new_blocking(WgslOptions::default()) {
        Ok(c) => std::sync::Arc::new(c),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    println!("device: {}", ctx.describe());
    println!("causal, 1 row, {heads} heads, f32, forward + backward, median of {reps}");
    println!("| tokens | head dim | flash (ms) | eager (ms) | eager / flash |");
    println!("|---:|---:|---:|---:|---:|");
    for &t in &tokens {
        for &d in &dims {
            let s = AttnSpec {
                n_heads: heads,
                n_kv_heads: heads,
                head_dim: d,
                seq_len: t,
                causal: true,
                window: None,
                scale: 1.0 / (d as f64).sqrt(),
                flex: FlexMask::default(),
            };
            let flash = time(&ctx, &s, false, reps);
            let eager = time(&ctx, &s, true, reps);
            let ms = |r: &Result<f64, String>| match r {
                Ok(x) => format!("{:.1}", x * 1e3),
                Err(_) => "does not fit".into(),
            };
            let ratio = match (&flash, &eager) {
                (Ok(f), Ok(e)) => format!("{:.2}", e / f),
                _ => "-".into(),
            };
            println!("| {t} | {d} | {} | {} | {ratio} |", ms(&flash), ms(&eager));
            for (name, r) in [("flash", &flash), ("eager", &eager)] {
                if let Err(e) = r {
                    println!(
                        "    {name} at {t} tokens, head dim {d}: {}",
                        e.lines().next().unwrap_or("")
                    );
                }
            }
        }
    }
}
