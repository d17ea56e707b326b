//! Whole-system ingest under faults (DESIGN §3 Lifecycle/Ingest, §7): a real
//! control plane, real data-plane nodes (in process, or the `data-plane`
//! binary as a child process), Postgres and a broker (the mock cluster, or
//! Tansu). After every fault the same invariants are checked:
//!
//! - every produced message is stored exactly once (`messages` and
//!   `message_records` hold exactly the produced (topic, partition, offset)
//!   set, nothing else, nothing twice);
//! - nothing is committed that was not stored: for every partition, every
//!   offset below the group's committed offset has a dedup record (read
//!   committed first, then the database, so a pass is never luck);
//! - in the end every stored offset is committed.
//!
//! Nodes are ingest-only (`workers = 0`) so stored messages stay in
//! `messages` to be counted, except where the test follows them to a webhook.

#[path = "ingest_e2e/invariants.rs"]
mod invariants;
#[path = "ingest_e2e/sandbox.rs"]
mod sandbox;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kt_kafka_testing::produce::{keyed_messages, produce_to, TestMessage};
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::process::DataPlaneProcess;
use kt_tests::{wait_for, ControlPlaneOptions, TestControlPlane, TestDb, TestNode};

use invariants::{
    assert_stays, assert_stored_exactly_once, end_offsets, ids, ids_in, poll_until, stored_count, wait_stored,
    CommittedOffsets,
};
use sandbox::{
    events, group_id, sandbox, sandbox_for_processes, trigger_uuid, update_trigger, wait_nodes_reporting, with_output,
    WAIT,
};

/// When to kill the first node of a kill -9 test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillPoint {
    /// More than 5 000 messages stored and every partition has a committed
    /// offset: the successor resumes from committed offsets.
    AfterCommits,
    /// The first batch is stored and nothing is committed yet (the binary
    /// commits every second): the successor finds a group without offsets
    /// but with partition checkpoints.
    BeforeFirstCommit,
}

/// kill -9 of a `data-plane` process while it ingests a backlog of 50 000
/// messages on 4 partitions, then a new `data-plane` process ingests the
/// rest.
async fn kill_mid_ingest(kill_point: KillPoint) {
    const TOPIC: &str = "orders";
    const PARTITIONS: i32 = 4;
    const MESSAGES: usize = 50_000;
    let s = sandbox_for_processes(&[(TOPIC, PARTITIONS)]).await;
    let produced = ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(MESSAGES, 1_000)).await.unwrap());
    assert_eq!(produced.len(), MESSAGES);

    let mut first = DataPlaneProcess::spawn(&s.child_options("node-killed")).unwrap();
    let trigger = s.create_trigger("kill-9", &[TOPIC]).await;
    let id = trigger_uuid(&trigger);
    let offsets = s.offsets(&trigger, &[(TOPIC, PARTITIONS)]);

    let started = std::time::Instant::now();
    let at_kill = poll_until(&format!("{kill_point:?}"), WAIT, Duration::from_millis(5), || async {
        first.ensure_running()?;
        let n = stored_count(&s.pool, id).await;
        Ok(match kill_point {
            KillPoint::BeforeFirstCommit => (n > 0).then_some(n),
            KillPoint::AfterCommits if n > 5_000 => {
                let committed = offsets.read().await?;
                (committed.len() == PARTITIONS as usize).then_some(n)
            }
            KillPoint::AfterCommits => None,
        })
    })
    .await
    .map_err(with_output(&first))
    .unwrap();
    first.kill().await.unwrap();
    let committed = offsets.assert_all_stored(&s.pool, id).await;
    let after_kill = stored_count(&s.pool, id).await;
    eprintln!(
        "{kill_point:?}: killed after {:?} with {at_kill} messages stored ({after_kill} after the kill), committed {committed:?}",
        started.elapsed()
    );
    assert!(after_kill < MESSAGES as i64, "ingest finished before the kill; produce more messages");
    if kill_point == KillPoint::BeforeFirstCommit && !committed.is_empty() {
        eprintln!("note: an auto-commit raced the kill; this run resumes from committed offsets");
    }

    // The dead process stays a member of the group for its session timeout
    // (10 s, the binary's default `--kafka-session-timeout-ms`). Its
    // successor is started the way a supervisor would, a few seconds later:
    // on the mock cluster a member that joins while the dead one may still be
    // counted at the leader election (due at join + 9 s) waits one more
    // rebalance round (~20 s in all instead of ~10 s).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut opts = s.child_options("node-successor");
    opts.rust_log = "warn,kt_data_plane::consumer=info".into();
    let successor = DataPlaneProcess::spawn(&opts).unwrap();
    let assigned = poll_until(
        "the successor assigned its partitions",
        Duration::from_secs(75),
        Duration::from_millis(100),
        || async {
            successor.ensure_running()?;
            Ok(successor.lines_containing("partitions assigned trigger_id").pop())
        },
    )
    .await
    .map_err(with_output(&successor))
    .unwrap();
    eprintln!("{kill_point:?}: successor assigned after {:?}: {assigned}", started.elapsed());
    wait_stored(&s.pool, id, MESSAGES as i64, &offsets, &[&successor], Duration::from_secs(30))
        .await
        .map_err(with_output(&successor))
        .unwrap();
    eprintln!("{kill_point:?}: all stored after {:?}", started.elapsed());
    assert_stored_exactly_once(&s.pool, id, &produced).await;
    offsets.wait_committed(&end_offsets(&produced), WAIT).await;
    offsets.assert_all_stored(&s.pool, id).await;
    // The checkpoints reached the end of every partition.
    let checkpoints: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, last_offset FROM partition_checkpoints WHERE trigger_id = $1 ORDER BY partition",
    )
    .bind(id)
    .fetch_all(&s.pool)
    .await
    .unwrap();
    let ends: Vec<(i32, i64)> = end_offsets(&produced).into_iter().map(|((_, p), end)| (p, end - 1)).collect();
    assert_eq!(checkpoints, ends);
    successor.ensure_running().unwrap();
}

