//! The trigger model both planes share: a validated [`TriggerSpec`] (what is
//! stored as plain configuration), its [`TriggerSecrets`] (stored encrypted),
//! and conversions from and to the wire types.

mod convert;
mod failure;
mod ordering;
mod validate;
#[cfg(test)]
mod validate_tests;

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::secret::Secret;

pub use convert::{spec_to_proto, timestamp};
pub use failure::OnFailure;
pub use ordering::Ordering;
pub use validate::{validate_trigger, SecretsInput, ValidatedTrigger};

pub const DEFAULT_CONNECT_TIMEOUT_SECONDS: u32 = 30;
pub const DEFAULT_WEBHOOK_TIMEOUT_MS: u32 = 10_000;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
pub const DEFAULT_INITIAL_BACKOFF_MS: u32 = 500;
pub const DEFAULT_MAX_BACKOFF_MS: u32 = 60_000;
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 100;

/// Where a consumer group without a committed offset starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetPolicy {
    Earliest,
    Latest,
    /// Unix milliseconds; resolved with offsets-for-times.
    Timestamp(i64),
}

impl fmt::Display for OffsetPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OffsetPolicy::Earliest => f.write_str("earliest"),
            OffsetPolicy::Latest => f.write_str("latest"),
            OffsetPolicy::Timestamp(ms) => write!(f, "{ms}"),
        }
    }
}

impl std::str::FromStr for OffsetPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "earliest" => Ok(Self::Earliest),
            "latest" => Ok(Self::Latest),
            ts if ts.len() == 13 && ts.bytes().all(|b| b.is_ascii_digit()) => {
                ts.parse().map(Self::Timestamp).map_err(|_| "timestamp out of range".into())
            }
            _ => Err("must be \"earliest\", \"latest\" or a 13-digit unix timestamp in milliseconds".into()),
        }
    }
}

impl Serialize for OffsetPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for OffsetPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sasl {
    None,
    Plain,
    ScramSha256,
    ScramSha512,
}

/// Kafka connection and consumption settings. Holds no secret: the SASL
/// password and the TLS client key live in [`TriggerSecrets`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaSource {
    pub hosts: Vec<String>,
    pub topics: Vec<String>,
    pub group_id: String,
    pub initial_offset_reset_policy: OffsetPolicy,
    pub ssl: bool,
    pub ssl_ca_cert: Option<String>,
    pub ssl_client_cert: Option<String>,
    pub sasl: Sasl,
    pub username: Option<String>,
    pub connect_timeout_seconds: u32,
}

/// A webhook header. The value of a secret header is kept in
/// [`TriggerSecrets::headers`], never here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookHeader {
    pub name: String,
    /// Empty for secret headers.
    pub value: String,
    pub secret: bool,
}

/// How a work order is sent: the JSON work-order body, or a CloudEvent in
/// HTTP binary content mode (the message value as the body).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WebhookFormat {
    #[default]
    #[serde(rename = "json")]
    Json,
    #[serde(rename = "cloudevents")]
    CloudEvents,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookTarget {
    pub url: String,
    pub headers: Vec<WebhookHeader>,
    pub timeout_ms: u32,
    /// Absent in triggers stored before formats existed: those are JSON.
    #[serde(default)]
    pub format: WebhookFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff_ms: u32,
    pub max_backoff_ms: u32,
    /// 0 = no limit.
    pub max_age_seconds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tuning {
    /// Messages per second per node; 0 = no limit.
    pub rate_limit_per_second: u32,
    pub max_in_flight: u32,
    /// 0 = librdkafka's default.
    pub fetch_max_bytes: u32,
}

/// A trigger's complete, validated configuration, without secrets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerSpec {
    pub name: String,
    pub kafka: KafkaSource,
    pub webhook: WebhookTarget,
    pub retry: RetryPolicy,
    pub tuning: Tuning,
    /// Absent in triggers stored before ordering modes existed: per key.
    #[serde(default)]
    pub ordering: Ordering,
    /// Absent in triggers stored before failure policies existed: those block.
    #[serde(default)]
    pub on_failure: OnFailure,
    /// CEL filter expression ([`crate::filter`]); empty = every message.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub filter: String,
}

/// The credentials of a trigger; serialized only to be encrypted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerSecrets {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssl_client_key: Option<Secret>,
    /// Values of secret webhook headers, by header name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Secret>,
}

impl TriggerSecrets {
    pub fn is_empty(&self) -> bool {
        self.password.is_none() && self.ssl_client_key.is_none() && self.headers.is_empty()
    }
}

/// A default consumer group name for a new trigger.
pub fn generate_group_id() -> String {
    format!("kafka-triggers-{}", uuid::Uuid::now_v7())
}
