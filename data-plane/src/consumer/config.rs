//! librdkafka configuration of a trigger's consumer, built from its
//! validated spec and secrets. The result is wrapped so it cannot be printed
//! with its credentials: only [`KafkaConfig::redacted`] is meant for logs.

use std::collections::BTreeMap;
use std::fmt;

use kt_common::trigger::{Sasl, TriggerSecrets, TriggerSpec};
use rdkafka::ClientConfig;

use super::IngestSettings;

/// Keys whose values are credentials and never leave this module unmasked.
const SENSITIVE_KEYS: &[&str] =
    &["sasl.password", "ssl.key.pem", "ssl.key.password", "ssl.keystore.password", "sasl.oauthbearer.client.secret"];

const REDACTED: &str = "<redacted>";

/// A consumer configuration; `Debug` masks the credentials.
#[derive(Clone)]
pub struct KafkaConfig {
    inner: ClientConfig,
}

impl KafkaConfig {
    /// The configuration of the consumer for one trigger. `client_id` names
    /// this node in broker logs.
    pub fn for_trigger(
        spec: &TriggerSpec,
        secrets: &TriggerSecrets,
        settings: &IngestSettings,
        client_id: &str,
    ) -> Self {
        let k = &spec.kafka;
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", k.hosts.join(","))
            .set("group.id", &k.group_id)
            .set("client.id", client_id)
            // Offsets are stored by the pipeline, and only after the messages
            // are committed in Postgres; librdkafka then commits the stored
            // offsets periodically, on revocation and on close.
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", millis(settings.commit_interval))
            // Where a partition *without* a committed offset starts is
            // decided by the pipeline itself (initial policy, partition
            // checkpoints). This only applies when a committed offset has
            // fallen out of the log: read everything that is left rather
            // than skip it.
            .set("auto.offset.reset", "earliest")
            // Eager protocol: the pipeline's rebalance handling assigns and
            // revokes whole assignments.
            .set("partition.assignment.strategy", "range,roundrobin")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", millis(settings.session_timeout))
            .set("heartbeat.interval.ms", millis(settings.heartbeat_interval))
            .set("max.poll.interval.ms", millis(settings.max_poll_interval))
            // Statistics carry committed offsets and high watermarks for the
            // status reports.
            .set("statistics.interval.ms", millis(settings.progress_interval))
            .set("socket.connection.setup.timeout.ms", (u64::from(k.connect_timeout_seconds) * 1000).to_string());
        let protocol = match (k.ssl, k.sasl) {
            (false, Sasl::None) => "plaintext",
            (true, Sasl::None) => "ssl",
            (false, _) => "sasl_plaintext",
            (true, _) => "sasl_ssl",
        };
        c.set("security.protocol", protocol);
        if let Some(mechanism) = match k.sasl {
            Sasl::None => None,
            Sasl::Plain => Some("PLAIN"),
            Sasl::ScramSha256 => Some("SCRAM-SHA-256"),
            Sasl::ScramSha512 => Some("SCRAM-SHA-512"),
        } {
            c.set("sasl.mechanism", mechanism);
            if let Some(user) = &k.username {
                c.set("sasl.username", user);
            }
            if let Some(password) = &secrets.password {
                c.set("sasl.password", password.expose());
            }
        }
        if k.ssl {
            if let Some(ca) = &k.ssl_ca_cert {
                c.set("ssl.ca.pem", ca);
            }
            if let Some(cert) = &k.ssl_client_cert {
                c.set("ssl.certificate.pem", cert);
            }
            if let Some(key) = &secrets.ssl_client_key {
                c.set("ssl.key.pem", key.expose());
            }
        }
        let fetch_max = spec.tuning.fetch_max_bytes;
        if fetch_max > 0 {
            c.set("fetch.max.bytes", fetch_max.to_string());
            // librdkafka refuses fetch.max.bytes below message.max.bytes
            // (default 1000000); for a consumer the latter only bounds
            // requests, so lower it along.
            if fetch_max < 1_000_000 {
                c.set("message.max.bytes", fetch_max.max(1_000).to_string());
            }
        }
        for (key, value) in &settings.extra_kafka_config {
            c.set(key, value);
        }
        Self { inner: c }
    }

    pub fn client_config(&self) -> &ClientConfig {
        &self.inner
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.inner.get(key)
    }

