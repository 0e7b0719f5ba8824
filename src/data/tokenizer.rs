//! A Hugging Face tokenizer (`tokenizer.json` through the `tokenizers` crate) plus the
//! settings transformers reads from `tokenizer_config.json`: the special tokens, whether to
//! add BOS/EOS, and the chat template.
//!
//! Loading follows transformers' `TokenizersBackend.__init__`
//! (`tokenization_utils_tokenizers.py`): named special tokens missing from the vocabulary are
//! added as special tokens, and when `add_bos_token`/`add_eos_token` is given (or the file has
//! no post-processor) the post-processor is rebuilt as `[bos] $A [eos]`.

use super::tokenizer_config::{self, TokenizerConfig};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::AddedToken;

/// Each token's `[start, end)` byte range in the encoded text.
pub type ByteOffsets = Vec<(usize, usize)>;

/// axolotl's `special_tokens:` overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpecialTokens {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unk_token: Option<String>,
}

#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    pad: Option<String>,
    unk: Option<String>,
    add_bos: bool,
    add_eos: bool,
    /// transformers rebuilds the post-processor from bos/eos in these cases.
    owns_post_processor: bool,
    chat_template: Option<String>,
    named_templates: Vec<(String, String)>,
    /// sha256 of the source files and every later change, for cache keys.
    fingerprint: Sha256,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("pad", &self.pad)
            .field("unk", &self.unk)
            .field("add_bos", &self.add_bos)
            .field("add_eos", &self.add_eos)
            .field("has_chat_template", &self.chat_template.is_some())
            .finish()
    }
}

fn tok_err(origin: &str, e: impl std::fmt::Display) -> Error {
    Error::format(origin, format!("tokenizer error: {e}"))
}