/// DESIGN §7 "kill -9 of a data-plane node mid-ingest": what the killed
/// process stored but had not committed is re-read by its successor and
/// deduplicated; nothing it had not stored was committed.
#[tokio::test]
async fn test_node_killed_with_sigkill_mid_ingest_loses_and_duplicates_nothing() {
    kill_mid_ingest(KillPoint::AfterCommits).await;
}

/// The same fault one second earlier: the process dies after storing its
/// first batch and before its first offset commit (the binary commits every
/// second), so the group has no committed offset but the trigger has
/// partition checkpoints.
///
/// The successor must resume each partition right after its checkpoint.
/// Regression test: at commit e11dc27 it resumed "from the earliest
/// checkpoint timestamp of the topic", which the mock cluster (no ListOffsets
/// by time) resolved to END: the ~49 000 messages not stored yet were
/// skipped for good.
#[tokio::test]
async fn test_node_killed_before_its_first_commit_loses_nothing() {
    kill_mid_ingest(KillPoint::BeforeFirstCommit).await;
}

/// A partition without a committed offset and without a checkpoint of its
/// own (it had no messages while the trigger consumed) follows the initial
/// policy ("earliest": its start), even though other partitions of its topic
/// have checkpoints. Its messages here carry older producer timestamps (a
/// replay), which a start "from the topic's earliest checkpoint timestamp"
/// would skip. Regression test: at commit e11dc27 this lost all 50 messages.
#[tokio::test]
async fn test_partition_first_used_while_disabled_is_read_from_its_start() {
    const TOPIC: &str = "sparse";
    let s = sandbox(&[(TOPIC, 2)]).await;
    let node = s.ingest_node(|_| {}).await;
    let trigger = s.create_trigger("sparse", &[TOPIC]).await;
    let id = trigger_uuid(&trigger);
    let offsets = s.offsets(&trigger, &[(TOPIC, 2)]);
    let to_p0: Vec<TestMessage> = keyed_messages(100, 10).into_iter().map(|m| m.partition(0)).collect();
    let mut expected = ids(TOPIC, &produce_to(&s.brokers(), TOPIC, to_p0).await.unwrap());
    wait_stored(&s.pool, id, 100, &offsets, &[], WAIT).await.unwrap();
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;

    s.triggers.clone().disable_trigger(DisableTriggerRequest { id: trigger.id.clone() }).await.unwrap();
    wait_for("pipeline_stopped reported", WAIT, || async {
        (!events(&s.pool, id, "pipeline_stopped").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    // Partition 1's first messages, created an hour ago (e.g. a replay).
    let hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    let to_p1: Vec<TestMessage> = keyed_messages(50, 10)
        .into_iter()
        .enumerate()
        .map(|(i, m)| m.partition(1).timestamp_ms(hour_ago + i as i64))
        .collect();
    expected.extend(ids(TOPIC, &produce_to(&s.brokers(), TOPIC, to_p1).await.unwrap()));
    s.triggers.clone().enable_trigger(EnableTriggerRequest { id: trigger.id.clone() }).await.unwrap();

    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[], Duration::from_secs(20)).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;
    node.stop().await.unwrap();
}

/// The partitions a child node currently owns, from its JSON log: the last
/// "partitions assigned by the group" line, unless a revocation followed.
fn owned_partitions(node: &DataPlaneProcess) -> BTreeSet<i32> {
    let mut owned = BTreeSet::new();
    for line in node.lines_containing("partitions") {
        let Ok(event) = serde_json::from_str::<serde_json::Value>(&line) else { continue };
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

/// DESIGN §7 "a second node joining/leaving (rebalance)": two nodes split
/// the partitions of one trigger; when one stops gracefully in the middle of
/// a stream, the other takes over every partition and nothing is lost or
/// stored twice.
#[tokio::test]
async fn test_two_nodes_share_partitions_and_a_leaving_node_hands_over() {
    const TOPIC: &str = "shared";
    const PARTITIONS: i32 = 6;
    let s = sandbox_for_processes(&[(TOPIC, PARTITIONS)]).await;
    // Child processes, so that each node's own log says what it owns.
    let logged = |node_id: &str| {
        let mut opts = s.child_options(node_id);
        opts.rust_log = "warn,kt_data_plane::consumer=info".into();
        opts.env.push(("KT_LOG_FORMAT".into(), "json".into()));
        opts
    };
    let mut a = DataPlaneProcess::spawn(&logged("node-a")).unwrap();
    let b = DataPlaneProcess::spawn(&logged("node-b")).unwrap();
    let trigger = s.create_trigger("shared", &[TOPIC]).await;
    let id = trigger_uuid(&trigger);
    let offsets = s.offsets(&trigger, &[(TOPIC, PARTITIONS)]);

    let mut expected = ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(6_000, 100)).await.unwrap());
    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[&a, &b], WAIT).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    let all: BTreeSet<i32> = (0..PARTITIONS).collect();
    let (of_a, of_b) = poll_until("both nodes owning partitions", WAIT, Duration::from_millis(100), || async {
        a.ensure_running()?;
        b.ensure_running()?;
        let (of_a, of_b) = (owned_partitions(&a), owned_partitions(&b));
        let split = !of_a.is_empty() && !of_b.is_empty() && of_a.is_disjoint(&of_b);
        Ok((split && of_a.union(&of_b).copied().collect::<BTreeSet<_>>() == all).then_some((of_a, of_b)))
    })
    .await
    .unwrap();
    eprintln!("node-a owns {of_a:?}, node-b owns {of_b:?}");

    // node-a leaves (SIGTERM) while messages keep coming.
    let brokers = s.brokers();
    let producing = tokio::spawn(async move { produce_to(&brokers, TOPIC, keyed_messages(6_000, 100)).await });
    let status = a.terminate(Duration::from_secs(30)).await.unwrap();
    assert!(status.success(), "graceful stop exits 0, got {status}\n{}", a.output());
    offsets.assert_all_stored(&s.pool, id).await;
    expected.extend(ids(TOPIC, &producing.await.unwrap().unwrap()));

    poll_until("node-b owning every partition", Duration::from_secs(50), Duration::from_millis(100), || async {
        b.ensure_running()?;
        Ok((owned_partitions(&b) == all).then_some(()))
    })
    .await
    .unwrap();
    expected.extend(ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(600, 100)).await.unwrap()));
    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[&b], WAIT).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;
    offsets.assert_all_stored(&s.pool, id).await;
}