    /// Every setting, credentials masked: safe to log.
    pub fn redacted(&self) -> BTreeMap<String, String> {
        self.inner
            .config_map()
            .iter()
            .map(|(k, v)| {
                let v = if SENSITIVE_KEYS.contains(&k.as_str()) { REDACTED.to_owned() } else { v.clone() };
                (k.clone(), v)
            })
            .collect()
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

/// `text` with every secret of `secrets` masked: for error messages that
/// librdkafka builds from configuration values.
pub fn scrub(text: &str, secrets: &TriggerSecrets) -> String {
    let mut out = text.to_owned();
    for secret in [&secrets.password, &secrets.ssl_client_key].into_iter().flatten() {
        if !secret.expose().is_empty() {
            out = out.replace(secret.expose(), REDACTED);
        }
    }
    out
}

fn millis(d: std::time::Duration) -> String {
    d.as_millis().max(1).to_string()
}

#[cfg(test)]
mod tests {
    use kt_common::secret::Secret;
    use kt_common::trigger::{KafkaSource, OffsetPolicy, RetryPolicy, Tuning, WebhookTarget};

    use super::*;

    fn spec(ssl: bool, sasl: Sasl) -> TriggerSpec {
        TriggerSpec {
            name: "t".into(),
            kafka: KafkaSource {
                hosts: vec!["a:9092".into(), "[::1]:9093".into()],
                topics: vec!["orders".into()],
                group_id: "g1".into(),
                initial_offset_reset_policy: OffsetPolicy::Earliest,
                ssl,
                ssl_ca_cert: ssl.then(|| "-----BEGIN CERTIFICATE-----ca".into()),
                ssl_client_cert: ssl.then(|| "-----BEGIN CERTIFICATE-----cert".into()),
                sasl,
                username: (sasl != Sasl::None).then(|| "alice".into()),
                connect_timeout_seconds: 7,
            },
            webhook: WebhookTarget { url: "http://x".into(), headers: vec![], timeout_ms: 1000 },
            retry: RetryPolicy { max_attempts: 1, initial_backoff_ms: 1, max_backoff_ms: 1, max_age_seconds: 0 },
            tuning: Tuning { rate_limit_per_second: 0, max_in_flight: 1, fetch_max_bytes: 0 },
        }
    }

    fn secrets() -> TriggerSecrets {
        TriggerSecrets {
            password: Some(Secret::new("hunter2")),
            ssl_client_key: Some(Secret::new("-----BEGIN PRIVATE KEY-----sekrit")),
            headers: Default::default(),
        }
    }

    #[test]
    fn test_config_maps_the_connection_settings() {
        let c = KafkaConfig::for_trigger(&spec(false, Sasl::None), &secrets(), &IngestSettings::default(), "node-1");
        assert_eq!(c.get("bootstrap.servers"), Some("a:9092,[::1]:9093"));
        assert_eq!(c.get("group.id"), Some("g1"));
        assert_eq!(c.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(c.get("security.protocol"), Some("plaintext"));
        assert_eq!(c.get("socket.connection.setup.timeout.ms"), Some("7000"));
        assert_eq!(c.get("sasl.password"), None, "no credentials without SASL");
        assert_eq!(c.get("ssl.key.pem"), None);
        assert_eq!(c.get("fetch.max.bytes"), None);
    }

    #[test]
    fn test_config_maps_every_security_combination() {
        let cases = [
            (true, Sasl::None, "ssl", None),
            (false, Sasl::Plain, "sasl_plaintext", Some("PLAIN")),
            (true, Sasl::ScramSha256, "sasl_ssl", Some("SCRAM-SHA-256")),
            (true, Sasl::ScramSha512, "sasl_ssl", Some("SCRAM-SHA-512")),
        ];
        for (ssl, sasl, protocol, mechanism) in cases {
            let c = KafkaConfig::for_trigger(&spec(ssl, sasl), &secrets(), &IngestSettings::default(), "n");
            assert_eq!(c.get("security.protocol"), Some(protocol));
            assert_eq!(c.get("sasl.mechanism"), mechanism);
            if mechanism.is_some() {
                assert_eq!(c.get("sasl.username"), Some("alice"));
                assert_eq!(c.get("sasl.password"), Some("hunter2"));
            }
            if ssl {
                assert_eq!(c.get("ssl.ca.pem"), Some("-----BEGIN CERTIFICATE-----ca"));
                assert_eq!(c.get("ssl.certificate.pem"), Some("-----BEGIN CERTIFICATE-----cert"));
                assert_eq!(c.get("ssl.key.pem"), Some("-----BEGIN PRIVATE KEY-----sekrit"));
            }
        }
    }

    #[test]
    fn test_fetch_max_bytes_is_set_only_when_tuned() {
        let mut s = spec(false, Sasl::None);
        s.tuning.fetch_max_bytes = 65_536;
        let c = KafkaConfig::for_trigger(&s, &secrets(), &IngestSettings::default(), "n");
        assert_eq!(c.get("fetch.max.bytes"), Some("65536"));
        assert_eq!(c.get("message.max.bytes"), Some("65536"));
        // librdkafka accepts the combination.
        c.client_config().create_native_config().expect("valid librdkafka config");
    }

    #[test]
    fn test_credentials_never_appear_in_printed_config() {
        let c = KafkaConfig::for_trigger(&spec(true, Sasl::Plain), &secrets(), &IngestSettings::default(), "n");
        let printed = format!("{c:?} {:?}", c.redacted());
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("sekrit"), "{printed}");
        assert!(printed.contains("sasl.password"));
        assert!(printed.contains(REDACTED));
    }

    #[test]
    fn test_scrub_masks_secrets_in_error_text() {
        let text = "Invalid value \"hunter2\" for property";
        assert_eq!(scrub(text, &secrets()), "Invalid value \"<redacted>\" for property");
    }
}
