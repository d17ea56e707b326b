//! Table-driven validation tests: each invalid input must be rejected with a
//! violation on the field that is wrong.

use kt_proto::v1;

use super::validate::*;
use super::*;

const CERT: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
const KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n";

fn valid() -> v1::Trigger {
    v1::Trigger {
        name: "orders".into(),
        kafka: Some(v1::KafkaSource {
            hosts: vec!["localhost:9092".into()],
            topics: vec!["orders".into()],
            ..Default::default()
        }),
        webhook: Some(v1::WebhookTarget { url: "http://127.0.0.1:8080/hook".into(), ..Default::default() }),
        ..Default::default()
    }
}

fn with(f: impl FnOnce(&mut v1::Trigger)) -> v1::Trigger {
    let mut t = valid();
    f(&mut t);
    t
}

fn kafka(f: impl FnOnce(&mut v1::KafkaSource)) -> v1::Trigger {
    with(|t| f(t.kafka.as_mut().unwrap()))
}

fn webhook(f: impl FnOnce(&mut v1::WebhookTarget)) -> v1::Trigger {
    with(|t| f(t.webhook.as_mut().unwrap()))
}

fn sasl(mech: v1::SaslMechanism) -> i32 {
    mech.into()
}

#[test]
fn test_valid_trigger_gets_defaults_and_a_generated_group() {
    let v = validate_trigger(&valid(), "trigger.", None, None).unwrap();
    assert!(v.spec.kafka.group_id.starts_with("kafka-triggers-"));
    assert_eq!(v.spec.kafka.initial_offset_reset_policy, OffsetPolicy::Latest);
    assert_eq!(v.spec.kafka.connect_timeout_seconds, DEFAULT_CONNECT_TIMEOUT_SECONDS);
    assert_eq!(v.spec.webhook.timeout_ms, DEFAULT_WEBHOOK_TIMEOUT_MS);
    assert_eq!(v.spec.retry.max_attempts, DEFAULT_MAX_ATTEMPTS);
    assert_eq!(v.spec.tuning.max_in_flight, DEFAULT_MAX_IN_FLIGHT);
    assert!(v.secrets.is_empty());
}

#[test]
fn test_valid_variants_are_accepted() {
    let cases = [
        kafka(|k| k.hosts = vec!["[::1]:9092".into(), "10.0.0.1:1".into(), "broker-1.example.com:65535".into()]),
        kafka(|k| k.initial_offset_reset_policy = "earliest".into()),
        kafka(|k| k.initial_offset_reset_policy = "1717171717171".into()),
        kafka(|k| k.topics = vec!["a.b_c-D".into(), "x".repeat(249)]),
        kafka(|k| {
            k.sasl = sasl(v1::SaslMechanism::ScramSha512);
            k.username = "u".into();
            k.password = "p".into();
        }),
        kafka(|k| {
            k.ssl = true;
            k.ssl_ca_cert = CERT.into();
            k.ssl_client_cert = CERT.into();
            k.ssl_client_key = KEY.into();
        }),
        webhook(|w| {
            w.url = "https://example.com/i/abc".into();
            w.headers = vec![v1::Header { name: "x-api-key".into(), value: "k".into(), secret: true }];
        }),
    ];
    for (i, t) in cases.iter().enumerate() {
        assert!(
            validate_trigger(t, "", None, None).is_ok(),
            "case {i} rejected: {:?}",
            validate_trigger(t, "", None, None)
        );
    }
}

