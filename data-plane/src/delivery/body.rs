//! The work-order body: the JSON document POSTed to a trigger's webhook, built
//! from one stored Kafka message (DESIGN §3 "Work orders").
//!
//! ```json
//! {"data": <value>, "encoding": "base64", "request": {"topic": "t", "partition": 0,
//!  "offset": 42, "key": "k", "ts": 1700000000000, "headers": [["name", "value"]]}}
//! ```
//!
//! - `data` is the message value itself when it is UTF-8 JSON (any JSON value,
//!   scalars included), embedded verbatim; otherwise (binary, plain text, empty)
//!   a standard base64 string, and then `"encoding": "base64"` appears next to
//!   it. `encoding` is absent in every other case. A null value gives
//!   `"data": null`.
//! - `key` and header values are strings: the bytes as UTF-8 text when they are
//!   valid UTF-8, otherwise standard base64. Kafka keys and header values are
//!   opaque bytes and almost always text, so text is what receivers want; the
//!   price is that a binary key and a text key that happens to look like base64
//!   cannot be told apart. A null key or header value is JSON `null`.
//! - `ts` is the message timestamp in unix milliseconds, or `null`.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde_json::{json, Value};

/// What the body needs from a stored message. Plain owned data so the caller
/// can fill it from a database row or a Kafka message alike.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageForBody {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// Unix milliseconds; `None` when the message carries no timestamp
    /// (librdkafka reports `-1`, which the caller maps to `None`).
    pub ts_ms: Option<i64>,
    /// In Kafka order; names may repeat.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

/// How the value is represented under `data`.
enum Data<'a> {
    Null,
    /// Valid JSON text, already trimmed of surrounding whitespace.
    Json(&'a str),
    /// Anything else, to be sent as base64.
    Binary(&'a [u8]),
}

fn classify(value: Option<&[u8]>) -> Data<'_> {
    let Some(bytes) = value else { return Data::Null };
    let Ok(text) = std::str::from_utf8(bytes) else { return Data::Binary(bytes) };
    // Parsing into a `Value` (not `IgnoredAny`) is deliberate: it also rejects
    // escapes that are not valid Unicode, such as a lone surrogate `"\ud800"`,
    // which strict receivers (and Postgres `jsonb`) refuse. Such a value is
    // delivered as base64 instead of as JSON nobody can read.
    match serde_json::from_str::<Value>(text) {
        Ok(_) => Data::Json(text.trim_matches(is_json_whitespace)),
        Err(_) => Data::Binary(bytes),
    }
}

/// Whether `value` is one JSON value, by the test that embeds it as JSON.
pub(super) fn is_json(value: &[u8]) -> bool {
    matches!(classify(Some(value)), Data::Json(_))
}

/// The only whitespace JSON allows between tokens (RFC 8259 §2).
fn is_json_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Text when the bytes are UTF-8, base64 otherwise (see the module docs).
fn text_or_base64(bytes: &[u8]) -> Value {
    match std::str::from_utf8(bytes) {
        Ok(text) => Value::String(text.to_owned()),
        Err(_) => Value::String(BASE64.encode(bytes)),
    }
}

fn opt_text_or_base64(bytes: Option<&[u8]>) -> Value {
    bytes.map_or(Value::Null, text_or_base64)
}

