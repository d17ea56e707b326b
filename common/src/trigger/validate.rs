//! Validation of a trigger as it arrives on the wire. Every bad field is
//! reported (not just the first), each with its path in the request, so a
//! client can fix them all at once.

use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr};

use kt_proto::status::FieldViolation;
use kt_proto::v1;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory as _};

use super::*;
use crate::webhook_policy::WebhookPolicy;

pub(super) const MAX_NAME_LEN: usize = 200;
pub(super) const MAX_HOSTS: usize = 100;
pub(super) const MAX_TOPICS: usize = 100;
pub(super) const MAX_TOPIC_LEN: usize = 249;
pub(super) const MAX_GROUP_ID_LEN: usize = 255;
pub(super) const MAX_CONNECT_TIMEOUT_SECONDS: u32 = 300;
pub(super) const MAX_WEBHOOK_TIMEOUT_MS: u32 = 600_000;
pub(super) const MAX_ATTEMPTS: u32 = 1_000;
pub(super) const MAX_BACKOFF_MS: u32 = 86_400_000;
pub(super) const MAX_IN_FLIGHT: u32 = 10_000;
pub(super) const MIN_FETCH_MAX_BYTES: u32 = 1_024;
pub(super) const MAX_FETCH_MAX_BYTES: u32 = 1 << 30;
pub(super) const MAX_URL_LEN: usize = 4_096;
pub(super) const MAX_HEADERS: usize = 64;
pub(super) const MAX_HEADER_NAME_LEN: usize = 256;
pub(super) const MAX_HEADER_VALUE_LEN: usize = 8 * 1_024;
/// Names and values of all headers together: servers commonly refuse a
/// request whose headers pass 8-32 KiB.
pub(super) const MAX_HEADER_BYTES: usize = 32 * 1_024;
/// Each of the CA certificate, the client certificate and the client key.
pub(super) const MAX_PEM_LEN: usize = 64 * 1_024;
pub(super) const MAX_USERNAME_LEN: usize = 1_024;
pub(super) const MAX_PASSWORD_LEN: usize = 4_096;
/// The whole trigger as a node receives it (secrets included, protobuf
/// encoded). It bounds what one trigger adds to a node's assignment, which
/// the control plane sends in parts well under the 4 MiB gRPC message limit.
pub const MAX_TRIGGER_BYTES: usize = 256 * 1_024;

/// Secrets as given in a request: `None` means "not given" (keep the stored
/// value on update).
#[derive(Debug, Default)]
pub struct SecretsInput {
    pub password: Option<Secret>,
    pub ssl_client_key: Option<Secret>,
    pub headers: BTreeMap<String, Secret>,
}

/// A trigger that passed validation: its configuration and its merged secrets.
#[derive(Debug, Clone)]
pub struct ValidatedTrigger {
    pub spec: TriggerSpec,
    pub secrets: TriggerSecrets,
}

pub(super) struct Checker {
    prefix: String,
    violations: Vec<FieldViolation>,
}

impl Checker {
    pub(super) fn new(prefix: &str) -> Self {
        Self { prefix: prefix.to_owned(), violations: Vec::new() }
    }

    #[cfg(test)]
    pub(super) fn into_violations(self) -> Vec<FieldViolation> {
        self.violations
    }

    pub(super) fn bad(&mut self, field: &str, description: impl Into<String>) {
        self.violations.push(FieldViolation::new(format!("{}{}", self.prefix, field), description));
    }
}