#[test]
fn test_invalid_inputs_name_the_bad_field() {
    use v1::SaslMechanism::{Plain, ScramSha256};
    let cases: Vec<(&str, v1::Trigger, &str)> = vec![
        ("empty name", with(|t| t.name = "  ".into()), "trigger.name"),
        ("long name", with(|t| t.name = "n".repeat(201)), "trigger.name"),
        ("control char in name", with(|t| t.name = "a\nb".into()), "trigger.name"),
        ("missing kafka", with(|t| t.kafka = None), "trigger.kafka"),
        ("no hosts", kafka(|k| k.hosts.clear()), "trigger.kafka.hosts"),
        ("host without port", kafka(|k| k.hosts = vec!["localhost".into()]), "trigger.kafka.hosts[0]"),
        ("non-numeric port", kafka(|k| k.hosts = vec!["localhost:abc".into()]), "trigger.kafka.hosts[0]"),
        ("port zero", kafka(|k| k.hosts = vec!["localhost:0".into()]), "trigger.kafka.hosts[0]"),
        ("port too large", kafka(|k| k.hosts = vec!["localhost:65536".into()]), "trigger.kafka.hosts[0]"),
        ("empty port", kafka(|k| k.hosts = vec!["localhost:".into()]), "trigger.kafka.hosts[0]"),
        ("empty host", kafka(|k| k.hosts = vec![":9092".into()]), "trigger.kafka.hosts[0]"),
        ("ipv6 without brackets", kafka(|k| k.hosts = vec!["::1:9092".into()]), "trigger.kafka.hosts[0]"),
        ("bad ipv6", kafka(|k| k.hosts = vec!["[::zz]:9092".into()]), "trigger.kafka.hosts[0]"),
        ("unclosed bracket", kafka(|k| k.hosts = vec!["[::1:9092".into()]), "trigger.kafka.hosts[0]"),
        ("bad ipv4", kafka(|k| k.hosts = vec!["300.1.1.1:9092".into()]), "trigger.kafka.hosts[0]"),
        ("bad host chars", kafka(|k| k.hosts = vec!["ok:1".into(), "bad host:9092".into()]), "trigger.kafka.hosts[1]"),
        ("scheme in host", kafka(|k| k.hosts = vec!["tcp://a:9092".into()]), "trigger.kafka.hosts[0]"),
        ("no topics", kafka(|k| k.topics.clear()), "trigger.kafka.topics"),
        ("empty topic", kafka(|k| k.topics = vec!["".into()]), "trigger.kafka.topics[0]"),
        ("topic with space", kafka(|k| k.topics = vec!["a b".into()]), "trigger.kafka.topics[0]"),
        ("topic with slash", kafka(|k| k.topics = vec!["a/b".into()]), "trigger.kafka.topics[0]"),
        ("topic dot", kafka(|k| k.topics = vec![".".into()]), "trigger.kafka.topics[0]"),
        ("topic dotdot", kafka(|k| k.topics = vec!["..".into()]), "trigger.kafka.topics[0]"),
        ("topic too long", kafka(|k| k.topics = vec!["t".repeat(250)]), "trigger.kafka.topics[0]"),
        ("duplicate topic", kafka(|k| k.topics = vec!["a".into(), "a".into()]), "trigger.kafka.topics[1]"),
        (
            "bad policy",
            kafka(|k| k.initial_offset_reset_policy = "beginning".into()),
            "trigger.kafka.initial_offset_reset_policy",
        ),
        (
            "10-digit policy",
            kafka(|k| k.initial_offset_reset_policy = "1717171717".into()),
            "trigger.kafka.initial_offset_reset_policy",
        ),
        (
            "14-digit policy",
            kafka(|k| k.initial_offset_reset_policy = "17171717171710".into()),
            "trigger.kafka.initial_offset_reset_policy",
        ),
        (
            "negative policy",
            kafka(|k| k.initial_offset_reset_policy = "-171717171717".into()),
            "trigger.kafka.initial_offset_reset_policy",
        ),
        (
            "sasl without username",
            kafka(|k| {
                k.sasl = sasl(Plain);
                k.password = "p".into();
            }),
            "trigger.kafka.username",
        ),
        (
            "sasl without password",
            kafka(|k| {
                k.sasl = sasl(ScramSha256);
                k.username = "u".into();
            }),
            "trigger.kafka.password",
        ),
        ("username without sasl", kafka(|k| k.username = "u".into()), "trigger.kafka.username"),
        (
            "password without sasl",
            kafka(|k| {
                k.sasl = sasl(v1::SaslMechanism::None);
                k.password = "p".into();
            }),
            "trigger.kafka.password",
        ),
        ("unknown sasl", kafka(|k| k.sasl = 42), "trigger.kafka.sasl"),
        ("unknown webhook format", webhook(|w| w.format = 7), "trigger.webhook.format"),
        (
            "zero connect timeout",
            kafka(|k| k.connect_timeout_seconds = Some(0)),
            "trigger.kafka.connect_timeout_seconds",
        ),
        (
            "huge connect timeout",
            kafka(|k| k.connect_timeout_seconds = Some(301)),
            "trigger.kafka.connect_timeout_seconds",
        ),
        ("ca cert without ssl", kafka(|k| k.ssl_ca_cert = CERT.into()), "trigger.kafka.ssl_ca_cert"),
        (
            "ca cert not pem",
            kafka(|k| {
                k.ssl = true;
                k.ssl_ca_cert = "abc".into();
            }),
            "trigger.kafka.ssl_ca_cert",
        ),
        (
            "client cert without key",
            kafka(|k| {
                k.ssl = true;
                k.ssl_client_cert = CERT.into();
            }),
            "trigger.kafka.ssl_client_key",
        ),
        (
            "client key without cert",
            kafka(|k| {
                k.ssl = true;
                k.ssl_client_key = KEY.into();
            }),
            "trigger.kafka.ssl_client_cert",
        ),
        (
            "client key not pem",
            kafka(|k| {
                k.ssl = true;
                k.ssl_client_cert = CERT.into();
                k.ssl_client_key = "x".into();
            }),
            "trigger.kafka.ssl_client_key",
        ),
        ("long group id", kafka(|k| k.group_id = "g".repeat(256)), "trigger.kafka.group_id"),
        ("missing webhook", with(|t| t.webhook = None), "trigger.webhook"),
        ("empty url", webhook(|w| w.url = "".into()), "trigger.webhook.url"),
        ("ftp url", webhook(|w| w.url = "ftp://example.com/x".into()), "trigger.webhook.url"),
        ("relative url", webhook(|w| w.url = "/hook".into()), "trigger.webhook.url"),
        ("url with credentials", webhook(|w| w.url = "http://u:p@example.com/".into()), "trigger.webhook.url"),
        ("zero webhook timeout", webhook(|w| w.timeout_ms = Some(0)), "trigger.webhook.timeout_ms"),
        (
            "bad header name",
            webhook(|w| w.headers = vec![v1::Header { name: "a b".into(), value: "v".into(), secret: false }]),
            "trigger.webhook.headers[0].name",
        ),
        (
            "header with newline",
            webhook(|w| w.headers = vec![v1::Header { name: "x".into(), value: "a\r\nb".into(), secret: false }]),
            "trigger.webhook.headers[0].value",
        ),
        (
            "duplicate header",
            webhook(|w| {
                w.headers = vec![
                    v1::Header { name: "X-A".into(), value: "1".into(), secret: false },
                    v1::Header { name: "x-a".into(), value: "2".into(), secret: false },
                ]
            }),
            "trigger.webhook.headers[1].name",
        ),
        (
            "reserved header",
            webhook(|w| w.headers = vec![v1::Header { name: "Content-Type".into(), value: "x".into(), secret: false }]),
            "trigger.webhook.headers[0].name",
        ),
        (
            "secret header without value",
            webhook(|w| w.headers = vec![v1::Header { name: "x-key".into(), value: "".into(), secret: true }]),
            "trigger.webhook.headers[0].value",
        ),
        (
            "zero attempts",
            with(|t| t.retry = Some(v1::RetryPolicy { max_attempts: Some(0), ..Default::default() })),
            "trigger.retry.max_attempts",
        ),
        (
            "backoff inverted",
            with(|t| {
                t.retry = Some(v1::RetryPolicy {
                    initial_backoff_ms: Some(1000),
                    max_backoff_ms: Some(10),
                    ..Default::default()
                })
            }),
            "trigger.retry.max_backoff_ms",
        ),
        (
            "zero in flight",
            with(|t| t.tuning = Some(v1::Tuning { max_in_flight: Some(0), ..Default::default() })),
            "trigger.tuning.max_in_flight",
        ),
        (
            "tiny fetch size",
            with(|t| t.tuning = Some(v1::Tuning { fetch_max_bytes: 10, ..Default::default() })),
            "trigger.tuning.fetch_max_bytes",
        ),
    ];
    assert!(cases.len() >= 30);
    for (what, input, field) in cases {
        let violations = validate_trigger(&input, "trigger.", None, None).expect_err(what);
        assert!(
            violations.iter().any(|v| v.field == field && !v.description.is_empty()),
            "{what}: expected a violation on {field}, got {violations:?}"
        );
    }
}

