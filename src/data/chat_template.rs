//! Hugging Face chat templates rendered with minijinja, in transformers' dialect
//! (`utils/chat_template_utils.py`, `_compile_jinja_template` and `render_jinja_template`):
//! `trim_blocks` and `lstrip_blocks` on, loop controls, Python string methods
//! (`.strip()`, `.startswith()`, ... through minijinja-contrib's pycompat),
//! `raise_exception(msg)`, `strftime_now(fmt)`, a `tojson` that is Python's `json.dumps`, and
//! `{% generation %}` blocks (rendered as plain content; label masks are found separately).

use super::pyjson;
use super::tokenizer::Tokenizer;
use crate::{Error, Result};
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

/// The ChatML template (`<|im_start|>{role}\n{content}<|im_end|>\n` per message), as axolotl's
/// `chatml` choice and most ChatML models ship it.
pub const CHATML: &str =
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}\
{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Variables besides `messages` and `add_generation_prompt`: the tokenizer's special tokens
/// (transformers passes its `special_tokens_map`) and any extra keyword arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TemplateVars {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl TemplateVars {
    pub fn from_tokenizer(tok: &Tokenizer) -> Self {
        TemplateVars {
            bos_token: tok.bos_token().map(str::to_string),
            eos_token: tok.eos_token().map(str::to_string),
            unk_token: tok.unk_token().map(str::to_string),
            pad_token: tok.pad_token().map(str::to_string),
            extra: Default::default(),
        }
    }
}

const NAME: &str = "chat_template";
const RAISED: &str = "raise_exception: ";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChatTemplate")
    }
}

impl ChatTemplate {
    /// Compile `source`; a syntax error is reported with its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .map_err(|e| Error::Msg(format!("chat template: {e}")))?,
        );
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(
                    ErrorKind::InvalidOperation,
                    format!("{RAISED}{msg}"),
                ))
            },
        );
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, replace_generation_tags(source))
            .map_err(|e| Error::Msg(format!("chat template does not parse: {}", describe(&e))))?;
        Ok(ChatTemplate { env })
    }

    /// The template a tokenizer ships, or an error saying how to provide one.
    pub fn from_tokenizer(tok: &Tokenizer) -> Result<Self> {
        let src = tok.chat_template().ok_or_else(|| {
            Error::Config(
                "chat_template: the tokenizer has no chat template (tokenizer_config.json has no \
                 `chat_template` and there is no chat_template.jinja); set chat_template: chatml, or \
                 chat_template: jinja with chat_template_jinja"
                    .to_string(),
            )
        })?;
        Self::new(src)
    }

    pub fn render(&self, messages: &[Message], add_generation_prompt: bool, vars: &TemplateVars) -> Result<String> {
        let msgs: Vec<serde_json::Value> = messages
            .iter()
            .map(|m| serde_json::to_value(m).expect("messages serialize"))
            .collect();
        self.render_json(&msgs, add_generation_prompt, vars)
    }

    /// Render messages given as JSON objects (extra keys such as `name` or `tool_calls` are
    /// visible to the template).
    pub fn render_json(
        &self,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        vars: &TemplateVars,
    ) -> Result<String> {
        let mut ctx = vars.extra.clone();
        ctx.insert("messages".into(), serde_json::Value::Array(messages.to_vec()));
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let tokens = [
            ("bos_token", &vars.bos_token),
            ("eos_token", &vars.eos_token),
            ("unk_token", &vars.unk_token),
            ("pad_token", &vars.pad_token),
        ];
        for (k, v) in tokens {
            if let Some(v) = v {
                ctx.insert(k.into(), v.clone().into());
            }
        }
        let tmpl = self.env.get_template(NAME).expect("template added in new()");
        tmpl.render(Value::from(minijinja::value::Serde(&ctx)))
            .map_err(|e| match e.detail() {
                Some(d) if e.kind() == ErrorKind::InvalidOperation && d.starts_with(RAISED) => {
                    Error::Msg(format!("chat template raised an exception: {}", &d[RAISED.len()..]))
                }
                _ => Error::Msg(format!("chat template failed to render: {}", describe(&e))),
            })
    }
}

/// The error with its template line, and the causes minijinja attaches.
fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(cause) = src {
        s.push_str(&format!(": {cause}"));
        src = cause.source();
    }
    s
}

/// `{% generation %}` / `{% endgeneration %}` (transformers' AssistantTracker extension) become
/// `{% if true %}` / `{% endif %}`: the same output and the same whitespace control.
fn replace_generation_tags(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while let Some(start) = rest.find("{%") {
        out.push_str(&rest[..start]);
        let tag = &rest[start..];
        // The closing `%}` starts after the opening `{%` (in `{%}` the two overlap).
        let Some(end) = tag[2..].find("%}").map(|e| e + 2) else {
            break;
        };
        let inner = &tag[2..end];
        let (lead, body) = match inner.chars().next() {
            Some(c @ ('-' | '+')) => (c.to_string(), &inner[1..]),
            _ => (String::new(), inner),
        };
        let (body, trail) = match body.chars().last() {
            Some(c @ ('-' | '+')) => (&body[..body.len() - 1], c.to_string()),
            _ => (body, String::new()),
        };
        match body.trim() {
            "generation" => out.push_str(&format!("{{%{lead} if true {trail}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{lead} endif {trail}%}}")),
            _ => out.push_str(&tag[..end + 2]),
        }
        rest = &tag[end + 2..];
    }
    out.push_str(rest);
    out
}

