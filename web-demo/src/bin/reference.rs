//! The demo's training run natively, for comparison with the browser: the bundled model
//! (or the model folder given with `--model`, read as the page reads it) on the built-in
//! addition task (or the dataset file given with `--data`) with the page's options,
//! printing one JSON object `{"device", "model", "data", "options", "rows", "losses"}`.
//! `--write-data FILE` saves the rows trained on as a file, `--adapter-out DIR` the
//! trained adapter as PEFT files (what the page downloads).
//!
//! web-demo-reference [--device cpu|wgsl] [--model DIR] [--rows N] [--data FILE]
//!                    [--options JSON] [--write-data FILE] [--adapter-out DIR]

#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() {
    if let Err(e) = run() {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

#[cfg(not(target_arch = "wasm32"))]
fn run() -> ferrotune::Result<()> {
    use ferrotune::backend::Backend;
    use ferrotune_web_demo::demo::{Dataset, Model, Run, TrainOptions};

    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let device = get("--device").unwrap_or_else(|| "cpu".into());
    let rows: usize = get("--rows").map(|r| r.parse().expect("--rows N")).unwrap_or(64);
    let options: TrainOptions = match get("--options") {
        Some(j) => serde_json::from_str(&j).map_err(|e| ferrotune::msg!("--options: {e}"))?,
        None => TrainOptions::default(),
    };
    let backend: Box<dyn Backend> = match device.as_str() {
        "cpu" => Box::new(ferrotune::backend::cpu::CpuBackend::new()),
        "wgsl" => ferrotune::backend::wgsl::create()?,
        other => return Err(ferrotune::msg!("--device {other:?}: expected cpu or wgsl")),
    };
    let model = match get("--model") {
        Some(dir) => load_folder(std::path::Path::new(&dir))?,
        None => Model::bundled()?,
    };
    let data = match get("--data") {
        Some(path) => {
            let p = std::path::Path::new(&path);
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| path.clone());
            Dataset::File {
                name,
                bytes: std::fs::read(p).map_err(|e| ferrotune::Error::io(p, e))?,
            }
        }
        None => Dataset::Addition {
            digits: 2,
            rows,
            seed: options.seed,
        },
    };
    let (data_name, bytes, format) = data.into_file()?;
    if let Some(path) = get("--write-data") {
        std::fs::write(&path, &bytes).map_err(|e| ferrotune::Error::io(&path, e))?;
    }
    let data = Dataset::File {
        name: data_name.clone(),
        bytes,
    };
    let mut run = Run::new(&model, data, &options, backend)?;
    while pollster::block_on(run.step())?.is_some() {}
    if let Some(dir) = get("--adapter-out") {
        let (weights, config) = pollster::block_on(run.adapter())?.files()?;
        std::fs::create_dir_all(&dir).map_err(|e| ferrotune::Error::io(&dir, e))?;
        let dir = std::path::Path::new(&dir);
        for (name, bytes) in [
            ("adapter_model.safetensors", weights),
            ("adapter_config.json", config.into_bytes()),
        ] {
            let p = dir.join(name);
            std::fs::write(&p, bytes).map_err(|e| ferrotune::Error::io(&p, e))?;
        }
    }
    let out = serde_json::json!({
        "device": device,
        "model": model.name,
        "data": data_name,
        "format": format!("{format:?}"),
        "options": options,
        "rows": rows,
        "losses": run.losses,
    });
    println!("{out}");
    Ok(())
}

/// A model folder's files, named by the folder, as the page's folder picker passes them.
#[cfg(not(target_arch = "wasm32"))]
fn load_folder(dir: &std::path::Path) -> ferrotune::Result<ferrotune_web_demo::demo::Model> {
    use ferrotune_web_demo::demo::{Model, ModelFiles};
    let read = |name: &str| -> ferrotune::Result<Option<Vec<u8>>> {
        let p = dir.join(name);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ferrotune::Error::io(&p, e)),
        }
    };
    let files = ModelFiles {
        config_json: read("config.json")?,
        weights: read("model.safetensors")?,
        tokenizer_json: read("tokenizer.json")?,
        tokenizer_config_json: read("tokenizer_config.json")?,
    };
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    Model::load(&name, files)
}
