//! The parts of a Hugging Face `tokenizer_config.json` the data pipeline needs.
//!
//! Special tokens are given as a string, `null`, or an `AddedToken` object
//! (`{"__type": "AddedToken", "content": "<s>", ...}`); `chat_template` is a string or a list
//! of `{"name", "template"}` entries where `default` is the main one
//! (transformers `tokenization_utils_base.py`).

use crate::{Error, Result};
use serde_json::Value;

#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub named_templates: Vec<(String, String)>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
    pub additional_special_tokens: Vec<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
}

fn token_value(key: &str, v: &Value, origin: &str) -> Result<Option<String>> {
    match v {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.clone())),
        Value::Object(o) => match o.get("content") {
            Some(Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::format(
                origin,
                format!("`{key}` is an object without a string `content`"),
            )),
        },
        other => Err(Error::format(
            origin,
            format!("`{key}` must be a string, null or an AddedToken object, not {other}"),
        )),
    }
}

pub(crate) fn parse(bytes: &[u8], origin: &str) -> Result<TokenizerConfig> {
    let root: Value =
        serde_json::from_slice(bytes).map_err(|e| Error::format(origin, format!("not valid JSON: {e}")))?;
    let obj = root
        .as_object()
        .ok_or_else(|| Error::format(origin, "expected a JSON object at the top level"))?;
    let mut cfg = TokenizerConfig::default();
    let tok = |key: &str| -> Result<Option<String>> {
        match obj.get(key) {
            Some(v) => token_value(key, v, origin),
            None => Ok(None),
        }
    };
    cfg.bos_token = tok("bos_token")?;
    cfg.eos_token = tok("eos_token")?;
    cfg.pad_token = tok("pad_token")?;
    cfg.unk_token = tok("unk_token")?;
    for key in ["additional_special_tokens", "extra_special_tokens"] {
        if let Some(Value::Array(list)) = obj.get(key) {
            for v in list {
                if let Some(t) = token_value(key, v, origin)? {
                    cfg.additional_special_tokens.push(t);
                }
            }
        }
    }
    let flag = |key: &str| -> Result<Option<bool>> {
        match obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(Error::format(
                origin,
                format!("`{key}` must be true or false, not {other}"),
            )),
        }
    };
    cfg.add_bos_token = flag("add_bos_token")?;
    cfg.add_eos_token = flag("add_eos_token")?;
    match obj.get("chat_template") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => cfg.chat_template = Some(s.clone()),
        Some(Value::Array(list)) => {
            for (i, entry) in list.iter().enumerate() {
                let name = entry.get("name").and_then(Value::as_str);
                let template = entry.get("template").and_then(Value::as_str);
                match (name, template) {
                    (Some(n), Some(t)) => cfg.named_templates.push((n.to_string(), t.to_string())),
                    _ => {
                        return Err(Error::format(
                            origin,
                            format!("chat_template[{i}] must be an object with string `name` and `template`"),
                        ))
                    }
                }
            }
            cfg.chat_template = cfg
                .named_templates
                .iter()
                .find(|(n, _)| n == "default")
                .map(|(_, t)| t.clone());
        }
        Some(other) => {
            return Err(Error::format(
                origin,
                format!("`chat_template` must be a string or a list of named templates, not {other}"),
            ))
        }
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_strings_objects_and_named_templates() {
        let json = br#"{
            "bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": false},
            "eos_token": "</s>",
            "pad_token": null,
            "additional_special_tokens": ["<a>", {"content": "<b>"}],
            "add_bos_token": true,
            "chat_template": [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
        }"#;
        let c = parse(json, "tokenizer_config.json").unwrap();
        assert_eq!(c.bos_token.as_deref(), Some("<s>"));
        assert_eq!(c.eos_token.as_deref(), Some("</s>"));
        assert_eq!(c.pad_token, None);
        assert_eq!(c.additional_special_tokens, vec!["<a>", "<b>"]);
        assert_eq!(c.add_bos_token, Some(true));
        assert_eq!(c.add_eos_token, None);
        assert_eq!(c.chat_template.as_deref(), Some("D"));
        assert_eq!(c.named_templates[1], ("tool_use".to_string(), "T".to_string()));
    }

    #[test]
    fn bad_values_name_the_key() {
        let err = parse(br#"{"eos_token": 5}"#, "cfg.json").unwrap_err().to_string();
        assert!(err.contains("cfg.json") && err.contains("eos_token"), "{err}");
        let err = parse(br#"{"chat_template": [{"name": "x"}]}"#, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(err.contains("chat_template[0]"), "{err}");
        let err = parse(b"{not json", "cfg.json").unwrap_err().to_string();
        assert!(err.contains("not valid JSON"), "{err}");
    }
}
