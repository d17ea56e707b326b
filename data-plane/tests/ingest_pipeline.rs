//! A pipeline end to end against the in-process Kafka mock cluster and a
//! real Postgres: everything stored once, offsets committed after storage,
//! payloads kept byte for byte, poison messages recorded, the rate limit,
//! and where a group without committed offsets starts.

mod support;

use std::time::{Duration, Instant};

use support::*;
use uuid::Uuid;

const T: Duration = Duration::from_secs(60);

struct Fixture {
    cluster: Cluster,
    bootstrap: String,
    db: TestDb,
    trigger_id: Uuid,
}

async fn fixture(topic: &str, partitions: i32) -> Fixture {
    let cluster = cluster(1);
    create_topic(&cluster, topic, partitions);
    let bootstrap = cluster.bootstrap_servers();
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g1").await;
    Fixture { cluster, bootstrap, db, trigger_id }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_pipeline_stores_every_message_once_and_commits_after_storage() {
    let f = fixture("orders", 3).await;
    produce(&f.bootstrap, "orders", &keyed_records(300, 3, "a")).await;
    let trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());

    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 300, T).await;
    wait_committed(&f.bootstrap, "g1", "orders", 3, T).await;
    // More while it runs.
    produce(&f.bootstrap, "orders", &keyed_records(90, 3, "b")).await;
    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 390, T).await;
    wait_committed(&f.bootstrap, "g1", "orders", 3, T).await;

    let report = p.report().unwrap();
    assert_eq!(report.state(), kt_proto::internal::PipelineState::Running);
    p.stop().await;
    let hwm = high_watermarks(&f.bootstrap, "orders", 3).await;
    assert_contiguous(&stored_offsets(&f.db.pool, f.trigger_id).await, "orders", &hwm);
    assert_eq!(count(&f.db.pool, FAILURES, f.trigger_id).await, 0);
    drop(f.cluster);
    f.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_redelivered_messages_are_counted_as_duplicates_not_stored_twice() {
    let f = fixture("orders", 2).await;
    produce(&f.bootstrap, "orders", &keyed_records(100, 2, "a")).await;
    let trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 100, T).await;
    wait_committed(&f.bootstrap, "g1", "orders", 2, T).await;
    p.stop().await;

    // A group that lost everything and a trigger without checkpoints: the
    // initial policy (earliest) replays the whole topic.
    sqlx::query("DELETE FROM partition_checkpoints WHERE trigger_id = $1")
        .bind(f.trigger_id)
        .execute(&f.db.pool)
        .await
        .unwrap();
    let replay = trigger_proto(f.trigger_id, 2, &f.bootstrap, &["orders"], "g2");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&replay), fast_settings_arc());
    // g2 committing everything proves it read everything again...
    wait_committed(&f.bootstrap, "g2", "orders", 2, T).await;
    p.stop().await;
    // ...and nothing was stored twice.
    assert_eq!(count(&f.db.pool, MESSAGES, f.trigger_id).await, 100);
    let hwm = high_watermarks(&f.bootstrap, "orders", 2).await;
    assert_contiguous(&stored_offsets(&f.db.pool, f.trigger_id).await, "orders", &hwm);
    drop(f.cluster);
    f.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_binary_payloads_and_headers_arrive_byte_for_byte() {
    let f = fixture("bin", 1).await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let records = vec![
        Record {
            partition: 0,
            key: None,
            value: Some(all_bytes.clone()),
            headers: vec![("trace".into(), Some(vec![0xde, 0xad, 0x00, 0xbe])), ("empty".into(), None)],
        },
        Record { partition: 0, key: Some(vec![0xff, 0x00, 0xc3]), value: None, headers: vec![] },
        Record { partition: 0, key: Some(b"k".to_vec()), value: Some(b"not json {".to_vec()), headers: vec![] },
    ];
    produce(&f.bootstrap, "bin", &records).await;
    let trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["bin"], "g1");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 3, T).await;
    p.stop().await;

    type Row = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<String>, Vec<Option<Vec<u8>>>, bool);
    let rows: Vec<Row> = sqlx::query_as(
        r#"SELECT key, value, header_names, header_values, ts IS NOT NULL
           FROM messages WHERE trigger_id = $1 ORDER BY "offset""#,
    )
    .bind(f.trigger_id)
    .fetch_all(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(rows[0].0, None);
    assert_eq!(rows[0].1.as_deref(), Some(all_bytes.as_slice()));
    assert_eq!(rows[0].2, ["trace", "empty"]);
    assert_eq!(rows[0].3, [Some(vec![0xde, 0xad, 0x00, 0xbe]), None]);
    assert!(rows[0].4, "the Kafka timestamp is kept");
    assert_eq!(rows[1].0.as_deref(), Some(&[0xff, 0x00, 0xc3][..]));
    assert_eq!(rows[1].1, None);
    assert_eq!(rows[2].1.as_deref(), Some(&b"not json {"[..]));
    drop(f.cluster);
    f.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_poison_message_is_recorded_and_does_not_block_the_partition() {
    let f = fixture("orders", 1).await;
    sqlx::query("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (value IS DISTINCT FROM 'poison'::bytea)")
        .execute(&f.db.pool)
        .await
        .unwrap();
    let mut records = keyed_records(30, 1, "a");
    records[12].value = Some(b"poison".to_vec());
    produce(&f.bootstrap, "orders", &records).await;
    let trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());

    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 29, T).await;
    wait_count(&f.db.pool, FAILURES, f.trigger_id, 1, T).await;
    // Committed past the poison message: it is recorded, not lost.
    wait_committed(&f.bootstrap, "g1", "orders", 1, T).await;
    p.stop().await;
    let offset: i64 = sqlx::query_scalar(r#"SELECT "offset" FROM ingest_failures WHERE trigger_id = $1"#)
        .bind(f.trigger_id)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
    assert_eq!(offset, 12);
    drop(f.cluster);
    f.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_rate_limit_paces_ingest_without_dropping() {
    let f = fixture("orders", 2).await;
    produce(&f.bootstrap, "orders", &keyed_records(100, 2, "a")).await;
    let mut trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["orders"], "g1");
    trigger.tuning = Some(kt_proto::v1::Tuning { rate_limit_per_second: 40, ..Default::default() });
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());
    p.wait_assigned(T).await;
    let started = Instant::now();
    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 100, T).await;
    // 40 at once, then 40/s: the other 60 need 1.5 s.
    assert!(started.elapsed() >= Duration::from_millis(1200), "too fast: {:?}", started.elapsed());
    wait_committed(&f.bootstrap, "g1", "orders", 2, T).await;
    p.stop().await;
    drop(f.cluster);
    f.db.drop().await;
}

