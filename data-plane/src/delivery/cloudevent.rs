//! A work order as a CloudEvent 1.0 in HTTP binary content mode, for
//! triggers whose `webhook.format` is CloudEvents: the message value is the
//! body, the event's attributes travel in `ce-*` headers.
//!
//! | header           | value                                                         |
//! |------------------|---------------------------------------------------------------|
//! | `ce-specversion` | `1.0`                                                         |
//! | `ce-id`          | the work order's id (the same as `Idempotency-Key`)           |
//! | `ce-source`      | `kafka://<topic>#<partition>`                                 |
//! | `ce-type`        | [`EVENT_TYPE`]                                                |
//! | `ce-time`        | the message timestamp, RFC 3339 in UTC with milliseconds; absent without one |
//! | `ce-subject`, `ce-partitionkey` | the key, when it is non-empty UTF-8            |
//! | `ce-kafkaoffset` | the message offset, in decimal                                |
//! | `ce-<name>`      | a Kafka header whose name is a valid attribute name (below)   |
//! | `Content-Type`   | the value's media type (below); absent for a null value       |
//!
//! - String values are percent-encoded as the binding requires (space, `"`,
//!   `%` and everything outside printable ASCII, as UTF-8 bytes `%XY`).
//! - A key that is not UTF-8 has no string form: `ce-subject` and
//!   `ce-partitionkey` are left out rather than sent in an encoding the
//!   receiver could not tell from text. (`partitionkey` is the Partitioning
//!   extension; Knative's Kafka sink uses it as the record key.)
//! - `Content-Type`: the message's `content-type` header (name compared
//!   without case, the last one), when its value is non-empty printable
//!   ASCII; else `application/json` when the value is one JSON value (the
//!   test the JSON body uses to embed it); else `application/octet-stream`.
//!   A null value (a tombstone) is an event without data: an empty body and
//!   no `Content-Type`.
//! - A Kafka header becomes the extension of its name when the name is
//!   already a valid attribute name (`a-z`, `0-9`, at most 20 characters),
//!   is not an attribute set here, and its value is UTF-8: `traceparent`
//!   and `tracestate` (the Distributed Tracing extension) pass through this
//!   way. Other headers are not sent; a repeated one sends its last value.
//!   Renaming the rest (lower-casing, dropping `-`) would make two headers
//!   one and one header the attribute of another.

use bytes::Bytes;
use chrono::{DateTime, SecondsFormat};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

use super::body::{is_json, MessageForBody};
use super::webhook::Payload;

/// The `type` of every event this service sends.
pub const EVENT_TYPE: &str = "dev.kafka-triggers.message";
pub const SPEC_VERSION: &str = "1.0";
/// The longest extension name the spec lets senders rely on.
const MAX_EXTENSION_NAME_LEN: usize = 20;
/// Attributes set (or, for a binary-mode `datacontenttype`, forbidden) here:
/// a Kafka header of one of these names is not carried.
const RESERVED: [&str; 11] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "partitionkey",
    "kafkaoffset",
];

/// The request of work order `id` for `msg`.
pub fn cloud_event(msg: &MessageForBody, id: &str) -> Payload {
    let mut headers = HeaderMap::new();
    // Reserved names are skipped, so no header stands for an attribute set
    // below.
    for (name, value) in &msg.headers {
        let Some(text) = value.as_deref().and_then(|v| std::str::from_utf8(v).ok()) else { continue };
        if is_extension_name(name) && !RESERVED.contains(&name.as_str()) {
            set(&mut headers, &format!("ce-{name}"), text);
        }
    }
    set(&mut headers, "ce-specversion", SPEC_VERSION);
    set(&mut headers, "ce-id", id);
    set(&mut headers, "ce-source", &format!("kafka://{}#{}", msg.topic, msg.partition));
    set(&mut headers, "ce-type", EVENT_TYPE);
    if let Some(time) = msg.ts_ms.and_then(DateTime::from_timestamp_millis) {
        set(&mut headers, "ce-time", &time.to_rfc3339_opts(SecondsFormat::Millis, true));
    }
    if let Some(key) = msg.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()).filter(|k| !k.is_empty()) {
        set(&mut headers, "ce-subject", key);
        set(&mut headers, "ce-partitionkey", key);
    }
    set(&mut headers, "ce-kafkaoffset", &msg.offset.to_string());

    let content_type = msg.value.as_deref().map(|value| {
        header_content_type(msg).unwrap_or_else(|| {
            HeaderValue::from_static(if is_json(value) { "application/json" } else { "application/octet-stream" })
        })
    });
    let body = msg.value.clone().map(Bytes::from).unwrap_or_default();
    Payload { content_type, headers, body }
}

