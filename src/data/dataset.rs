//! Prepare the training data: read every dataset, tokenize its rows, apply
//! `excess_length_strategy`, split off the eval set (`val_set_size`), shuffle, and cache.

use super::cache;
use super::config::{DataOptions, DatasetSpec, ExcessLengthStrategy};
use super::formats::Formatter;
use super::reader::{self, SourceFile};
use super::sample::Sample;
use super::tokenizer::{hex, Tokenizer};
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Counts over the whole preparation.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStats {
    /// Rows read from the files.
    pub rows: usize,
    /// Samples kept (train + eval).
    pub samples: usize,
    pub train_samples: usize,
    pub eval_samples: usize,
    /// Samples removed: `dropped_long + dropped_no_labels`.
    pub dropped: usize,
    /// Longer than `sequence_len` under `excess_length_strategy: drop`.
    pub dropped_long: usize,
    /// Nothing left to train on (no label after the first position).
    pub dropped_no_labels: usize,
    /// Cut to `sequence_len` under `excess_length_strategy: truncate`.
    pub truncated: usize,
    /// Extra samples from `completion` text split into `sequence_len` pieces.
    pub split_extra: usize,
    /// Tokens in the kept samples.
    pub tokens: usize,
    /// Labels that take part in the loss, over the kept samples.
    pub label_tokens: usize,
    /// Longest kept sample.
    pub max_len: usize,
    /// Loaded from `dataset_prepared_path` rather than tokenized now.
    #[serde(skip)]
    pub from_cache: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PreparedData {
    pub train: Vec<Sample>,
    pub eval: Vec<Sample>,
    pub stats: DataStats,
}

impl PreparedData {
    /// Refuses token ids past the embedding (a tokenizer that is not the model's, or a
    /// named special token the tokenizer lacked and had to add): they would train as zero
    /// rows. `token` names an id for the message where a tokenizer is at hand.
    pub fn check_ids_fit(&self, vocab: usize, token: &dyn Fn(u32) -> Option<String>) -> Result<()> {
        let max = self
            .train
            .iter()
            .chain(&self.eval)
            .flat_map(|s| s.input_ids.iter().copied())
            .max();
        match max {
            Some(id) if id as usize >= vocab => Err(Error::Data(format!(
                "the data holds token id {id}{}, but the model's vocabulary has {vocab} ids: the tokenizer \
                 does not match the model, or a special token named in tokenizer_config.json or `special_tokens` \
                 is missing from it (adding tokens would need a larger embedding, which is not supported); use \
                 the model's own tokenizer and name only tokens it has",
                token(id).map(|t| format!(" (`{t}`)")).unwrap_or_default()
            ))),
            _ => Ok(()),
        }
    }
}

/// Everything that changes the prepared samples; packing and batch keys do not.
#[derive(Serialize)]
struct KeyOptions<'a> {
    version: u32,
    sequence_len: usize,
    train_on_inputs: bool,
    excess_length_strategy: ExcessLengthStrategy,
    val_set_size: f64,
    shuffle: bool,
    seed: u64,
    chat_template: &'a Option<super::config::ChatTemplateChoice>,
    chat_template_jinja: &'a Option<String>,
    eot_tokens: &'a Option<Vec<String>>,
}

fn cache_key(datasets: &[(&DatasetSpec, Vec<SourceFile>)], opts: &DataOptions, tok: &Tokenizer) -> String {
    let mut h = Sha256::new();
    let mut put = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    put(b"ferrotune prepared dataset");
    put(tok.fingerprint().as_bytes());
    let ko = KeyOptions {
        version: 1,
        sequence_len: opts.sequence_len,
        train_on_inputs: opts.train_on_inputs,
        excess_length_strategy: opts.excess_length_strategy,
        val_set_size: opts.val_set_size,
        shuffle: opts.shuffle,
        seed: opts.seed,
        chat_template: &opts.chat_template,
        chat_template_jinja: &opts.chat_template_jinja,
        eot_tokens: &opts.eot_tokens,
    };
    put(&serde_json::to_vec(&ko).expect("options serialize"));
    for (spec, files) in datasets {
        put(&serde_json::to_vec(spec).expect("spec serializes"));
        for f in files {
            put(f.path.to_string_lossy().as_bytes());
            put(&f.bytes);
        }
    }
    hex(&h.finalize())
}