/// DESIGN §3 Lifecycle: "a changed trigger's consumer is restarted with the
/// new config" on every node, without restarting the node; a configuration
/// that cannot work is visible, and reverting it heals the pipeline.
#[tokio::test]
async fn test_config_change_restarts_pipeline_on_every_node() {
    let s = sandbox(&[("alpha", 3), ("beta", 3)]).await;
    let n1 = s.ingest_node(|_| {}).await;
    let n2 = s.ingest_node(|_| {}).await;
    let trigger = s.create_trigger("config", &["alpha"]).await;
    let id = trigger_uuid(&trigger);
    let offsets = s.offsets(&trigger, &[("alpha", 3), ("beta", 3)]);
    let mut expected = ids("alpha", &produce_to(&s.brokers(), "alpha", keyed_messages(300, 10)).await.unwrap());
    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[], WAIT).await.unwrap();
    wait_nodes_reporting(&s, id, "pipeline_started", trigger.generation, &[&n1, &n2]).await;

    // Add a topic: both nodes restart their pipeline on the new generation.
    let updated = update_trigger(&s, &trigger, &["kafka.topics"], |t| {
        t.kafka = Some(KafkaSource { topics: vec!["alpha".into(), "beta".into()], ..Default::default() });
    })
    .await;
    assert!(updated.generation > trigger.generation);
    assert_eq!(updated.kafka.as_ref().unwrap().topics, ["alpha", "beta"]);
    assert_eq!(group_id(&updated), group_id(&trigger), "the group is immutable");
    wait_nodes_reporting(&s, id, "pipeline_started", updated.generation, &[&n1, &n2]).await;
    expected.extend(ids("beta", &produce_to(&s.brokers(), "beta", keyed_messages(300, 10)).await.unwrap()));
    expected.extend(ids("alpha", &produce_to(&s.brokers(), "alpha", keyed_messages(300, 10)).await.unwrap()));
    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[], WAIT).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;

    // Credentials the broker cannot accept (the mock cluster speaks no
    // SASL): the failure is visible in the trigger's status (DESIGN §3), on
    // every node, without the secret; nothing is consumed meanwhile.
    let broken = update_trigger(&s, &updated, &["kafka.sasl", "kafka.username", "kafka.password"], |t| {
        t.kafka = Some(KafkaSource {
            sasl: SaslMechanism::Plain.into(),
            username: "alice".into(),
            password: "not-the-password".into(),
            ..Default::default()
        });
    })
    .await;
    assert!(broken.generation > updated.generation);
    let status_of = || async {
        let request = GetTriggerStatusRequest { id: trigger.id.clone() };
        s.triggers.clone().get_trigger_status(request).await.ok().map(tonic::Response::into_inner)
    };
    let status = wait_for("an error on both nodes in the trigger status", WAIT, || async {
        let status = status_of().await?;
        let failing = status.nodes.iter().filter(|n| !n.last_error.is_empty()).count();
        (failing == 2 && !status.last_error.is_empty()).then_some(status)
    })
    .await
    .unwrap();
    let printed = format!("{status:?}");
    assert!(!printed.contains("not-the-password"), "secrets never appear in the status: {printed}");
    // DESIGN §7 "every error is clear": the status names the cause. Checked
    // at the end of the test, so that the healing below is tested either way.
    let last = std::cell::RefCell::new(status);
    let names_the_cause =
        wait_for("the trigger status naming the authentication failure", Duration::from_secs(10), || async {
            let status = status_of().await?;
            let clear = status.nodes.iter().all(|n| n.last_error.to_lowercase().contains("authentication"));
            *last.borrow_mut() = status;
            clear.then_some(())
        })
        .await
        .map_err(|e| format!("{e}; the status said: {:?}", last.borrow()));
    let failed_events = events(&s.pool, id, "pipeline_failed").await;
    eprintln!("pipeline_failed events while the credentials are wrong: {failed_events:?}");
    let during = ids("alpha", &produce_to(&s.brokers(), "alpha", keyed_messages(100, 10)).await.unwrap());
    let before = expected.len() as i64;
    assert_stays("nothing consumed with bad credentials", Duration::from_secs(2), || async {
        let n = stored_count(&s.pool, id).await;
        anyhow::ensure!(n == before, "{n} messages stored");
        Ok(())
    })
    .await;
    expected.extend(during);

    // Reverting heals it: everything produced meanwhile arrives.
    let healed = update_trigger(&s, &broken, &["kafka.sasl", "kafka.username", "kafka.password"], |t| {
        t.kafka = Some(KafkaSource { sasl: SaslMechanism::None.into(), ..Default::default() });
    })
    .await;
    assert!(healed.generation > broken.generation);
    wait_nodes_reporting(&s, id, "pipeline_started", healed.generation, &[&n1, &n2]).await;
    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[], WAIT).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;
    assert!(!n1.task.is_finished() && !n2.task.is_finished(), "the nodes were never restarted");
    n1.stop().await.unwrap();
    n2.stop().await.unwrap();
    // Pins a bug: the consequence ("AllBrokersDown") overwrites the cause
    // ("Authentication failure") in each node's report.
    names_the_cause.unwrap();
}

