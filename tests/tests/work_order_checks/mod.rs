//! Shared by `work_order_faults` and `work_order_invariants`: the stack (a
//! database, a mock broker, a control plane, a scripted webhook target), a
//! probe that records every POST the target saw, and the invariants checked
//! after every fault (DESIGN §7): exactly one work order per message, per-key
//! order of successes, one work order of a key in flight at a time, nothing
//! left behind.

// Each test file uses a part of this module.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{produce_to, Produced, TestMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::{Delivery, Reply, WebhookReceiver};
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb};
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

/// Upper bound of every wait of these tests.
pub const WAIT: Duration = Duration::from_secs(60);

/// (partition, offset): one Kafka message of the test topic.
pub type MessageId = (i32, i64);

pub struct Stack {
    pub db: TestDb,
    pub pool: PgPool,
    pub kafka: MockKafka,
    /// `None` only while a test restarts it.
    pub cp: Option<TestControlPlane>,
    pub receiver: WebhookReceiver,
}

/// The trigger's webhook target and policies.
#[derive(Debug, Clone)]
pub struct Target {
    pub timeout_ms: u32,
    pub retry: RetryPolicy,
    pub max_in_flight: Option<u32>,
    /// `Trigger.on_failure` and `Trigger.dead_letter_topic`.
    pub on_failure: OnFailure,
    pub dead_letter_topic: String,
}

impl Target {
    pub fn new(timeout_ms: u32, retry: RetryPolicy) -> Self {
        Self {
            timeout_ms,
            retry,
            max_in_flight: None,
            on_failure: OnFailure::Unspecified,
            dead_letter_topic: String::new(),
        }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.timeout_ms))
    }
}

pub fn retry(max_attempts: u32, initial_backoff_ms: u32, max_backoff_ms: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts: Some(max_attempts),
        initial_backoff_ms: Some(initial_backoff_ms),
        max_backoff_ms: Some(max_backoff_ms),
        max_age_seconds: 0,
    }
}

/// Logs of the planes on stderr when `RUST_LOG` is set (quiet otherwise).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("RUST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_test_writer()
            .try_init();
    }
}

impl Stack {
    /// Database, broker with `topic`, control plane and target; no node.
    pub async fn start(topic: &str, partitions: i32) -> Stack {
        Self::start_with(topic, partitions, ControlPlaneOptions::default()).await
    }

    /// [`Stack::start`] with a control plane started with `cp`.
    pub async fn start_with(topic: &str, partitions: i32, cp: ControlPlaneOptions) -> Stack {
        init_logs();
        let db = TestDb::create().await.unwrap();
        let pool = db.pool().await.unwrap();
        let kafka = MockKafka::new(1).unwrap();
        kafka.create_topic(topic, partitions).unwrap();
        let cp = TestControlPlane::start(&db, cp).await.unwrap();
        let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
        Stack { db, pool, kafka, cp: Some(cp), receiver }
    }

    pub fn cp(&self) -> &TestControlPlane {
        self.cp.as_ref().expect("control plane running")
    }

    pub async fn create_trigger(&self, topic: &str, target: &Target) -> Uuid {
        let mut client = TriggerServiceClient::new(self.cp().channel().await.unwrap());
        let trigger = Trigger {
            name: format!("t-{topic}"),
            kafka: Some(KafkaSource {
                hosts: vec![self.kafka.bootstrap_servers()],
                topics: vec![topic.into()],
                initial_offset_reset_policy: "earliest".into(),
                ..Default::default()
            }),
            webhook: Some(WebhookTarget {
                url: self.receiver.url(),
                timeout_ms: Some(target.timeout_ms),
                ..Default::default()
            }),
            retry: Some(target.retry),
            tuning: target.max_in_flight.map(|n| Tuning { max_in_flight: Some(n), ..Default::default() }),
            on_failure: target.on_failure.into(),
            dead_letter_topic: target.dead_letter_topic.clone(),
            ..Default::default()
        };
        let id = client.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner().id;
        Uuid::parse_str(&id).unwrap()
    }