/// Builds the work-order body as JSON text.
///
/// A JSON value is copied verbatim rather than parsed and re-serialized, so
/// the receiver sees exactly what the producer wrote: key order, duplicate
/// keys, and number spellings such as `1.0` or integers beyond 64 bits
/// survive. Anything stored from the result should therefore keep it as text
/// (`json`, `text`, `bytea`): `jsonb` would reorder keys.
pub fn build_body(msg: &MessageForBody) -> String {
    let data = classify(msg.value.as_deref());

    let headers: Vec<Value> =
        msg.headers.iter().map(|(name, value)| json!([name, opt_text_or_base64(value.as_deref())])).collect();
    let request = json!({
        "topic": msg.topic,
        "partition": msg.partition,
        "offset": msg.offset,
        "key": opt_text_or_base64(msg.key.as_deref()),
        "ts": msg.ts_ms,
        "headers": headers,
    });
    // `Value`'s `Display` cannot fail, unlike `serde_json::to_string`.
    let request = request.to_string();

    let mut out = String::with_capacity(request.len() + msg.value.as_ref().map_or(0, |v| v.len() * 4 / 3 + 48));
    out.push_str("{\"data\":");
    match data {
        Data::Null => out.push_str("null"),
        Data::Json(text) => out.push_str(text),
        Data::Binary(bytes) => {
            out.push('"');
            // The base64 alphabet needs no JSON escaping.
            BASE64.encode_string(bytes, &mut out);
            out.push_str("\",\"encoding\":\"base64\"");
        }
    }
    out.push_str(",\"request\":");
    out.push_str(&request);
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(value: Option<&[u8]>) -> MessageForBody {
        MessageForBody {
            topic: "orders".into(),
            partition: 3,
            offset: 42,
            key: Some(b"customer-1".to_vec()),
            value: value.map(<[u8]>::to_vec),
            ts_ms: Some(1_700_000_000_000),
            headers: vec![("trace".into(), Some(b"abc".to_vec()))],
        }
    }

    fn parse(body: &str) -> Value {
        serde_json::from_str(body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {body}"))
    }

    #[test]
    fn test_json_value_is_embedded_as_json() {
        let body = parse(&build_body(&message(Some(br#"{"id": 7, "tags": ["a"]}"#))));
        assert_eq!(
            body,
            json!({
                "data": {"id": 7, "tags": ["a"]},
                "request": {
                    "topic": "orders",
                    "partition": 3,
                    "offset": 42,
                    "key": "customer-1",
                    "ts": 1_700_000_000_000_i64,
                    "headers": [["trace", "abc"]],
                },
            })
        );
        assert!(body.get("encoding").is_none());
    }

    #[test]
    fn test_json_value_is_copied_verbatim() {
        // Key order, number spelling and big integers would all change if the
        // value were parsed and re-serialized.
        let raw = r#"{"z": 1.0, "a": 123456789012345678901234567890}"#;
        let body = build_body(&message(Some(format!("\n  {raw}\r\n").as_bytes())));
        assert!(body.starts_with(&format!("{{\"data\":{raw},\"request\":")), "{body}");
        parse(&body);
    }

    #[test]
    fn test_json_scalars_are_json() {
        for (raw, expected) in
            [("42", json!(42)), (r#""hi""#, json!("hi")), ("true", json!(true)), ("null", Value::Null)]
        {
            let body = parse(&build_body(&message(Some(raw.as_bytes()))));
            assert_eq!(body["data"], expected, "{raw}");
            assert!(body.get("encoding").is_none(), "{raw}");
        }
    }

    #[test]
    fn test_plain_text_is_base64() {
        let body = parse(&build_body(&message(Some(b"hello world"))));
        assert_eq!(body["data"], json!("aGVsbG8gd29ybGQ="));
        assert_eq!(body["encoding"], json!("base64"));
    }

    #[test]
    fn test_truncated_json_is_base64() {
        let body = parse(&build_body(&message(Some(br#"{"id": 7"#))));
        assert_eq!(body["encoding"], json!("base64"));
        assert_eq!(BASE64.decode(body["data"].as_str().unwrap()).unwrap(), br#"{"id": 7"#);
    }

    #[test]
    fn test_binary_value_is_base64() {
        let bytes = [0u8, 159, 146, 150, 255];
        let body = parse(&build_body(&message(Some(&bytes))));
        assert_eq!(body["encoding"], json!("base64"));
        assert_eq!(BASE64.decode(body["data"].as_str().unwrap()).unwrap(), bytes);
    }

    #[test]
    fn test_lone_surrogate_is_base64() {
        let raw = br#"{"s": "\ud800"}"#;
        let body = parse(&build_body(&message(Some(raw))));
        assert_eq!(body["encoding"], json!("base64"));
        assert_eq!(BASE64.decode(body["data"].as_str().unwrap()).unwrap(), raw);
    }

    #[test]
    fn test_empty_value_is_empty_base64() {
        for raw in [&b""[..], b"   "] {
            let body = parse(&build_body(&message(Some(raw))));
            assert_eq!(body["encoding"], json!("base64"));
            assert_eq!(BASE64.decode(body["data"].as_str().unwrap()).unwrap(), raw);
        }
    }

    #[test]
    fn test_null_value_is_null_data() {
        let body = parse(&build_body(&message(None)));
        assert_eq!(body["data"], Value::Null);
        assert!(body.get("encoding").is_none());
    }

    #[test]
    fn test_null_key_and_timestamp_are_null() {
        let mut msg = message(Some(b"{}"));
        msg.key = None;
        msg.ts_ms = None;
        msg.headers.clear();
        let body = parse(&build_body(&msg));
        assert_eq!(body["request"]["key"], Value::Null);
        assert_eq!(body["request"]["ts"], Value::Null);
        assert_eq!(body["request"]["headers"], json!([]));
    }

    #[test]
    fn test_non_utf8_key_is_base64() {
        let mut msg = message(Some(b"{}"));
        msg.key = Some(vec![0xff, 0xfe, 0x00]);
        let body = parse(&build_body(&msg));
        assert_eq!(body["request"]["key"], json!("//4A"));
    }

    #[test]
    fn test_headers_keep_order_duplicates_and_nulls() {
        let mut msg = message(Some(b"{}"));
        msg.headers = vec![
            ("a".into(), Some(b"1".to_vec())),
            ("bin".into(), Some(vec![0xc3, 0x28])),
            ("a".into(), None),
            ("quote\"d".into(), Some("é\"\n".as_bytes().to_vec())),
        ];
        let body = parse(&build_body(&msg));
        assert_eq!(
            body["request"]["headers"],
            json!([["a", "1"], ["bin", "wyg="], ["a", null], ["quote\"d", "é\"\n"]])
        );
    }

    #[test]
    fn test_topic_and_key_are_escaped() {
        let mut msg = message(Some(b"1"));
        msg.key = Some(b"line\n\"quoted\"\\".to_vec());
        let body = parse(&build_body(&msg));
        assert_eq!(body["request"]["key"], json!("line\n\"quoted\"\\"));
    }
}
