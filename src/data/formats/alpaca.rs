//! `type: alpaca`: `{instruction, input?, output}` with axolotl's prompt
//! (`src/axolotl/prompters.py` `AlpacaPrompter`, instruct style) and tokenization
//! (`src/axolotl/prompt_tokenizers.py` `InstructionPromptTokenizingStrategy`): the prompt and
//! the response are tokenized separately, the response without BOS and with EOS appended.

use crate::data::sample::{Sample, IGNORE_INDEX};
use crate::data::tokenizer::Tokenizer;
use crate::Result;

/// The system sentence when the row has an input.
pub const SYSTEM_PROMPT: &str = "Below is an instruction that describes a task, paired with an input that provides \
further context. Write a response that appropriately completes the request.\n\n";
/// The system sentence when the row has no input.
pub const SYSTEM_NO_INPUT_PROMPT: &str =
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n";

/// The prompt text; an empty input counts as no input (Python truthiness, as in axolotl).
pub fn prompt(instruction: &str, input: Option<&str>) -> String {
    match input.filter(|i| !i.is_empty()) {
        Some(input) => {
            format!("{SYSTEM_PROMPT}### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
        }
        None => {
            format!("{SYSTEM_NO_INPUT_PROMPT}### Instruction:\n{instruction}\n\n### Response:\n")
        }
    }
}

/// axolotl `_tokenize`: encode with special tokens, truncated to `max_len`; append EOS when it
/// is not already last and there is room; drop a leading BOS when asked.
pub(crate) fn axolotl_tokenize(
    tok: &Tokenizer,
    text: &str,
    max_len: usize,
    add_eos: bool,
    strip_bos: bool,
) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true)?;
    ids.truncate(max_len);
    if let Some(eos) = tok.eos_id() {
        if add_eos && ids.last().is_some_and(|&l| l != eos) && ids.len() < max_len {
            ids.push(eos);
        }
    }
    if let (true, Some(&first), Some(bos)) = (strip_bos, ids.first(), tok.bos_id()) {
        if first == bos {
            ids.remove(0);
        }
    }
    Ok(ids)
}

pub fn tokenize(
    tok: &Tokenizer,
    instruction: &str,
    input: Option<&str>,
    output: &str,
    sequence_len: usize,
    train_on_inputs: bool,
) -> Result<Sample> {
    let prompt_ids = axolotl_tokenize(tok, &prompt(instruction, input), sequence_len, false, false)?;
    let response_ids = axolotl_tokenize(tok, output, sequence_len, true, true)?;
    let mut labels: Vec<i32> = if train_on_inputs {
        prompt_ids.iter().map(|&t| t as i32).collect()
    } else {
        vec![IGNORE_INDEX; prompt_ids.len()]
    };
    labels.extend(response_ids.iter().map(|&t| t as i32));
    let mut input_ids = prompt_ids;
    input_ids.extend(response_ids);
    Ok(Sample { input_ids, labels })
}