    /// Produces `messages`; returns where each landed, with its key, in order.
    pub async fn produce(&self, topic: &str, messages: Vec<TestMessage>) -> Vec<Sent> {
        let keys: Vec<Option<String>> =
            messages.iter().map(|m| m.key.as_ref().map(|k| String::from_utf8(k.clone()).unwrap())).collect();
        let produced = produce_to(&self.kafka.bootstrap_servers(), topic, messages).await.unwrap();
        assert_eq!(produced.len(), keys.len());
        keys.into_iter()
            .zip(produced)
            .map(|(key, Produced { partition, offset })| Sent { key, message: (partition, offset) })
            .collect()
    }
}

/// A produced message: its key and where it landed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    pub key: Option<String>,
    pub message: MessageId,
}

pub fn ids(sent: &[Sent]) -> Vec<MessageId> {
    sent.iter().map(|s| s.message).collect()
}

/// `n` messages `{"seq": first + i}` for `key` (`None`: unkeyed).
pub fn messages_for(key: Option<&str>, first: usize, n: usize) -> Vec<TestMessage> {
    (first..first + n)
        .map(|seq| {
            let m = TestMessage::new(serde_json::json!({ "seq": seq }).to_string());
            match key {
                Some(k) => m.key(k),
                None => m,
            }
        })
        .collect()
}

/// `per_key` messages for each of `keys`, interleaved round robin, then
/// `unkeyed` messages without a key.
pub fn interleaved(keys: &[String], per_key: usize, unkeyed: usize, first_seq: usize) -> Vec<TestMessage> {
    let mut out = Vec::new();
    for round in 0..per_key {
        for key in keys {
            out.extend(messages_for(Some(key), first_seq + round, 1));
        }
    }
    out.extend(messages_for(None, first_seq, unkeyed));
    out
}

// ---------------------------------------------------------------------------
// The probe: what the target saw, attempt by attempt.

/// One POST as the target saw it, with what the script answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub key: Option<String>,
    pub message: MessageId,
    /// 1 for the first POST of this message the target saw.
    pub attempt: u32,
    pub reply: Reply,
    /// When the target had the whole request (before it waited `reply.delay`).
    pub at: Instant,
}

impl Seen {
    /// When the target answered: it sleeps `reply.delay`, then responds.
    pub fn answered_at(&self) -> Instant {
        self.at + self.reply.delay.unwrap_or_default()
    }

    /// Whether the worker got this answer before its timeout. Scripts keep
    /// delays either well under or well over the timeout, so this is clear-cut.
    pub fn in_time(&self, timeout: Duration) -> bool {
        self.reply.delay.unwrap_or_default() < timeout
    }

    pub fn succeeded(&self, timeout: Duration) -> bool {
        (200..300).contains(&self.reply.status) && self.reply.status != 202 && self.in_time(timeout)
    }

    pub fn accepted(&self, timeout: Duration) -> bool {
        self.reply.status == 202 && self.in_time(timeout)
    }
}

#[derive(Default)]
struct ProbeState {
    seen: Vec<Seen>,
    attempts: HashMap<MessageId, u32>,
    /// When the test asked CompleteWorkOrder (success) for an accepted message.
    completed: HashMap<MessageId, Instant>,
}

/// Scripts a [`WebhookReceiver`] and records every POST it gets.
#[derive(Clone)]
pub struct Probe {
    state: Arc<Mutex<ProbeState>>,
    posts: Arc<watch::Sender<usize>>,
}

impl Probe {
    /// Makes `receiver` answer `decide(key, message, attempt)`; `attempt`
    /// counts the POSTs of that message the target saw, from 1.
    pub fn install(
        receiver: &WebhookReceiver,
        decide: impl Fn(Option<&str>, MessageId, u32) -> Reply + Send + Sync + 'static,
    ) -> Probe {
        let probe = Probe { state: Arc::default(), posts: Arc::new(watch::channel(0).0) };
        let p = probe.clone();
        receiver.script(move |body| {
            let at = Instant::now();
            let key = body["request"]["key"].as_str().map(str::to_owned);
            let message = (
                body["request"]["partition"].as_i64().unwrap_or(-1) as i32,
                body["request"]["offset"].as_i64().unwrap_or(-1),
            );
            let attempt = {
                let mut state = p.state.lock().unwrap();
                let n = state.attempts.entry(message).or_default();
                *n += 1;
                *n
            };
            let reply = decide(key.as_deref(), message, attempt);
            p.state.lock().unwrap().seen.push(Seen { key, message, attempt, reply, at });
            p.posts.send_modify(|n| *n += 1);
            reply
        });
        probe
    }

