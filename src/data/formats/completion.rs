//! `type: completion`: raw text, every token trained; text longer than `sequence_len` becomes
//! several samples (axolotl `src/axolotl/prompt_strategies/completion.py`: tokenize with
//! special tokens, append EOS, cut into `sequence_len` pieces).

use crate::data::sample::Sample;
use crate::data::tokenizer::Tokenizer;
use crate::Result;

pub fn tokenize(tok: &Tokenizer, text: &str, sequence_len: usize) -> Result<Vec<Sample>> {
    let mut ids = tok.encode(text, true)?;
    if let Some(eos) = tok.eos_id() {
        if ids.last() != Some(&eos) {
            ids.push(eos);
        }
    }
    Ok(ids
        .chunks(sequence_len.max(1))
        .map(|c| Sample::all_trained(c.to_vec()))
        .collect())
}