/// Produces one message at a time until one of them is stored: proves the
/// pipeline consumes, whatever position it started from.
async fn produce_until_stored(f: &Fixture, topic: &str) {
    let deadline = Instant::now() + T;
    for i in 0.. {
        assert!(Instant::now() < deadline, "no new message was stored");
        produce(&f.bootstrap, topic, &[Record::keyed(0, "late", &format!("after-{i}"))]).await;
        let stored = wait_for_some_after(f).await;
        if stored {
            return;
        }
    }
}

async fn wait_for_some_after(f: &Fixture) -> bool {
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM messages WHERE trigger_id = $1 AND convert_from(value, 'UTF8') LIKE 'after-%'",
        )
        .bind(f.trigger_id)
        .fetch_one(&f.db.pool)
        .await
        .unwrap();
        if n > 0 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_timestamp_policy_starts_at_the_first_message_after_it() {
    let f = fixture("orders", 1).await;
    produce(&f.bootstrap, "orders", &keyed_records(20, 1, "before")).await;
    let mut trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["orders"], "g1");
    // A 13-digit timestamp after every message produced so far.
    let future_ms = chrono::Utc::now().timestamp_millis() + 3_600_000;
    trigger.kafka.as_mut().unwrap().initial_offset_reset_policy = future_ms.to_string();
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());
    p.wait_assigned(T).await;
    produce_until_stored(&f, "orders").await;
    let before: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE trigger_id = $1 AND convert_from(value, 'UTF8') LIKE 'before-%'",
    )
    .bind(f.trigger_id)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    assert_eq!(before, 0, "messages older than the timestamp are skipped");
    p.stop().await;
    drop(f.cluster);
    f.db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_group_without_offsets_resumes_from_partition_checkpoints() {
    let f = fixture("orders", 1).await;
    produce(&f.bootstrap, "orders", &keyed_records(40, 1, "before")).await;
    let trigger = trigger_proto(f.trigger_id, 1, &f.bootstrap, &["orders"], "g1");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&trigger), fast_settings_arc());
    wait_count(&f.db.pool, MESSAGES, f.trigger_id, 40, T).await;
    p.stop().await;
    // Everything was processed and its dedup records expired; only the
    // checkpoints remember how far the trigger got.
    for table in ["messages", "message_records"] {
        sqlx::query(&format!("DELETE FROM {table} WHERE trigger_id = $1"))
            .bind(f.trigger_id)
            .execute(&f.db.pool)
            .await
            .unwrap();
    }
    // The group's offsets are gone too (a new group id stands in for the
    // broker's offset retention). The initial policy says "earliest", which
    // would replay all 40 messages.
    let again = trigger_proto(f.trigger_id, 2, &f.bootstrap, &["orders"], "g2");
    let p = RunningPipeline::start(&f.db.pool, pipeline_def(&again), fast_settings_arc());
    p.wait_assigned(T).await;
    // Nothing new to read, yet the resume position is committed: the group
    // does not report lag it does not have, and the next owner of the
    // partition starts from a committed offset.
    wait_committed(&f.bootstrap, "g2", "orders", 1, T).await;
    produce_until_stored(&f, "orders").await;
    let replayed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM messages WHERE trigger_id = $1 AND convert_from(value, 'UTF8') LIKE 'before-%'",
    )
    .bind(f.trigger_id)
    .fetch_one(&f.db.pool)
    .await
    .unwrap();
    // It resumed right after the checkpoint: nothing before it again.
    assert_eq!(replayed, 0, "replayed {replayed} messages from before the checkpoint");
    p.stop().await;
    drop(f.cluster);
    f.db.drop().await;
}
