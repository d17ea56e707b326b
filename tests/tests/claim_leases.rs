//! Claim leases (issue 11, items 3 and 4): a set's claim lives on a short
//! lease its worker renews while it holds the set. A node killed with
//! SIGKILL stops renewing, and its sets are delivered by another node within
//! the lease and a janitor tick; a POST longer than the lease is fine while
//! renewals succeed; a database outage shorter than the lease makes no
//! redelivery, since the worker keeps trying to record what it delivered
//! while its claims hold. And the renewal statement itself: it extends only
//! the claims still held under the worker's lock id, without waiting on
//! rows being written.

mod work_order_checks;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use kt_common::dispatch::{grant, lease, round};
use kt_kafka_testing::mock::MockKafka;
use kt_kafka_testing::produce::{produce_to, Produced, TestMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::postgres::PgCluster;
use kt_tests::process::{ControlPlaneProcess, DataPlaneOptions, DataPlaneProcess};
use kt_tests::webhook::{Reply, WebhookReceiver};
use kt_tests::{wait_for, workspace_binary, ControlPlaneOptions, TestDb, TestNode};
use sqlx::{Connection as _, PgConnection, PgPool};
use uuid::Uuid;
use work_order_checks::*;

/// The bound of issue 11 item 3: a dead node's sets are delivered again
/// within 15 s of the kill. With the default 10 s lease renewed every
/// 3.3 s, a claim expires 6.7–10 s after the kill, the janitor releases it
/// within its 1 s tick and the scheduler grants it at once.
const KILL_RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// How long Postgres stays down in the outage test, and the lease it runs
/// with: the outage is well inside the lease (even counted from a renewal
/// a third of a lease before the outage).
const OUTAGE: Duration = Duration::from_secs(5);
const OUTAGE_LEASE_SECS: &str = "30";

fn reply(status: u16, delay_ms: u64) -> Reply {
    Reply { status, retry_after: None, delay: Some(Duration::from_millis(delay_ms)) }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Messages stored so far (pending, or delivered and deleted).
async fn stored(pool: &PgPool) -> usize {
    count(
        pool,
        "SELECT count(*) FROM (SELECT partition, \"offset\" FROM messages
                               UNION SELECT partition, \"offset\" FROM work_orders) m",
    )
    .await as usize
}

/// A set as the tests name it: its key, or the one message of an unkeyed set.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum SetName {
    Key(String),
    Unkeyed(MessageId),
}

impl SetName {
    fn of(seen: &Seen) -> SetName {
        match &seen.key {
            Some(k) => SetName::Key(k.clone()),
            None => SetName::Unkeyed(seen.message),
        }
    }
}

/// The sets claimed right now.
async fn claimed_sets(pool: &PgPool) -> Vec<SetName> {
    type Row = (Option<Vec<u8>>, Option<i32>, Option<i64>);
    let rows: Vec<Row> =
        sqlx::query_as("SELECT key, partition, \"offset\" FROM message_sets WHERE lock_id IS NOT NULL")
            .fetch_all(pool)
            .await
            .unwrap();
    rows.into_iter()
        .map(|(key, partition, offset)| match key {
            Some(k) => SetName::Key(String::from_utf8(k).unwrap()),
            None => SetName::Unkeyed((partition.unwrap(), offset.unwrap())),
        })
        .collect()
}

/// Issue 11 item 3: kill -9 of the node delivering; another node delivers
/// every set the dead one held within [`KILL_RECOVERY_BOUND`] of the kill
/// (measured per set: kill → its first POST from the new node), 0 lost, one
/// work order per message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_killed_nodes_sets_are_delivered_by_another_node_within_15_s() {
    let s = Stack::start("lease-kill", 2).await;
    // Slow answers, so that deliveries are in flight when the node dies.
    let probe = Probe::install(&s.receiver, |_, _, _| reply(200, 400));
    let target = Target::new(5_000, retry(5, 20, 100));
    let trigger = s.create_trigger("lease-kill", &target).await;

    let mut doomed = DataPlaneProcess::spawn(&DataPlaneOptions {
        workers: 64,
        ..DataPlaneOptions::new(&s.db.url, &s.cp().url(), "node-doomed")
    })
    .unwrap();
    let mut messages = interleaved(&keys("k", 20), 6, 0, 0);
    messages.extend(messages_for(None, 1_000, 40));
    let produced = ids(&s.produce("lease-kill", messages).await);
    // Everything stored by the doomed node, so the other node need not wait
    // for the consumer group to notice the dead member.
    wait_for("all messages stored", WAIT, || async {
        doomed.ensure_running().unwrap();
        (stored(&s.pool).await == produced.len()).then_some(())
    })
    .await
    .unwrap();

    // SIGKILL once a good part of the work is done, right after a POST
    // reached the target: that delivery is in flight for another 400 ms.
    let mut posts = probe.subscribe();
    tokio::time::timeout(WAIT, async {
        while s.receiver.successes().len() < 30 {
            posts.changed().await.unwrap();
        }
    })
    .await
    .expect("30 deliveries before the kill");
    let killed_db: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()").fetch_one(&s.pool).await.unwrap();
    let killed_at = Instant::now();
    doomed.kill().await.unwrap();
    let dead_at = Instant::now();
    // A statement the node sent before it died still runs to its end (a
    // group commit finishing sets): the sets it held are those still
    // claimed after that.
    wait_for("the dead node's last statements to finish", WAIT, || async {
        let running: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
              WHERE datname = current_database() AND state = 'active' AND query_start < $1
                AND pid <> pg_backend_pid()",
        )
        .bind(killed_db)
        .fetch_one(&s.pool)
        .await
        .ok()?;
        (running == 0).then_some(())
    })
    .await
    .unwrap();
    let held: HashSet<SetName> = claimed_sets(&s.pool).await.into_iter().collect();
    assert!(!held.is_empty(), "the dead node held sets");
    let in_flight: Vec<Seen> =
        probe.seen().into_iter().filter(|p| p.at < killed_at && p.answered_at() > killed_at).collect();
    assert!(!in_flight.is_empty(), "a delivery was in flight when the node was killed");

    let _other = TestNode::start(&s.db, &s.cp().url(), |_| {}).await;
    wait_succeeded(&s.pool, trigger, produced.len()).await;

    // Per set the dead node held: from the kill to its first POST afterwards.
    let mut resumed: BTreeMap<SetName, Duration> = BTreeMap::new();
    for p in probe.seen().into_iter().filter(|p| p.at > dead_at) {
        let name = SetName::of(&p);
        if held.contains(&name) {
            resumed.entry(name).or_insert(p.at - killed_at);
        }
    }
    assert_eq!(resumed.len(), held.len(), "every set the dead node held was delivered again: {held:?}");
    let slowest = resumed.values().max().copied().unwrap();
    let fastest = resumed.values().min().copied().unwrap();
    eprintln!(
        "killed with {} sets held, {} POSTs in flight; their sets delivered again {fastest:?} to {slowest:?} after the kill",
        held.len(),
        in_flight.len()
    );
    assert!(slowest <= KILL_RECOVERY_BOUND, "a dead node's set waited {slowest:?}: {resumed:?}");

    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), true).await;
    // The work orders in flight at the kill were POSTed again under the same id.
    let wos = work_orders(&s.pool, trigger).await;
    for p in &in_flight {
        let ids: HashSet<String> = s
            .receiver
            .deliveries()
            .iter()
            .filter(|d| (d.partition(), d.offset()) == p.message)
            .map(|d| d.work_order_id.clone())
            .collect();
        assert_eq!(ids, HashSet::from([wos[&p.message].id.to_string()]));
    }
}