/// The message's own `content-type` header, when it is usable as one.
fn header_content_type(msg: &MessageForBody) -> Option<HeaderValue> {
    let (_, value) = msg.headers.iter().rev().find(|(name, _)| name.eq_ignore_ascii_case("content-type"))?;
    let text = std::str::from_utf8(value.as_deref()?).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| (0x20..=0x7e).contains(&b)) {
        return None;
    }
    HeaderValue::from_str(text).ok()
}

/// A CloudEvents attribute name: lower-case letters and digits.
fn is_extension_name(name: &str) -> bool {
    (1..=MAX_EXTENSION_NAME_LEN).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Sets `name` to the percent-encoded `value`; both are valid by then.
fn set(headers: &mut HeaderMap, name: &str, value: &str) {
    let name = HeaderName::from_bytes(name.as_bytes()).expect("ce- plus an attribute name is a header name");
    let value = HeaderValue::try_from(percent_encode(value)).expect("percent-encoded text is printable ASCII");
    headers.insert(name, value);
}

/// The binding's encoding of a string attribute (HTTP binding §3.1.3.2):
/// every UTF-8 byte of space, `"`, `%`, or a character outside U+0021 to
/// U+007E becomes `%XY`. Bytes of multi-byte characters are all ≥ 0x80, so
/// encoding byte by byte encodes exactly those characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message() -> MessageForBody {
        MessageForBody {
            topic: "orders".into(),
            partition: 3,
            offset: 42,
            key: Some(b"customer-1".to_vec()),
            value: Some(br#"{"id": 7}"#.to_vec()),
            ts_ms: Some(1_700_000_000_123),
            headers: vec![("trace".into(), Some(b"abc".to_vec()))],
        }
    }

    fn header<'a>(p: &'a Payload, name: &str) -> Option<&'a str> {
        p.headers.get(name).map(|v| v.to_str().unwrap())
    }

    fn content_type(p: &Payload) -> Option<&str> {
        p.content_type.as_ref().map(|v| v.to_str().unwrap())
    }

    #[test]
    fn test_attributes_describe_the_message() {
        let p = cloud_event(&message(), "0190b4c8-9c1e-7000-8000-000000000001");
        assert_eq!(header(&p, "ce-specversion"), Some("1.0"));
        assert_eq!(header(&p, "ce-id"), Some("0190b4c8-9c1e-7000-8000-000000000001"));
        assert_eq!(header(&p, "ce-source"), Some("kafka://orders#3"));
        assert_eq!(header(&p, "ce-type"), Some("dev.kafka-triggers.message"));
        assert_eq!(header(&p, "ce-time"), Some("2023-11-14T22:13:20.123Z"));
        assert_eq!(header(&p, "ce-subject"), Some("customer-1"));
        assert_eq!(header(&p, "ce-partitionkey"), Some("customer-1"));
        assert_eq!(header(&p, "ce-kafkaoffset"), Some("42"));
        assert_eq!(header(&p, "ce-trace"), Some("abc"));
        // Binary mode carries the content type in Content-Type only.
        assert_eq!(header(&p, "ce-datacontenttype"), None);
        assert_eq!(content_type(&p), Some("application/json"));
        assert_eq!(p.body, Bytes::from_static(br#"{"id": 7}"#));
        assert_eq!(p.headers.len(), 9, "{:?}", p.headers);
    }

    #[test]
    fn test_body_is_the_value_verbatim() {
        let bytes = vec![0u8, 159, 146, 150, 255];
        let mut msg = message();
        msg.value = Some(bytes.clone());
        let p = cloud_event(&msg, "wo");
        assert_eq!(p.body, bytes);
        assert_eq!(content_type(&p), Some("application/octet-stream"));
    }

    #[test]
    fn test_content_type_comes_from_the_header_then_the_value() {
        let with_header = |value: Option<&[u8]>, headers: Vec<(&str, Option<&[u8]>)>| {
            let mut msg = message();
            msg.value = value.map(<[u8]>::to_vec);
            msg.headers = headers.into_iter().map(|(n, v)| (n.to_owned(), v.map(<[u8]>::to_vec))).collect();
            content_type(&cloud_event(&msg, "wo")).map(str::to_owned)
        };
        let json = Some(&br#"{"a": 1}"#[..]);
        // The header wins, even over a value that is JSON; the last one counts.
        assert_eq!(
            with_header(json, vec![("content-type", Some(b"text/plain")), ("Content-Type", Some(b" text/csv "))]),
            Some("text/csv".into())
        );
        assert_eq!(
            with_header(Some(b"x"), vec![("CONTENT-TYPE", Some(b"application/avro"))]),
            Some("application/avro".into())
        );
        // An unusable header is ignored: binary, empty, null, not ASCII.
        for bad in [Some(&[0xffu8, 0xfe][..]), Some(b"  "), None, Some("téxt/plain".as_bytes())] {
            assert_eq!(with_header(json, vec![("content-type", bad)]), Some("application/json".into()), "{bad:?}");
        }
        // Without one, the value decides.
        assert_eq!(with_header(Some(b"42"), vec![]), Some("application/json".into()));
        assert_eq!(with_header(Some(b"hello world"), vec![]), Some("application/octet-stream".into()));
        assert_eq!(with_header(Some(br#"{"id": 7"#), vec![]), Some("application/octet-stream".into()));
        assert_eq!(with_header(Some(b""), vec![]), Some("application/octet-stream".into()));
    }

    #[test]
    fn test_null_value_is_an_event_without_data() {
        let mut msg = message();
        msg.value = None;
        msg.headers = vec![("content-type".into(), Some(b"text/plain".to_vec()))];
        let p = cloud_event(&msg, "wo");
        assert!(p.body.is_empty());
        assert_eq!(p.content_type, None);
        assert_eq!(header(&p, "ce-id"), Some("wo"));
    }

    #[test]
    fn test_missing_timestamp_has_no_time() {
        let mut msg = message();
        msg.ts_ms = None;
        assert_eq!(header(&cloud_event(&msg, "wo"), "ce-time"), None);
        msg.ts_ms = Some(0);
        assert_eq!(header(&cloud_event(&msg, "wo"), "ce-time"), Some("1970-01-01T00:00:00.000Z"));
    }

    #[test]
    fn test_key_without_text_has_no_subject() {
        for key in [None, Some(vec![0xff, 0xfe, 0x00]), Some(Vec::new())] {
            let mut msg = message();
            msg.key = key.clone();
            let p = cloud_event(&msg, "wo");
            assert_eq!(header(&p, "ce-subject"), None, "{key:?}");
            assert_eq!(header(&p, "ce-partitionkey"), None, "{key:?}");
        }
    }

    #[test]
    fn test_text_is_percent_encoded() {
        // The binding's own example.
        assert_eq!(percent_encode("Euro € 😀"), "Euro%20%E2%82%AC%20%F0%9F%98%80");
        assert_eq!(percent_encode("a\"b%c\td\u{7f}"), "a%22b%25c%09d%7F");
        assert_eq!(percent_encode("kafka://orders#3"), "kafka://orders#3");
        let mut msg = message();
        msg.key = Some("user 1/é\n".as_bytes().to_vec());
        assert_eq!(header(&cloud_event(&msg, "wo"), "ce-subject"), Some("user%201/%C3%A9%0A"));
    }

    #[test]
    fn test_headers_named_like_attributes_become_extensions() {
        let mut msg = message();
        msg.headers = [
            ("traceparent", Some(&b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"[..])),
            ("tenant", Some(b"one")),
            ("tenant", Some(b"two two")),
            ("X-Request-Id", Some(b"r")),
            ("trace-id", Some(b"t")),
            ("id", Some(b"forged")),
            ("type", Some(b"forged")),
            ("partitionkey", Some(b"forged")),
            ("datacontenttype", Some(b"text/plain")),
            ("binary", Some(&[0xc3, 0x28][..])),
            ("nothing", None),
            ("abcdefghijklmnopqrstu", Some(b"21 characters")),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.map(<[u8]>::to_vec)))
        .collect();
        let p = cloud_event(&msg, "wo");
        assert_eq!(header(&p, "ce-traceparent"), Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(header(&p, "ce-tenant"), Some("two%20two"));
        assert_eq!(header(&p, "ce-id"), Some("wo"));
        assert_eq!(header(&p, "ce-type"), Some(EVENT_TYPE));
        assert_eq!(header(&p, "ce-partitionkey"), Some("customer-1"));
        for absent in ["ce-x-request-id", "ce-trace-id", "ce-datacontenttype", "ce-binary", "ce-nothing"] {
            assert_eq!(header(&p, absent), None, "{absent}");
        }
        assert_eq!(header(&p, "ce-abcdefghijklmnopqrstu"), None);
    }
}