#[test]
fn test_webhook_format_defaults_to_json_and_round_trips() {
    let v = validate_trigger(&valid(), "", None, None).unwrap();
    assert_eq!(v.spec.webhook.format, WebhookFormat::Json);
    assert_eq!(spec_to_proto(&v.spec, None).webhook.unwrap().format(), v1::WebhookFormat::Json);

    let ce = webhook(|w| w.format = v1::WebhookFormat::Cloudevents.into());
    let v = validate_trigger(&ce, "", None, None).unwrap();
    assert_eq!(v.spec.webhook.format, WebhookFormat::CloudEvents);
    assert_eq!(spec_to_proto(&v.spec, None).webhook.unwrap().format(), v1::WebhookFormat::Cloudevents);

    // A trigger stored before formats existed reads as JSON.
    let mut stored = serde_json::to_value(&v.spec).unwrap();
    assert_eq!(stored["webhook"]["format"], "cloudevents");
    stored["webhook"].as_object_mut().unwrap().remove("format");
    let old: TriggerSpec = serde_json::from_value(stored).unwrap();
    assert_eq!(old.webhook.format, WebhookFormat::Json);
}

#[test]
fn test_every_bad_field_is_reported_at_once() {
    let t = v1::Trigger {
        name: "".into(),
        kafka: Some(v1::KafkaSource { hosts: vec!["x".into()], topics: vec![], ..Default::default() }),
        webhook: Some(v1::WebhookTarget { url: "nope".into(), ..Default::default() }),
        ..Default::default()
    };
    let fields: Vec<String> = validate_trigger(&t, "", None, None).unwrap_err().into_iter().map(|v| v.field).collect();
    assert_eq!(fields, ["name", "kafka.hosts[0]", "kafka.topics", "webhook.url"]);
}