/// A POST that takes longer than the claim's lease (5 s against 3 s): the
/// worker keeps renewing the claim meanwhile, so the set is never released
/// and granted again (a second node stands by to take it), and no message
/// is POSTed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_post_longer_than_the_lease_keeps_its_claim_while_renewals_succeed() {
    const LEASE: Duration = Duration::from_secs(3);
    let s = Stack::start_with("lease-slow", 2, ControlPlaneOptions { claim_lease: Some(LEASE), ..Default::default() })
        .await;
    let probe = Probe::install(&s.receiver, |key, _, _| match key {
        Some(k) if k.starts_with("slow") => reply(200, 5_000),
        _ => reply(200, 10),
    });
    let target = Target::new(10_000, retry(5, 20, 100));
    let trigger = s.create_trigger("lease-slow", &target).await;
    let _nodes =
        [TestNode::start(&s.db, &s.cp().url(), |_| {}).await, TestNode::start(&s.db, &s.cp().url(), |_| {}).await];
    let mut messages = interleaved(&keys("slow", 2), 2, 0, 0);
    messages.extend(interleaved(&keys("fast", 4), 3, 4, 0));
    let produced = ids(&s.produce("lease-slow", messages).await);

    // The first slow POST, and its set's claim as it began.
    let first = wait_for("a slow POST", WAIT, || async {
        probe.seen().into_iter().find(|p| p.key.as_deref().is_some_and(|k| k.starts_with("slow")))
    })
    .await
    .unwrap();
    let key = first.key.clone().unwrap();
    let claim = || async {
        let row: (Option<Uuid>, Option<DateTime<Utc>>, DateTime<Utc>) =
            sqlx::query_as("SELECT lock_id, lock_expires, now() FROM message_sets WHERE key = $1")
                .bind(key.as_bytes())
                .fetch_one(&s.pool)
                .await
                .unwrap();
        row
    };
    let (lock, expires, _) = claim().await;
    let lock = lock.expect("claimed while its POST runs");
    // Once the POST has outlived the lease it was granted with, the claim is
    // still the same one, with a later expiry that has not passed.
    let outlived = first.at + LEASE + Duration::from_secs(1);
    wait_for("the slow POST to outlive the lease", WAIT, || async { (Instant::now() >= outlived).then_some(()) })
        .await
        .unwrap();
    assert!(first.answered_at() > Instant::now(), "the slow POST is still in flight");
    let (lock_now, expires_now, now) = claim().await;
    assert_eq!(lock_now, Some(lock), "the claim of a set whose POST outlives the lease is kept");
    let expires_now = expires_now.unwrap();
    assert!(expires_now > expires.unwrap() && expires_now > now, "renewed: {expires:?} → {expires_now} (now {now})");

    wait_succeeded(&s.pool, trigger, produced.len()).await;
    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), false).await;
    assert_eq!(s.receiver.deliveries().len(), produced.len(), "no message POSTed twice");
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Whether the control plane at `addr` answers a health check.
async fn serving(addr: SocketAddr) -> bool {
    let check = async {
        let Ok(channel) = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await
        else {
            return false;
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health.check(tonic_health::pb::HealthCheckRequest::default()).await.is_ok()
    };
    tokio::time::timeout(Duration::from_secs(1), check).await.unwrap_or(false)
}

/// Issue 11 item 4: Postgres restarted (a throwaway cluster of the test's
/// own, stopped at once) while POSTs are in flight, the outage shorter than
/// the lease. The POSTs succeed while the database is down; the worker keeps
/// trying to record them while its claims hold and succeeds once Postgres is
/// back, so no work order is POSTed twice (before, the claim expired and the
/// next holder POSTed it again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_database_outage_shorter_than_the_lease_repeats_no_post() {
    init_logs();
    let cluster = PgCluster::start(&[]).await.unwrap();
    let db = TestDb::create_on(&cluster.url()).await.unwrap();
    let pool = db.pool().await.unwrap();
    // Not dropped: the mock cluster's teardown may stall while clients of a
    // node still reconnect (as in high_availability).
    let kafka = std::mem::ManuallyDrop::new(MockKafka::new(1).unwrap());
    kafka.create_topic("lease-pg", 3).unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let probe = Probe::install(&receiver, |_, _, _| reply(200, 800));

    let addr = free_addr();
    let env = [("KT_CLAIM_LEASE_SECONDS", OUTAGE_LEASE_SECS)];
    let cp = ControlPlaneProcess::spawn_with("cp", &db.url, addr, "warn,kt_control_plane=info", &env).unwrap();
    wait_for("the control plane active", WAIT, || async { serving(addr).await.then_some(()) })
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cp.output()));
    let _node = TestNode::start(&db, &cp.url(), |c| {
        c.control_plane_timeout = Duration::from_secs(3);
        c.reconnect_backoff = kt_common::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
    })
    .await;
    let trigger = Trigger {
        name: "lease-pg".into(),
        kafka: Some(KafkaSource {
            hosts: vec![kafka.bootstrap_servers()],
            topics: vec!["lease-pg".into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), timeout_ms: Some(5_000), ..Default::default() }),
        ..Default::default()
    };
    let mut triggers = TriggerServiceClient::connect(cp.url()).await.unwrap();
    let trigger = triggers.create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner();
    let trigger = Uuid::parse_str(&trigger.id).unwrap();

    let mut messages: Vec<TestMessage> = interleaved(&keys("k", 10), 4, 0, 0);
    messages.extend(messages_for(None, 1_000, 10));
    let produced: Vec<MessageId> = produce_to(&kafka.bootstrap_servers(), "lease-pg", messages)
        .await
        .unwrap()
        .into_iter()
        .map(|Produced { partition, offset }| (partition, offset))
        .collect();
    wait_for("all messages stored", WAIT, || async { (stored(&pool).await == produced.len()).then_some(()) })
        .await
        .unwrap();

    // Postgres goes while POSTs are in flight (answered 800 ms after they
    // arrive), some work done already.
    wait_for("POSTs in flight after 10 deliveries", WAIT, || async {
        let soon = Instant::now() + Duration::from_millis(300);
        let in_flight = probe.seen().iter().any(|p| p.answered_at() > soon);
        (receiver.successes().len() >= 10 && in_flight).then_some(())
    })
    .await
    .unwrap();
    cluster.stop().unwrap();
    let stopped_at = Instant::now();
    // The fault's length, not a wait for something.
    tokio::time::sleep(OUTAGE).await;
    cluster.start_server().await.unwrap();
    let back = Instant::now();
    let answered_while_down: Vec<Seen> =
        probe.seen().into_iter().filter(|p| p.at < stopped_at && p.answered_at() > stopped_at).collect();
    assert!(!answered_while_down.is_empty(), "POSTs were answered while the database was down");

    wait_succeeded(&pool, trigger, produced.len()).await;
    eprintln!(
        "{} POSTs answered while Postgres was down ({:?}); every message delivered {:?} after it was back",
        answered_while_down.len(),
        back - stopped_at,
        back.elapsed()
    );
    cp.ensure_running().unwrap();

    // Exactly once at the target, one work order each, with one attempt.
    let mut posts: HashMap<MessageId, usize> = HashMap::new();
    for d in receiver.deliveries() {
        *posts.entry((d.partition(), d.offset())).or_default() += 1;
    }
    let repeated: Vec<_> = posts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "POSTed more than once: {repeated:?}");
    assert_eq!(posts.len(), produced.len(), "every message reached the target");
    assert_one_work_order_each(&pool, trigger, &produced, "success").await;
    let wos = work_orders(&pool, trigger).await;
    assert_one_work_order_id_per_message(&receiver.deliveries(), &wos);
    for p in &answered_while_down {
        assert_eq!(wos[&p.message].attempts, 1, "{:?}, answered while Postgres was down", p.message);
    }
    assert_per_key_order(&probe, Duration::from_secs(5), false);
}

