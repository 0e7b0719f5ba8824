//! The addition task: `What is {a} + {b}?` answered by `{a+b}`, with `a` and `b` uniform over
//! the `digits`-digit numbers. Train and eval share no (a, b) pair and neither repeats a pair;
//! the eval file's assistant content is the reference answer for exact-match scoring.

use super::{chat_line, lines_to_bytes};
use crate::data::atomic::write_atomic;
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdditionOptions {
    /// Digits of each operand, 1 to 18.
    pub digits: u32,
    pub n_train: usize,
    pub n_eval: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AdditionProblem {
    pub a: u64,
    pub b: u64,
}

impl AdditionProblem {
    pub fn prompt(&self) -> String {
        format!("What is {} + {}?", self.a, self.b)
    }
    pub fn answer(&self) -> String {
        (self.a + self.b).to_string()
    }
    pub fn chat_line(&self) -> String {
        chat_line(&self.prompt(), &self.answer())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdditionSet {
    pub train: Vec<AdditionProblem>,
    pub eval: Vec<AdditionProblem>,
}

pub fn generate_addition(opts: &AdditionOptions) -> Result<AdditionSet> {
    if !(1..=18).contains(&opts.digits) {
        return Err(Error::Config(format!(
            "digits: {} must be between 1 and 18",
            opts.digits
        )));
    }
    let lo = 10u64.pow(opts.digits - 1);
    let hi = 10u64.pow(opts.digits) - 1;
    let per_operand = (hi - lo + 1) as u128;
    let space = per_operand * per_operand;
    let total = (opts.n_train + opts.n_eval) as u128;
    if total > space {
        return Err(Error::Config(format!(
            "{} train + {} eval problems need that many distinct pairs, but {}-digit operands give only {space}",
            opts.n_train, opts.n_eval, opts.digits
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    let pairs: Vec<AdditionProblem> = if total * 2 > space {
        // Dense request: enumerate every pair and take a shuffled prefix.
        let mut all: Vec<AdditionProblem> = (lo..=hi)
            .flat_map(|a| (lo..=hi).map(move |b| AdditionProblem { a, b }))
            .collect();
        all.shuffle(&mut rng);
        all.truncate(total as usize);
        all
    } else {
        let mut seen = HashSet::with_capacity(total as usize);
        let mut out = Vec::with_capacity(total as usize);
        while out.len() < total as usize {
            let p = AdditionProblem {
                a: rng.random_range(lo..=hi),
                b: rng.random_range(lo..=hi),
            };
            if seen.insert(p) {
                out.push(p);
            }
        }
        out
    };
    let train = pairs[opts.n_eval..].to_vec();
    let eval = pairs[..opts.n_eval].to_vec();
    Ok(AdditionSet { train, eval })
}

/// Files written by [`write_addition`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdditionFiles {
    pub train: PathBuf,
    pub eval: PathBuf,
}

/// Write `train.jsonl` and `eval.jsonl` into `dir`.
pub fn write_addition(dir: &Path, opts: &AdditionOptions) -> Result<AdditionFiles> {
    let set = generate_addition(opts)?;
    let files = AdditionFiles {
        train: dir.join("train.jsonl"),
        eval: dir.join("eval.jsonl"),
    };
    let lines = |ps: &[AdditionProblem]| lines_to_bytes(&ps.iter().map(AdditionProblem::chat_line).collect::<Vec<_>>());
    write_atomic(&files.train, &lines(&set.train))?;
    write_atomic(&files.eval, &lines(&set.eval))?;
    Ok(files)
}