/// Validates `t` (fields under `prefix`, e.g. `"trigger."`). With `existing`
/// (an update), an empty `group_id` and empty secrets keep their stored value,
/// and a different `group_id` is refused. With `policy`, a `webhook.url` whose
/// host is an IP literal the policy refuses is a violation (host names are
/// resolved by the caller, [`WebhookPolicy::refused_dns_answer`]); nodes pass
/// none, since they check the target when they connect.
pub fn validate_trigger(
    t: &v1::Trigger,
    prefix: &str,
    existing: Option<(&TriggerSpec, &TriggerSecrets)>,
    policy: Option<&WebhookPolicy>,
) -> Result<ValidatedTrigger, Vec<FieldViolation>> {
    let mut c = Checker::new(prefix);

    let name = t.name.trim().to_owned();
    if name.is_empty() {
        c.bad("name", "must not be empty");
    } else if name.chars().count() > MAX_NAME_LEN {
        c.bad("name", format!("must be at most {MAX_NAME_LEN} characters"));
    } else if name.chars().any(char::is_control) {
        c.bad("name", "must not contain control characters");
    } else if let Some(ch) = name.chars().find(|ch| ch.general_category() == GeneralCategory::Format) {
        // Invisible format characters (bidi overrides such as U+202E,
        // zero-width spaces) make a name display as something it is not, in
        // lists, logs and terminals.
        c.bad("name", format!("must not contain invisible format characters (U+{:04X})", u32::from(ch)));
    }

    let default_kafka = v1::KafkaSource::default();
    let kafka = t.kafka.as_ref().unwrap_or_else(|| {
        c.bad("kafka", "is required");
        &default_kafka
    });
    let kafka = check_kafka(&mut c, kafka, existing);

    let default_webhook = v1::WebhookTarget::default();
    let webhook = t.webhook.as_ref().unwrap_or_else(|| {
        c.bad("webhook", "is required");
        &default_webhook
    });
    let (webhook, header_secrets) = check_webhook(&mut c, webhook, existing, policy);
    let retry = check_retry(&mut c, t.retry.as_ref());
    let tuning = check_tuning(&mut c, t.tuning.as_ref());
    let on_failure = super::failure::check_on_failure(&mut c, t);
    let ordering = super::ordering::check_ordering(&mut c, t);
    let filter = t.filter.trim().to_owned();
    if !filter.is_empty() {
        if let Err(why) = crate::filter::Filter::compile(&filter) {
            c.bad("filter", why);
        }
    }

    if !c.violations.is_empty() {
        return Err(c.violations);
    }
    let (kafka, kafka_secrets) = kafka;
    let valid = ValidatedTrigger {
        spec: TriggerSpec { name, kafka, webhook, retry, tuning, ordering, on_failure, filter },
        secrets: TriggerSecrets {
            password: kafka_secrets.password,
            ssl_client_key: kafka_secrets.ssl_client_key,
            headers: header_secrets,
        },
    };
    // Measured as sent to nodes, so kept secrets count too.
    let size = prost::Message::encoded_len(&spec_to_proto(&valid.spec, Some(&valid.secrets)));
    if size > MAX_TRIGGER_BYTES {
        let field = prefix.trim_end_matches('.');
        let field = if field.is_empty() { "trigger" } else { field };
        let why = format!("is {size} bytes encoded, secrets included; at most {MAX_TRIGGER_BYTES} bytes");
        return Err(vec![FieldViolation::new(field, why)]);
    }
    Ok(valid)
}

/// Refuses a value longer than `max` bytes; `true` when it fits.
fn check_len(c: &mut Checker, field: &str, value: &str, max: usize) -> bool {
    let fits = value.len() <= max;
    if !fits {
        c.bad(field, format!("must be at most {max} bytes, not {}", value.len()));
    }
    fits
}