#[test]
fn test_update_keeps_group_id_and_stored_secrets() {
    let mut created = kafka(|k| {
        k.sasl = sasl(v1::SaslMechanism::Plain);
        k.username = "u".into();
        k.password = "p1".into();
    });
    created.webhook.as_mut().unwrap().headers =
        vec![v1::Header { name: "x-key".into(), value: "k1".into(), secret: true }];
    let first = validate_trigger(&created, "", None, None).unwrap();

    // The API returns no secret values; sending the trigger back unchanged
    // must keep them.
    let mut echoed = spec_to_proto(&first.spec, None);
    echoed.kafka.as_mut().unwrap().topics.push("more".into());
    let second = validate_trigger(&echoed, "", Some((&first.spec, &first.secrets)), None).unwrap();
    assert_eq!(second.spec.kafka.group_id, first.spec.kafka.group_id);
    assert_eq!(second.secrets, first.secrets);
    assert_eq!(second.spec.kafka.topics, ["orders", "more"]);

    let mut moved = echoed.clone();
    moved.kafka.as_mut().unwrap().group_id = "another".into();
    let err = validate_trigger(&moved, "", Some((&first.spec, &first.secrets)), None).unwrap_err();
    assert_eq!(err[0].field, "kafka.group_id");

    // Dropping SASL drops the stored password.
    let mut plain = echoed;
    let k = plain.kafka.as_mut().unwrap();
    k.sasl = sasl(v1::SaslMechanism::None);
    k.username.clear();
    let third = validate_trigger(&plain, "", Some((&first.spec, &first.secrets)), None).unwrap();
    assert_eq!(third.secrets.password, None);
}

