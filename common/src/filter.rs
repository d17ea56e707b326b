//! Trigger filters: a CEL expression over one Kafka message, compiled once
//! per trigger generation, deciding whether the message becomes a work
//! order. Both planes compile with [`Filter::compile`], so what the API
//! accepts is exactly what a pipeline runs.
//!
//! The variables, as the README documents them: `topic` (string),
//! `partition` and `offset` (int), `key` (string when UTF-8, bytes
//! otherwise, null when absent), `headers` (map of name to string, or bytes
//! when not UTF-8, or null without a value; the last of repeated names
//! wins), `timestamp` (timestamp, or null), `value` (the JSON-decoded value
//! when the payload is JSON, else a string when UTF-8, else bytes; null for
//! a tombstone).

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, MapExpr, StructExpr};
use cel::{Context, Env, ExecutionError, IdedExpr, Program, Value};
use chrono::{DateTime, Utc};

/// An expression longer than this is refused: it is evaluated for every
/// message, and shipped to every node with the trigger.
pub const MAX_FILTER_LEN: usize = 4 * 1_024;

/// A compiled filter expression.
pub struct Filter {
    program: Program,
    env: Arc<Env>,
}

impl std::fmt::Debug for Filter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Filter")
    }
}

/// The parts of a Kafka message a filter sees.
#[derive(Debug, Clone, Copy)]
pub struct MessageView<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub value: Option<&'a [u8]>,
    /// In the order Kafka delivered them.
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
    pub timestamp: Option<DateTime<Utc>>,
}

/// Why a filter did not give a verdict on a message. Its text names the
/// kind of failure and types, never a value of the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FilterError(String);

impl Filter {
    /// Compiles `source`; the error is the compiler's message (with the
    /// position), for the field violation.
    pub fn compile(source: &str) -> Result<Self, String> {
        if source.len() > MAX_FILTER_LEN {
            return Err(format!("must be at most {MAX_FILTER_LEN} bytes, not {}", source.len()));
        }
        let env = Arc::new(Env::stdlib());
        let program = env.compile(source).map_err(|e| e.to_string())?;
        // CEL resolves names at run time, so a misspelt variable would
        // otherwise compile and then fail on every message, silently
        // filtering everything out.
        let mut unknown = BTreeSet::new();
        free_names(program.expression(), &mut Vec::new(), &mut unknown);
        if !unknown.is_empty() {
            let names: Vec<String> = unknown.into_iter().map(|n| format!("`{n}`")).collect();
            return Err(format!(
                "unknown variable {}; a filter can use {}",
                names.join(", "),
                VARIABLES.map(|v| format!("`{v}`")).join(", ")
            ));
        }
        Ok(Self { program, env })
    }

    /// Whether `message` matches. A run-time failure (a missing field, a type
    /// mismatch, a result that is not a bool) is an error, which callers
    /// count as a non-match.
    pub fn matches(&self, message: &MessageView<'_>) -> Result<bool, FilterError> {
        let mut context = Context::with_env(self.env.clone());
        for (name, value) in bind(message) {
            context.add_variable_from_value(name, value);
        }
        match self.program.execute(&context) {
            Ok(Value::Bool(matched)) => Ok(matched),
            Ok(other) => Err(FilterError(format!("the expression gave a {}, not a bool", other.type_of()))),
            Err(e) => Err(FilterError(describe(&e))),
        }
    }
}

/// The variables [`bind`] gives a filter.
const VARIABLES: [&str; 7] = ["topic", "partition", "offset", "key", "value", "headers", "timestamp"];
/// Names CEL itself resolves: its type names (`type(value) == string`).
const TYPE_NAMES: [&str; 11] =
    ["bool", "int", "uint", "double", "string", "bytes", "list", "map", "null_type", "type", "dyn"];

