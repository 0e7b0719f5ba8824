//! WordNet definitions from Debian's `wordnet-base` (`/usr/share/wordnet/data.{noun,verb,adj,adv}`):
//! `Define the {pos} "{word}" in one short phrase.` answered by the gloss's definition.
//!
//! Data file format (WordNet `wndb(5WN)`): lines starting with two spaces are the licence
//! header; a synset line is `offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...]
//! p_cnt ... | gloss` with `w_cnt` in hex. The first word names the synset; adjectives may carry
//! a syntactic marker such as `(a)`, `(p)` or `(ip)`, which is removed, and `_` becomes a space.
//! The definition is the gloss up to its first `;` (the rest are examples).
//! Split by lemma: `md5(lemma.lower()) % 20 == 0` goes to eval, so no word is in both files.

use super::{chat_line, lines_to_bytes};
use crate::data::atomic::write_atomic;
use crate::{Error, Result};
use md5::{Digest, Md5};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};

/// The data files and the part of speech each holds.
pub const DATA_FILES: [(&str, &str); 4] = [
    ("data.noun", "noun"),
    ("data.verb", "verb"),
    ("data.adj", "adjective"),
    ("data.adv", "adverb"),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gloss {
    /// The synset's first word, with spaces for underscores and no adjective marker.
    pub word: String,
    /// noun, verb, adjective or adverb.
    pub pos: &'static str,
    pub definition: String,
    /// Byte offset of the synset in its data file (its WordNet id).
    pub offset: u64,
}

impl Gloss {
    pub fn prompt(&self) -> String {
        format!("Define the {} \"{}\" in one short phrase.", self.pos, self.word)
    }
    pub fn chat_line(&self) -> String {
        chat_line(&self.prompt(), &self.definition)
    }
}

/// `md5(lemma.lower()) % 20 == 0`, the digest read as a big-endian integer.
pub fn is_eval_lemma(lemma: &str) -> bool {
    let digest = Md5::digest(lemma.to_lowercase().as_bytes());
    u128::from_be_bytes(digest.into()) % 20 == 0
}

fn pos_name(ss_type: &str) -> Option<&'static str> {
    match ss_type {
        "n" => Some("noun"),
        "v" => Some("verb"),
        "a" | "s" => Some("adjective"),
        "r" => Some("adverb"),
        _ => None,
    }
}

/// `word(ip)` -> `word`.
fn strip_marker(word: &str) -> &str {
    match word.strip_suffix(')').and_then(|w| w.rfind('(').map(|i| &word[..i])) {
        Some(w) if !w.is_empty() => w,
        _ => word,
    }
}

/// Parse one data file's text; returns the glosses and the licence header lines.
pub fn parse_data_file(text: &str, file: &str) -> Result<(Vec<Gloss>, Vec<String>)> {
    let mut glosses = Vec::new();
    let mut header = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if let Some(h) = line.strip_prefix("  ") {
            header.push(h.to_string());
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let bad = |what: &str| Error::Data(format!("{file}:{}: {what}", i + 1));
        let (head, gloss) = line.split_once(" | ").ok_or_else(|| bad("no ` | ` before the gloss"))?;
        let f: Vec<&str> = head.split_whitespace().collect();
        if f.len() < 6 {
            return Err(bad("too few fields"));
        }
        let offset: u64 = f[0].parse().map_err(|_| bad("offset is not a number"))?;
        let pos = pos_name(f[2]).ok_or_else(|| bad("unknown synset type"))?;
        let w_cnt = usize::from_str_radix(f[3], 16).map_err(|_| bad("word count is not hex"))?;
        if w_cnt == 0 {
            return Err(bad("synset without words"));
        }
        let word = strip_marker(f[4]).replace('_', " ");
        let definition = gloss.split(';').next().unwrap_or_default().trim().to_string();
        if definition.is_empty() {
            continue;
        }
        glosses.push(Gloss {
            word,
            pos,
            definition,
            offset,
        });
    }
    Ok((glosses, header))
}