fn check_kafka(
    c: &mut Checker,
    k: &v1::KafkaSource,
    existing: Option<(&TriggerSpec, &TriggerSecrets)>,
) -> (KafkaSource, TriggerSecrets) {
    if k.hosts.is_empty() {
        c.bad("kafka.hosts", "at least one host:port is required");
    } else if k.hosts.len() > MAX_HOSTS {
        c.bad("kafka.hosts", format!("at most {MAX_HOSTS} hosts"));
    }
    for (i, host) in k.hosts.iter().enumerate() {
        if let Err(why) = check_host_port(host) {
            c.bad(&format!("kafka.hosts[{i}]"), why);
        }
    }

    if k.topics.is_empty() {
        c.bad("kafka.topics", "at least one topic is required");
    } else if k.topics.len() > MAX_TOPICS {
        c.bad("kafka.topics", format!("at most {MAX_TOPICS} topics"));
    }
    let mut seen = HashSet::new();
    for (i, topic) in k.topics.iter().enumerate() {
        if let Err(why) = check_topic(topic) {
            c.bad(&format!("kafka.topics[{i}]"), why);
        } else if !seen.insert(topic.as_str()) {
            c.bad(&format!("kafka.topics[{i}]"), format!("duplicate topic `{topic}`"));
        }
    }

    let group_id = match (k.group_id.trim(), existing) {
        ("", Some((spec, _))) => spec.kafka.group_id.clone(),
        ("", None) => generate_group_id(),
        (given, Some((spec, _))) if given != spec.kafka.group_id => {
            c.bad("kafka.group_id", format!("is immutable (currently `{}`)", spec.kafka.group_id));
            given.to_owned()
        }
        (given, _) => {
            if given.len() > MAX_GROUP_ID_LEN {
                c.bad("kafka.group_id", format!("must be at most {MAX_GROUP_ID_LEN} bytes"));
            } else if given.chars().any(char::is_control) {
                c.bad("kafka.group_id", "must not contain control characters");
            }
            given.to_owned()
        }
    };

    let policy = match k.initial_offset_reset_policy.trim() {
        "" => OffsetPolicy::Latest,
        p => p.parse().unwrap_or_else(|why: String| {
            c.bad("kafka.initial_offset_reset_policy", why);
            OffsetPolicy::Latest
        }),
    };

    let non_empty = |s: &str| (!s.trim().is_empty()).then(|| s.trim().to_owned());
    let ca = non_empty(&k.ssl_ca_cert);
    let client_cert = non_empty(&k.ssl_client_cert);
    let given_key = non_empty(&k.ssl_client_key).map(Secret::new);
    let stored = existing.map(|e| e.1);
    // A client key given now wins; otherwise an update keeps the stored one
    // as long as a client certificate is still configured.
    let client_key = given_key.or_else(|| client_cert.as_ref().and(stored.and_then(|s| s.ssl_client_key.clone())));

    if !k.ssl && (ca.is_some() || client_cert.is_some() || client_key.is_some()) {
        for (field, set) in [
            ("kafka.ssl_ca_cert", ca.is_some()),
            ("kafka.ssl_client_cert", client_cert.is_some()),
            ("kafka.ssl_client_key", !k.ssl_client_key.trim().is_empty()),
        ] {
            if set {
                c.bad(field, "requires ssl = true");
            }
        }
    }
    for (field, value) in [
        ("kafka.ssl_ca_cert", &k.ssl_ca_cert),
        ("kafka.ssl_client_cert", &k.ssl_client_cert),
        ("kafka.ssl_client_key", &k.ssl_client_key),
    ] {
        check_len(c, field, value, MAX_PEM_LEN);
    }
    check_len(c, "kafka.username", &k.username, MAX_USERNAME_LEN);
    check_len(c, "kafka.password", &k.password, MAX_PASSWORD_LEN);
    if let Some(pem) = &ca {
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            c.bad("kafka.ssl_ca_cert", "must be a PEM certificate (-----BEGIN CERTIFICATE-----)");
        }
    }
    if let Some(pem) = &client_cert {
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            c.bad("kafka.ssl_client_cert", "must be a PEM certificate (-----BEGIN CERTIFICATE-----)");
        }
        if client_key.is_none() {
            c.bad("kafka.ssl_client_key", "is required with ssl_client_cert");
        }
    }
    if let Some(key) = &client_key {
        if client_cert.is_none() {
            c.bad("kafka.ssl_client_cert", "is required with ssl_client_key");
        } else if !(key.expose().contains("-----BEGIN") && key.expose().contains("PRIVATE KEY-----")) {
            c.bad("kafka.ssl_client_key", "must be a PEM private key");
        }
    }

    let sasl = match v1::SaslMechanism::try_from(k.sasl) {
        Ok(v1::SaslMechanism::Unspecified | v1::SaslMechanism::None) => Sasl::None,
        Ok(v1::SaslMechanism::Plain) => Sasl::Plain,
        Ok(v1::SaslMechanism::ScramSha256) => Sasl::ScramSha256,
        Ok(v1::SaslMechanism::ScramSha512) => Sasl::ScramSha512,
        Err(_) => {
            c.bad("kafka.sasl", format!("unknown SASL mechanism {}", k.sasl));
            Sasl::None
        }
    };
    let username = non_empty(&k.username);
    let given_password = (!k.password.is_empty()).then(|| Secret::new(k.password.clone()));
    let password = match sasl {
        Sasl::None => {
            if username.is_some() {
                c.bad("kafka.username", "is only allowed with a SASL mechanism");
            }
            if given_password.is_some() {
                c.bad("kafka.password", "is only allowed with a SASL mechanism");
            }
            None
        }
        _ => {
            if username.is_none() {
                c.bad("kafka.username", "is required with SASL");
            }
            let kept = given_password.is_none().then(|| stored.and_then(|s| s.password.clone())).flatten();
            if let (Some(_), Some((spec, _))) = (&kept, existing) {
                if let Some(why) = password_destination_changed(&spec.kafka, &k.hosts, sasl, k.ssl) {
                    c.bad("kafka.password", format!("must be sent again: {why}"));
                }
            }
            let password = given_password.or(kept);
            if password.is_none() {
                c.bad("kafka.password", "is required with SASL");
            }
            password
        }
    };

    let connect_timeout_seconds = match k.connect_timeout_seconds {
        None => DEFAULT_CONNECT_TIMEOUT_SECONDS,
        Some(s) if (1..=MAX_CONNECT_TIMEOUT_SECONDS).contains(&s) => s,
        Some(_) => {
            c.bad("kafka.connect_timeout_seconds", format!("must be 1-{MAX_CONNECT_TIMEOUT_SECONDS} seconds"));
            DEFAULT_CONNECT_TIMEOUT_SECONDS
        }
    };

    let source = KafkaSource {
        hosts: k.hosts.iter().map(|h| h.trim().to_owned()).collect(),
        topics: k.topics.clone(),
        group_id,
        initial_offset_reset_policy: policy,
        ssl: k.ssl,
        ssl_ca_cert: ca,
        ssl_client_cert: client_cert,
        sasl,
        username,
        connect_timeout_seconds,
    };
    let secrets = TriggerSecrets { password, ssl_client_key: client_key, headers: BTreeMap::new() };
    (source, secrets)
}

