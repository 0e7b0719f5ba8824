//! `type: chat_template`: a list of messages rendered with a chat template, with labels on the
//! trained turns (axolotl `src/axolotl/prompt_strategies/chat_template.py`).
//!
//! Locating each message: the conversation is rendered once as it is, then once per message
//! with that message's content replaced by a marker. The marker's position gives where the
//! content starts; the text after the marker, which must equal the end of the real rendering,
//! gives where it ends. The byte span is mapped to tokens through the tokenizer's offsets, so
//! no token ids are guessed and templates that trim or decorate content still work.
//!
//! A turn's end-of-turn token is the first eos (or `eot_tokens`) id at most 3 tokens after its
//! content, as axolotl finds it. `train_on_eos` picks which of those are trained.

use crate::data::chat_template::{ChatTemplate, TemplateVars, CHATML};
use crate::data::config::{ChatTemplateChoice, DataOptions, DatasetSpec, DatasetType, TrainOnEos};
use crate::data::reader::kind;
use crate::data::sample::{Sample, IGNORE_INDEX};
use crate::data::tokenizer::Tokenizer;
use crate::{Error, Result};
use serde_json::{Map, Value};

/// Stands in for a message's content; private-use characters that no tokenizer treats specially
/// and no template changes (no letters, no whitespace).
const MARKER: &str = "\u{E000}\u{E0A7}\u{E000}";
/// How far after a turn's content its end-of-turn token may sit (axolotl allows 3).
const EOT_WINDOW: usize = 3;

#[derive(Debug)]
pub struct ChatFormat {
    template: ChatTemplate,
    vars: TemplateVars,
    field_messages: String,
    /// (message property, key in the data)
    mappings: Vec<(String, String)>,
    roles_to_train: Vec<String>,
    train_on_eos: TrainOnEos,
    train_on_inputs: bool,
    eot_ids: Vec<u32>,
}

/// The template text a spec selects (dataset keys first, then the root keys).
pub fn template_source(spec: &DatasetSpec, opts: &DataOptions, tok: &Tokenizer) -> Result<String> {
    // A template text given without a choice is the choice (as axolotl sets `jinja` then);
    // the dataset's own keys come before the top-level ones.
    let pick = |c: &Option<ChatTemplateChoice>, j: &Option<String>| match (c, j) {
        (Some(c), _) => Some(c.clone()),
        (None, Some(_)) => Some(ChatTemplateChoice::Jinja),
        (None, None) => None,
    };
    let choice = pick(&spec.chat_template, &spec.chat_template_jinja)
        .or_else(|| pick(&opts.chat_template, &opts.chat_template_jinja))
        .unwrap_or_default();
    match choice {
        ChatTemplateChoice::Chatml => Ok(CHATML.to_string()),
        ChatTemplateChoice::Jinja => spec
            .chat_template_jinja
            .clone()
            .or_else(|| opts.chat_template_jinja.clone())
            .ok_or_else(|| Error::Config("chat_template_jinja: required when chat_template is `jinja`".into())),
        ChatTemplateChoice::TokenizerDefault => tok.chat_template().map(str::to_string).ok_or_else(|| {
            Error::Config(
                "chat_template: tokenizer_default, but the tokenizer has no chat template; set \
                 chat_template: chatml, or chat_template: jinja with chat_template_jinja"
                    .into(),
            )
        }),
        ChatTemplateChoice::TokenizerDefaultFallbackChatml => Ok(tok
            .chat_template()
            .map(str::to_string)
            .unwrap_or_else(|| CHATML.to_string())),
    }
}

impl ChatFormat {
    pub fn new(spec: &DatasetSpec, opts: &DataOptions, tok: &Tokenizer) -> Result<Self> {
        let template = ChatTemplate::new(&template_source(spec, opts, tok)?)?;
        let mut mappings: Vec<(String, String)> = spec
            .message_property_mappings
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect();
        for prop in ["role", "content"] {
            if !mappings.iter().any(|(p, _)| p == prop) {
                mappings.push((prop.to_string(), prop.to_string()));
            }
        }
        let mut eot_ids: Vec<u32> = tok.eos_id().into_iter().collect();
        for t in opts.eot_tokens.iter().flatten() {
            let id = tok.token_to_id(t).ok_or_else(|| {
                Error::Config(format!(
                    "eot_tokens: `{t}` is not a token of the tokenizer's vocabulary"
                ))
            })?;
            eot_ids.push(id);
        }
        Ok(ChatFormat {
            template,
            vars: TemplateVars::from_tokenizer(tok),
            field_messages: spec.field_messages_or_default().to_string(),
            mappings,
            roles_to_train: spec.roles_to_train_or_default(),
            train_on_eos: spec.train_on_eos.unwrap_or_default(),
            train_on_inputs: opts.train_on_inputs,
            eot_ids,
        })
    }

