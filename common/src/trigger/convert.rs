//! Domain → wire. Secrets are written only when the caller passes them (the
//! internal node protocol); the public API passes `None` and shows only that
//! a secret is set.

use chrono::{DateTime, Utc};
use kt_proto::v1;

use super::*;

/// A time on the wire.
pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// The configuration part of a wire `Trigger` (name, kafka, webhook, retry,
/// tuning); the caller fills id, enabled flag, generation and timestamps.
pub fn spec_to_proto(spec: &TriggerSpec, secrets: Option<&TriggerSecrets>) -> v1::Trigger {
    let k = &spec.kafka;
    let sasl = match k.sasl {
        Sasl::None => v1::SaslMechanism::None,
        Sasl::Plain => v1::SaslMechanism::Plain,
        Sasl::ScramSha256 => v1::SaslMechanism::ScramSha256,
        Sasl::ScramSha512 => v1::SaslMechanism::ScramSha512,
    };
    let reveal = |s: Option<&Secret>| s.map(|s| s.expose().to_owned()).unwrap_or_default();
    let kafka = v1::KafkaSource {
        hosts: k.hosts.clone(),
        topics: k.topics.clone(),
        group_id: k.group_id.clone(),
        initial_offset_reset_policy: k.initial_offset_reset_policy.to_string(),
        ssl: k.ssl,
        ssl_ca_cert: k.ssl_ca_cert.clone().unwrap_or_default(),
        ssl_client_cert: k.ssl_client_cert.clone().unwrap_or_default(),
        ssl_client_key: reveal(secrets.and_then(|s| s.ssl_client_key.as_ref())),
        ssl_client_key_set: k.ssl_client_cert.is_some(),
        sasl: sasl.into(),
        username: k.username.clone().unwrap_or_default(),
        password: reveal(secrets.and_then(|s| s.password.as_ref())),
        password_set: k.sasl != Sasl::None,
        connect_timeout_seconds: Some(k.connect_timeout_seconds),
    };
    let headers = spec
        .webhook
        .headers
        .iter()
        .map(|h| v1::Header {
            name: h.name.clone(),
            value: if h.secret { reveal(secrets.and_then(|s| s.headers.get(&h.name))) } else { h.value.clone() },
            secret: h.secret,
        })
        .collect();
    let mut t = v1::Trigger {
        name: spec.name.clone(),
        kafka: Some(kafka),
        webhook: Some(v1::WebhookTarget {
            url: spec.webhook.url.clone(),
            headers,
            timeout_ms: Some(spec.webhook.timeout_ms),
            format: match spec.webhook.format {
                WebhookFormat::Json => v1::WebhookFormat::Json,
                WebhookFormat::CloudEvents => v1::WebhookFormat::Cloudevents,
            }
            .into(),
        }),
        retry: Some(v1::RetryPolicy {
            max_attempts: Some(spec.retry.max_attempts),
            initial_backoff_ms: Some(spec.retry.initial_backoff_ms),
            max_backoff_ms: Some(spec.retry.max_backoff_ms),
            max_age_seconds: spec.retry.max_age_seconds,
        }),
        tuning: Some(v1::Tuning {
            rate_limit_per_second: spec.tuning.rate_limit_per_second,
            max_in_flight: Some(spec.tuning.max_in_flight),
            fetch_max_bytes: spec.tuning.fetch_max_bytes,
        }),
        filter: spec.filter.clone(),
        ..Default::default()
    };
    super::failure::on_failure_to_proto(&spec.on_failure, &mut t);
    t.ordering = super::ordering::ordering_to_proto(spec.ordering).into();
    t
}