// ---------------------------------------------------------------------------
// The renewal statement.

/// A database with one trigger and six keyed sets, a..f.
async fn sets_db() -> (TestDb, PgPool, Vec<i64>) {
    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    kt_common::db::migrate(&pool).await.unwrap();
    let trigger = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO triggers (id, name, enabled, generation, group_id, spec) VALUES ($1, 'l', true, 1, 'l', '{}')",
    )
    .bind(trigger)
    .execute(&pool)
    .await
    .unwrap();
    let sets: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO message_sets (trigger_id, topic, key)
         SELECT $1, 'l', convert_to(k, 'UTF8') FROM unnest(ARRAY['a', 'b', 'c', 'd', 'e', 'f']) k
         RETURNING id",
    )
    .bind(trigger)
    .fetch_all(&pool)
    .await
    .unwrap();
    (db, pool, sets)
}

/// Claims `set` for `lock` until `secs` from now (negative: already expired).
async fn claim(pool: &PgPool, set: i64, lock: Uuid, secs: f64) {
    sqlx::query("UPDATE message_sets SET lock_id = $2, lock_expires = now() + make_interval(secs => $3) WHERE id = $1")
        .bind(set)
        .bind(lock)
        .bind(secs)
        .execute(pool)
        .await
        .unwrap();
}

