//! Presentation: tables for people, proto3 JSON / YAML for scripts, and the
//! small formatters the tables share (keys, ages, enum names).

use std::io::{IsTerminal as _, Write as _};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use serde_json::Value;

use crate::args::Format;
use crate::error::{CliError, Result};
use prost_reflect::{Kind, MessageDescriptor};

use crate::proto_json::{self, Typed};

/// The format asked for, else a table on a terminal and JSON otherwise.
pub fn resolve(format: Option<Format>) -> Format {
    format.unwrap_or_else(|| if std::io::stdout().is_terminal() { Format::Table } else { Format::Json })
}

/// Prints `value` as pretty JSON or as YAML.
pub fn print_value(format: Format, value: &Value) -> Result<()> {
    let text = match format {
        Format::Yaml => serde_yaml::to_string(value).map_err(anyhow::Error::from)?,
        _ => serde_json::to_string_pretty(value).map_err(anyhow::Error::from)? + "\n",
    };
    write_stdout(&text)
}

/// Prints a message: `table` renders it for people, JSON/YAML is its
/// proto3 JSON.
pub fn print_message<M: Typed>(format: Format, msg: &M, table: impl FnOnce(&M) -> String) -> Result<()> {
    match format {
        Format::Table => write_stdout(&table(msg)),
        Format::Json => write_stdout(&(proto_json::json_text(msg, true) + "\n")),
        Format::Yaml => write_stdout(&proto_json::yaml_text(msg)),
    }
}

/// Writes to stdout; a closed pipe (`kt … | head`) is not an error.
pub fn write_stdout(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other.map_err(anyhow::Error::from)?),
    }
}

/// Columns separated by two spaces, headers in capitals, the last column
/// unpadded.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Self { headers: headers.iter().map(|h| h.to_uppercase()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in std::iter::once(&self.headers).chain(&self.rows) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate().take(columns) {
                if i + 1 < columns {
                    line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
                } else {
                    line.push_str(cell);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `field  value` lines for one `M` from its JSON, nested fields as dotted
/// paths in declaration order; empty values and the `skip` paths are left out.
pub fn describe<M: Typed>(value: &Value, skip: &[&str]) -> String {
    let mut lines = Vec::new();
    flatten("", value, Some(&M::descriptor()), &mut lines);
    let mut table = Table::new(&["field", "value"]);
    for (k, v) in lines {
        if !skip.iter().any(|s| k == *s || k.starts_with(&format!("{s}.")) || k.starts_with(&format!("{s}["))) {
            table.row(vec![k, v]);
        }
    }
    // No header line for a description.
    table.render().split_once('\n').map(|(_, rest)| rest.to_owned()).unwrap_or_default()
}

fn flatten(prefix: &str, value: &Value, message: Option<&MessageDescriptor>, out: &mut Vec<(String, String)>) {
    let join = |k: &str| if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") };
    match value {
        Value::Object(map) => {
            // Declaration order when the message is known, then the rest.
            let mut keys: Vec<(String, Option<MessageDescriptor>)> = Vec::new();
            if let Some(m) = message {
                for f in m.fields() {
                    if map.contains_key(f.json_name()) {
                        let child = match f.kind() {
                            Kind::Message(c) if !f.is_map() => Some(c),
                            _ => None,
                        };
                        keys.push((f.json_name().to_owned(), child));
                    }
                }
            }
            for k in map.keys() {
                if !keys.iter().any(|(known, _)| known == k) {
                    keys.push((k.clone(), None));
                }
            }
            for (k, child) in keys {
                flatten(&join(&k), &map[&k], child.as_ref(), out);
            }
        }
        Value::Array(items) if items.iter().all(|i| !i.is_object()) => {
            if !items.is_empty() {
                out.push((prefix.to_owned(), items.iter().map(plain).collect::<Vec<_>>().join(", ")));
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                flatten(&format!("{prefix}[{i}]"), item, message, out);
            }
        }
        Value::String(s) if s.is_empty() => {}
        Value::Null => {}
        v => out.push((prefix.to_owned(), plain(v))),
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

/// The bytes of a key written as [`key`] prints it: `base64:…`, or text.
pub fn parse_key(text: &str) -> Result<Vec<u8>, CliError> {
    match text.strip_prefix("base64:") {
        Some(encoded) => base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|e| CliError::usage(format!("--key {text}: not valid base64 ({e})"))),
        None => Ok(text.as_bytes().to_vec()),
    }
}

/// A key as text when it is printable UTF-8, else `base64:…`; `-` for none.
pub fn key(key: Option<&[u8]>) -> String {
    match key {
        None => "-".into(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(s) if !s.chars().any(char::is_control) => s.to_owned(),
            _ => format!("base64:{}", base64::engine::general_purpose::STANDARD.encode(bytes)),
        },
    }
}

/// `EVENT_KIND_SET_BLOCKED` with prefix `EVENT_KIND_` → `set_blocked`.
pub fn enum_name(full: &str, prefix: &str) -> String {
    full.strip_prefix(prefix).unwrap_or(full).to_ascii_lowercase()
}

/// Seconds as `45s`, `3m20s`, `2h5m`, `3d4h`.
pub fn duration(secs: i64) -> String {
    let s = secs.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3_600 => format!("{}m{}s", s / 60, s % 60),
        3_600..86_400 => format!("{}h{}m", s / 3_600, s % 3_600 / 60),
        _ => format!("{}d{}h", s / 86_400, s % 86_400 / 3_600),
    }
}

/// How long ago a timestamp was; `-` when absent.
pub fn ago(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => "-".into(),
        Some(ts) => {
            let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs() as i64;
            format!("{} ago", duration(now - ts.seconds))
        }
    }
}