/// Why a stored password may not be kept, if it may not. It was given for
/// the brokers, mechanism and transport it is stored with; keeping it
/// across a change of those would let anyone allowed to edit the trigger
/// (but not to read its secrets) send it somewhere it was never meant to go:
/// to a broker of their own, or in clear with PLAIN or without TLS.
/// Removing or reordering brokers sends it nowhere new.
fn password_destination_changed(stored: &KafkaSource, hosts: &[String], sasl: Sasl, ssl: bool) -> Option<String> {
    let known: HashSet<String> = stored.hosts.iter().map(|h| h.trim().to_ascii_lowercase()).collect();
    if let Some(new) = hosts.iter().find(|h| !known.contains(&h.trim().to_ascii_lowercase())) {
        return Some(format!(
            "kafka.hosts adds `{}`, and the stored password is only sent to the brokers it was given for",
            new.trim()
        ));
    }
    if sasl != stored.sasl {
        return Some("kafka.sasl changed, and the stored password was given for the previous mechanism".into());
    }
    if stored.ssl && !ssl {
        return Some("kafka.ssl was turned off, and the stored password was given for TLS connections".into());
    }
    None
}

/// `host:port` with a DNS name, an IPv4 address, or a bracketed IPv6 address.
pub(crate) fn check_host_port(s: &str) -> Result<(), String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or("IPv6 address is missing its closing `]`")?;
        addr.parse::<Ipv6Addr>().map_err(|_| format!("`{addr}` is not an IPv6 address"))?;
        let port = after.strip_prefix(':').ok_or("expected host:port, e.g. [::1]:9092")?;
        (None, port)
    } else {
        if s.matches(':').count() > 1 {
            return Err("IPv6 addresses must be in brackets, e.g. [::1]:9092".into());
        }
        let (host, port) = s.rsplit_once(':').ok_or("expected host:port, e.g. localhost:9092")?;
        (Some(host), port)
    };
    if let Some(host) = host {
        check_hostname(host)?;
    }
    match port.parse::<u32>() {
        Ok(p) if (1..=65_535).contains(&p) && !port.starts_with('+') => Ok(()),
        Ok(_) => Err(format!("port {port} is out of range 1-65535")),
        Err(_) => Err(format!("port `{port}` is not a number")),
    }
}