#[test]
fn test_public_conversion_never_contains_secret_values() {
    let t = kafka(|k| {
        k.ssl = true;
        k.ssl_client_cert = CERT.into();
        k.ssl_client_key = KEY.into();
        k.sasl = sasl(v1::SaslMechanism::ScramSha256);
        k.username = "u".into();
        k.password = "pw-123".into();
    });
    let v = validate_trigger(&t, "", None, None).unwrap();
    let public = spec_to_proto(&v.spec, None);
    let k = public.kafka.as_ref().unwrap();
    assert!(k.password.is_empty() && k.password_set);
    assert!(k.ssl_client_key.is_empty() && k.ssl_client_key_set);
    let internal = spec_to_proto(&v.spec, Some(&v.secrets));
    assert_eq!(internal.kafka.unwrap().password, "pw-123");
    let json = serde_json::to_string(&v.spec).unwrap();
    assert!(!json.contains("pw-123") && !json.contains("MIIE"));
}

/// Pins issue #10 item 8: bidi overrides and other invisible format
/// characters (Unicode category Cf) were accepted in names.
#[test]
fn test_names_refuse_invisible_format_characters() {
    for name in ["pay\u{202E}lortnoc", "zero\u{200B}width", "\u{FEFF}bom", "tag\u{E0041}"] {
        let mut t = valid();
        t.name = name.into();
        let err = validate_trigger(&t, "", None, None).unwrap_err();
        assert_eq!(err[0].field, "name", "{name:?}");
        assert!(err[0].description.contains("format characters"), "{name:?}: {}", err[0].description);
    }
    let mut t = valid();
    t.name = "café ☕ 注文".into();
    validate_trigger(&t, "", None, None).unwrap();
}

/// Pins issue #10 item 6: webhook targets were unrestricted, cloud metadata
/// included.
#[test]
fn test_webhook_ip_literals_follow_the_target_policy() {
    use crate::webhook_policy::WebhookPolicy;
    let default = WebhookPolicy::default();
    for url in
        ["http://169.254.169.254/latest", "http://[::ffff:169.254.169.254]/", "http://0.0.0.0:8080/", "http://[::]/"]
    {
        let t = webhook(|w| w.url = url.into());
        let err = validate_trigger(&t, "trigger.", None, Some(&default)).unwrap_err();
        assert_eq!(err.len(), 1, "{url}: {err:?}");
        assert_eq!(err[0].field, "trigger.webhook.url", "{url}");
        assert!(err[0].description.contains("refused by the webhook target policy"), "{url}: {}", err[0].description);
        // Without a policy (the nodes, which check at connect time) it passes.
        validate_trigger(&t, "trigger.", None, None).unwrap();
    }
    let err = validate_trigger(&webhook(|w| w.url = "http://169.254.169.254/".into()), "", None, Some(&default));
    assert_eq!(
        err.unwrap_err()[0].description,
        "address 169.254.169.254 is refused by the webhook target policy \
         (--webhook-deny-cidrs has 169.254.0.0/16; --webhook-allow-cidrs can allow it)"
    );
    let allowing = WebhookPolicy::parse(crate::webhook_policy::DEFAULT_DENY_CIDRS, "169.254.169.254/32").unwrap();
    validate_trigger(&webhook(|w| w.url = "http://169.254.169.254/".into()), "", None, Some(&allowing)).unwrap();
    // Host names are the caller's to resolve; loopback is allowed by default.
    validate_trigger(&webhook(|w| w.url = "http://metadata.example/".into()), "", None, Some(&default)).unwrap();
    validate_trigger(&valid(), "", None, Some(&default)).unwrap();
}

fn header(name: &str, value: &str, secret: bool) -> v1::Header {
    v1::Header { name: name.into(), value: value.into(), secret }
}

/// A PEM of about `len` bytes that passes the format checks.
fn pem_of(kind: &str, len: usize) -> String {
    format!("-----BEGIN {kind}-----\n{}\n-----END {kind}-----\n", "A".repeat(len))
}

