//! `TriggerService.TestTriggerConnection`, run on this node: a consumer with
//! exactly the configuration the trigger's pipeline would use (brokers, TLS,
//! SASL, group, timeouts), which never subscribes, so it joins no group and
//! moves no partition of a running trigger. It reads the cluster's metadata,
//! each topic's partitions and watermarks and the group's committed offsets,
//! all within the trigger's connect timeout, and says precisely why when it
//! cannot.
//!
//! librdkafka does not say why a broker could not be reached in the answer
//! to a request (a metadata request just times out): a consumer of a group
//! gets the errors from `poll`, as bare codes, and the reasons in its log
//! lines. The probe keeps both and [`classify`] names the most specific.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kt_proto::v1::{BrokerInfo, ConnectionFailure, PartitionInfo, TestTriggerConnectionResponse, TopicInfo};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::config::{scrub, KafkaConfig};
use super::IngestSettings;
use crate::assignment::AssignedTrigger;

/// How long one metadata request may wait before the probe looks at the
/// client's errors again.
const METADATA_SLICE: Duration = Duration::from_millis(250);
/// Polls that collect the client's queued errors; each returns at once, and
/// a consumer that subscribed to nothing has no messages to return instead.
const MAX_POLLS: usize = 1_000;

/// Tests the connection of `trigger` as its pipeline on this node would
/// make it. Blocking (librdkafka calls): run it on a blocking thread.
pub fn test_connection(
    trigger: &AssignedTrigger,
    settings: &IngestSettings,
    client_id: &str,
) -> TestTriggerConnectionResponse {
    let started = Instant::now();
    let timeout = Duration::from_secs(u64::from(trigger.spec.kafka.connect_timeout_seconds.max(1)));
    let mut response = probe(trigger, settings, client_id, started + timeout);
    response.error = scrub(&response.error, &trigger.secrets);
    response.ok = response.failure == ConnectionFailure::Unspecified as i32;
    response.elapsed_ms = started.elapsed().as_millis() as i64;
    response
}

