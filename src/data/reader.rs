//! Read the rows of a dataset's local `.json` / `.jsonl` files (or a folder of them).
//!
//! A `.json` file holds one array of objects, or JSON Lines like a `.jsonl` file (the Hugging
//! Face `json` loader accepts both). Every error names the file, and the line for JSON Lines.

use super::config::DatasetSpec;
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a row came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) struct RowLoc {
    pub file: Arc<PathBuf>,
    /// 1-based line (JSON Lines) or 0-based array index (JSON array).
    pub pos: usize,
    pub is_line: bool,
}

impl fmt::Display for RowLoc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_line {
            write!(f, "{}:{}", self.file.display(), self.pos)
        } else {
            write!(f, "{} (array item {})", self.file.display(), self.pos)
        }
    }
}

pub(crate) struct Row {
    pub fields: Map<String, Value>,
    pub loc: RowLoc,
}

/// A file's path and bytes (the bytes also feed the cache key).
pub(crate) struct SourceFile {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
}

fn is_data_file(p: &Path) -> bool {
    matches!(p.extension().and_then(|e| e.to_str()), Some("json" | "jsonl"))
}

/// The files a spec names, in a fixed order.
pub(crate) fn list_files(spec: &DatasetSpec) -> Result<Vec<PathBuf>> {
    let base = Path::new(&spec.path);
    let meta = std::fs::metadata(base).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::Data(format!(
                "{}: no such file or folder (datasets[].path must name a local .json/.jsonl file or a folder of them)",
                base.display()
            ))
        } else {
            Error::io(base, e)
        }
    })?;
    if let Some(files) = &spec.data_files {
        let dir = if meta.is_dir() {
            base
        } else {
            base.parent().unwrap_or(Path::new(""))
        };
        return Ok(files.iter().map(|f| dir.join(f)).collect());
    }
    if !meta.is_dir() {
        return Ok(vec![base.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(base).map_err(|e| Error::io(base, e))? {
        let p = entry.map_err(|e| Error::io(base, e))?.path();
        if p.is_file() && is_data_file(&p) {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(Error::Data(format!(
            "{}: the folder has no .json or .jsonl files",
            base.display()
        )));
    }
    Ok(files)
}

pub(crate) fn read_sources(spec: &DatasetSpec) -> Result<Vec<SourceFile>> {
    list_files(spec)?
        .into_iter()
        .map(|path| {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            Ok(SourceFile { path, bytes })
        })
        .collect()
}

/// Parse a file's rows; `.json` starting with `[` is an array, anything else JSON Lines.
pub(crate) fn parse_rows(src: &SourceFile) -> Result<Vec<Row>> {
    let file = Arc::new(src.path.clone());
    let text = std::str::from_utf8(&src.bytes).map_err(|e| {
        Error::Data(format!(
            "{}: not UTF-8 text (invalid byte at offset {})",
            src.path.display(),
            e.valid_up_to()
        ))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let is_json = src.path.extension().and_then(|e| e.to_str()) == Some("json");
    if is_json && text.trim_start().starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(text)
            .map_err(|e| Error::Data(format!("{}:{}: not valid JSON: {e}", src.path.display(), e.line())))?;
        return items
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let loc = RowLoc {
                    file: file.clone(),
                    pos: i,
                    is_line: false,
                };
                match v {
                    Value::Object(fields) => Ok(Row { fields, loc }),
                    other => Err(Error::Data(format!(
                        "{loc}: expected a JSON object, found {}",
                        kind(&other)
                    ))),
                }
            })
            .collect();
    }
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let loc = RowLoc {
            file: file.clone(),
            pos: i + 1,
            is_line: true,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(fields)) => rows.push(Row { fields, loc }),
            Ok(other) => {
                return Err(Error::Data(format!(
                    "{loc}: expected a JSON object, found {}",
                    kind(&other)
                )));
            }
            Err(e) => {
                return Err(Error::Data(format!(
                    "{loc}: malformed JSON at column {}: {e}",
                    e.column()
                )));
            }
        }
    }
    Ok(rows)
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(name: &str, text: &str) -> SourceFile {
        SourceFile {
            path: PathBuf::from(name),
            bytes: text.as_bytes().to_vec(),
        }
    }

    #[test]
    fn jsonl_and_json_arrays() {
        let rows = parse_rows(&src("a.jsonl", "{\"x\": 1}\n\n{\"x\": 2}\n")).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].loc.to_string(), "a.jsonl:3");
        let rows = parse_rows(&src("b.json", " [{\"x\": 1}, {\"y\": \"z\"}]")).unwrap();
        assert_eq!(rows[1].fields["y"], "z");
        assert_eq!(rows[1].loc.to_string(), "b.json (array item 1)");
        // JSON Lines inside a .json file.
        assert_eq!(parse_rows(&src("c.json", "{\"x\": 1}\n{\"x\": 2}")).unwrap().len(), 2);
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = parse_rows(&src("d.jsonl", "{\"x\": 1}\n{\"x\": 2,,}\n"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.starts_with("dataset: d.jsonl:2: malformed JSON at column"), "{err}");
        let err = parse_rows(&src("d.jsonl", "{\"x\": 1}\n[1, 2]\n"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("d.jsonl:2: expected a JSON object, found an array"),
            "{err}"
        );
        let err = parse_rows(&src("e.json", "[{\"x\": 1},\n 3]"))
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("e.json (array item 1): expected a JSON object, found a number"),
            "{err}"
        );
        let err = parse_rows(&src("f.json", "[{\"x\": 1},\n {\"x\" 2}]"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("f.json:2: not valid JSON"), "{err}");
    }
}