fn check_hostname(host: &str) -> Result<(), String> {
    if host.is_empty() {
        return Err("host must not be empty".into());
    }
    if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return host.parse::<Ipv4Addr>().map(|_| ()).map_err(|_| format!("`{host}` is not an IPv4 address"));
    }
    if host.len() > 253 {
        return Err("host name is longer than 253 characters".into());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if host.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!("`{host}` is not a valid host name"))
    }
}

/// Kafka's own rule: 1-249 characters of `[a-zA-Z0-9._-]`, not `.` or `..`.
pub(crate) fn check_topic(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("must not be empty".into());
    }
    if t.len() > MAX_TOPIC_LEN {
        return Err(format!("must be at most {MAX_TOPIC_LEN} characters"));
    }
    if t == "." || t == ".." {
        return Err("`.` and `..` are not valid topic names".into());
    }
    if let Some(bad) = t.chars().find(|ch| !(ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'))) {
        return Err(format!("`{t}` contains `{bad}`; topic names use only a-z, A-Z, 0-9, `.`, `_` and `-`"));
    }
    Ok(())
}

fn check_webhook(
    c: &mut Checker,
    w: &v1::WebhookTarget,
    existing: Option<(&TriggerSpec, &TriggerSecrets)>,
    policy: Option<&WebhookPolicy>,
) -> (WebhookTarget, BTreeMap<String, Secret>) {
    let stored = existing.map(|e| e.1);
    let url = w.url.trim().to_owned();
    // A stored secret header was given for the URL it is stored with; any
    // other URL (another path on one host can be another tenant) needs it
    // sent again, or an editor could redirect it to a server of their own.
    let url_changed = existing.is_some_and(|(spec, _)| spec.webhook.url != url);
    if url.is_empty() {
        c.bad("webhook.url", "is required");
    } else if check_len(c, "webhook.url", &url, MAX_URL_LEN) {
        match url::Url::parse(&url) {
            Ok(u) if !matches!(u.scheme(), "http" | "https") => {
                c.bad("webhook.url", format!("scheme must be http or https, not `{}`", u.scheme()))
            }
            Ok(u) if u.host_str().is_none_or(str::is_empty) => c.bad("webhook.url", "must name a host"),
            Ok(u) if !u.username().is_empty() || u.password().is_some() => {
                c.bad("webhook.url", "must not embed credentials; use a secret header")
            }
            Ok(u) => {
                if let Some(Err(refusal)) = policy.map(|p| p.check_url_literal(&u)) {
                    c.bad("webhook.url", format!("address {refusal}"));
                }
            }
            Err(e) => c.bad("webhook.url", format!("is not a valid URL: {e}")),
        }
    }

    if w.headers.len() > MAX_HEADERS {
        c.bad("webhook.headers", format!("at most {MAX_HEADERS} headers, not {}", w.headers.len()));
    }
    let header_bytes: usize = w.headers.iter().map(|h| h.name.len() + h.value.len()).sum();
    if header_bytes > MAX_HEADER_BYTES {
        c.bad(
            "webhook.headers",
            format!("names and values together at most {MAX_HEADER_BYTES} bytes, not {header_bytes}"),
        );
    }
    let mut headers = Vec::with_capacity(w.headers.len());
    let mut secrets = BTreeMap::new();
    let mut seen = HashSet::new();
    for (i, h) in w.headers.iter().enumerate() {
        let name = h.name.trim();
        let field = format!("webhook.headers[{i}]");
        check_len(c, &format!("{field}.value"), &h.value, MAX_HEADER_VALUE_LEN);
        if name.len() > MAX_HEADER_NAME_LEN {
            c.bad(&format!("{field}.name"), format!("must be at most {MAX_HEADER_NAME_LEN} bytes, not {}", name.len()));
        } else if name.is_empty() || !name.bytes().all(is_header_token_byte) {
            c.bad(&format!("{field}.name"), format!("`{name}` is not a valid HTTP header name"));
        } else if !seen.insert(name.to_ascii_lowercase()) {
            c.bad(&format!("{field}.name"), format!("duplicate header `{name}`"));
        } else if name.eq_ignore_ascii_case("content-type") || name.eq_ignore_ascii_case("content-length") {
            c.bad(&format!("{field}.name"), format!("`{name}` is set by the service"));
        }
        if h.value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
            c.bad(&format!("{field}.value"), "must not contain CR, LF or NUL");
        }
        if h.secret {
            let value = if h.value.is_empty() {
                let kept = stored.and_then(|s| s.headers.get(name).cloned());
                if kept.is_some() && url_changed {
                    c.bad(
                        &format!("{field}.value"),
                        format!("secret header `{name}` must be sent again: webhook.url changed, and the stored value is only sent to the URL it was given for"),
                    );
                }
                kept
            } else {
                Some(Secret::new(h.value.clone()))
            };
            match value {
                Some(v) => {
                    secrets.insert(name.to_owned(), v);
                }
                None => c.bad(&format!("{field}.value"), "is required for a secret header"),
            }
            headers.push(WebhookHeader { name: name.to_owned(), value: String::new(), secret: true });
        } else {
            headers.push(WebhookHeader { name: name.to_owned(), value: h.value.clone(), secret: false });
        }
    }

    let timeout_ms = match w.timeout_ms {
        None => DEFAULT_WEBHOOK_TIMEOUT_MS,
        Some(ms) if (1..=MAX_WEBHOOK_TIMEOUT_MS).contains(&ms) => ms,
        Some(_) => {
            c.bad("webhook.timeout_ms", format!("must be 1-{MAX_WEBHOOK_TIMEOUT_MS} ms"));
            DEFAULT_WEBHOOK_TIMEOUT_MS
        }
    };
    let format = match v1::WebhookFormat::try_from(w.format) {
        Ok(v1::WebhookFormat::Unspecified | v1::WebhookFormat::Json) => WebhookFormat::Json,
        Ok(v1::WebhookFormat::Cloudevents) => WebhookFormat::CloudEvents,
        Err(_) => {
            c.bad("webhook.format", format!("unknown format {}", w.format));
            WebhookFormat::Json
        }
    };
    (WebhookTarget { url, headers, timeout_ms, format }, secrets)
}