    /// A probe holding what a target saw, for checking the checks.
    pub fn recorded(seen: Vec<Seen>, completed: Vec<(MessageId, Instant)>) -> Probe {
        let state = ProbeState { seen, attempts: HashMap::new(), completed: completed.into_iter().collect() };
        Probe { state: Arc::new(Mutex::new(state)), posts: Arc::new(watch::channel(0).0) }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Notified on every POST.
    pub fn subscribe(&self) -> watch::Receiver<usize> {
        self.posts.subscribe()
    }

    /// Records that the test asked for the completion of an accepted message
    /// at `asked` (the set becomes ready no earlier than that).
    pub fn completed(&self, message: MessageId, asked: Instant) {
        self.state.lock().unwrap().completed.insert(message, asked);
    }

    fn completion(&self, message: MessageId) -> Option<Instant> {
        self.state.lock().unwrap().completed.get(&message).copied()
    }

    /// Messages that succeeded at the target (2xx in time, or 202 then
    /// completed), each with when, in time order per key.
    fn successes(&self, timeout: Duration) -> Vec<(Option<String>, MessageId, Instant)> {
        let mut out: Vec<_> = self
            .seen()
            .into_iter()
            .filter_map(|s| {
                if s.succeeded(timeout) {
                    Some((s.key.clone(), s.message, s.answered_at()))
                } else if s.accepted(timeout) {
                    self.completion(s.message).map(|at| (s.key.clone(), s.message, at))
                } else {
                    None
                }
            })
            .collect();
        out.sort_by_key(|(_, _, at)| *at);
        out
    }
}

// ---------------------------------------------------------------------------
// Invariants.

/// A work order as the database holds it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct WorkOrderRow {
    pub id: Uuid,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
}

/// The trigger's work orders by message, counting them per message: the
/// unique constraint allows one, and this says so out loud.
pub async fn work_orders(pool: &PgPool, trigger: Uuid) -> BTreeMap<MessageId, WorkOrderRow> {
    let per_message: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, \"offset\", count(*) FROM work_orders WHERE trigger_id = $1 GROUP BY 1, 2 HAVING count(*) > 1",
    )
    .bind(trigger)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(per_message.is_empty(), "messages with more than one work order: {per_message:?}");
    let rows: Vec<WorkOrderRow> = sqlx::query_as(
        "SELECT id, partition, \"offset\", key, state, attempts, last_error FROM work_orders WHERE trigger_id = $1",
    )
    .bind(trigger)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.into_iter().map(|r| ((r.partition, r.offset), r)).collect()
}

/// Exactly the `expected` messages have a work order, one each, all in `state`.
pub async fn assert_one_work_order_each(pool: &PgPool, trigger: Uuid, expected: &[MessageId], state: &str) {
    let wos = work_orders(pool, trigger).await;
    let expected: HashSet<MessageId> = expected.iter().copied().collect();
    let have: HashSet<MessageId> = wos.keys().copied().collect();
    let missing: Vec<_> = expected.difference(&have).collect();
    let extra: Vec<_> = have.difference(&expected).collect();
    assert!(missing.is_empty(), "{} messages without a work order: {missing:?}", missing.len());
    assert!(extra.is_empty(), "work orders for unexpected messages: {extra:?}");
    let wrong: Vec<_> = wos.values().filter(|w| w.state != state).map(|w| (w.partition, w.offset, &w.state)).collect();
    assert!(wrong.is_empty(), "work orders not {state}: {wrong:?}");
}

/// Every POST of a message carries one work order id, the one in the
/// database: the target may see a work order twice (at least once), never
/// two work orders for one message.
pub fn assert_one_work_order_id_per_message(deliveries: &[Delivery], wos: &BTreeMap<MessageId, WorkOrderRow>) {
    let mut ids: BTreeMap<MessageId, HashSet<&str>> = BTreeMap::new();
    for d in deliveries {
        ids.entry((d.partition(), d.offset())).or_default().insert(&d.work_order_id);
    }
    for (message, ids) in ids {
        assert_eq!(ids.len(), 1, "message {message:?} POSTed as several work orders: {ids:?}");
        let wo = wos.get(&message).unwrap_or_else(|| panic!("message {message:?} POSTed without a work order"));
        assert!(ids.contains(wo.id.to_string().as_str()), "message {message:?} POSTed as {ids:?}, stored as {}", wo.id);
    }
}

