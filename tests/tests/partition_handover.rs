//! Fast partition hand-over (issue 11): a `data-plane` node (the real
//! binary) killed with SIGKILL in the middle of ingest, with and without a
//! restart under the same node id. A steady producer writes to every
//! partition all along; each test measures how long after the kill messages
//! produced after it are stored again on every partition, asserts the
//! bound, and checks that nothing was lost, stored twice, or committed
//! before it was stored.

#[allow(dead_code)]
#[path = "ingest_e2e/invariants.rs"]
mod invariants;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{produce, producer, TestMessage};
use kt_kafka_testing::tansu::Tansu;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::process::{DataPlaneOptions, DataPlaneProcess};
use kt_tests::{ControlPlaneOptions, TestControlPlane, TestDb};
use sqlx::PgPool;
use uuid::Uuid;

use invariants::{assert_stored_exactly_once, end_offsets, poll_until, wait_stored, CommittedOffsets, MessageId};

const TOPIC: &str = "handover";
const PARTITIONS: i32 = 4;
const WAIT: Duration = Duration::from_secs(45);

/// Kept until the end of the test (the mock is never dropped: see
/// `Sandbox::kafka` in ingest_e2e).
enum Broker {
    Mock(std::mem::ManuallyDrop<MockKafka>),
    Tansu(Tansu),
}

impl Broker {
    fn bootstrap(&self) -> String {
        match self {
            Broker::Mock(m) => m.bootstrap_servers(),
            Broker::Tansu(t) => t.bootstrap_servers(),
        }
    }
}

/// A producer writing one message to every partition every 20 ms until
/// stopped, remembering when each was acknowledged.
struct SteadyProducer {
    stop: tokio_util::sync::CancellationToken,
    task: Mutex<Option<tokio::task::JoinHandle<anyhow::Result<()>>>>,
    acked: Arc<Mutex<Vec<(i32, i64, Instant)>>>,
}

impl SteadyProducer {
    fn start(brokers: &str) -> Self {
        let stop = tokio_util::sync::CancellationToken::new();
        let acked = Arc::new(Mutex::new(Vec::new()));
        let producer = producer(brokers).unwrap();
        let (token, log) = (stop.clone(), acked.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            let mut seq = 0u64;
            while !token.is_cancelled() {
                tick.tick().await;
                let batch: Vec<TestMessage> = (0..PARTITIONS)
                    .map(|p| {
                        seq += 1;
                        TestMessage::new(format!("{{\"seq\":{seq}}}")).key(format!("key-{seq}")).partition(p)
                    })
                    .collect();
                let produced = produce(&producer, TOPIC, batch).await?;
                let at = Instant::now();
                log.lock().unwrap().extend(produced.iter().map(|p| (p.partition, p.offset, at)));
            }
            Ok(())
        });
        Self { stop, task: Mutex::new(Some(task)), acked }
    }

    /// Per partition, the first offset acknowledged after `t`.
    fn first_after(&self, t: Instant) -> BTreeMap<i32, i64> {
        let mut first = BTreeMap::new();
        for (p, o, at) in self.acked.lock().unwrap().iter() {
            if *at > t {
                let e = first.entry(*p).or_insert(*o);
                *e = (*e).min(*o);
            }
        }
        first
    }

    /// Stops producing; everything produced, acknowledged.
    async fn stop(&self) -> BTreeSet<MessageId> {
        self.stop.cancel();
        let task = self.task.lock().unwrap().take();
        if let Some(task) = task {
            task.await.unwrap().unwrap();
        }
        self.acked.lock().unwrap().iter().map(|(p, o, _)| (TOPIC.to_owned(), *p, *o)).collect()
    }
}

/// The highest stored offset per partition.
async fn stored_heads(pool: &PgPool, trigger: Uuid) -> BTreeMap<i32, i64> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, max(\"offset\") FROM messages WHERE trigger_id = $1 GROUP BY partition")
            .bind(trigger)
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter().collect()
}

/// The partitions a node owns, from its JSON log: the last "partitions
/// assigned by the group" line, unless a revocation followed.
fn owned_partitions(node: &DataPlaneProcess) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for event in group_events(node) {
        match event["message"].as_str() {
            Some("partitions assigned by the group") => {
                // Debug of [("topic", 0), ("topic", 3)].
                let list = event["partitions"].as_str().unwrap_or_default();
                owned =
                    list.split("\", ").skip(1).filter_map(|rest| rest.split(')').next()?.trim().parse().ok()).collect();
            }
            Some("partitions revoked") => owned.clear(),
            _ => {}
        }
    }
    owned
}