/// DESIGN §3 Lifecycle: a disabled trigger's pipeline stops (nothing is
/// consumed or committed), enabling it resumes from where it stopped, and a
/// deleted trigger's pipeline stops and its rows go with it.
#[tokio::test]
async fn test_disable_and_delete_stop_the_pipeline() {
    const TOPIC: &str = "lifecycle";
    let s = sandbox(&[(TOPIC, 2)]).await;
    let node = s.ingest_node(|_| {}).await;
    let trigger = s.create_trigger("lifecycle", &[TOPIC]).await;
    let id = trigger_uuid(&trigger);
    let offsets = s.offsets(&trigger, &[(TOPIC, 2)]);
    let mut expected = ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(200, 10)).await.unwrap());
    wait_stored(&s.pool, id, 200, &offsets, &[], WAIT).await.unwrap();
    wait_nodes_reporting(&s, id, "pipeline_started", trigger.generation, &[&node]).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;

    // Disabled: the pipeline stops; new messages are neither stored nor committed.
    let disabled = s
        .triggers
        .clone()
        .disable_trigger(DisableTriggerRequest { id: trigger.id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(disabled.enabled, Some(false));
    wait_for("pipeline_stopped reported", WAIT, || async {
        (!events(&s.pool, id, "pipeline_stopped").await.is_empty()).then_some(())
    })
    .await
    .unwrap();
    let held = ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(200, 10)).await.unwrap());
    let ends_before = end_offsets(&expected);
    assert_stays("nothing consumed while disabled", Duration::from_secs(3), || async {
        let n = stored_count(&s.pool, id).await;
        anyhow::ensure!(n == 200, "{n} messages stored");
        let committed = offsets.read().await?;
        anyhow::ensure!(committed == ends_before, "offsets committed while disabled: {committed:?}");
        Ok(())
    })
    .await;

    // Enabled again: it resumes at the committed offsets.
    let enabled =
        s.triggers.clone().enable_trigger(EnableTriggerRequest { id: trigger.id.clone() }).await.unwrap().into_inner();
    assert!(enabled.generation > disabled.generation);
    expected.extend(held);
    wait_stored(&s.pool, id, 400, &offsets, &[], WAIT).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;
    wait_nodes_reporting(&s, id, "pipeline_started", enabled.generation, &[&node]).await;

    // Deleted: the pipeline stops and the trigger's rows are gone.
    let stops_before = events(&s.pool, id, "pipeline_stopped").await.len();
    s.triggers.clone().delete_trigger(DeleteTriggerRequest { id: trigger.id.clone() }).await.unwrap();
    wait_for("pipeline_stopped after delete", WAIT, || async {
        (events(&s.pool, id, "pipeline_stopped").await.len() > stops_before).then_some(())
    })
    .await
    .unwrap();
    for table in ["triggers", "messages", "partition_checkpoints", "message_sets"] {
        let column = if table == "triggers" { "id" } else { "trigger_id" };
        let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {table} WHERE {column} = $1"))
            .bind(id)
            .fetch_one(&s.pool)
            .await
            .unwrap();
        assert_eq!(n, 0, "{table} rows of the deleted trigger");
    }
    let status = s.triggers.clone().get_trigger(GetTriggerRequest { id: trigger.id.clone() }).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::NotFound);
    produce_to(&s.brokers(), TOPIC, keyed_messages(100, 10)).await.unwrap();
    let ends = end_offsets(&expected);
    assert_stays("nothing consumed after delete", Duration::from_secs(2), || async {
        let records = ids_in(&s.pool, "message_records", id).await.len();
        // Dedup records outlive the trigger until the retention cleanup.
        anyhow::ensure!(records == 400, "{records} dedup records");
        anyhow::ensure!(stored_count(&s.pool, id).await == 0, "messages stored after delete");
        let committed = offsets.read().await?;
        anyhow::ensure!(committed == ends, "offsets committed after delete: {committed:?}");
        Ok(())
    })
    .await;
    assert!(!node.task.is_finished());
    node.stop().await.unwrap();
}