/// Per key, messages succeed in offset order, each once. With
/// `allow_repeats`, a message may succeed again right after itself (a worker
/// killed after the target answered delivers it again; at least once).
pub fn assert_per_key_order(probe: &Probe, timeout: Duration, allow_repeats: bool) {
    let mut last: HashMap<String, MessageId> = HashMap::new();
    let mut once = HashSet::new();
    for (key, message, _) in probe.successes(timeout) {
        let first = once.insert(message);
        assert!(first || allow_repeats, "message {message:?} (key {key:?}) succeeded twice");
        let Some(key) = key else { continue };
        if let Some(prev) = last.insert(key.clone(), message) {
            let in_order = prev < message || (allow_repeats && prev == message);
            assert!(in_order, "key {key}: {message:?} succeeded after {prev:?}");
        }
    }
}

/// Per key, no POST reaches the target before the previous one of that key
/// was answered: by the target (it answers `reply.delay` after the request
/// arrived), by the worker's timeout (half of it, leaving the other half for
/// the request's own latency), or, for a 202, by the completion the test asked.
pub fn assert_one_in_flight_per_key(probe: &Probe, timeout: Duration) {
    // (start, end — `None`: never, message, attempt)
    type Post = (Instant, Option<Instant>, MessageId, u32);
    let mut per_key: BTreeMap<String, Vec<Post>> = BTreeMap::new();
    for s in probe.seen() {
        let Some(key) = s.key.clone() else { continue };
        let end = if !s.in_time(timeout) {
            Some(s.at + timeout / 2)
        } else if s.reply.status == 202 {
            probe.completion(s.message)
        } else {
            Some(s.answered_at())
        };
        per_key.entry(key).or_default().push((s.at, end, s.message, s.attempt));
    }
    for (key, mut posts) in per_key {
        posts.sort_by_key(|p| p.0);
        let mut busy_until: Option<(Option<Instant>, MessageId, u32)> = None;
        for (start, end, message, attempt) in posts {
            if let Some((until, prev, prev_attempt)) = busy_until {
                let free = until.is_some_and(|u| start >= u);
                assert!(
                    free,
                    "key {key}: {message:?} attempt {attempt} started while {prev:?} attempt {prev_attempt} was in flight \
                     ({:?} before it ended)",
                    until.map(|u| u - start)
                );
            }
            busy_until = Some((end, message, attempt));
        }
    }
}

/// The same from the workers' own records: per key, in offset order, every
/// attempt in `attempt_log` (and every CompleteWorkOrder) starts no earlier
/// than the previous one ended (`at + ms`).
pub async fn assert_attempt_logs_sequential(pool: &PgPool, trigger: Uuid) {
    let rows: Vec<(Vec<u8>, i32, i64, String)> = sqlx::query_as(
        "SELECT key, partition, \"offset\", attempt_log::text FROM work_orders
          WHERE trigger_id = $1 AND key IS NOT NULL ORDER BY key, partition, \"offset\"",
    )
    .bind(trigger)
    .fetch_all(pool)
    .await
    .unwrap();
    let mut prev: Option<(Vec<u8>, DateTime<Utc>, MessageId)> = None;
    for (key, partition, offset, log) in rows {
        let log: serde_json::Value = serde_json::from_str(&log).unwrap();
        for entry in log.as_array().unwrap() {
            let at: DateTime<Utc> =
                entry["at"].as_str().and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("{entry}"));
            let ms = entry["ms"].as_u64().unwrap_or(0);
            if let Some((prev_key, prev_end, prev_message)) = &prev {
                if *prev_key == key {
                    assert!(
                        at >= *prev_end,
                        "key {}: attempt of {:?} at {at} began before the attempt of {prev_message:?} ended at {prev_end}",
                        String::from_utf8_lossy(&key),
                        (partition, offset)
                    );
                }
            }
            let end = at + chrono::Duration::milliseconds(ms as i64);
            prev = Some((key.clone(), end, (partition, offset)));
        }
    }
}