/// The node's group membership changes (assignments and revocations), oldest first.
fn group_events(node: &DataPlaneProcess) -> Vec<serde_json::Value> {
    node.lines_containing("partitions")
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|e| matches!(e["message"].as_str(), Some("partitions assigned by the group" | "partitions revoked")))
        .collect()
}

/// A database, a control plane, a broker, a trigger with a steady
/// producer, and two ingest-only `data-plane` processes sharing its
/// partitions, both ingesting. Fields drop in this order: nodes, clients, control plane, database,
/// and the broker last.
struct Sandbox {
    victim: DataPlaneProcess,
    survivor: DataPlaneProcess,
    producing: SteadyProducer,
    offsets: CommittedOffsets,
    trigger: Uuid,
    env: Vec<(String, String)>,
    cp_url: String,
    _cp: TestControlPlane,
    pool: PgPool,
    db: TestDb,
    _broker: Broker,
}

impl Sandbox {
    async fn start(broker: Broker, env: &[(&str, &str)]) -> Self {
        let db = TestDb::create().await.unwrap();
        let pool = db.pool().await.unwrap();
        // The binary's nodes heartbeat every 5 s; the control plane must not
        // declare them dead sooner.
        let heartbeat = Some(Duration::from_secs(5));
        let cp = TestControlPlane::start(&db, ControlPlaneOptions { heartbeat, ..Default::default() }).await.unwrap();
        let trigger = Trigger {
            name: "handover".into(),
            kafka: Some(KafkaSource {
                hosts: vec![broker.bootstrap()],
                topics: vec![TOPIC.into()],
                initial_offset_reset_policy: "earliest".into(),
                ..Default::default()
            }),
            webhook: Some(WebhookTarget { url: "http://127.0.0.1:9/hook".into(), ..Default::default() }),
            ..Default::default()
        };
        let trigger = TriggerServiceClient::new(cp.channel().await.unwrap())
            .create_trigger(CreateTriggerRequest { trigger: Some(trigger) })
            .await
            .unwrap()
            .into_inner();
        let group = &trigger.kafka.as_ref().unwrap().group_id;
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        let s = Self {
            cp_url: cp.url(),
            victim: DataPlaneProcess::spawn(&node_options(&db, &cp.url(), "node-victim", &env)).unwrap(),
            survivor: DataPlaneProcess::spawn(&node_options(&db, &cp.url(), "node-survivor", &env)).unwrap(),
            offsets: CommittedOffsets::new(&broker.bootstrap(), group, &[(TOPIC, PARTITIONS)]),
            producing: SteadyProducer::start(&broker.bootstrap()),
            trigger: Uuid::parse_str(&trigger.id).unwrap(),
            db,
            pool,
            _cp: cp,
            _broker: broker,
            env,
        };

        // Both nodes own partitions and every partition is ingested.
        let started = Instant::now();
        let all: BTreeSet<i32> = (0..PARTITIONS).collect();
        poll_until("both nodes ingesting", WAIT, Duration::from_millis(100), || async {
            s.victim.ensure_running()?;
            s.survivor.ensure_running()?;
            let (a, b) = (owned_partitions(&s.victim), owned_partitions(&s.survivor));
            let split = !a.is_empty() && !b.is_empty() && a.union(&b).copied().collect::<BTreeSet<_>>() == all;
            Ok((split && s.stored_since(started + Duration::from_millis(500)).await).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", s.outputs()));
        s
    }

    fn node(&self, node_id: &str) -> DataPlaneProcess {
        DataPlaneProcess::spawn(&node_options(&self.db, &self.cp_url, node_id, &self.env)).unwrap()
    }

    /// Whether, on every partition, a message produced after `t` is stored.
    async fn stored_since(&self, t: Instant) -> bool {
        let first = self.producing.first_after(t);
        let heads = stored_heads(&self.pool, self.trigger).await;
        first.len() == PARTITIONS as usize && first.iter().all(|(p, o)| heads.get(p).is_some_and(|h| h >= o))
    }

    /// Waits until ingest resumed on every partition after `killed_at`;
    /// returns how long that took.
    async fn resumed_after(&self, killed_at: Instant, nodes: &[&DataPlaneProcess]) -> Duration {
        poll_until("ingest resumed on every partition", WAIT, Duration::from_millis(50), || async {
            for node in nodes {
                node.ensure_running()?;
            }
            Ok(self.stored_since(killed_at).await.then(|| killed_at.elapsed()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", self.outputs()))
    }

    /// Stops producing, then checks that every produced message is stored
    /// exactly once and, in the end, committed.
    async fn assert_nothing_lost(&self, nodes: &[&DataPlaneProcess]) {
        let produced = self.producing.stop().await;
        wait_stored(&self.pool, self.trigger, produced.len() as i64, &self.offsets, nodes, WAIT).await.unwrap();
        assert_stored_exactly_once(&self.pool, self.trigger, &produced).await;
        self.offsets.wait_committed(&end_offsets(&produced), WAIT).await;
        eprintln!("{} messages produced, each stored once", produced.len());
    }

    fn outputs(&self) -> String {
        format!("--- victim ---\n{}\n--- survivor ---\n{}", self.victim.output(), self.survivor.output())
    }
}

fn node_options(db: &TestDb, cp_url: &str, node_id: &str, env: &[(String, String)]) -> DataPlaneOptions {
    let mut o = DataPlaneOptions::new(&db.url, cp_url, node_id);
    o.rust_log = "warn,kt_data_plane::consumer=info".into();
    o.env.push(("KT_LOG_FORMAT".into(), "json".into()));
    o.env.extend(env.iter().cloned());
    o
}

/// A node killed for good: the group hands its partitions to the other node
/// once its session times out, and ingest goes on there.
///
/// On the mock cluster a rebalance after a member timed out waits another
/// session timeout less one second for members to rejoin (Apache Kafka
/// completes it as soon as the live members have rejoined, within a
/// heartbeat), so the hand-over takes about twice the session timeout here:
/// the test sets `--kafka-session-timeout-ms` to 4 s to hold the 10 s bound
/// the default (10 s) gives on Kafka. (Before the flag the binary used 30 s:
/// about a minute here.)
#[tokio::test]
async fn test_killed_node_partitions_move_to_the_other_node_within_seconds() {
    let mock = MockKafka::new(1).unwrap();
    mock.create_topic(TOPIC, PARTITIONS).unwrap();
    let mut s =
        Sandbox::start(Broker::Mock(std::mem::ManuallyDrop::new(mock)), &[("KT_KAFKA_SESSION_TIMEOUT_MS", "4000")])
            .await;
    let victims = owned_partitions(&s.victim);
    s.victim.kill().await.unwrap();
    let killed_at = Instant::now();
    let resumed = s.resumed_after(killed_at, &[&s.survivor]).await;
    eprintln!("ingest on the killed node's partitions {victims:?} resumed {resumed:?} after the kill");
    assert_eq!(owned_partitions(&s.survivor), (0..PARTITIONS).collect(), "the survivor owns every partition");
    assert!(resumed <= Duration::from_secs(10), "hand-over took {resumed:?}, more than 10 s");
    s.assert_nothing_lost(&[&s.survivor]).await;
}

/// A node killed and restarted at once under the same node id: with static
/// group membership (on by default for a fixed `--node-id`) it rejoins as
/// the member it was, takes back exactly its partitions and the other node
/// sees no rebalance; ingest resumes without waiting for the dead
/// member's session timeout (10 s, the default).
///
/// On Tansu, a broker process: it implements the static rejoin (the mock
/// cluster does not; it treats the restarted node as a new member). Tansu
/// makes every join wait about the rebalance timeout, which is the
/// consumer's max.poll.interval.ms: set to the session timeout here.
#[tokio::test]
async fn test_node_restarted_under_its_id_takes_its_partitions_back_without_a_rebalance() {
    let tansu = Tansu::start()
        .map_err(|e| {
            e.context(
                "failed to start the Tansu broker this test needs (TANSU_BIN or PATH; scripts/test.sh installs it)",
            )
        })
        .unwrap();
    tansu.create_topic(TOPIC, PARTITIONS).unwrap();
    let mut s = Sandbox::start(Broker::Tansu(tansu), &[("KT_KAFKA_MAX_POLL_INTERVAL_MS", "10000")]).await;
    let victims = owned_partitions(&s.victim);
    let survivor_events = group_events(&s.survivor).len();
    s.victim.kill().await.unwrap();
    let killed_at = Instant::now();
    let restarted = s.node("node-victim");
    // Start-up: until the restarted node creates its consumer.
    poll_until("the restarted node's pipeline starting", WAIT, Duration::from_millis(20), || async {
        restarted.ensure_running()?;
        Ok((!restarted.lines_containing("\"starting pipeline\"").is_empty()).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", restarted.output()));
    let startup = killed_at.elapsed();
    let resumed = s.resumed_after(killed_at, &[&s.survivor, &restarted]).await;
    eprintln!("restarted node up after {startup:?}; ingest on {victims:?} resumed {resumed:?} after the kill");
    assert_eq!(owned_partitions(&restarted), victims, "the restarted node got its own partitions back");
    assert_eq!(group_events(&s.survivor).len(), survivor_events, "the other node saw no rebalance");
    let session = Duration::from_secs(10);
    assert!(
        resumed < session + startup,
        "ingest resumed {resumed:?} after the kill: the rejoin waited for the session timeout ({session:?})"
    );
    s.assert_nothing_lost(&[&s.survivor, &restarted]).await;
}
