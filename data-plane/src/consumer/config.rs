//! librdkafka configuration of a trigger's consumer, built from its
//! validated spec and secrets. The result is wrapped so it cannot be printed
//! with its credentials: only [`KafkaConfig::redacted`] is meant for logs.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use kt_common::trigger::{Sasl, TriggerSecrets, TriggerSpec};
use kt_proto::ids::TriggerId;
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
    /// this node in broker logs; `instance_id` (see [`group_instance_id`])
    /// makes it a static member of the trigger's group.
    pub fn for_trigger(
        spec: &TriggerSpec,
        secrets: &TriggerSecrets,
        settings: &IngestSettings,
        client_id: &str,
        instance_id: Option<&str>,
    ) -> Self {
        let mut c = connection(spec, secrets, client_id);
        c.set("group.id", &spec.kafka.group_id)
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
            .set("heartbeat.interval.ms", millis(settings.heartbeat_interval.min(settings.session_timeout / 3)))
            // librdkafka refuses a poll interval below the session timeout.
            .set("max.poll.interval.ms", millis(settings.max_poll_interval.max(settings.session_timeout)))
            // Statistics carry committed offsets and high watermarks for the
            // status reports.
            .set("statistics.interval.ms", millis(settings.progress_interval));
        if let Some(instance_id) = instance_id {
            c.set("group.instance.id", instance_id);
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

    /// The configuration of the producer of a trigger's dead letters: the
    /// trigger's own connection (brokers, TLS, SASL), idempotent, so a
    /// retried produce is not written twice by the broker.
    pub fn for_dead_letters(spec: &TriggerSpec, secrets: &TriggerSecrets, client_id: &str, timeout: Duration) -> Self {
        let mut c = connection(spec, secrets, client_id);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            // A produce that cannot be acknowledged fails within this; the
            // set then waits and tries again.
            .set("message.timeout.ms", millis(timeout));
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

/// The `client.id` of this node's Kafka clients: names the node in broker
/// logs.
pub fn client_id(node_id: &str) -> String {
    format!("kafka-triggers/{node_id}")
}

/// How a client reaches the trigger's brokers: addresses, TLS and SASL, the
/// connect timeout. Shared by its consumer and its dead-letter producer.
fn connection(spec: &TriggerSpec, secrets: &TriggerSecrets, client_id: &str) -> ClientConfig {
    let k = &spec.kafka;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", k.hosts.join(","))
        .set("client.id", client_id)
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
    c
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.redacted()).finish()
    }
}

/// Kafka's limit on a `group.instance.id` (the rules of topic names).
const INSTANCE_ID_MAX_LEN: usize = 249;

/// The `group.instance.id` of the consumer that node `node_id` runs for
/// `trigger_id`: the same on every start of a node under that id, so the
/// group recognises the restarted node as the member it was; distinct per
/// trigger, since triggers may share a group. Kafka allows only
/// `[A-Za-z0-9._-]` and 249 characters: any other character becomes `_`,
/// and a node id changed that way (or shortened) gets a hash of the
/// original appended, so two node ids never map to one instance id.
pub fn group_instance_id(node_id: &str, trigger_id: TriggerId) -> String {
    let suffix = format!(".{}", trigger_id.0);
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    let mut node: String = node_id.chars().map(|c| if legal(c) { c } else { '_' }).collect();
    let budget = INSTANCE_ID_MAX_LEN - suffix.len();
    if node != node_id || node.len() > budget || node.is_empty() {
        let hash = format!("-{:016x}", fnv1a(node_id.as_bytes()));
        node.truncate(budget - hash.len());
        node.push_str(&hash);
    }
    node + &suffix
}

/// 64-bit FNV-1a: stable across builds and platforms, unlike std's hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
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

fn millis(d: Duration) -> String {
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
            webhook: WebhookTarget {
                url: "http://x".into(),
                headers: vec![],
                timeout_ms: 1000,
                format: Default::default(),
            },
            retry: RetryPolicy { max_attempts: 1, initial_backoff_ms: 1, max_backoff_ms: 1, max_age_seconds: 0 },
            tuning: Tuning { rate_limit_per_second: 0, max_in_flight: 1, fetch_max_bytes: 0 },
            ordering: Default::default(),
            on_failure: Default::default(),
            filter: String::new(),
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
        let c =
            KafkaConfig::for_trigger(&spec(false, Sasl::None), &secrets(), &IngestSettings::default(), "node-1", None);
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
            let c = KafkaConfig::for_trigger(&spec(ssl, sasl), &secrets(), &IngestSettings::default(), "n", None);
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
        let c = KafkaConfig::for_trigger(&s, &secrets(), &IngestSettings::default(), "n", None);
        assert_eq!(c.get("fetch.max.bytes"), Some("65536"));
        assert_eq!(c.get("message.max.bytes"), Some("65536"));
        // librdkafka accepts the combination.
        c.client_config().create_native_config().expect("valid librdkafka config");
    }

    #[test]
    fn test_credentials_never_appear_in_printed_config() {
        let c = KafkaConfig::for_trigger(&spec(true, Sasl::Plain), &secrets(), &IngestSettings::default(), "n", None);
        let printed = format!("{c:?} {:?}", c.redacted());
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(!printed.contains("sekrit"), "{printed}");
        assert!(printed.contains("sasl.password"));
        assert!(printed.contains(REDACTED));
    }

    #[test]
    fn test_group_membership_settings() {
        let settings = IngestSettings {
            session_timeout: std::time::Duration::from_millis(6_000),
            heartbeat_interval: std::time::Duration::from_secs(3),
            ..IngestSettings::default()
        };
        let c = KafkaConfig::for_trigger(&spec(false, Sasl::None), &secrets(), &settings, "n", Some("node-1.x"));
        assert_eq!(c.get("group.instance.id"), Some("node-1.x"));
        assert_eq!(c.get("session.timeout.ms"), Some("6000"));
        assert_eq!(c.get("heartbeat.interval.ms"), Some("2000"), "at most a third of the session timeout");
        c.client_config().create_native_config().expect("valid librdkafka config");
        let dynamic = KafkaConfig::for_trigger(&spec(false, Sasl::None), &secrets(), &settings, "n", None);
        assert_eq!(dynamic.get("group.instance.id"), None);
    }

    #[test]
    fn test_group_instance_ids_are_stable_legal_and_distinct() {
        let t1 = TriggerId(uuid::Uuid::from_u128(1));
        let t2 = TriggerId(uuid::Uuid::from_u128(2));
        let id = group_instance_id("node-1", t1);
        assert_eq!(id, "node-1.00000000-0000-0000-0000-000000000001");
        assert_eq!(group_instance_id("node-1", t1), id, "stable across calls (and so restarts)");
        assert_ne!(group_instance_id("node-1", t2), id, "one per trigger");
        assert_ne!(group_instance_id("node-2", t1), id, "one per node");
        let long = "n".repeat(400);
        let cases = ["node 1", "node_1", "nœud/1", "", long.as_str(), &long[..399]];
        let ids: Vec<String> = cases.iter().map(|n| group_instance_id(n, t1)).collect();
        for (node, id) in cases.iter().zip(&ids) {
            assert!(id.len() <= INSTANCE_ID_MAX_LEN, "{node}: {} characters", id.len());
            assert!(id.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)), "{node}: {id}");
            assert!(id.ends_with(".00000000-0000-0000-0000-000000000001"), "{id}");
        }
        let distinct: std::collections::BTreeSet<&String> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "no two node ids share an instance id: {ids:?}");
    }

    #[test]
    fn test_scrub_masks_secrets_in_error_text() {
        let text = "Invalid value \"hunter2\" for property";
        assert_eq!(scrub(text, &secrets()), "Invalid value \"<redacted>\" for property");
    }
}