#[test]
fn test_variable_size_fields_are_capped() {
    let tls = |f: fn(&mut v1::KafkaSource)| {
        kafka(move |k| {
            k.ssl = true;
            k.ssl_client_cert = CERT.into();
            k.ssl_client_key = KEY.into();
            f(k)
        })
    };
    let cases: Vec<(&str, v1::Trigger, &str)> = vec![
        ("long url", webhook(|w| w.url = format!("http://h/{}", "p".repeat(MAX_URL_LEN))), "trigger.webhook.url"),
        (
            "too many headers",
            webhook(|w| w.headers = (0..=MAX_HEADERS).map(|i| header(&format!("x-h{i}"), "v", false)).collect()),
            "trigger.webhook.headers",
        ),
        (
            "long header name",
            webhook(|w| w.headers = vec![header(&"x".repeat(MAX_HEADER_NAME_LEN + 1), "v", false)]),
            "trigger.webhook.headers[0].name",
        ),
        (
            "long header value",
            webhook(|w| w.headers = vec![header("x-a", &"v".repeat(MAX_HEADER_VALUE_LEN + 1), false)]),
            "trigger.webhook.headers[0].value",
        ),
        (
            "long secret header value",
            webhook(|w| w.headers = vec![header("x-a", &"v".repeat(MAX_HEADER_VALUE_LEN + 1), true)]),
            "trigger.webhook.headers[0].value",
        ),
        (
            "headers too large together",
            webhook(|w| w.headers = (0..5).map(|i| header(&format!("x-h{i}"), &"v".repeat(8_000), false)).collect()),
            "trigger.webhook.headers",
        ),
        ("large ca", tls(|k| k.ssl_ca_cert = pem_of("CERTIFICATE", MAX_PEM_LEN)), "trigger.kafka.ssl_ca_cert"),
        (
            "large client cert",
            tls(|k| k.ssl_client_cert = pem_of("CERTIFICATE", MAX_PEM_LEN)),
            "trigger.kafka.ssl_client_cert",
        ),
        (
            "large client key",
            tls(|k| k.ssl_client_key = pem_of("PRIVATE KEY", MAX_PEM_LEN)),
            "trigger.kafka.ssl_client_key",
        ),
        (
            "long username",
            kafka(|k| {
                k.sasl = sasl(v1::SaslMechanism::Plain);
                k.username = "u".repeat(MAX_USERNAME_LEN + 1);
                k.password = "p".into();
            }),
            "trigger.kafka.username",
        ),
        (
            "long password",
            kafka(|k| {
                k.sasl = sasl(v1::SaslMechanism::Plain);
                k.username = "u".into();
                k.password = "p".repeat(MAX_PASSWORD_LEN + 1);
            }),
            "trigger.kafka.password",
        ),
    ];
    for (what, input, field) in cases {
        let violations = validate_trigger(&input, "trigger.", None, None).expect_err(what);
        assert!(
            violations.iter().any(|v| v.field == field && v.description.contains("at most")),
            "{what}: expected a size violation on {field}, got {violations:?}"
        );
    }

    // Right at each cap is fine.
    let at_caps = tls(|k| {
        k.ssl_ca_cert = pem_of("CERTIFICATE", MAX_PEM_LEN - 64);
        k.ssl_client_cert = pem_of("CERTIFICATE", MAX_PEM_LEN - 64);
    });
    validate_trigger(&at_caps, "trigger.", None, None).expect("certificates under the cap");
}

#[test]
fn test_a_trigger_too_large_in_all_is_refused_as_a_whole() {
    // Every field within its own cap, the sum over the total.
    let t = kafka(|k| {
        k.ssl = true;
        k.ssl_ca_cert = pem_of("CERTIFICATE", MAX_PEM_LEN - 64);
        k.ssl_client_cert = pem_of("CERTIFICATE", MAX_PEM_LEN - 64);
        k.ssl_client_key = pem_of("PRIVATE KEY", MAX_PEM_LEN - 64);
        k.hosts = (0..MAX_HOSTS).map(|i| format!("{l}.{l}.{l}.h{i}.example.com:9092", l = "b".repeat(60))).collect();
        k.topics = (0..MAX_TOPICS).map(|i| format!("{}{i}", "t".repeat(240))).collect();
    });
    let t = with(move |x| {
        *x = t;
        let w = x.webhook.as_mut().unwrap();
        w.headers = (0..4).map(|i| header(&format!("x-h{i}"), &"v".repeat(MAX_HEADER_VALUE_LEN - 16), false)).collect();
    });
    let violations = validate_trigger(&t, "trigger.", None, None).unwrap_err();
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "trigger");
    assert!(violations[0].description.contains(&MAX_TRIGGER_BYTES.to_string()), "{violations:?}");
}
