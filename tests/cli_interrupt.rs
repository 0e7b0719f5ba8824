//! Ctrl-C during `ferrotune train`: the running step finishes, a checkpoint of exactly the
//! steps done is saved, the process exits 0, and the run resumes from that checkpoint.
#![cfg(unix)]

mod common;
use common::{temp_dir, write_arithmetic, write_tiny_model, CHATML};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn config(model: &Path, train: &str, out: &Path, max_steps: u64) -> String {
    format!(
        "base_model: {}\ndatasets:\n  - path: {train}\n    type: chat_template\n    chat_template: jinja\n    \
         chat_template_jinja: \"{}\"\nsequence_len: 64\nmicro_batch_size: 2\nlearning_rate: 0.01\nadapter: lora\n\
         lora_r: 4\nlora_alpha: 8\nlora_target_linear: true\nmax_steps: {max_steps}\nsave_steps: 100000\n\
         output_dir: {}\ndevice: cpu\n",
        model.display(),
        CHATML.replace('"', "\\\""),
        out.display()
    )
}

fn step_lines(metrics: &Path) -> usize {
    std::fs::read_to_string(metrics)
        .map(|m| m.lines().filter(|l| l.contains("\"learning_rate\"")).count())
        .unwrap_or(0)
}

#[test]
fn ctrl_c_finishes_the_step_saves_a_checkpoint_and_exits_zero() {
    let dir = temp_dir("interrupt");
    let model = write_tiny_model(&dir.join("model"), 2);
    let (train, _) = write_arithmetic(&dir.join("data"), 400, 2);
    let out = dir.join("out");
    let cfg = dir.join("config.yaml");
    std::fs::write(&cfg, config(&model, &train, &out, 100_000)).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", cfg.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Drain stderr while the run goes on, so a full pipe can never stall it.
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut s).unwrap();
        s
    });
    let metrics = out.join("metrics.jsonl");
    let deadline = Instant::now() + Duration::from_secs(300);
    while step_lines(&metrics) < 2 {
        assert!(Instant::now() < deadline, "no training steps were logged");
        assert!(
            child.try_wait().unwrap().is_none(),
            "train exited before it was interrupted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let sent = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let status = child.wait().unwrap();
    let stderr = reader.join().unwrap();
    assert!(status.success(), "exit status {status:?}: {stderr}");
    assert!(stderr.contains("interrupted; resume with"), "{stderr}");

    // The checkpoint holds every step that was logged, and nothing was half-written.
    let steps = step_lines(&metrics);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.contains(&format!("checkpoint-{steps}")),
        "{steps} steps, {names:?}"
    );
    assert!(!names.iter().any(|n| n.starts_with('.')), "{names:?}");
    // As in axolotl, the interrupted run's weights are saved as well: the adapter in
    // output_dir is the checkpoint's.
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        std::fs::read(out.join(format!("checkpoint-{steps}/adapter_model.safetensors"))).unwrap()
    );
    assert!(stderr.contains(&format!("(interrupted at step {steps} of")), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(format!("checkpoint-{steps}/trainer_state.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(state["global_step"], steps as u64);

    let at_interrupt = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    // Resuming continues from there to the end.
    std::fs::write(&cfg, config(&model, &train, &out, steps as u64 + 1)).unwrap();
    let ck = format!(
        "resume_from_checkpoint={}",
        out.join(format!("checkpoint-{steps}")).display()
    );
    let resumed = Command::new(env!("CARGO_BIN_EXE_ferrotune"))
        .args(["train", cfg.to_str().unwrap(), "--set", &ck])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&resumed.stderr);
    assert!(resumed.status.success(), "{stderr}");
    assert!(stderr.contains("resumed from"), "{stderr}");
    assert_ne!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        at_interrupt,
        "the resumed run's adapter replaces the interrupted one"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