/// `x | tojson(indent=None, ensure_ascii=False, separators=None, sort_keys=False)`.
fn tojson(value: Value, indent: Option<Value>, kwargs: Kwargs) -> std::result::Result<Value, minijinja::Error> {
    let indent = match indent.or(kwargs.get::<Option<Value>>("indent")?) {
        None => None,
        Some(v) if v.kind() == ValueKind::None => None,
        Some(v) if v.kind() == ValueKind::Number => Some(" ".repeat(i64::try_from(v)?.max(0) as usize)),
        Some(v) if v.kind() == ValueKind::String => Some(v.as_str().unwrap_or_default().to_string()),
        Some(v) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: bad indent {v}"),
            ))
        }
    };
    let separators = match kwargs.get::<Option<Vec<String>>>("separators")? {
        None => None,
        Some(s) if s.len() == 2 => Some((s[0].clone(), s[1].clone())),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ))
        }
    };
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let opts = pyjson::Options::new(indent, separators, sort_keys, ensure_ascii);
    Ok(Value::from(pyjson::dumps(&value, &opts)?))
}

/// `strftime_now(fmt)`: the current UTC time with the common strftime codes.
fn strftime_now(fmt: String) -> std::result::Result<Value, minijinja::Error> {
    #[cfg(target_arch = "wasm32")]
    {
        let _ = fmt;
        Err(minijinja::Error::new(
            ErrorKind::InvalidOperation,
            "strftime_now: no clock on wasm32",
        ))
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Ok(Value::from(format_utc(secs, &fmt)))
    }
}

/// Format seconds since the Unix epoch (UTC). Civil date from days: H. Hinnant,
/// "chrono-Compatible Low-Level Date Algorithms" (`civil_from_days`).
#[cfg_attr(target_arch = "wasm32", allow(dead_code))]
fn format_utc(secs: i64, fmt: &str) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
        "Monday",
        "Tuesday",
        "Wednesday",
    ];
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let month = MONTHS[(m - 1) as usize];
    let weekday = DAYS[days.rem_euclid(7) as usize];
    let mut out = String::new();
    let mut chars = fmt.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y.rem_euclid(100))),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('e') => out.push_str(&format!("{d:2}")),
            Some('H') => out.push_str(&format!("{:02}", tod / 3600)),
            Some('M') => out.push_str(&format!("{:02}", tod / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", tod % 60)),
            Some('B') => out.push_str(month),
            Some('b') => out.push_str(&month[..3]),
            Some('A') => out.push_str(weekday),
            Some('a') => out.push_str(&weekday[..3]),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatml_renders() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Hello")];
        let out = t.render(&msgs, true, &TemplateVars::default()).unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn raise_exception_carries_the_message() {
        let t = ChatTemplate::new("{% if messages|length == 0 %}{{ raise_exception('need one message') }}{% endif %}")
            .unwrap();
        let err = t.render(&[], false, &TemplateVars::default()).unwrap_err().to_string();
        assert_eq!(err, "chat template raised an exception: need one message");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = ChatTemplate::new("line one\n{% for m in messages %}\n{{ m.content }\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("chat template does not parse"), "{err}");
        assert!(err.contains("chat_template:3"), "{err}");
    }

    #[test]
    fn a_malformed_block_tag_is_a_syntax_error() {
        for src in ["{%}", "x {%} y", "{%-%}", "{%"] {
            let err = ChatTemplate::new(src).unwrap_err().to_string();
            assert!(err.starts_with("chat template does not parse"), "{src}: {err}");
        }
    }

    #[test]
    fn generation_tags_keep_whitespace_control() {
        // Expected strings: Python jinja2 3.1 with trim_blocks and lstrip_blocks.
        let v = TemplateVars::default();
        let render = |src: &str| ChatTemplate::new(src).unwrap().render(&[], false, &v).unwrap();
        assert_eq!(render("A\n{%- generation -%}\n B \n{%- endgeneration %}\nC"), "ABC");
        assert_eq!(
            render("A\n  {% generation %}\n B \n  {% endgeneration %}\nC"),
            "A\n B \nC"
        );
    }

    #[test]
    fn utc_formatting() {
        // Expected values from GNU `date -u -d @SECONDS`.
        let t = 1_722_013_509;
        assert_eq!(
            format_utc(t, "%d %b %Y %H:%M:%S %A %%"),
            "26 Jul 2024 17:05:09 Friday %"
        );
        assert_eq!(format_utc(0, "%Y-%m-%d %a"), "1970-01-01 Thu");
        assert_eq!(format_utc(951_782_400, "%Y-%m-%d"), "2000-02-29");
    }
}