fn probe(
    trigger: &AssignedTrigger,
    settings: &IngestSettings,
    client_id: &str,
    deadline: Instant,
) -> TestTriggerConnectionResponse {
    let mut response = TestTriggerConnectionResponse::default();
    let config = KafkaConfig::for_trigger(&trigger.spec, &trigger.secrets, settings, client_id, None);
    let context = ProbeContext::default();
    let errors = context.errors.clone();
    let consumer: BaseConsumer<ProbeContext> = match config.client_config().create_with_context(context) {
        Ok(consumer) => consumer,
        Err(e) => return failed(response, ConnectionFailure::Other, format!("cannot create a Kafka client: {e}")),
    };
    let remaining = || deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1));
    // A consumer of a group gets the client's errors from poll, as codes
    // without their reason (which its log lines carry).
    let collect_errors = || {
        for _ in 0..MAX_POLLS {
            match consumer.poll(Duration::ZERO) {
                Some(Err(e)) => errors.lock().expect("probe errors lock").push((e.rdkafka_error_code(), e.to_string())),
                Some(Ok(_)) => {}
                None => break,
            }
        }
        classify(&errors.lock().expect("probe errors lock"))
    };
    let broker_failure = |response, e: &KafkaError| {
        let (failure, reason) = collect_errors();
        let error = match reason {
            Some(reason) => reason,
            None => format!("no broker answered within the connect timeout: {e}"),
        };
        failed(response, if failure == ConnectionFailure::Other { ConnectionFailure::Timeout } else { failure }, error)
    };

    // Every topic's metadata, which lists the brokers too. A missing topic
    // is absent here; asked for by name below, the broker says whether it
    // does not exist or may not be described. Asked in slices, so that
    // refused credentials or a failed handshake answer at once rather than
    // at the deadline: retrying cannot change them.
    let metadata = loop {
        match consumer.fetch_metadata(None, remaining().min(METADATA_SLICE)) {
            Ok(metadata) => break metadata,
            Err(e) if Instant::now() >= deadline => return broker_failure(response, &e),
            Err(e) => {
                if matches!(collect_errors().0, ConnectionFailure::SaslAuthentication | ConnectionFailure::Tls) {
                    return broker_failure(response, &e);
                }
            }
        }
    };
    response.brokers = metadata
        .brokers()
        .iter()
        .map(|b| BrokerInfo { id: b.id(), host: b.host().to_owned(), port: b.port() })
        .collect();
    let mut partitions = TopicPartitionList::new();
    for topic in &trigger.spec.kafka.topics {
        let found = metadata.topics().iter().find(|t| t.name() == topic);
        let Some(found) = found.filter(|t| t.error().is_none()) else {
            let error = match consumer.fetch_metadata(Some(topic), remaining()) {
                Ok(m) => m.topics().first().and_then(|t| t.error()).map(RDKafkaErrorCode::from),
                Err(e) => e.rdkafka_error_code(),
            };
            let failure = match error {
                Some(RDKafkaErrorCode::TopicAuthorizationFailed) => ConnectionFailure::Authorization,
                _ => ConnectionFailure::TopicMissing,
            };
            let why = error.map_or_else(|| "not in the cluster's metadata".to_owned(), |e| e.to_string());
            return failed(response, failure, format!("topic {topic}: {why}"));
        };
        let mut info = TopicInfo { name: topic.clone(), partitions: Vec::new() };
        for p in found.partitions() {
            let (low, high) = match consumer.fetch_watermarks(topic, p.id(), remaining()) {
                Ok(w) => w,
                Err(e) => return broker_failure(response, &e),
            };
            partitions.add_partition(topic, p.id());
            info.partitions.push(PartitionInfo {
                partition: p.id(),
                low_watermark: low,
                high_watermark: high,
                committed_offset: None,
            });
        }
        response.topics.push(info);
    }

    // The group's committed offsets: an OffsetFetch, which joins nothing.
    let committed = match consumer.committed_offsets(partitions, remaining()) {
        Ok(committed) => committed,
        Err(e) => {
            let failure = match e.rdkafka_error_code() {
                Some(RDKafkaErrorCode::GroupAuthorizationFailed) => ConnectionFailure::Authorization,
                _ => return broker_failure(response, &e),
            };
            let group = &trigger.spec.kafka.group_id;
            return failed(response, failure, format!("cannot read the committed offsets of group {group}: {e}"));
        }
    };
    for e in committed.elements() {
        let Offset::Offset(offset) = e.offset() else { continue };
        let topic = response.topics.iter_mut().find(|t| t.name == e.topic());
        if let Some(p) = topic.and_then(|t| t.partitions.iter_mut().find(|p| p.partition == e.partition())) {
            p.committed_offset = Some(offset);
        }
    }
    response
}

/// The answer of a test that could not run at all (`error` says why).
pub fn not_run(error: String) -> TestTriggerConnectionResponse {
    failed(TestTriggerConnectionResponse::default(), ConnectionFailure::Other, error)
}

fn failed(
    mut response: TestTriggerConnectionResponse,
    failure: ConnectionFailure,
    error: String,
) -> TestTriggerConnectionResponse {
    response.failure = failure.into();
    response.error = error;
    response
}

/// One error the client reported: its code, if any, and its text.
type SeenError = (Option<RDKafkaErrorCode>, String);

/// Keeps the log lines of level warning and above: where librdkafka says
/// why a broker connection failed (unreachable, handshake refused).
#[derive(Default)]
struct ProbeContext {
    errors: Arc<Mutex<Vec<SeenError>>>,
}

impl ClientContext for ProbeContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        tracing::debug!(?level, fac, log_message, "connection test");
        if (level as i32) <= RDKafkaLogLevel::Warning as i32 {
            self.errors.lock().expect("probe errors lock").push((None, log_message.to_owned()));
        }
    }
}