/// Collects into `out` the identifiers of `expr` that are neither filter
/// variables, nor CEL type names, nor bound by an enclosing macro
/// (`headers.exists(h, ...)` binds `h`; `bound` holds those in scope).
fn free_names(expr: &IdedExpr, bound: &mut Vec<String>, out: &mut BTreeSet<String>) {
    match &expr.expr {
        Expr::Ident(name) => {
            let known = VARIABLES.contains(&name.as_str()) || TYPE_NAMES.contains(&name.as_str());
            // `@`-names are the macro expansion's own accumulators.
            if !known && !name.starts_with('@') && !bound.contains(name) {
                out.insert(name.clone());
            }
        }
        Expr::Call(call) => {
            for e in call.target.iter().map(|t| &**t).chain(&call.args) {
                free_names(e, bound, out);
            }
        }
        Expr::Comprehension(c) => {
            free_names(&c.iter_range, bound, out);
            free_names(&c.accu_init, bound, out);
            let scope = bound.len();
            bound.extend([c.iter_var.clone(), c.accu_var.clone()].into_iter().chain(c.iter_var2.clone()));
            for e in [&c.loop_cond, &c.loop_step, &c.result] {
                free_names(e, bound, out);
            }
            bound.truncate(scope);
        }
        Expr::List(list) => {
            for e in &list.elements {
                free_names(e, bound, out);
            }
        }
        Expr::Map(MapExpr { entries }) | Expr::Struct(StructExpr { entries, .. }) => {
            for entry in entries {
                match &entry.expr {
                    EntryExpr::StructField(field) => free_names(&field.value, bound, out),
                    EntryExpr::MapEntry(e) => {
                        free_names(&e.key, bound, out);
                        free_names(&e.value, bound, out);
                    }
                }
            }
        }
        Expr::Select(select) => free_names(&select.operand, bound, out),
        Expr::Literal(_) | Expr::Unspecified => {}
    }
}

/// The variables of one message.
fn bind(m: &MessageView<'_>) -> [(&'static str, Value); 7] {
    let headers: HashMap<String, Value> =
        m.headers.iter().map(|(name, value)| ((*name).to_owned(), value.map_or(Value::Null, text_or_bytes))).collect();
    [
        ("topic", Value::from(m.topic)),
        ("partition", Value::Int(m.partition.into())),
        ("offset", Value::Int(m.offset)),
        ("key", m.key.map_or(Value::Null, text_or_bytes)),
        ("value", m.value.map_or(Value::Null, decode_value)),
        ("headers", Value::from(headers)),
        ("timestamp", m.timestamp.map_or(Value::Null, |ts| Value::Timestamp(ts.fixed_offset()))),
    ]
}

fn text_or_bytes(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::from(text),
        Err(_) => Value::Bytes(Arc::new(bytes.to_vec())),
    }
}

/// JSON when it parses as JSON, else as [`text_or_bytes`].
fn decode_value(bytes: &[u8]) -> Value {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(json) => from_json(json),
        Err(_) => text_or_bytes(bytes),
    }
}

/// Integers that fit stay `int` (so `value.n == 3` holds), larger ones are
/// `uint`, the rest `double`.
fn from_json(json: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Value::Int(i),
            (None, Some(u)) => Value::UInt(u),
            _ => Value::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        J::String(s) => Value::from(s),
        J::Array(items) => Value::List(Arc::new(items.into_iter().map(from_json).collect())),
        J::Object(fields) => {
            Value::from(fields.into_iter().map(|(k, v)| (k, from_json(v))).collect::<HashMap<String, Value>>())
        }
    }
}