/// The licence text from the header lines (`  N text`), numbers removed.
pub fn licence_text(header: &[String]) -> String {
    let mut out = String::new();
    for h in header {
        let text = h
            .trim_start_matches(|c: char| c.is_ascii_digit())
            .strip_prefix(' ')
            .unwrap_or("");
        out.push_str(text.trim_end());
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone)]
pub struct WordnetData {
    pub glosses: Vec<Gloss>,
    /// The licence notice from the data files' header.
    pub licence: String,
}

/// Read the four data files in `dir`.
pub fn read_wordnet(dir: &Path) -> Result<WordnetData> {
    let mut glosses = Vec::new();
    let mut licence = None;
    for (name, _) in DATA_FILES {
        let path = dir.join(name);
        let bytes = std::fs::read(&path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::format(
                    &path,
                    "missing; install Debian's wordnet-base (apt-get install wordnet-base)",
                )
            } else {
                Error::io(&path, e)
            }
        })?;
        let text = String::from_utf8_lossy(&bytes);
        let (g, header) = parse_data_file(&text, &path.display().to_string())?;
        if licence.is_none() && !header.is_empty() {
            licence = Some(licence_text(&header));
        }
        glosses.extend(g);
    }
    let licence = licence.ok_or_else(|| Error::format(dir, "no licence header in the WordNet data files"))?;
    Ok(WordnetData { glosses, licence })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordnetOptions {
    /// Keep at most this many (a seeded random choice); None keeps all.
    pub max_train: Option<usize>,
    pub max_eval: Option<usize>,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WordnetFiles {
    pub train: PathBuf,
    pub eval: PathBuf,
    pub licence: PathBuf,
    pub n_train: usize,
    pub n_eval: usize,
}

/// Split by lemma, optionally subsample, and write `train.jsonl`, `eval.jsonl` and the
/// licence notice `LICENSE.wordnet` into `out_dir`.
pub fn write_wordnet(src_dir: &Path, out_dir: &Path, opts: &WordnetOptions) -> Result<WordnetFiles> {
    let data = read_wordnet(src_dir)?;
    let (mut eval, mut train): (Vec<Gloss>, Vec<Gloss>) =
        data.glosses.into_iter().partition(|g| is_eval_lemma(&g.word));
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    for (set, max) in [(&mut train, opts.max_train), (&mut eval, opts.max_eval)] {
        if let Some(max) = max.filter(|&m| m < set.len()) {
            set.shuffle(&mut rng);
            set.truncate(max);
        }
    }
    let files = WordnetFiles {
        train: out_dir.join("train.jsonl"),
        eval: out_dir.join("eval.jsonl"),
        licence: out_dir.join("LICENSE.wordnet"),
        n_train: train.len(),
        n_eval: eval.len(),
    };
    let lines = |gs: &[Gloss]| lines_to_bytes(&gs.iter().map(Gloss::chat_line).collect::<Vec<_>>());
    write_atomic(&files.train, &lines(&train))?;
    write_atomic(&files.eval, &lines(&eval))?;
    let notice = format!(
        "The definitions in train.jsonl and eval.jsonl come from WordNet 3.0 (Debian package wordnet-base).\n\n{}",
        data.licence
    );
    write_atomic(&files.licence, notice.as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_md5_split() {
        assert_eq!(strip_marker("galore(ip)"), "galore");
        assert_eq!(strip_marker("outback(a)"), "outback");
        assert_eq!(strip_marker("able"), "able");
        // Residues from python3: int(hashlib.md5(w.encode()).hexdigest(), 16) % 20
        // ("dog" 5, "water" 0, "ice cream" 3).
        assert!(!is_eval_lemma("Dog"));
        assert!(is_eval_lemma("water"));
        assert!(is_eval_lemma("WATER"));
        assert!(!is_eval_lemma("ice cream"));
    }
}
