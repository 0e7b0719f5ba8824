//! Demo data sets written as `chat_template` JSON Lines
//! (`{"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}`).

pub mod arithmetic;
pub mod wordnet;

use serde_json::json;

/// One JSON Lines row with a user prompt and the assistant's answer.
pub fn chat_line(prompt: &str, answer: &str) -> String {
    json!({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]}).to_string()
}

pub(crate) fn lines_to_bytes(lines: &[String]) -> Vec<u8> {
    let mut out = Vec::with_capacity(lines.iter().map(|l| l.len() + 1).sum());
    for l in lines {
        out.extend_from_slice(l.as_bytes());
        out.push(b'\n');
    }
    out
}