/// Read, tokenize, filter, split and shuffle the datasets; use or fill the cache in
/// `dataset_prepared_path` when it is set.
pub fn prepare(datasets: &[DatasetSpec], opts: &DataOptions, tok: &Tokenizer) -> Result<PreparedData> {
    opts.validate()?;
    if datasets.is_empty() {
        return Err(Error::Config("datasets: empty; name at least one dataset".to_string()));
    }
    for (i, spec) in datasets.iter().enumerate() {
        spec.validate(&format!("datasets[{i}]"))?;
    }
    let mut sources = Vec::with_capacity(datasets.len());
    for spec in datasets {
        sources.push((spec, reader::read_sources(spec)?));
    }
    let cache_path = match &opts.dataset_prepared_path {
        Some(dir) => {
            let key = cache_key(&sources, opts, tok);
            let path = cache::cache_file(dir, &key);
            if let Some(data) = cache::load(&path, &key)? {
                return Ok(data);
            }
            Some((path, key))
        }
        None => None,
    };
    let data = prepare_uncached(&sources, opts, tok)?;
    if let Some((path, key)) = cache_path {
        cache::save(&path, &key, &data)?;
    }
    Ok(data)
}

/// [`prepare`] for one dataset whose file is given as bytes (the browser has no paths);
/// `name` (e.g. `train.jsonl`) names it in errors and picks JSON array vs JSON Lines.
/// No cache is used.
pub fn prepare_bytes(
    spec: &DatasetSpec,
    name: &str,
    bytes: Vec<u8>,
    opts: &DataOptions,
    tok: &Tokenizer,
) -> Result<PreparedData> {
    opts.validate()?;
    let source = SourceFile {
        path: name.into(),
        bytes,
    };
    prepare_uncached(&[(spec, vec![source])], opts, tok)
}

fn prepare_uncached(
    sources: &[(&DatasetSpec, Vec<SourceFile>)],
    opts: &DataOptions,
    tok: &Tokenizer,
) -> Result<PreparedData> {
    let seq = opts.sequence_len;
    let mut stats = DataStats::default();
    let mut samples = Vec::new();
    for (i, (spec, files)) in sources.iter().enumerate() {
        let formatter = Formatter::new(spec, opts, tok).map_err(|e| match e {
            Error::Msg(m) => Error::Config(format!("datasets[{i}]: {m}")),
            other => other,
        })?;
        // One file parsed at a time; the bar's total grows as files are read.
        let task = crate::progress::task(&format!("tokenizing {}", spec.path), 0);
        let (first_row, mut total) = (stats.rows, 0);
        for file in files {
            let rows = reader::parse_rows(file)?;
            total += rows.len();
            task.set_total(total as u64);
            for row in rows {
                task.set_done((stats.rows - first_row) as u64);
                stats.rows += 1;
                let loc = &row.loc;
                let produced = formatter.format_row(tok, &row.fields).map_err(|e| match e {
                    Error::Msg(m) => Error::Data(format!("{loc}: {m}")),
                    other => other,
                })?;
                stats.split_extra += produced.len().saturating_sub(1);
                for mut s in produced {
                    if s.len() > seq {
                        match opts.excess_length_strategy {
                            ExcessLengthStrategy::Drop => {
                                stats.dropped_long += 1;
                                continue;
                            }
                            ExcessLengthStrategy::Truncate => {
                                s.truncate(seq);
                                stats.truncated += 1;
                            }
                            ExcessLengthStrategy::Raise => {
                                return Err(Error::Data(format!(
                                    "{loc}: the sample has {} tokens, more than sequence_len {seq} \
                                 (excess_length_strategy: raise); raise sequence_len or use drop or truncate",
                                    s.len()
                                )));
                            }
                        }
                    }
                    if s.n_label_tokens() == 0 {
                        stats.dropped_no_labels += 1;
                        continue;
                    }
                    samples.push(s);
                }
            }
        }
    }
    stats.dropped = stats.dropped_long + stats.dropped_no_labels;
    if samples.is_empty() {
        return Err(Error::Data(format!(
            "no samples left to train on: {} rows read, {} samples longer than sequence_len {seq} dropped, \
             {} with no trained tokens dropped. Check the dataset fields and roles_to_train, raise \
             sequence_len, or set excess_length_strategy: truncate",
            stats.rows, stats.dropped_long, stats.dropped_no_labels
        )));
    }
    let (train, eval) = split(samples, opts)?;
    stats.train_samples = train.len();
    stats.eval_samples = eval.len();
    stats.samples = train.len() + eval.len();
    for s in train.iter().chain(&eval) {
        stats.tokens += s.len();
        stats.label_tokens += s.n_label_tokens();
        stats.max_len = stats.max_len.max(s.len());
    }
    Ok(PreparedData { train, eval, stats })
}