impl Tokenizer {
    /// Load `tokenizer.json`, and `tokenizer_config.json` and `chat_template.jinja` when present
    /// (a `chat_template.jinja` file replaces the config's template, as in transformers).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json_path = dir.join("tokenizer.json");
        let json = std::fs::read(&json_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::format(
                    &json_path,
                    "missing; a Hugging Face tokenizer folder must contain tokenizer.json \
                     (slow-only tokenizers with just tokenizer.model are not supported)",
                )
            } else {
                Error::io(&json_path, e)
            }
        })?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = match std::fs::read(&cfg_path) {
            Ok(b) => Some(b),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::io(&cfg_path, e)),
        };
        let mut tok = Self::build(
            &json,
            cfg.as_deref(),
            &json_path.display().to_string(),
            &cfg_path.display().to_string(),
        )?;
        let jinja_path = dir.join("chat_template.jinja");
        match std::fs::read_to_string(&jinja_path) {
            Ok(t) => tok.set_chat_template(Some(t)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(&jinja_path, e)),
        }
        Ok(tok)
    }

    /// Build from the file contents (no file system access; works on wasm32).
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        Self::build(
            tokenizer_json,
            tokenizer_config_json,
            "tokenizer.json",
            "tokenizer_config.json",
        )
    }

    fn build(json: &[u8], cfg: Option<&[u8]>, json_origin: &str, cfg_origin: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(|e| {
            Error::format(
                json_origin,
                format!("not a Hugging Face tokenizer.json this version can read: {e}"),
            )
        })?;
        let config = match cfg {
            Some(b) => tokenizer_config::parse(b, cfg_origin)?,
            None => TokenizerConfig::default(),
        };
        let mut fingerprint = Sha256::new();
        fingerprint.update((json.len() as u64).to_le_bytes());
        fingerprint.update(json);
        fingerprint.update(cfg.unwrap_or_default());
        let owns_post_processor =
            config.add_bos_token.is_some() || config.add_eos_token.is_some() || inner.get_post_processor().is_none();
        let mut tok = Tokenizer {
            inner,
            bos: config.bos_token,
            eos: config.eos_token,
            pad: config.pad_token,
            unk: config.unk_token,
            add_bos: config.add_bos_token.unwrap_or(false),
            add_eos: config.add_eos_token.unwrap_or(false),
            owns_post_processor,
            chat_template: config.chat_template,
            named_templates: config.named_templates,
            fingerprint,
        };
        let named: Vec<String> = [&tok.bos, &tok.eos, &tok.pad, &tok.unk]
            .into_iter()
            .flatten()
            .cloned()
            .chain(config.additional_special_tokens)
            .collect();
        let missing: Vec<AddedToken> = named
            .iter()
            .filter(|t| tok.inner.token_to_id(t).is_none())
            .map(|t| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        if !missing.is_empty() {
            tok.inner
                .add_special_tokens(missing)
                .map_err(|e| tok_err(cfg_origin, e))?;
        }
        tok.update_post_processor()?;
        Ok(tok)
    }

    /// transformers' `update_post_processor`: `[bos:0] $A:0 [eos:0]`.
    fn update_post_processor(&mut self) -> Result<()> {
        if !self.owns_post_processor {
            return Ok(());
        }
        let bos = match (&self.bos, self.bos_id()) {
            (Some(b), Some(id)) if self.add_bos => Some((b.clone(), id)),
            _ => None,
        };
        let eos = match (&self.eos, self.eos_id()) {
            (Some(e), Some(id)) if self.add_eos => Some((e.clone(), id)),
            _ => None,
        };
        self.add_bos = bos.is_some();
        self.add_eos = eos.is_some();
        let piece = |seq: &str, type_id: u8| -> String {
            let mut p = Vec::new();
            if let Some((b, _)) = &bos {
                p.push(format!("{b}:{type_id}"));
            }
            p.push(format!("${seq}:{type_id}"));
            if let Some((e, _)) = &eos {
                p.push(format!("{e}:{type_id}"));
            }
            p.join(" ")
        };
        let single = piece("A", 0);
        let pair = format!("{single} {}", piece("B", 1));
        let specials: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
        let pp = TemplateProcessing::builder()
            .try_single(single.as_str())
            .and_then(|b| b.try_pair(pair.as_str()))
            .map_err(|e| tok_err("tokenizer_config.json", e))?
            .special_tokens(specials)
            .build()
            .map_err(|e| tok_err("tokenizer_config.json", e))?;
        self.inner.with_post_processor(Some(pp));
        Ok(())
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encode", e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids and each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str, add_special_tokens: bool) -> Result<(Vec<u32>, ByteOffsets)> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| tok_err("encode", e))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| tok_err("decode", e))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos.as_deref()
    }
    pub fn eos_token(&self) -> Option<&str> {
        self.eos.as_deref()
    }
    pub fn pad_token(&self) -> Option<&str> {
        self.pad.as_deref()
    }
    pub fn unk_token(&self) -> Option<&str> {
        self.unk.as_deref()
    }
    pub fn bos_id(&self) -> Option<u32> {
        self.bos.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn eos_id(&self) -> Option<u32> {
        self.eos.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_deref().and_then(|t| self.token_to_id(t))
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id batches are padded with: the pad token, or else the eos token.
    pub fn padding_id(&self) -> Result<u32> {
        self.pad_id().or_else(|| self.eos_id()).ok_or_else(|| {
            Error::Config(
                "special_tokens.pad_token: the tokenizer has neither a pad nor an eos token; \
                 set special_tokens: {pad_token: ...} to a token of its vocabulary"
                    .to_string(),
            )
        })
    }

    /// Whether BOS / EOS are added by `encode(.., true)` under transformers' rules.
    pub fn adds_bos(&self) -> bool {
        self.owns_post_processor && self.add_bos
    }
    pub fn adds_eos(&self) -> bool {
        self.owns_post_processor && self.add_eos
    }

    /// Apply axolotl's `special_tokens:` overrides. Each token must already be in the
    /// vocabulary (adding one would need a larger embedding matrix).
    pub fn set_special_tokens(&mut self, overrides: &SpecialTokens) -> Result<()> {
        let entries = [
            ("bos_token", &overrides.bos_token),
            ("eos_token", &overrides.eos_token),
            ("pad_token", &overrides.pad_token),
            ("unk_token", &overrides.unk_token),
        ];
        for (key, value) in entries {
            if let Some(t) = value {
                if self.token_to_id(t).is_none() {
                    let hint = match self.eos_token() {
                        Some(e) => format!("; use an existing token such as `{e}` (the eos token)"),
                        None => String::new(),
                    };
                    return Err(Error::Config(format!(
                        "special_tokens.{key}: `{t}` is not in the tokenizer's vocabulary ({} tokens){hint}",
                        self.vocab_size()
                    )));
                }
            }
        }
        for (key, value) in entries {
            if let Some(t) = value {
                let slot = match key {
                    "bos_token" => &mut self.bos,
                    "eos_token" => &mut self.eos,
                    "pad_token" => &mut self.pad,
                    _ => &mut self.unk,
                };
                *slot = Some(t.clone());
                self.fingerprint.update(format!("\0{key}={t}").as_bytes());
            }
        }
        self.update_post_processor()
    }

    /// Add tokens to the vocabulary as special tokens (ids follow the current vocabulary);
    /// returns how many were new.
    pub fn add_special_tokens(&mut self, tokens: &[&str]) -> Result<usize> {
        let added: Vec<AddedToken> = tokens
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true).normalized(false))
            .collect();
        for t in tokens {
            self.fingerprint.update(format!("\0added={t}").as_bytes());
        }
        let n = self
            .inner
            .add_special_tokens(added)
            .map_err(|e| tok_err("add_special_tokens", e))?;
        Ok(n)
    }

    /// Whether `id` is an added token marked special (e.g. `<|im_end|>`).
    pub fn is_special(&self, id: u32) -> bool {
        self.inner
            .get_added_tokens_decoder()
            .get(&id)
            .is_some_and(|t| t.special)
    }

    /// The default chat template (`chat_template` in tokenizer_config.json).
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// A named template from a list-form `chat_template` (e.g. `tool_use`).
    pub fn named_chat_template(&self, name: &str) -> Option<&str> {
        self.named_templates
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.as_str())
    }

    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.fingerprint.update(b"\0chat_template=");
        self.fingerprint.update(template.as_deref().unwrap_or("").as_bytes());
        self.chat_template = template;
    }

    /// Hex sha256 over the tokenizer files and later changes; equal fingerprints tokenize alike.
    pub fn fingerprint(&self) -> String {
        hex(&self.fingerprint.clone().finalize())
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer small enough to write inline.
    fn tiny(post_processor: &str) -> Vec<u8> {
        format!(
            r#"{{"version":"1.0","truncation":null,"padding":null,
            "added_tokens":[{{"id":0,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}},
                            {{"id":1,"content":"</s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}}],
            "normalizer":null,"pre_tokenizer":{{"type":"Whitespace"}},"post_processor":{post_processor},"decoder":null,
            "model":{{"type":"WordLevel","vocab":{{"<s>":0,"</s>":1,"hello":2,"world":3,"[UNK]":4}},"unk_token":"[UNK]"}}}}"#
        )
        .into_bytes()
    }

    #[test]
    fn add_bos_and_eos_rebuild_the_post_processor() {
        let cfg = br#"{"bos_token":"<s>","eos_token":"</s>","add_bos_token":true,"add_eos_token":true}"#;
        let t = Tokenizer::from_bytes(&tiny("null"), Some(cfg)).unwrap();
        assert_eq!(t.encode("hello world", true).unwrap(), vec![0, 2, 3, 1]);
        assert_eq!(t.encode("hello world", false).unwrap(), vec![2, 3]);
        // Without the flags and without a post-processor nothing is added (transformers'
        // defaults are add_bos_token = add_eos_token = false).
        let t = Tokenizer::from_bytes(&tiny("null"), Some(br#"{"bos_token":"<s>"}"#)).unwrap();
        assert_eq!(t.encode("hello world", true).unwrap(), vec![2, 3]);
        assert_eq!(t.pad_id(), None);
        assert_eq!(t.bos_id(), Some(0));
    }

    #[test]
    fn overrides_must_exist_and_change_the_fingerprint() {
        let mut t = Tokenizer::from_bytes(&tiny("null"), Some(br#"{"eos_token":"</s>"}"#)).unwrap();
        let before = t.fingerprint();
        let err = t.set_special_tokens(&SpecialTokens {
            pad_token: Some("<pad>".into()),
            ..Default::default()
        });
        let msg = err.unwrap_err().to_string();
        assert!(
            msg.contains("special_tokens.pad_token") && msg.contains("`</s>`"),
            "{msg}"
        );
        t.set_special_tokens(&SpecialTokens {
            pad_token: Some("</s>".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(t.pad_id(), Some(1));
        assert_eq!(t.padding_id().unwrap(), 1);
        assert_ne!(t.fingerprint(), before);
    }

    #[test]
    fn missing_named_tokens_are_added_like_transformers() {
        let t = Tokenizer::from_bytes(&tiny("null"), Some(br#"{"pad_token":"<pad>"}"#)).unwrap();
        assert_eq!(t.pad_id(), Some(5));
        assert_eq!(t.vocab_size(), 6);
        assert!(t.is_special(5));
    }

    #[test]
    fn a_broken_tokenizer_json_is_a_clear_error() {
        let err = Tokenizer::from_bytes(b"{\"version\": \"1.0\", \"model\": 3}", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("tokenizer.json: not a Hugging Face tokenizer.json"),
            "{err}"
        );
        let err = Tokenizer::from_bytes(b"not json at all", None).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json") && err.contains("missing"), "{err}");
        std::fs::write(dir.path().join("tokenizer.json"), tiny("null")).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), b"{\"bos_token\": [1]}").unwrap();
        let err = Tokenizer::from_dir(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json") && err.contains("bos_token"),
            "{err}"
        );
    }
}