/// Waits until no message is stored and every set rests: keyed ones idle,
/// unkeyed ones gone, no claim held.
pub async fn wait_drained(pool: &PgPool) {
    wait_for("messages deleted and sets idle", WAIT, || async {
        let (messages, busy): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT count(*) FROM messages),
                    (SELECT count(*) FROM message_sets WHERE state <> 'idle' OR lock_id IS NOT NULL)",
        )
        .fetch_one(pool)
        .await
        .ok()?;
        (messages == 0 && busy == 0).then_some(())
    })
    .await
    .unwrap();
}

pub async fn count(pool: &PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// Waits until `n` work orders of the trigger succeeded; on timeout, shows
/// the sets and work orders that did not finish.
pub async fn wait_succeeded(pool: &PgPool, trigger: Uuid, n: usize) {
    let waited = wait_for(&format!("{n} work orders succeeded"), WAIT, || async {
        let done: i64 =
            sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE trigger_id = $1 AND state = 'success'")
                .bind(trigger)
                .fetch_one(pool)
                .await
                .ok()?;
        (done as usize >= n).then_some(())
    })
    .await;
    if let Err(error) = waited {
        panic!("{error}\n{}", stuck(pool).await);
    }
}

/// The sets that are not at rest and the work orders that did not succeed.
pub async fn stuck(pool: &PgPool) -> String {
    #[derive(Debug, sqlx::FromRow)]
    struct SetRow {
        id: i64,
        key: Option<Vec<u8>>,
        state: String,
        lock_id: Option<Uuid>,
        lock_expires: Option<DateTime<Utc>>,
        retry_at: Option<DateTime<Utc>>,
        messages: i64,
    }
    #[derive(Debug, sqlx::FromRow)]
    struct WorkOrderDump {
        id: Uuid,
        partition: i32,
        offset: i64,
        state: String,
        attempts: i32,
        last_error: Option<String>,
        log: String,
    }
    let sets: Vec<SetRow> =
        sqlx::query_as(
            "SELECT s.id, s.key, s.state, s.lock_id, s.lock_expires, s.retry_at,
                    (SELECT count(*) FROM messages m WHERE m.trigger_id = s.trigger_id AND m.topic = s.topic
                        AND (m.key = s.key OR (s.key IS NULL AND m.partition = s.partition AND m.\"offset\" = s.\"offset\")))
                    AS messages
               FROM message_sets s WHERE s.state <> 'idle' OR s.lock_id IS NOT NULL ORDER BY s.id",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_default();
    let wos: Vec<WorkOrderDump> = sqlx::query_as(
        "SELECT id, partition, \"offset\", state, attempts, last_error, attempt_log::text AS log
           FROM work_orders WHERE state <> 'success' ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let mut out = format!("now {}\nsets not at rest:\n", Utc::now());
    for s in sets {
        let key = s.key.as_deref().map(String::from_utf8_lossy);
        out += &format!("  {key:?} {s:?}\n");
    }
    out += "work orders not succeeded:\n";
    for w in wos {
        out += &format!("  {w:?}\n");
    }
    let events: Vec<(String, Option<String>, String)> = sqlx::query_as(
        "SELECT kind, node_id, details::text FROM events
          WHERE kind NOT LIKE 'work_order%' ORDER BY id DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    out += "latest events other than work orders' (newest first):\n";
    for e in events {
        out += &format!("  {e:?}\n");
    }
    out
}

/// Everything after the work is done: one work order per message, all
/// succeeded, one work order id per message at the target, per-key order,
/// one in flight per key (target's view and workers' view), all drained.
pub async fn assert_all_invariants(
    s: &Stack,
    probe: &Probe,
    trigger: Uuid,
    produced: &[MessageId],
    timeout: Duration,
    allow_repeats: bool,
) {
    wait_drained(&s.pool).await;
    assert_one_work_order_each(&s.pool, trigger, produced, "success").await;
    let wos = work_orders(&s.pool, trigger).await;
    assert_one_work_order_id_per_message(&s.receiver.deliveries(), &wos);
    assert_per_key_order(probe, timeout, allow_repeats);
    assert_one_in_flight_per_key(probe, timeout);
    assert_attempt_logs_sequential(&s.pool, trigger).await;
    // Each produced message succeeded at the target.
    let succeeded: HashSet<MessageId> = probe.successes(timeout).into_iter().map(|(_, m, _)| m).collect();
    let lost: Vec<_> = produced.iter().filter(|m| !succeeded.contains(m)).collect();
    assert!(lost.is_empty(), "messages that never succeeded at the target: {lost:?}");
}