/// Number of eval samples for `val_set_size` (a fraction rounds up, as in `datasets`'
/// `train_test_split`; a value >= 1 is a count).
pub fn eval_count(val_set_size: f64, n: usize) -> usize {
    if val_set_size <= 0.0 {
        0
    } else if val_set_size < 1.0 {
        (val_set_size * n as f64).ceil() as usize
    } else {
        val_set_size as usize
    }
}

/// Seeded split: a permutation picks the eval samples (kept in dataset order); the rest is the
/// training set, shuffled when `shuffle` is on.
fn split(samples: Vec<Sample>, opts: &DataOptions) -> Result<(Vec<Sample>, Vec<Sample>)> {
    let n = samples.len();
    let n_eval = eval_count(opts.val_set_size, n);
    if n_eval >= n && n_eval > 0 {
        return Err(Error::Config(format!(
            "val_set_size: {} takes {n_eval} of the {n} samples for evaluation and leaves none for training",
            opts.val_set_size
        )));
    }
    let mut is_eval = vec![false; n];
    if n_eval > 0 {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        rng.set_stream(1);
        let mut perm: Vec<usize> = (0..n).collect();
        perm.shuffle(&mut rng);
        for &i in &perm[..n_eval] {
            is_eval[i] = true;
        }
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - n_eval), Vec::with_capacity(n_eval));
    for (s, e) in samples.into_iter().zip(is_eval) {
        if e {
            eval.push(s);
        } else {
            train.push(s);
        }
    }
    if opts.shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
        rng.set_stream(2);
        train.shuffle(&mut rng);
    }
    Ok((train, eval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eval_counts() {
        assert_eq!(eval_count(0.0, 10), 0);
        assert_eq!(eval_count(0.1, 10), 1);
        assert_eq!(eval_count(0.15, 10), 2);
        assert_eq!(eval_count(3.0, 10), 3);
    }

    #[test]
    fn split_is_seeded_and_complete() {
        let samples: Vec<Sample> = (0..50).map(|i| Sample::all_trained(vec![i, i + 1])).collect();
        let opts = DataOptions {
            val_set_size: 0.2,
            ..Default::default()
        };
        let (train, eval) = split(samples.clone(), &opts).unwrap();
        assert_eq!((train.len(), eval.len()), (40, 10));
        let mut all: Vec<u32> = train.iter().chain(&eval).map(|s| s.input_ids[0]).collect();
        all.sort();
        assert_eq!(all, (0..50).collect::<Vec<u32>>());
        assert_eq!(split(samples.clone(), &opts).unwrap(), (train.clone(), eval.clone()));
        let other = split(
            samples.clone(),
            &DataOptions {
                seed: 7,
                ..opts.clone()
            },
        )
        .unwrap();
        assert_ne!(other.1, eval);
        let err = split(
            samples,
            &DataOptions {
                val_set_size: 50.0,
                ..opts
            },
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("val_set_size"), "{err}");
    }
}