impl ConsumerContext for ProbeContext {}

/// The most specific failure among the client's errors, and its reason:
/// credentials and TLS before name resolution, before a refused or timed
/// out connection. `Other` (and no reason) when there are none.
pub fn classify(errors: &[SeenError]) -> (ConnectionFailure, Option<String>) {
    let kind = |(code, reason): &SeenError| {
        let text = reason.to_lowercase();
        match code {
            Some(RDKafkaErrorCode::Authentication | RDKafkaErrorCode::SaslAuthenticationFailed) => {
                ConnectionFailure::SaslAuthentication
            }
            _ if text.contains("sasl") || text.contains("authentication") => ConnectionFailure::SaslAuthentication,
            Some(RDKafkaErrorCode::SSL) => ConnectionFailure::Tls,
            _ if text.contains("ssl") || text.contains("tls") || text.contains("certificate") => ConnectionFailure::Tls,
            Some(
                RDKafkaErrorCode::TopicAuthorizationFailed
                | RDKafkaErrorCode::GroupAuthorizationFailed
                | RDKafkaErrorCode::ClusterAuthorizationFailed,
            ) => ConnectionFailure::Authorization,
            Some(RDKafkaErrorCode::Resolve) => ConnectionFailure::Dns,
            _ if text.contains("failed to resolve") => ConnectionFailure::Dns,
            _ if text.contains("connection refused") => ConnectionFailure::Refused,
            _ if text.contains("timed out") => ConnectionFailure::Timeout,
            _ => ConnectionFailure::Other,
        }
    };
    let rank = |f: ConnectionFailure| match f {
        ConnectionFailure::SaslAuthentication => 0,
        ConnectionFailure::Tls => 1,
        ConnectionFailure::Authorization => 2,
        ConnectionFailure::Dns => 3,
        ConnectionFailure::Refused => 4,
        ConnectionFailure::Timeout => 5,
        _ => 6,
    };
    errors
        .iter()
        .map(|e| (kind(e), &e.1))
        .min_by_key(|(f, _)| rank(*f))
        .map_or((ConnectionFailure::Other, None), |(f, reason)| (f, Some(reason.clone())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_the_most_specific_error_names_the_failure() {
        let e = |code: Option<RDKafkaErrorCode>, text: &str| (code, text.to_owned());
        let refused = e(
            Some(RDKafkaErrorCode::BrokerTransportFailure),
            "127.0.0.1:9/bootstrap: Connect to ipv4#127.0.0.1:9 failed: Connection refused (after 0ms in state CONNECT)",
        );
        let dns = e(Some(RDKafkaErrorCode::Resolve), "nohost:9092/bootstrap: Failed to resolve 'nohost:9092'");
        let sasl = e(
            Some(RDKafkaErrorCode::Authentication),
            "127.0.0.1:9092/bootstrap: SASL authentication error: Authentication failed",
        );
        let tls = e(Some(RDKafkaErrorCode::SSL), "127.0.0.1:9093/bootstrap: SSL handshake failed");
        let down = e(Some(RDKafkaErrorCode::AllBrokersDown), "1/1 brokers are down");
        assert_eq!(classify(&[refused.clone(), down.clone()]).0, ConnectionFailure::Refused);
        assert_eq!(classify(&[down.clone(), dns.clone(), refused.clone()]).0, ConnectionFailure::Dns);
        assert_eq!(
            classify(&[refused.clone(), sasl.clone(), dns]),
            (ConnectionFailure::SaslAuthentication, Some(sasl.1))
        );
        assert_eq!(classify(&[refused, tls.clone()]), (ConnectionFailure::Tls, Some(tls.1)));
        assert_eq!(classify(std::slice::from_ref(&down)), (ConnectionFailure::Other, Some(down.1)));
        assert_eq!(classify(&[]), (ConnectionFailure::Other, None));
    }
}
