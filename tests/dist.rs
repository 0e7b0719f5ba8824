//! Data-parallel training on the CPU: 2 and 4 ranks (threads sharing a collective, or
//! processes under `ferrotune launch`) give the loss and weights of one rank at the same
//! global batch, for plain data parallelism and ZeRO stages 1-3 (LoRA and full
//! fine-tuning); a ZeRO-3 rank's memory plan holds a quarter of the parameters, gradients
//! and moments and two layers in flight; a sharded checkpoint resumes at another world size
//! and stage; a missing or dead rank and a config mismatch are named.

mod common;
use common::train::{adapter, max_rel};
use common::{temp_dir, write_arithmetic, write_tiny_model, CHATML};
use ferrotune::dist::collective::Collective;
use ferrotune::dist::store::{self, RendezvousOptions};
use ferrotune::dist::tcp::TcpCollective;
use ferrotune::dist::{DataParallel, ShardingConfig, ThreadCollective};
use ferrotune::exec::MemoryPlan;
use ferrotune::train::run::{train, train_with, Callback};
use ferrotune::train::trainer::{EvalReport, RunInfo, StepReport};
use ferrotune::Config;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Default)]
struct Collect {
    losses: Vec<f64>,
    grad_norms: Vec<f64>,
    eval: Vec<f64>,
    stop_at: Option<u64>,
    plan: Option<MemoryPlan>,
}

impl Callback for Collect {
    fn on_start(&mut self, info: &RunInfo) {
        self.plan = Some(info.plan.clone());
    }
    fn on_step(&mut self, r: &StepReport) {
        self.losses.push(r.loss);
        self.grad_norms.push(r.grad_norm);
    }
    fn on_eval(&mut self, r: &EvalReport) {
        self.eval.push(r.eval_loss);
    }
    fn should_stop(&mut self) -> bool {
        self.stop_at.is_some_and(|s| self.losses.len() as u64 >= s)
    }
}

struct Setup {
    dir: PathBuf,
    model: PathBuf,
    train: String,
    eval: String,
}

fn setup(name: &str) -> Setup {
    let dir = temp_dir(name);
    let model = write_tiny_model(&dir.join("model"), 3);
    let (train, eval) = write_arithmetic(&dir.join("data"), 48, 6);
    Setup {
        dir,
        model,
        train,
        eval,
    }
}

impl Setup {
    /// A config with `micro_batch_size: 2`, 2 steps of 8 rows split as `ga` x world.
    fn config(&self, out: &Path, ga: usize, extra: &str) -> Config {
        Config::from_yaml(&self.yaml(out, ga, extra), &[]).unwrap()
    }

    fn yaml(&self, out: &Path, ga: usize, extra: &str) -> String {
        format!(
            "base_model: {}\ndatasets:\n  - path: {}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{tpl}\"\n\
             test_datasets:\n  - path: {}\n    type: chat_template\n    chat_template: jinja\n    chat_template_jinja: \"{tpl}\"\n\
             sequence_len: 64\nlearning_rate: 0.01\nadapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n\
             micro_batch_size: 2\ngradient_accumulation_steps: {ga}\nmax_steps: 2\nsample_packing: false\nwarmup_steps: 1\n\
             output_dir: {}\ndevice: cpu\n{extra}",
            self.model.display(),
            self.train,
            self.eval,
            out.display(),
            tpl = CHATML.replace('"', "\\\""),
        )
    }
}