/// (lock id, seconds left) of a set's claim.
async fn claim_of(pool: &PgPool, set: i64) -> (Option<Uuid>, Option<f64>) {
    sqlx::query_as("SELECT lock_id, extract(epoch FROM lock_expires - now())::float8 FROM message_sets WHERE id = $1")
        .bind(set)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn test_renewal_extends_only_claims_held_under_their_lock_id_and_never_waits() {
    let (_db, pool, sets) = sets_db().await;
    let [a, b, c, d, e, f] = sets[..] else { panic!("six sets") };
    let lock = |n: u128| Uuid::from_u128(n);
    // a: held. b: held, asked with another lock id. c: claimed, then
    // released by its holder. d: held, its row locked by another
    // transaction. e: expired but not released yet. f: expired and
    // released by the janitor.
    claim(&pool, f, lock(6), -1.0).await;
    assert_eq!(grant::release_expired_claims(&pool).await.unwrap(), 1);
    for (set, n, secs) in [(a, 1, 5.0), (b, 2, 5.0), (c, 3, 5.0), (d, 4, 5.0), (e, 5, -1.0)] {
        claim(&pool, set, lock(n), secs).await;
    }
    assert!(round::release_ready(&pool, c, lock(3)).await.unwrap());
    let mut other = PgConnection::connect(&_db.url).await.unwrap();
    let mut tx = other.begin().await.unwrap();
    sqlx::query("SELECT id FROM message_sets WHERE id = $1 FOR UPDATE").bind(d).execute(&mut *tx).await.unwrap();

    let lease = Duration::from_secs(60);
    let asked: Vec<lease::Renew> = [(a, 1), (b, 99), (c, 3), (d, 4), (e, 5), (f, 6)]
        .into_iter()
        .map(|(set_id, n)| lease::Renew { set_id, lock_id: lock(n), lease })
        .collect();
    let held = tokio::time::timeout(Duration::from_secs(5), lease::renew(&pool, &asked))
        .await
        .expect("a renewal never waits for a locked row")
        .unwrap();
    let mut held: Vec<(i64, Uuid, bool)> = held.into_iter().map(|h| (h.set_id, h.lock_id, h.renewed)).collect();
    held.sort();
    assert_eq!(held, vec![(a, lock(1), true), (d, lock(4), false), (e, lock(5), true)]);
    tx.rollback().await.unwrap();

    let left = |(_, secs): (Option<Uuid>, Option<f64>)| secs.unwrap_or(f64::NAN);
    assert!(left(claim_of(&pool, a).await) > 55.0, "a renewed by the lease");
    assert!(left(claim_of(&pool, e).await) > 55.0, "e: expired, but nobody else had it");
    assert!(left(claim_of(&pool, b).await) < 6.0, "b: not renewed under another lock id");
    assert!(left(claim_of(&pool, d).await) < 6.0, "d: skipped while locked, expiry unchanged");
    assert_eq!(claim_of(&pool, b).await.0, Some(lock(2)));
    assert_eq!(claim_of(&pool, c).await, (None, None), "c: a released claim is not revived");
    assert_eq!(claim_of(&pool, f).await, (None, None), "f: a claim the janitor released is not revived");

    // Once the row is free, the next renewal extends d too.
    let held = lease::renew(&pool, &asked[3..4]).await.unwrap();
    assert_eq!(held, vec![lease::Held { set_id: d, lock_id: lock(4), renewed: true }]);
    assert!(left(claim_of(&pool, d).await) > 55.0);
}

#[tokio::test]
async fn test_control_plane_refuses_a_claim_lease_out_of_range() {
    for value in ["2", "3601", "ten"] {
        let out = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(workspace_binary("control-plane").unwrap())
                .env("DATABASE_URL", "postgres://127.0.0.1:1/none")
                .env("KT_CLAIM_LEASE_SECONDS", value)
                .env("NO_COLOR", "1")
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("exits at once")
        .unwrap();
        assert!(!out.status.success(), "{value}");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(text.contains("--claim-lease-seconds"), "{value}: {text}");
        let why = if value == "ten" { "not a whole number of seconds" } else { "3 to 3600 seconds" };
        assert!(text.contains(why), "{value}: {text}");
    }
}