/// The failure without the values involved: several of the interpreter's
/// messages print them, and message contents never go to the logs.
fn describe(e: &ExecutionError) -> String {
    match e {
        ExecutionError::NoSuchKey(_) => "no such key".into(),
        ExecutionError::UndeclaredReference(name) => format!("undeclared reference to `{name}`"),
        ExecutionError::NoSuchOverload(o) => {
            format!("no overload of `{}` for ({})", o.function(), o.argument_types().join(", "))
        }
        ExecutionError::UnexpectedType { got, want } => format!("unexpected type: got {got}, want {want}"),
        ExecutionError::ValuesNotComparable(a, b) => {
            format!("{} and {} cannot be compared", a.type_of(), b.type_of())
        }
        ExecutionError::DivisionByZero(_) => "division by zero".into(),
        _ => "evaluation failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view<'a>(
        key: Option<&'a [u8]>,
        value: Option<&'a [u8]>,
        headers: &'a [(&'a str, Option<&'a [u8]>)],
    ) -> MessageView<'a> {
        MessageView {
            topic: "orders",
            partition: 2,
            offset: 41,
            key,
            value,
            headers,
            timestamp: DateTime::from_timestamp_millis(1_700_000_000_000),
        }
    }

    fn eval(expr: &str, m: &MessageView<'_>) -> Result<bool, FilterError> {
        Filter::compile(expr).unwrap().matches(m)
    }

    #[test]
    fn test_json_value_fields_are_typed() {
        let m = view(None, Some(br#"{"type":"order","amount":150.5,"n":3,"tags":["a"]}"#), &[]);
        assert_eq!(eval(r#"value.type == "order" && value.amount > 100"#, &m), Ok(true));
        assert_eq!(eval("value.n == 3 && value.n < 3.5 && 'a' in value.tags", &m), Ok(true));
        assert_eq!(eval("value.amount > 200", &m), Ok(false));
    }

    #[test]
    fn test_non_json_values_are_strings_or_bytes_and_tombstones_null() {
        assert_eq!(eval(r#"value == "plain text""#, &view(None, Some(b"plain text"), &[])), Ok(true));
        assert_eq!(eval("value == b'\\xff\\x00'", &view(None, Some(&[0xff, 0]), &[])), Ok(true));
        assert_eq!(eval("value == null", &view(None, None, &[])), Ok(true));
    }

    #[test]
    fn test_key_is_a_string_when_utf8_else_bytes() {
        assert_eq!(eval(r#"key.startsWith("eu-")"#, &view(Some(b"eu-7"), None, &[])), Ok(true));
        assert_eq!(eval("key == null", &view(None, None, &[])), Ok(true));
        let raw: &[u8] = &[0xc3, 0x28];
        assert_eq!(eval("key == b'\\xc3\\x28'", &view(Some(raw), None, &[])), Ok(true));
        // A string method on bytes is a run-time error: the caller's non-match.
        assert!(eval(r#"key.startsWith("eu-")"#, &view(Some(raw), None, &[])).is_err());
    }

    #[test]
    fn test_headers_topic_partition_offset_and_timestamp() {
        let headers: &[(&str, Option<&[u8]>)] = &[("source", Some(b"app")), ("source", Some(b"web")), ("empty", None)];
        let m = view(None, None, headers);
        assert_eq!(eval(r#"headers["source"] == "web" && headers.empty == null"#, &m), Ok(true));
        assert_eq!(eval(r#"topic == "orders" && partition == 2 && offset == 41"#, &m), Ok(true));
        assert_eq!(eval(r#"timestamp > timestamp("2023-01-01T00:00:00Z")"#, &m), Ok(true));
        assert_eq!(eval("!has(headers.missing)", &m), Ok(true));
    }

    #[test]
    fn test_run_time_failures_are_errors_without_message_contents() {
        let m = view(None, Some(br#"{"secret":"hunter2"}"#), &[]);
        let missing = eval("value.amount > 1", &m).unwrap_err();
        let mismatch = eval("value.secret > 1", &m).unwrap_err();
        let not_bool = eval("value.secret", &m).unwrap_err();
        for e in [&missing, &mismatch, &not_bool] {
            assert!(!e.to_string().contains("hunter2"), "{e}");
        }
        assert_eq!(not_bool.to_string(), "the expression gave a string, not a bool");
    }

    #[test]
    fn test_compile_errors_carry_the_compiler_message_and_the_cap() {
        let e = Filter::compile("value.type == ").unwrap_err();
        assert!(e.contains("1:"), "{e}");
        let e = Filter::compile(&"a".repeat(MAX_FILTER_LEN + 1)).unwrap_err();
        assert!(e.contains("at most 4096 bytes"), "{e}");
    }

    #[test]
    fn test_unknown_variables_are_refused_and_macro_variables_are_not() {
        let e = Filter::compile("vaule.n == 1 || key == kee").unwrap_err();
        assert!(e.starts_with("unknown variable `kee`, `vaule`; a filter can use `topic`"), "{e}");
        let h: &[(&str, Option<&[u8]>)] = &[("source", Some(b"app"))];
        let m = view(None, Some(br#"{"tags":["a","b"]}"#), h);
        assert_eq!(eval(r#"headers.exists(h, h == "source") && value.tags.all(t, t.size() == 1)"#, &m), Ok(true));
        assert_eq!(eval(r#"value.tags.map(t, t + "!").exists(t, t == "b!")"#, &m), Ok(true));
        assert_eq!(eval("type(value) == map && type(offset) == int", &m), Ok(true));
        // A macro's variable is bound only inside it.
        let e = Filter::compile("value.tags.exists(t, t == 'a') && t == 'b'").unwrap_err();
        assert!(e.starts_with("unknown variable `t`;"), "{e}");
    }
}