/// RFC 3339 in UTC with milliseconds, from the proto JSON mapping.
pub fn timestamp(ts: Option<&prost_types::Timestamp>) -> String {
    match ts {
        None => "-".into(),
        Some(ts) => {
            // prost-types prints RFC 3339 with nanoseconds; keep milliseconds.
            let text = ts.to_string();
            match (text.find('.'), text.strip_suffix('Z')) {
                (Some(dot), Some(_)) if text.len() > dot + 4 => format!("{}Z", &text[..dot + 4]),
                _ => text,
            }
        }
    }
}

/// At most `max` characters, the cut marked with `…`; one line.
pub fn truncate(text: &str, max: usize) -> String {
    let one_line = text.replace(['\n', '\r'], " ");
    if one_line.chars().count() <= max {
        one_line
    } else {
        one_line.chars().take(max.saturating_sub(1)).collect::<String>() + "…"
    }
}

/// Empty strings show as `-` in tables.
pub fn or_dash(text: &str) -> String {
    if text.is_empty() {
        "-".into()
    } else {
        text.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_table_pads_every_column_but_the_last() {
        let mut t = Table::new(&["id", "name", "error"]);
        t.row(vec!["1".into(), "orders".into(), "".into()]);
        t.row(vec!["22".into(), "x".into(), "boom".into()]);
        assert_eq!(t.render(), "ID  NAME    ERROR\n1   orders\n22  x       boom\n");
    }

    #[test]
    fn test_keys_show_as_text_or_base64() {
        assert_eq!(key(Some(b"user-7")), "user-7");
        assert_eq!(key(Some(&[0xff, 0x00])), "base64:/wA=");
        for shown in [key(Some(&[0xff, 0x00])), key(Some(b"a\nb")), key(Some(b"user-9"))] {
            assert_eq!(key(Some(&parse_key(&shown).unwrap())), shown, "parse_key undoes key");
        }
        assert!(parse_key("base64:!!").is_err());
        assert_eq!(key(Some(b"a\nb")), "base64:YQpi");
        assert_eq!(key(None), "-");
    }

    #[test]
    fn test_describe_flattens_nested_fields_and_skips_empty_ones() {
        let v = serde_json::json!({
            "webhook": {"headers": [{"name": "x", "value": ""}], "url": "http://h"},
            "kafka": {"hosts": ["a:1", "b:2"], "groupId": ""},
            "id": "1",
        });
        assert_eq!(
            describe::<kt_proto::v1::Trigger>(&v, &[]),
            "id                       1\nkafka.hosts              a:1, b:2\nwebhook.url              http://h\n\
             webhook.headers[0].name  x\n"
        );
        assert_eq!(describe::<kt_proto::v1::Trigger>(&v, &["webhook"]), "id           1\nkafka.hosts  a:1, b:2\n");
    }

    #[test]
    fn test_durations_and_timestamps_read_well() {
        assert_eq!(duration(45), "45s");
        assert_eq!(duration(200), "3m20s");
        assert_eq!(duration(7_500), "2h5m");
        assert_eq!(duration(3 * 86_400 + 4 * 3_600), "3d4h");
        let ts = prost_types::Timestamp { seconds: 1_700_000_000, nanos: 123_456_789 };
        assert_eq!(timestamp(Some(&ts)), "2023-11-14T22:13:20.123Z");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(enum_name("EVENT_KIND_SET_BLOCKED", "EVENT_KIND_"), "set_blocked");
    }
}