fn is_header_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn check_retry(c: &mut Checker, r: Option<&v1::RetryPolicy>) -> RetryPolicy {
    let r = r.cloned().unwrap_or_default();
    let max_attempts = r.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS);
    if !(1..=MAX_ATTEMPTS).contains(&max_attempts) {
        c.bad("retry.max_attempts", format!("must be 1-{MAX_ATTEMPTS}"));
    }
    let initial = r.initial_backoff_ms.unwrap_or(DEFAULT_INITIAL_BACKOFF_MS);
    if !(1..=MAX_BACKOFF_MS).contains(&initial) {
        c.bad("retry.initial_backoff_ms", format!("must be 1-{MAX_BACKOFF_MS} ms"));
    }
    let max = r.max_backoff_ms.unwrap_or(DEFAULT_MAX_BACKOFF_MS.max(initial));
    if !(1..=MAX_BACKOFF_MS).contains(&max) {
        c.bad("retry.max_backoff_ms", format!("must be 1-{MAX_BACKOFF_MS} ms"));
    } else if max < initial {
        c.bad("retry.max_backoff_ms", "must not be less than initial_backoff_ms");
    }
    RetryPolicy { max_attempts, initial_backoff_ms: initial, max_backoff_ms: max, max_age_seconds: r.max_age_seconds }
}

fn check_tuning(c: &mut Checker, t: Option<&v1::Tuning>) -> Tuning {
    let t = t.cloned().unwrap_or_default();
    let max_in_flight = t.max_in_flight.unwrap_or(DEFAULT_MAX_IN_FLIGHT);
    if !(1..=MAX_IN_FLIGHT).contains(&max_in_flight) {
        c.bad("tuning.max_in_flight", format!("must be 1-{MAX_IN_FLIGHT}"));
    }
    if t.fetch_max_bytes != 0 && !(MIN_FETCH_MAX_BYTES..=MAX_FETCH_MAX_BYTES).contains(&t.fetch_max_bytes) {
        c.bad(
            "tuning.fetch_max_bytes",
            format!("must be 0 (default) or {MIN_FETCH_MAX_BYTES}-{MAX_FETCH_MAX_BYTES} bytes"),
        );
    }
    Tuning { rate_limit_per_second: t.rate_limit_per_second, max_in_flight, fetch_max_bytes: t.fetch_max_bytes }
}