/// Trains `cfg` on `world` threads; returns every rank's callback.
fn run_threads(cfg: &Config, world: usize, stop_at: Option<u64>) -> Vec<Collect> {
    let sharding = ShardingConfig::from_config(cfg).unwrap();
    let group = ThreadCollective::group(world, Duration::from_secs(120));
    let handles: Vec<_> = group
        .into_iter()
        .map(|c| {
            let (cfg, sharding) = (cfg.clone(), sharding.clone());
            std::thread::spawn(move || {
                // Small buckets, so the all-reduce runs in several pieces.
                let dp = DataParallel::new(Box::new(c), sharding).with_bucket_elems(100);
                let mut cb = Collect {
                    stop_at,
                    ..Default::default()
                };
                train_with(&cfg, &mut cb, Some(dp)).map(|_| cb)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: {a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * y.abs(), "{what}: {a:?} vs {b:?}");
    }
}

fn write_zero_json(dir: &Path, stage: u32) -> String {
    let p = dir.join(format!("ds_zero{stage}.json"));
    let text = format!(
        r#"{{"zero_optimization": {{"stage": {stage}, "overlap_comm": true}}, "bf16": {{"enabled": "auto"}},
        "gradient_accumulation_steps": "auto", "train_micro_batch_size_per_gpu": "auto"}}"#
    );
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

#[test]
fn ranks_match_one_rank_for_data_parallel_and_zero_stages() {
    let s = setup("dist-equal");
    let reference_out = s.dir.join("reference");
    let mut reference = Collect::default();
    train(&s.config(&reference_out, 4, ""), &mut reference).unwrap();
    let ref_w = adapter(&reference_out);
    assert_eq!(reference.losses.len(), 2);
    let zero1 = format!("deepspeed: {}\n", write_zero_json(&s.dir, 1));
    let zero2 = format!("deepspeed: {}\n", write_zero_json(&s.dir, 2));
    let zero3 = format!("deepspeed: {}\n", write_zero_json(&s.dir, 3));
    let fsdp = "fsdp_version: 2\nfsdp_config:\n  reshard_after_forward: true\n  state_dict_type: FULL_STATE_DICT\n";
    let fsdp_keep = "fsdp_version: 2\nfsdp_config:\n  reshard_after_forward: false\n";
    for (name, extra) in [
        ("dp", ""),
        ("zero1", zero1.as_str()),
        ("zero2", zero2.as_str()),
        ("zero3", zero3.as_str()),
        ("fsdp", fsdp),
        ("fsdp-keep", fsdp_keep),
    ] {
        for world in [2, 4] {
            let out = s.dir.join(format!("{name}-{world}"));
            let ranks = run_threads(&s.config(&out, 4 / world, extra), world, None);
            for (r, c) in ranks.iter().enumerate() {
                close(&c.losses, &reference.losses, &format!("{name} x{world} rank {r} loss"));
                close(
                    &c.grad_norms,
                    &reference.grad_norms,
                    &format!("{name} x{world} rank {r} grad norm"),
                );
                close(&c.eval, &reference.eval, &format!("{name} x{world} rank {r} eval loss"));
            }
            let e = max_rel(&adapter(&out), &ref_w);
            eprintln!("{name} x{world}: adapter max relative difference {e:.2e}");
            assert!(e < 1e-5, "{name} x{world}: weights differ by {e:e}");
        }
    }
    // The step moved the weights, so equal weights are not equal initial weights.
    let b: f64 = ref_w
        .iter()
        .filter(|(k, _)| k.contains("lora_B"))
        .map(|(_, t)| t.to_f64().iter().map(|x| x.abs()).sum::<f64>())
        .sum();
    assert!(b > 0.0);
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// Persistent bytes of parameters, gradient accumulators and optimizer moments.
fn sharded_bytes(p: &MemoryPlan) -> u64 {
    p.persistent.trainable_parameters + p.persistent.optimizer_state
}

#[test]
fn full_fine_tuning_under_zero2_and_zero3_matches_one_rank() {
    let s = setup("dist-full");
    let reference_out = s.dir.join("reference");
    let mut reference = Collect::default();
    let cfg = |out: &Path, ga, extra: &str| {
        let mut c = s.config(out, ga, extra);
        c.adapter = None;
        c
    };
    train(&cfg(&reference_out, 4, ""), &mut reference).unwrap();
    let read = |d: &Path| {
        let st = ferrotune::model::WeightStore::open(&d.join("model.safetensors")).unwrap();
        st.names()
            .iter()
            .map(|n| (n.to_string(), st.get_raw(n).unwrap()))
            .collect::<BTreeMap<_, _>>()
    };
    let ref_w = read(&reference_out);
    let whole = reference.plan.clone().unwrap();
    for stage in [2, 3] {
        let extra = format!("deepspeed: {}\n", write_zero_json(&s.dir, stage));
        for world in [2, 4] {
            let out = s.dir.join(format!("zero{stage}-{world}"));
            let ranks = run_threads(&cfg(&out, 4 / world, &extra), world, None);
            for (r, c) in ranks.iter().enumerate() {
                let what = format!("full zero{stage} x{world} rank {r}");
                close(&c.losses, &reference.losses, &format!("{what} loss"));
                close(&c.grad_norms, &reference.grad_norms, &format!("{what} grad norm"));
                close(&c.eval, &reference.eval, &format!("{what} eval loss"));
            }
            let e = max_rel(&read(&out), &ref_w);
            assert!(e < 1e-5, "full zero{stage} x{world}: weights differ by {e:e}");
            // Each rank plans its slices of what is sharded; together they hold it once.
            let plans: Vec<MemoryPlan> = ranks.iter().map(|c| c.plan.clone().unwrap()).collect();
            let (params, state) = (whole.persistent.trainable_parameters, whole.persistent.optimizer_state);
            let sum = |f: &dyn Fn(&MemoryPlan) -> u64| plans.iter().map(f).sum::<u64>();
            if stage == 3 {
                assert_eq!(sum(&sharded_bytes), params + state, "zero3 x{world}");
            } else {
                // Parameters stay whole on every rank; accumulators and moments are sliced.
                assert!(plans.iter().all(|p| p.persistent.trainable_parameters == params));
                assert_eq!(sum(&|p| p.persistent.optimizer_state), state, "zero2 x{world}");
            }
        }
    }
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn sharded_checkpoint_from_four_ranks_resumes_on_two() {
    let s = setup("dist-resume");
    let zero2 = format!("deepspeed: {}\n", write_zero_json(&s.dir, 2));
    let fsdp = "fsdp_version: 2\nfsdp_config:\n  state_dict_type: SHARDED_STATE_DICT\nsave_steps: 1\n";
    for lora in [true, false] {
        let kind = if lora { "lora" } else { "full" };
        let cfg = |out: &Path, ga, extra: &str| {
            let mut c = s.config(out, ga, extra);
            if !lora {
                c.adapter = None;
            }
            c
        };
        let weights = |d: &Path| match lora {
            true => adapter(d),
            false => {
                let st = ferrotune::model::WeightStore::open(&d.join("model.safetensors")).unwrap();
                st.names()
                    .iter()
                    .map(|n| (n.to_string(), st.get_raw(n).unwrap()))
                    .collect()
            }
        };
        let reference_out = s.dir.join(format!("{kind}-reference"));
        let mut reference = Collect::default();
        train(&cfg(&reference_out, 4, ""), &mut reference).unwrap();

        // ZeRO-3 on 4 ranks, each writing its slices.
        let out = s.dir.join(format!("{kind}-sharded"));
        let first = run_threads(&cfg(&out, 1, fsdp), 4, Some(1));
        assert_eq!(first[0].losses.len(), 1);
        let ck = out.join("checkpoint-1");
        assert!(!ck.join("optimizer.safetensors").exists());
        for r in 0..4 {
            let f = ck.join(format!("optimizer-rank{r:05}-of-00004.safetensors"));
            assert!(f.is_file(), "missing {}", f.display());
        }
        if !lora {
            // The embedding's moments are cut into four slices, one per file.
            let name = "model.embed_tokens.weight.exp_avg";
            for r in 0..4 {
                let f = ck.join(format!("optimizer-rank{r:05}-of-00004.safetensors"));
                let st = ferrotune::model::WeightStore::open(&f).unwrap();
                assert_eq!(st.get_raw(name).unwrap().shape, vec![32000 * 16 / 4], "rank {r}");
            }
        }
        // Resumed on 2 ranks, with ZeRO-3 and with ZeRO-2.
        for (stage, extra) in [
            ("zero3", fsdp.to_string()),
            ("zero2", format!("{zero2}save_steps: 1\n")),
        ] {
            let out2 = s.dir.join(format!("{kind}-resumed-{stage}"));
            let mut c = cfg(&out2, 2, &extra);
            c.resume_from_checkpoint = Some(ck.clone());
            let second = run_threads(&c, 2, None);
            let losses: Vec<f64> = first[0].losses.iter().chain(&second[0].losses).copied().collect();
            close(&losses, &reference.losses, &format!("{kind} {stage} resumed loss"));
            let e = max_rel(&weights(&out2), &weights(&reference_out));
            assert!(e < 1e-5, "{kind} {stage}: resumed weights differ by {e:e}");
        }
        // The same shards load into a single process as well.
        let mut c = cfg(&s.dir.join(format!("{kind}-single")), 4, "");
        c.resume_from_checkpoint = Some(ck);
        let mut one = Collect::default();
        train(&c, &mut one).unwrap();
        close(
            &one.losses,
            &reference.losses[1..],
            &format!("{kind} single-process resume loss"),
        );
    }
    std::fs::remove_dir_all(&s.dir).unwrap();
}

fn expected_sum(world: usize, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| (0..world).map(|r| value(r, i)).sum::<f64>() as f32)
        .collect()
}

fn value(rank: usize, i: usize) -> f64 {
    (rank * 100 + i) as f64 * 0.25 - 3.0
}

/// Every operation on rank `rank` of `world`, checked against values computed here.
fn exercise(c: &mut dyn Collective) {
    let (rank, world) = (c.rank(), c.world_size());
    let n = 6;
    let mine: Vec<f32> = (0..n).map(|i| value(rank, i) as f32).collect();
    let mut buf = mine.clone();
    c.all_reduce(&mut buf).unwrap();
    assert_eq!(buf, expected_sum(world, n));
    let send: Vec<f32> = (0..n * world).map(|i| value(rank, i) as f32).collect();
    let mut recv = vec![0f32; n];
    c.reduce_scatter(&send, &mut recv).unwrap();
    assert_eq!(recv, expected_sum(world, n * world)[rank * n..(rank + 1) * n]);
    let mut all = vec![0f32; n * world];
    c.all_gather(&mine, &mut all).unwrap();
    let want: Vec<f32> = (0..world)
        .flat_map(|r| (0..n).map(move |i| value(r, i) as f32))
        .collect();
    assert_eq!(all, want);
    let mut b = mine.clone();
    c.broadcast(&mut b, world - 1).unwrap();
    assert_eq!(b, (0..n).map(|i| value(world - 1, i) as f32).collect::<Vec<_>>());
    c.barrier().unwrap();
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rdzv(port: u16, rank: usize, world: usize, hash: &str, timeout: f64) -> RendezvousOptions {
    RendezvousOptions {
        master_addr: "127.0.0.1".into(),
        master_port: port,
        rank,
        world_size: world,
        config_hash: hash.into(),
        timeout: Duration::from_secs_f64(timeout),
    }
}

/// Starts ranks `present` of `world` over TCP; each gets `f(rank, result)`.
fn tcp_group<T: Send + 'static>(
    world: usize,
    present: &[usize],
    hashes: &[&str],
    timeout: f64,
    f: impl Fn(usize, ferrotune::Result<TcpCollective>) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let port = free_port();
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = present
        .iter()
        .map(|&r| {
            let o = rdzv(port, r, world, hashes[r], timeout);
            let f = f.clone();
            std::thread::spawn(move || {
                let c = store::rendezvous(&o, &|| Ok(vec![7u8; 3])).map(|(links, payload)| {
                    assert_eq!(payload, vec![7u8; 3]);
                    TcpCollective::new(r, world, links, Duration::from_secs_f64(timeout))
                });
                f(r, c)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn a_stray_client_on_the_port_does_not_stop_the_rendezvous() {
    use std::io::Write;
    let port = free_port();
    let hub = {
        let o = rdzv(port, 0, 2, "h", 30.0);
        std::thread::spawn(move || store::rendezvous(&o, &|| Ok(vec![1u8])).map(|(_, p)| p))
    };
    // An HTTP probe: its first bytes read as a frame of about 6e18 bytes.
    let mut probe = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => break s,
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    probe.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n").unwrap();
    let o = rdzv(port, 1, 2, "h", 30.0);
    let worker = store::rendezvous(&o, &|| Ok(vec![1u8])).map(|(_, p)| p);
    assert_eq!(worker.unwrap(), vec![1u8]);
    assert_eq!(hub.join().unwrap().unwrap(), vec![1u8]);
}

#[test]
fn collectives_compute_sums_scatters_and_gathers() {
    for world in [1, 3] {
        let group = ThreadCollective::group(world, Duration::from_secs(30));
        let hs: Vec<_> = group
            .into_iter()
            .map(|mut c| std::thread::spawn(move || exercise(&mut c)))
            .collect();
        hs.into_iter().for_each(|h| h.join().unwrap());
        tcp_group(world, &(0..world).collect::<Vec<_>>(), &["h"; 3], 30.0, |_, c| {
            exercise(&mut c.unwrap())
        });
    }
}

#[test]
fn a_rank_that_never_arrives_is_named() {
    // Threads: rank 2 never calls all_reduce.
    let group = ThreadCollective::group(3, Duration::from_millis(300));
    let hs: Vec<_> = group
        .into_iter()
        .filter(|c| c.rank() != 2)
        .map(|mut c| std::thread::spawn(move || c.all_reduce(&mut [1.0]).unwrap_err().to_string()))
        .collect();
    for h in hs {
        let e = h.join().unwrap();
        assert!(e.contains("rank 2 did not arrive at all_reduce"), "{e}");
    }
    // Rendezvous: rank 2 of 3 never starts.
    let errs = tcp_group(3, &[0, 1], &["h"; 3], 0.5, |_, c| c.err().map(|e| e.to_string()));
    let e0 = errs[0].clone().expect("rank 0 fails");
    assert!(e0.contains("rank 2 did not arrive"), "{e0}");
    let e1 = errs[1].clone().expect("rank 1 fails");
    assert!(e1.contains("rank 2 did not arrive"), "{e1}");
    // After start-up: rank 1 stops calling (it hangs), then dies (its connection closes).
    let errs = tcp_group(2, &[0, 1], &["h"; 2], 0.5, |r, c| {
        let mut c = c.unwrap();
        if r == 1 {
            std::thread::sleep(Duration::from_millis(900));
            drop(c);
            return String::new();
        }
        c.all_reduce(&mut [1.0]).unwrap_err().to_string()
    });
    assert!(
        errs[0].contains("rank 1 did not arrive at all_reduce within"),
        "{}",
        errs[0]
    );
    let errs = tcp_group(2, &[0, 1], &["h"; 2], 5.0, |r, c| {
        let mut c = c.unwrap();
        if r == 1 {
            drop(c);
            return String::new();
        }
        c.all_reduce(&mut [1.0]).unwrap_err().to_string()
    });
    assert!(errs[0].contains("rank 1 closed its connection"), "{}", errs[0]);
}

#[test]
fn mismatched_configs_are_refused_at_start_up() {
    let errs = tcp_group(3, &[0, 1, 2], &["aaaa", "aaaa", "bbbb"], 10.0, |_, c| {
        c.err().map(|e| e.to_string())
    });
    for (r, e) in errs.iter().enumerate() {
        let e = e.clone().unwrap_or_else(|| panic!("rank {r} started"));
        assert!(
            e.contains("the config of rank 2 (hash bbbb) differs from rank 0's (aaaa)"),
            "rank {r}: {e}"
        );
    }
    // Through the trainer's own hash: one overridden key differs.
    let s = setup("dist-hash");
    let a = s.config(&s.dir.join("o"), 1, "");
    let mut b = a.clone();
    b.learning_rate = 0.02;
    assert_ne!(ferrotune::dist::config_hash(&a), ferrotune::dist::config_hash(&b));
    std::fs::remove_dir_all(&s.dir).unwrap();
}

#[test]
fn launch_runs_two_processes_that_match_one() {
    let s = setup("dist-launch");
    let reference_out = s.dir.join("reference");
    train(&s.config(&reference_out, 2, ""), &mut Collect::default()).unwrap();
    let out = s.dir.join("launched");
    let yaml = s.dir.join("tiny.yaml");
    std::fs::write(&yaml, s.yaml(&out, 1, "")).unwrap();
    let port = free_port().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(args)
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap()
    };
    let y = yaml.display().to_string();
    let o = run(&["launch", "--nproc-per-node", "2", "--master-port", &port, "train", &y]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    let e = max_rel(&adapter(&out), &adapter(&reference_out));
    assert!(e < 1e-5, "launched weights differ by {e:e}");
    // ZeRO-3 over TCP: sharded parameters gathered and gradients reduced between processes.
    let zero3_out = s.dir.join("launched-zero3");
    let zero3 = format!("deepspeed: {}\n", write_zero_json(&s.dir, 3));
    std::fs::write(&yaml, s.yaml(&zero3_out, 1, &zero3)).unwrap();
    let o = run(&["launch", "--nproc-per-node", "2", "--master-port", &port, "train", &y]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let e = max_rel(&adapter(&zero3_out), &adapter(&reference_out));
    assert!(e < 1e-5, "launched ZeRO-3 weights differ by {e:e}");

    // Rank 0 cannot create its output folder (a file is in the way): the launcher fails
    // naming it, and rank 1 fails naming rank 0 instead of hanging.
    let blocked = s.dir.join("blocked");
    std::fs::write(&blocked, b"").unwrap();
    std::fs::write(&yaml, s.yaml(&blocked, 1, "")).unwrap();
    let o = run(&["launch", "--nproc-per-node", "2", "--master-port", &port, "train", &y]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("launch: rank 0 failed first"), "{err}");
    assert!(err.contains("rank 1: rank 0 went away"), "{err}");
    std::fs::remove_dir_all(&s.dir).unwrap();
}

/// An 8-layer model whose layers hold most of its weights (small vocabulary, untied head).
const DEEP_CONFIG: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
    "vocab_size": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 64,
    "tie_word_embeddings": false, "torch_dtype": "float32"}"#;

/// The memory plan of rank `rank` of `world` (ZeRO-3 when `world > 1`) for a full fine-tune
/// of [`DEEP_CONFIG`], and the element counts of its trainable tensors by name.
fn deep_plan(world: usize, rank: usize, reshard: bool) -> (MemoryPlan, Vec<(String, usize)>) {
    deep_plan_of(world, rank, reshard, false)
}

/// The plan of rank `rank` of `world` under ZeRO-3 (world 1: unsharded) for a full fine-tune
/// or (`lora`) LoRA r=4 on every linear layer, with the trainable tensors' sizes.
fn deep_plan_of(world: usize, rank: usize, reshard: bool, lora: bool) -> (MemoryPlan, Vec<(String, usize)>) {
    use ferrotune::dist::{ShardLayout, ShardSpec, Stage};
    use ferrotune::model::llama::{build_with_attention, AttnOptions, BuildOptions, LoraOptions, LINEAR_MODULES};
    use ferrotune::train::TrainGraph;
    let cfg = ferrotune::model::ModelConfig::parse(DEEP_CONFIG, "deep").unwrap();
    let opts = BuildOptions {
        rows: 2,
        seq_len: 32,
        weight_dtype: ferrotune::DType::F32,
        act_dtype: ferrotune::DType::F32,
        lora: lora.then(|| LoraOptions {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            use_rslora: false,
            targets: LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        }),
        train_base: !lora,
        modules_to_save: Vec::new(),
        loss_rows: None,
    };
    let mg = build_with_attention(&cfg, &opts, &AttnOptions::default()).unwrap();
    let sizes: Vec<(String, usize)> = mg
        .trainable
        .iter()
        .map(|&t| (mg.graph.info(t).name.clone(), mg.graph.info(t).numel()))
        .collect();
    let opt = Default::default();
    let tg = if world == 1 {
        TrainGraph::new(mg, &opt).unwrap()
    } else {
        let n: Vec<usize> = sizes.iter().map(|s| s.1).collect();
        let spec = ShardSpec {
            stage: Stage::Zero3,
            reshard_after_forward: reshard,
            layout: ShardLayout::new(&n, rank, world),
        };
        TrainGraph::new_sharded(mg, &opt, spec).unwrap()
    };
    let backend = Box::new(ferrotune::backend::plan::PlanBackend::new("cpu", 64, u64::MAX));
    let ex = ferrotune::exec::Executor::new(tg.model.graph.clone(), backend, &tg.programs()).unwrap();
    (ex.plan().clone(), sizes)
}

#[test]
fn a_zero3_rank_plans_a_quarter_of_the_weights_and_few_layers_in_flight() {
    let (whole, sizes) = deep_plan(1, 0, true);
    let total = sharded_bytes(&whole);
    // Parameter, accumulator and two moments per tensor, in f32.
    assert_eq!(total, 4 * 4 * sizes.iter().map(|s| s.1 as u64).sum::<u64>());
    let layer: u64 = 4 * sizes
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers.3."))
        .map(|s| s.1 as u64)
        .sum::<u64>();
    let padding = (sizes.len() * 4 * ferrotune::dist::SHARD_ALIGN * 4) as u64;
    let params = total / 4;
    for reshard in [true, false] {
        let mut sum = 0;
        for rank in 0..4 {
            let (p, _) = deep_plan(4, rank, reshard);
            let mine = sharded_bytes(&p);
            assert!(
                mine <= total / 4 + padding,
                "rank {rank}: {mine} > {total} / 4 + {padding}"
            );
            assert_eq!(p.persistent.frozen_weights, 0);
            sum += mine;
            let in_flight = |name: &str| p.programs.iter().find(|q| q.name == name).unwrap().host_output_peak;
            let (train, eval) = (in_flight("train"), in_flight("eval"));
            eprintln!(
                "reshard {reshard} rank {rank}: {mine} of {total} persistent bytes; in flight: train {train}, \
                 eval {eval} (a layer: {layer}); transient {} (unsharded {})",
                p.transient_bytes, whole.transient_bytes
            );
            // A layer in use and the next one prefetched (plus reduced gradient slices).
            assert!(layer <= eval && eval <= 2 * layer + layer / 4, "eval: {eval}");
            if reshard {
                assert!(layer <= train && train <= 2 * layer + layer / 4, "train: {train}");
                assert!(p.transient_bytes <= whole.transient_bytes + 2 * layer);
            } else {
                // The forward's copies are kept for the backward: all 8 layers at its start.
                assert!(8 * layer <= train && train <= params + layer / 4, "train: {train}");
            }
        }
        assert_eq!(sum, total, "the ranks' slices hold every tensor once");
    }
}

#[test]
fn a_zero3_lora_rank_plans_a_quarter_of_the_frozen_base_weights() {
    let (whole, sizes) = deep_plan_of(1, 0, true, true);
    let frozen = whole.persistent.frozen_weights;
    assert!(frozen > 0 && sizes.iter().all(|(n, _)| n.contains("lora_")));
    // Slices start at SHARD_ALIGN elements: at most that much padding per weight (the deep
    // model has 9 per layer, 3 outside), plus the rotary table, which stays whole.
    let padding = ((9 * 8 + 3) * ferrotune::dist::SHARD_ALIGN * 4 + 4096) as u64;
    let mut sum = 0;
    for rank in 0..4 {
        let (p, _) = deep_plan_of(4, rank, true, true);
        let mine = p.persistent.frozen_weights;
        eprintln!("lora zero3 rank {rank}: {mine} of {frozen} frozen bytes");
        assert!(
            mine <= frozen / 4 + padding,
            "rank {rank}: {mine} > {frozen} / 4 + {padding}"
        );
        sum += mine;
    }
    // Every weight is held once, by the rank that owns each element.
    assert!(frozen <= sum && sum <= frozen + 3 * 4096, "{sum} against {frozen}");
}

#[test]
fn plan_shows_a_zero3_ranks_share_of_a_full_fine_tune() {
    let s = setup("dist-plan");
    let full = |extra: &str| {
        let y = s.yaml(&s.dir.join("out"), 1, extra);
        let y = y.replace(
            "adapter: lora\nlora_r: 4\nlora_alpha: 8\nlora_target_linear: true\n",
            "",
        );
        let p = s.dir.join(format!("plan{}.yaml", extra.len()));
        std::fs::write(&p, y).unwrap();
        p.display().to_string()
    };
    let plan = |args: &[&str]| -> serde_json::Value {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
            .args(args)
            .env_remove("WORLD_SIZE")
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let bytes = |v: &serde_json::Value| {
        let p = &v["plan"]["persistent"];
        p["trainable_parameters"].as_u64().unwrap() + p["optimizer_state"].as_u64().unwrap()
    };
    let one = plan(&["plan", &full(""), "--json"]);
    let zero3 = full("fsdp_version: 2\nfsdp_config:\n  reshard_after_forward: true\n");
    let mut sum = 0;
    for rank in ["0", "3"] {
        let r = plan(&["plan", &zero3, "--json", "--world-size", "4", "--rank", rank]);
        assert_eq!(r["world_size"], 4);
        let train = r["plan"]["programs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "train")
            .unwrap();
        assert!(
            train["host_output_peak"].as_u64().unwrap() > 0,
            "rank {rank} gathers nothing"
        );
        sum += bytes(&r);
    }
    // Ranks 0 and 3 of 4 hold about half of what one process holds.
    let total = bytes(&one);
    assert!(sum.abs_diff(total / 2) <= total / 100, "{sum} vs {total} / 2");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["plan", &zero3, "--world-size", "4", "--rank", "4"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("rank 4 of world size 4"));
    std::fs::remove_dir_all(&s.dir).unwrap();
}