/// Standard base64 with padding (what the work-order body uses for bytes
/// that are not text).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Message `i` of the Tansu test: binary and text keys or none, binary,
/// empty or null values, binary header values with repeated names.
fn odd_message(i: usize) -> TestMessage {
    let value: Option<Vec<u8>> = match i % 5 {
        0 => None,
        1 => Some(Vec::new()),
        2 => Some(format!("{{\"n\":{i}}}").into_bytes()),
        _ => Some([&[0xff, 0x00, 0xfe][..], &(i as u64).to_le_bytes()[..], b"\xc3\x28"].concat()),
    };
    let mut m = TestMessage { payload: value, ..Default::default() }
        .header("bin", vec![0x00, 0xff, (i % 256) as u8])
        .header("dup", "first")
        .header("dup", "second")
        .header("empty", Vec::new());
    m = match i % 3 {
        0 => m.key(vec![0xff, 0x00, (i % 7) as u8]),
        1 => m.key(format!("key-{}", i % 7)),
        _ => m,
    };
    m
}

type StoredRow = (String, i32, i64, Option<Vec<u8>>, Option<Vec<u8>>, Vec<String>, Vec<Option<Vec<u8>>>);

/// DESIGN §5: an independent Kafka-protocol broker process (Tansu) and a
/// real producer. Keys, values and headers are stored byte for byte, each
/// message once; then workers turn them into webhook deliveries.
#[tokio::test]
async fn test_tansu_end_to_end_with_a_real_producer() {
    use kt_kafka_testing::tansu::Tansu;
    use kt_tests::webhook::WebhookReceiver;

    const TOPIC: &str = "tansu-e2e";
    const MESSAGES: usize = 300;
    let tansu = Tansu::start()
        .map_err(|e| e.context("failed to start the Tansu broker this test needs (binary from TANSU_BIN or PATH; scripts/test.sh installs it)"))
        .unwrap();
    tansu.create_topic(TOPIC, 3).unwrap();
    let brokers = tansu.bootstrap_servers();
    let messages: Vec<TestMessage> = (0..MESSAGES).map(odd_message).collect();
    let produced = produce_to(&brokers, TOPIC, messages.clone()).await.unwrap();
    let expected = ids(TOPIC, &produced);
    assert_eq!(expected.len(), MESSAGES);
    let by_position: BTreeMap<(i32, i64), &TestMessage> =
        produced.iter().zip(&messages).map(|(p, m)| ((p.partition, p.offset), m)).collect();

    let db = TestDb::create().await.unwrap();
    let pool = db.pool().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    // Tansu makes a joining member wait out the group's rebalance timeout.
    let tansu_timings = |c: &mut kt_data_plane::Config| {
        c.ingest.session_timeout = Duration::from_secs(6);
        c.ingest.max_poll_interval = Duration::from_secs(6);
        c.ingest.heartbeat_interval = Duration::from_millis(500);
    };
    let ingest = TestNode::start(&db, &cp.url(), |c| {
        c.workers = 0;
        tansu_timings(c);
    })
    .await;
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    let mut trigger = Trigger {
        name: "tansu".into(),
        kafka: Some(KafkaSource {
            hosts: vec![brokers.clone()],
            topics: vec![TOPIC.into()],
            initial_offset_reset_policy: "earliest".into(),
            ..Default::default()
        }),
        webhook: Some(WebhookTarget { url: receiver.url(), timeout_ms: Some(5_000), ..Default::default() }),
        ..Default::default()
    };
    trigger =
        triggers.clone().create_trigger(CreateTriggerRequest { trigger: Some(trigger) }).await.unwrap().into_inner();
    let id = trigger_uuid(&trigger);
    let offsets = CommittedOffsets::new(&brokers, group_id(&trigger), &[(TOPIC, 3)]);

    wait_stored(&pool, id, MESSAGES as i64, &offsets, &[], WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n--- tansu log ---\n{}", tansu.log()));
    assert_stored_exactly_once(&pool, id, &expected).await;
    let rows: Vec<StoredRow> = sqlx::query_as(
        "SELECT topic, partition, \"offset\", key, value, header_names, header_values FROM messages WHERE trigger_id = $1",
    )
    .bind(id)
    .fetch_all(&pool)
    .await
    .unwrap();
    for (topic, partition, offset, key, value, names, values) in rows {
        assert_eq!(topic, TOPIC);
        let m = by_position[&(partition, offset)];
        let at = format!("{partition}/{offset}");
        assert_eq!(key, m.key, "key of {at}");
        assert_eq!(value, m.payload, "value of {at}");
        let headers: Vec<(String, Option<Vec<u8>>)> = names.into_iter().zip(values).collect();
        assert_eq!(headers, m.headers, "headers of {at}");
    }
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;

    // Workers on: every stored message becomes one delivery.
    let worker = TestNode::start(&db, &cp.url(), tansu_timings).await;
    receiver.wait_for_deliveries(MESSAGES, WAIT).await.unwrap();
    let deliveries = receiver.successes();
    let delivered: BTreeSet<(i32, i64)> = deliveries.iter().map(|d| (d.partition(), d.offset())).collect();
    assert_eq!(delivered.len(), MESSAGES, "each message delivered once");
    assert_eq!(deliveries.len(), MESSAGES);
    for d in &deliveries {
        let m = by_position[&(d.partition(), d.offset())];
        let body = &d.body;
        match m.payload.as_deref() {
            None => assert!(body["data"].is_null(), "{body}"),
            Some(v) => match serde_json::from_slice::<serde_json::Value>(v) {
                Ok(json) => assert_eq!(body["data"], json, "{body}"),
                Err(_) => {
                    assert_eq!(body["encoding"], "base64", "{body}");
                    assert_eq!(body["data"], base64(v), "{body}");
                }
            },
        }
        let key = m.key.as_deref().map(|k| std::str::from_utf8(k).map_or_else(|_| base64(k), str::to_owned));
        assert_eq!(body["request"]["key"].as_str(), key.as_deref(), "{body}");
        assert_eq!(body["request"]["headers"][0], serde_json::json!(["bin", base64(&m.headers[0].1.clone().unwrap())]));
        assert_eq!(body["request"]["headers"].as_array().map(Vec::len), Some(4), "{body}");
    }
    wait_for("delivered messages deleted", WAIT, || async { (stored_count(&pool, id).await == 0).then_some(()) })
        .await
        .unwrap();
    let succeeded: i64 =
        sqlx::query_scalar("SELECT count(*) FROM work_orders WHERE trigger_id = $1 AND state = 'success'")
            .bind(id)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(succeeded, MESSAGES as i64);
    // Before the broker goes (see `Sandbox::kafka`).
    worker.stop().await.unwrap();
    ingest.stop().await.unwrap();
    drop(cp);
    drop(db);
}

/// DESIGN §3 Ingest: "If Postgres is down, consumption pauses and retries;
/// nothing is committed and nothing is dropped." The database refuses the
/// node for real (connections disallowed and the existing ones terminated)
/// while messages keep arriving; committed offsets are checked against what
/// is stored all through the outage.
#[tokio::test]
async fn test_postgres_outage_pauses_ingest_without_loss() {
    use sqlx::{Connection as _, PgConnection};

    const TOPIC: &str = "outage";
    // This binary's only metrics recorder: the retries must be counted.
    let metrics_addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    kt_common::telemetry::install_metrics(metrics_addr).unwrap();
    let s = sandbox(&[(TOPIC, 4)]).await;
    let node = s
        .ingest_node(|c| {
            c.ingest.persist.retry_backoff =
                kt_common::backoff::Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        })
        .await;
    let trigger = s.create_trigger("outage", &[TOPIC]).await;
    let id = trigger_uuid(&trigger);
    let offsets = s.offsets(&trigger, &[(TOPIC, 4)]);
    let mut expected = ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(2_000, 100)).await.unwrap());
    wait_stored(&s.pool, id, 2_000, &offsets, &[], WAIT).await.unwrap();

    // The outage. One connection of the test stays to look inside.
    let mut probe = PgConnection::connect(&s.db.url).await.unwrap();
    let probe_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()").fetch_one(&mut probe).await.unwrap();
    let mut admin = PgConnection::connect(&kt_tests::admin_database_url()).await.unwrap();
    sqlx::query(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS false", s.db.name)).execute(&mut admin).await.unwrap();
    let others = "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND pid <> $2";
    // Terminating is asynchronous: repeat until no other backend is left.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND pid <> $2")
            .bind(&s.db.name)
            .bind(probe_pid)
            .execute(&mut admin)
            .await
            .unwrap();
        let n: i64 = sqlx::query_scalar(others).bind(&s.db.name).bind(probe_pid).fetch_one(&mut admin).await.unwrap();
        if n == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{n} connections survive pg_terminate_backend");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let frozen: i64 = sqlx::query_scalar("SELECT count(*) FROM message_records WHERE trigger_id = $1")
        .bind(id)
        .fetch_one(&mut probe)
        .await
        .unwrap();
    expected.extend(ids(TOPIC, &produce_to(&s.brokers(), TOPIC, keyed_messages(3_000, 100)).await.unwrap()));
    let mut checks = 0;
    let window = tokio::time::Instant::now() + Duration::from_secs(4);
    while tokio::time::Instant::now() < window {
        // Committed never runs ahead of what the database has.
        offsets.assert_all_stored(&mut probe, id).await;
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM message_records WHERE trigger_id = $1")
            .bind(id)
            .fetch_one(&mut probe)
            .await
            .unwrap();
        assert_eq!(stored, frozen, "the database must really refuse the node");
        let n: i64 = sqlx::query_scalar(others).bind(&s.db.name).bind(probe_pid).fetch_one(&mut admin).await.unwrap();
        assert_eq!(n, 0, "no other connection gets in during the outage");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(checks > 5);
    assert!(!node.task.is_finished(), "the node rides out the outage");

    // Back: the node stores everything, once.
    sqlx::query(&format!("ALTER DATABASE {} ALLOW_CONNECTIONS true", s.db.name)).execute(&mut admin).await.unwrap();
    drop(probe);
    wait_stored(&s.pool, id, expected.len() as i64, &offsets, &[], Duration::from_secs(60)).await.unwrap();
    assert_stored_exactly_once(&s.pool, id, &expected).await;
    offsets.wait_committed(&end_offsets(&expected), WAIT).await;
    offsets.assert_all_stored(&s.pool, id).await;
    assert!(!node.task.is_finished());
    let scraped = tokio::process::Command::new("curl")
        .args(["-s", &format!("http://{metrics_addr}/metrics")])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&scraped.stdout);
    let retries: f64 = text
        .lines()
        .find(|l| l.starts_with("kt_ingest_db_retries_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("kt_ingest_db_retries_total missing:\n{text}"));
    assert!(retries >= 1.0, "the outage's retries are counted");
    node.stop().await.unwrap();
}
