//! Python's `json.dumps` for template values, as transformers' chat-template `tojson` filter
//! calls it (`json.dumps(x, ensure_ascii=False, indent=indent, separators=separators,
//! sort_keys=sort_keys)`, transformers `utils/chat_template_utils.py`). minijinja's own
//! `tojson` escapes HTML characters and uses compact separators, so rendered prompts would
//! differ from the ones the model was trained with.

use minijinja::value::{Value, ValueKind};
use minijinja::{Error, ErrorKind};

pub(crate) struct Options {
    pub indent: Option<String>,
    pub item_sep: String,
    pub key_sep: String,
    pub sort_keys: bool,
    pub ensure_ascii: bool,
}

impl Options {
    /// Python's defaults: `", "` and `": "`, or `","` between items when indenting.
    pub fn new(
        indent: Option<String>,
        separators: Option<(String, String)>,
        sort_keys: bool,
        ensure_ascii: bool,
    ) -> Self {
        let (item_sep, key_sep) = separators.unwrap_or_else(|| {
            let item = if indent.is_some() { "," } else { ", " };
            (item.to_string(), ": ".to_string())
        });
        Options {
            indent,
            item_sep,
            key_sep,
            sort_keys,
            ensure_ascii,
        }
    }
}

pub(crate) fn dumps(v: &Value, opts: &Options) -> Result<String, Error> {
    let mut out = String::new();
    write_value(v, opts, 0, &mut out)?;
    Ok(out)
}

fn newline(opts: &Options, depth: usize, out: &mut String) {
    if let Some(ind) = &opts.indent {
        out.push('\n');
        for _ in 0..depth {
            out.push_str(ind);
        }
    }
}

fn write_value(v: &Value, opts: &Options, depth: usize, out: &mut String) -> Result<(), Error> {
    match v.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => {
            if v.is_integer() {
                out.push_str(&v.to_string());
            } else {
                let f = f64::try_from(v.clone())?;
                out.push_str(&float_repr(f));
            }
        }
        ValueKind::String => write_str(v.as_str().unwrap_or_default(), opts.ensure_ascii, out),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(opts, depth + 1, out);
                write_value(item, opts, depth + 1, out)?;
            }
            newline(opts, depth, out);
            out.push(']');
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in v.try_iter()? {
                let val = v.get_item(&key)?;
                entries.push((key_string(&key)?, val));
            }
            if opts.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            if entries.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, (k, val)) in entries.iter().enumerate() {
                if i > 0 {
                    out.push_str(&opts.item_sep);
                }
                newline(opts, depth + 1, out);
                write_str(k, opts.ensure_ascii, out);
                out.push_str(&opts.key_sep);
                write_value(val, opts, depth + 1, out)?;
            }
            newline(opts, depth, out);
            out.push('}');
        }
        ValueKind::Undefined => {
            return Err(Error::new(ErrorKind::InvalidOperation, "tojson: value is undefined"));
        }
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a {other}"),
            ));
        }
    }
    Ok(())
}

/// Python converts non-string keys: `True` -> "true", `None` -> "null", numbers by repr.
fn key_string(k: &Value) -> Result<String, Error> {
    Ok(match k.kind() {
        ValueKind::String => k.as_str().unwrap_or_default().to_string(),
        ValueKind::None => "null".to_string(),
        ValueKind::Bool => (if k.is_true() { "true" } else { "false" }).to_string(),
        ValueKind::Number if k.is_integer() => k.to_string(),
        ValueKind::Number => float_repr(f64::try_from(k.clone())?),
        other => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: keys must be strings, not {other}"),
            ))
        }
    })
}

fn write_str(s: &str, ensure_ascii: bool, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7f => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest round-trip digits, in positional notation when the
/// decimal exponent is in [-4, 16), else `d.ddde+XX`; `Infinity`/`NaN` as json.dumps writes them.
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string();
    }
    // `{:e}` gives the shortest round-trip digits, e.g. "2.5e0", "-1e-5".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').expect("`{:e}` always has an exponent");
    let exp: i32 = exp.parse().expect("integer exponent");
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp < 0 {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        } else if exp + 1 >= n {
            format!("{}{}.0", digits, "0".repeat((exp + 1 - n) as usize))
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{int}.{frac}")
        };
        format!("{sign}{body}")
    } else {
        let (first, rest) = digits.split_at(1);
        let frac = if rest.is_empty() {
            String::new()
        } else {
            format!(".{rest}")
        };
        let esign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{first}{frac}e{esign}{:02}", exp.abs())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_match_python_repr() {
        // Expected strings are Python 3 `repr(x)` of the same doubles.
        let cases = [
            (1.0, "1.0"),
            (2.5, "2.5"),
            (-0.0, "-0.0"),
            (0.1, "0.1"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (123456789.0, "123456789.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (1.5e300, "1.5e+300"),
            (-2.25e-7, "-2.25e-07"),
            (1.0 / 3.0, "0.3333333333333333"),
        ];
        for (f, want) in cases {
            assert_eq!(float_repr(f), want, "{f}");
        }
    }

    #[test]
    fn dumps_matches_python_json() {
        let v = Value::from(minijinja::value::Serde(
            serde_json::json!({"b": [1, 2.5, null, true], "a": "x<y & 'q' é\n"}),
        ));
        let plain = Options::new(None, None, false, false);
        assert_eq!(
            dumps(&v, &plain).unwrap(),
            r#"{"b": [1, 2.5, null, true], "a": "x<y & 'q' é\n"}"#
        );
        let sorted_ascii = Options::new(None, None, true, true);
        assert_eq!(
            dumps(&v, &sorted_ascii).unwrap(),
            r#"{"a": "x<y & 'q' \u00e9\n", "b": [1, 2.5, null, true]}"#
        );
        let indented = Options::new(Some("  ".into()), None, false, false);
        assert_eq!(
            dumps(
                &Value::from(minijinja::value::Serde(serde_json::json!({"k": [1, {}], "e": []}))),
                &indented
            )
            .unwrap(),
            "{\n  \"k\": [\n    1,\n    {}\n  ],\n  \"e\": []\n}"
        );
    }
}