    /// The template, for rendering prompts elsewhere (e.g. evaluation).
    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    /// A row's messages with the property mappings applied.
    pub fn messages(&self, row: &Map<String, Value>) -> Result<Vec<Value>> {
        let list = super::field(
            row,
            &self.field_messages,
            DatasetType::ChatTemplate,
            "; set `field_messages:` to the column that holds the message list",
        )?;
        let list = list.as_array().ok_or_else(|| {
            Error::Msg(format!(
                "field `{}` must be a list of messages, found {}",
                self.field_messages,
                kind(list)
            ))
        })?;
        let mut out = Vec::with_capacity(list.len());
        for (i, m) in list.iter().enumerate() {
            let Value::Object(orig) = m else {
                return Err(Error::Msg(format!(
                    "{}[{i}] must be an object, found {}",
                    self.field_messages,
                    kind(m)
                )));
            };
            let mut msg = orig.clone();
            for (prop, src) in &self.mappings {
                if prop != src {
                    if let Some(v) = msg.remove(src) {
                        msg.insert(prop.clone(), v);
                    }
                }
            }
            for prop in ["role", "content"] {
                match msg.get(prop) {
                    Some(Value::String(_)) => {}
                    Some(other) => {
                        return Err(Error::Msg(format!(
                            "{}[{i}].{prop} must be a string, found {}",
                            self.field_messages,
                            kind(other)
                        )))
                    }
                    None => {
                        let src = self
                            .mappings
                            .iter()
                            .find(|(p, _)| p == prop)
                            .map(|(_, s)| s.as_str())
                            .unwrap_or(prop);
                        return Err(Error::Msg(format!(
                            "{}[{i}] has no `{src}` (its keys: {}); name the key that holds the {prop} with \
                             message_property_mappings: {{{prop}: <key>}}",
                            self.field_messages,
                            super::keys(orig)
                        )));
                    }
                }
            }
            out.push(Value::Object(msg));
        }
        Ok(out)
    }

    /// Byte range of each message's content in `full`, or None when the template does not
    /// print it.
    fn content_spans(&self, messages: &[Value], full: &str) -> Result<Vec<Option<(usize, usize)>>> {
        let mut spans = Vec::with_capacity(messages.len());
        for i in 0..messages.len() {
            let mut marked = messages.to_vec();
            marked[i]["content"] = Value::String(MARKER.to_string());
            let r = self.template.render_json(&marked, false, &self.vars)?;
            let Some(start) = r.find(MARKER) else {
                spans.push(None);
                continue;
            };
            let after = &r.as_bytes()[start + MARKER.len()..];
            let ok = full.len() >= start + after.len()
                && full.as_bytes()[..start] == r.as_bytes()[..start]
                && full.as_bytes().ends_with(after);
            if !ok {
                return Err(Error::Msg(format!(
                    "cannot locate message {i} in the rendered conversation: the chat template prints its \
                     content more than once or changes the surrounding text depending on it"
                )));
            }
            spans.push(Some((start, full.len() - after.len())));
        }
        Ok(spans)
    }

    pub fn tokenize(&self, tok: &Tokenizer, row: &Map<String, Value>) -> Result<Sample> {
        let messages = self.messages(row)?;
        let full = self.template.render_json(&messages, false, &self.vars)?;
        let spans = self.content_spans(&messages, &full)?;
        // Chat templates write their own special tokens (transformers encodes with
        // add_special_tokens=False in apply_chat_template).
        let (ids, offsets) = tok.encode_with_offsets(&full, false)?;
        let n = ids.len();
        let mut labels = vec![IGNORE_INDEX; n];
        let mut last_eot = None;
        for (msg, span) in messages.iter().zip(&spans) {
            let Some((s, e)) = *span else { continue };
            let role = msg["role"].as_str().unwrap_or_default();
            let train = self.train_on_inputs || self.roles_to_train.iter().any(|r| r == role);
            // Tokens overlapping [s, e), and any zero-width tokens between them.
            let first = offsets.iter().position(|&(a, b)| b > s && a < e);
            let last = offsets.iter().rposition(|&(a, b)| a < e && b > s);
            let end = match (first, last) {
                (Some(f), Some(l)) if s < e => {
                    if train {
                        for t in f..=l {
                            labels[t] = ids[t] as i32;
                        }
                    }
                    l + 1
                }
                _ => offsets.iter().position(|&(a, _)| a >= e).unwrap_or(n),
            };
            let eot = (end..n.min(end + EOT_WINDOW + 1)).find(|&t| self.eot_ids.contains(&ids[t]));
            if let Some(t) = eot {
                last_eot = Some(t);
                if self.train_on_eos == TrainOnEos::All || (self.train_on_eos == TrainOnEos::Turn && train) {
                    labels[t] = ids[t] as i32;
                }
            }
        }
        if let (TrainOnEos::Last, Some(t)) = (self.train_on_eos, last_eot) {
            labels[t] = ids[t] as i32;
        }
        Ok(Sample { input_ids: ids, labels })
    }
}
