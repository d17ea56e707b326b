//! Ingest persistence against a real Postgres: batch writes, dedup,
//! byte-exact storage, isolation of rows the database rejects, checkpoints,
//! retries through an outage, and the retention cleanup.

mod support;

use std::time::Duration;

use chrono::{DateTime, Utc};
use kt_common::backoff::Backoff;
use kt_data_plane::store::{
    cleanup_dedup_records, load_checkpoints, persist_batch, write_batch, BatchOutcome, Header, IngestMessage,
    PersistSettings, CLEANUP_CHUNK_ROWS,
};
use support::{count, insert_trigger, TestDb};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn message(partition: i32, offset: i64, value: &[u8]) -> IngestMessage {
    IngestMessage {
        topic: "orders".into(),
        partition,
        offset,
        key: Some(format!("k{}", offset % 3).into_bytes()),
        value: Some(value.to_vec()),
        headers: Some(vec![Header { name: "h".into(), value: Some(b"v".to_vec()) }]),
        timestamp: DateTime::from_timestamp_millis(1_700_000_000_000 + offset),
        filtered: false,
    }
}

async fn store(db: &TestDb, trigger_id: Uuid, batch: &[IngestMessage]) -> BatchOutcome {
    let mut tx = db.pool.begin().await.unwrap();
    let outcome = write_batch(&mut tx, trigger_id, batch).await.unwrap();
    tx.commit().await.unwrap();
    outcome
}

async fn setup() -> (TestDb, Uuid) {
    let db = TestDb::new().await;
    let trigger_id = Uuid::now_v7();
    insert_trigger(&db.pool, trigger_id, "g").await;
    (db, trigger_id)
}

fn quick_retry() -> PersistSettings {
    PersistSettings { retry_backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(200)) }
}

#[tokio::test]
async fn test_batch_is_stored_once_and_redelivery_counts_duplicates() {
    let (db, trigger_id) = setup().await;
    let batch: Vec<_> = (0..50).map(|o| message(o as i32 % 2, o, b"{}")).collect();
    let first = store(&db, trigger_id, &batch).await;
    assert_eq!(first, BatchOutcome { stored: 50, duplicates: 0, failed: 0, filtered: 0 });

    // The same offsets again (a redelivery after a crash before the commit),
    // plus new ones and a repeat inside the batch.
    let mut again: Vec<_> = (25..75).map(|o| message(o as i32 % 2, o, b"{}")).collect();
    again.push(message(1, 73, b"{}"));
    let second = store(&db, trigger_id, &again).await;
    assert_eq!(second, BatchOutcome { stored: 25, duplicates: 26, failed: 0, filtered: 0 });

    assert_eq!(count(&db.pool, "SELECT count(*) FROM messages WHERE trigger_id = $1", trigger_id).await, 75);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM message_records WHERE trigger_id = $1", trigger_id).await, 75);

    // A message deleted after its work order succeeded stays deduplicated.
    sqlx::query(r#"DELETE FROM messages WHERE trigger_id = $1 AND "offset" < 10"#)
        .bind(trigger_id)
        .execute(&db.pool)
        .await
        .unwrap();
    let third = store(&db, trigger_id, &batch[..10]).await;
    assert_eq!(third, BatchOutcome { stored: 0, duplicates: 10, failed: 0, filtered: 0 });
    db.drop().await;
}

#[tokio::test]
async fn test_filtered_messages_keep_only_dedup_records_and_are_counted_once_per_partition() {
    let (db, trigger_id) = setup().await;
    let filtered = |partition: i32, offset: i64| IngestMessage { filtered: true, ..message(partition, offset, b"{}") };
    let batch = vec![message(0, 0, b"{}"), filtered(0, 1), filtered(1, 2), filtered(1, 3), message(1, 4, b"{}")];
    let first = store(&db, trigger_id, &batch).await;
    assert_eq!(first, BatchOutcome { stored: 2, duplicates: 0, failed: 0, filtered: 3 });
    assert_eq!(count(&db.pool, "SELECT count(*) FROM messages WHERE trigger_id = $1", trigger_id).await, 2);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM message_records WHERE trigger_id = $1", trigger_id).await, 5);

    // Redelivered: duplicates, not counted again.
    let again = store(&db, trigger_id, &batch).await;
    assert_eq!(again, BatchOutcome { stored: 0, duplicates: 5, failed: 0, filtered: 0 });
    let counts: Vec<(i32, i64, i64)> = sqlx::query_as(
        "SELECT partition, last_offset, filtered FROM partition_checkpoints WHERE trigger_id = $1 ORDER BY partition",
    )
    .bind(trigger_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(counts, [(0, 1, 1), (1, 4, 2)]);
    db.drop().await;
}

#[tokio::test]
async fn test_binary_keys_values_and_headers_are_kept_byte_for_byte() {
    let (db, trigger_id) = setup().await;
    let all_bytes: Vec<u8> = (0..=255u8).collect();
    let not_utf8_key = vec![0xff, 0xfe, 0x00, 0x80];
    let batch = vec![
        IngestMessage {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            key: None,
            value: Some(all_bytes.clone()),
            headers: Some(vec![
                Header { name: "bin".into(), value: Some(vec![0, 159, 146, 150]) },
                Header { name: "null".into(), value: None },
                Header { name: "bin".into(), value: Some(vec![]) },
            ]),
            timestamp: None,
            filtered: false,
        },
        IngestMessage {
            topic: "t".into(),
            partition: 0,
            offset: 1,
            key: Some(not_utf8_key.clone()),
            value: None,
            headers: Some(vec![]),
            timestamp: DateTime::from_timestamp_millis(1_700_000_000_123),
            filtered: false,
        },
    ];
    assert_eq!(store(&db, trigger_id, &batch).await.stored, 2);

    type Row = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<String>, Vec<Option<Vec<u8>>>, Option<DateTime<Utc>>);
    let rows: Vec<Row> = sqlx::query_as(
        r#"SELECT key, value, header_names, header_values, ts FROM messages WHERE trigger_id = $1 ORDER BY "offset""#,
    )
    .bind(trigger_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows[0].0, None);
    assert_eq!(rows[0].1.as_deref(), Some(all_bytes.as_slice()));
    assert_eq!(rows[0].2, ["bin", "null", "bin"]);
    assert_eq!(rows[0].3, [Some(vec![0, 159, 146, 150]), None, Some(vec![])]);
    assert_eq!(rows[0].4, None);
    assert_eq!(rows[1].0.as_deref(), Some(not_utf8_key.as_slice()));
    assert_eq!(rows[1].1, None);
    assert!(rows[1].2.is_empty() && rows[1].3.is_empty());
    assert_eq!(rows[1].4, DateTime::from_timestamp_millis(1_700_000_000_123));
    db.drop().await;
}

#[tokio::test]
async fn test_a_rejected_message_is_recorded_and_the_others_stored() {
    let (db, trigger_id) = setup().await;
    // Stands in for any row-level rejection by the database.
    sqlx::query("ALTER TABLE messages ADD CONSTRAINT no_poison CHECK (value IS DISTINCT FROM 'poison'::bytea)")
        .execute(&db.pool)
        .await
        .unwrap();
    let mut batch: Vec<_> = (0..20).map(|o| message(0, o, b"ok")).collect();
    batch[7].value = Some(b"poison".to_vec());
    let cancel = CancellationToken::new();
    let outcome = persist_batch(&db.pool, trigger_id, &batch, &quick_retry(), &cancel, |_| {}).await.unwrap();
    assert_eq!(outcome, BatchOutcome { stored: 19, duplicates: 0, failed: 1, filtered: 0 });

    let failures: Vec<(i64, Option<Vec<u8>>, String)> =
        sqlx::query_as(r#"SELECT "offset", value, error FROM ingest_failures WHERE trigger_id = $1"#)
            .bind(trigger_id)
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(failures.len(), 1);
    assert_eq!(failures[0].0, 7);
    assert_eq!(failures[0].1.as_deref(), Some(&b"poison"[..]));
    assert!(failures[0].2.contains("23514"), "error names the SQLSTATE: {}", failures[0].2);

    // Redelivered: a duplicate, not a second failure.
    let again = persist_batch(&db.pool, trigger_id, &batch, &quick_retry(), &cancel, |_| {}).await.unwrap();
    assert_eq!(again, BatchOutcome { stored: 0, duplicates: 20, failed: 0, filtered: 0 });
    assert_eq!(count(&db.pool, "SELECT count(*) FROM ingest_failures WHERE trigger_id = $1", trigger_id).await, 1);
    // Checkpoints cover the failed message too: it was seen.
    let last: i64 = sqlx::query_scalar("SELECT last_offset FROM partition_checkpoints WHERE trigger_id = $1")
        .bind(trigger_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(last, 19);
    db.drop().await;
}

#[tokio::test]
async fn test_unreadable_headers_are_recorded_as_failures() {
    let (db, trigger_id) = setup().await;
    let mut batch: Vec<_> = (0..3).map(|o| message(0, o, b"ok")).collect();
    batch[1].headers = None;
    let outcome = store(&db, trigger_id, &batch).await;
    assert_eq!(outcome, BatchOutcome { stored: 2, duplicates: 0, failed: 1, filtered: 0 });
    let error: String = sqlx::query_scalar("SELECT error FROM ingest_failures WHERE trigger_id = $1")
        .bind(trigger_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(error.contains("headers"), "{error}");
    db.drop().await;
}

#[tokio::test]
async fn test_checkpoints_only_move_forward() {
    let (db, trigger_id) = setup().await;
    assert!(load_checkpoints(&db.pool, trigger_id).await.unwrap().is_empty());
    store(&db, trigger_id, &[message(0, 10, b"x"), message(1, 4, b"x")]).await;
    // A late, older batch (e.g. replayed) must not move them back.
    store(&db, trigger_id, &[message(0, 3, b"x")]).await;
    let rows: Vec<(i32, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT partition, last_offset, last_ts FROM partition_checkpoints WHERE trigger_id = $1 ORDER BY partition",
    )
    .bind(trigger_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(rows[0].1, 10);
    assert_eq!(rows[0].2, DateTime::from_timestamp_millis(1_700_000_000_010));
    assert_eq!(rows[1].1, 4);
    let loaded = load_checkpoints(&db.pool, trigger_id).await.unwrap();
    let got: Vec<_> = loaded.iter().map(|c| (c.partition, c.last_offset)).collect();
    assert_eq!(got, [(0, 10), (1, 4)]);
    db.drop().await;
}

#[tokio::test]
async fn test_persist_retries_through_a_database_outage() {
    let (db, trigger_id) = setup().await;
    let batch: Vec<_> = (0..10).map(|o| message(0, o, b"x")).collect();
    db.cut().await;
    let cancel = CancellationToken::new();
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel(64);
    let pool = db.pool.clone();
    let writer = tokio::spawn(async move {
        persist_batch(&pool, trigger_id, &batch, &quick_retry(), &CancellationToken::new(), move |e| {
            let _ = failed_tx.try_send(e.to_string());
        })
        .await
    });
    // It keeps failing (and retrying) while the database is gone...
    for _ in 0..3 {
        let error = tokio::time::timeout(Duration::from_secs(10), failed_rx.recv()).await.unwrap().unwrap();
        assert!(error.contains(&trigger_id.to_string()), "{error}");
    }
    assert!(!writer.is_finished());
    // ...and stores the batch once it is back.
    db.restore().await;
    let outcome = tokio::time::timeout(Duration::from_secs(20), writer).await.unwrap().unwrap().unwrap();
    assert_eq!(outcome.stored, 10);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM messages WHERE trigger_id = $1", trigger_id).await, 10);
    cancel.cancel();
    db.drop().await;
}

#[tokio::test]
async fn test_persist_gives_up_only_when_cancelled() {
    let (db, trigger_id) = setup().await;
    db.cut().await;
    let cancel = CancellationToken::new();
    let pool = db.pool.clone();
    let c = cancel.clone();
    let writer = tokio::spawn(async move {
        persist_batch(&pool, trigger_id, &[message(0, 0, b"x")], &quick_retry(), &c, |_| {}).await
    });
    cancel.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), writer).await.unwrap().unwrap();
    assert!(matches!(result, Err(kt_data_plane::store::PersistError::Cancelled { .. })), "{result:?}");
    db.restore().await;
    assert_eq!(count(&db.pool, "SELECT count(*) FROM messages WHERE trigger_id = $1", trigger_id).await, 0);
    db.drop().await;
}

#[tokio::test]
async fn test_dedup_cleanup_deletes_expired_records_in_chunks() {
    let (db, trigger_id) = setup().await;
    let n = CLEANUP_CHUNK_ROWS * 2 + 10;
    let batch: Vec<_> = (0..n).map(|o| message(0, o, b"x")).collect();
    for chunk in batch.chunks(2_000) {
        store(&db, trigger_id, chunk).await;
    }
    // Work orders succeeded for all but the first 5 messages: they are gone.
    sqlx::query(r#"DELETE FROM messages WHERE trigger_id = $1 AND "offset" >= 5"#)
        .bind(trigger_id)
        .execute(&db.pool)
        .await
        .unwrap();
    // Age all but the last 100 records past the retention.
    sqlx::query(
        r#"UPDATE message_records SET created_at = now() - interval '2 days' WHERE trigger_id = $1 AND "offset" < $2"#,
    )
    .bind(trigger_id)
    .bind(n - 100)
    .execute(&db.pool)
    .await
    .unwrap();

    let deleted = cleanup_dedup_records(&db.pool, Duration::from_secs(86_400)).await.unwrap();
    // Expired and without a stored message: everything except the 5 live
    // messages and the 100 recent records.
    assert_eq!(deleted as i64, n - 100 - 5);
    let left: Vec<i64> = sqlx::query_scalar(
        r#"SELECT "offset" FROM message_records WHERE trigger_id = $1 AND "offset" < 10 ORDER BY 1"#,
    )
    .bind(trigger_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(left, [0, 1, 2, 3, 4]);
    assert_eq!(count(&db.pool, "SELECT count(*) FROM message_records WHERE trigger_id = $1", trigger_id).await, 105);
    assert_eq!(cleanup_dedup_records(&db.pool, Duration::from_secs(86_400)).await.unwrap(), 0);
    db.drop().await;
}

#[tokio::test]
async fn test_a_key_too_large_for_the_set_index_is_recorded_not_retried_forever() {
    let (db, trigger_id) = setup().await;
    // Incompressible and larger than a btree entry may be (SQLSTATE 54000).
    let huge_key: Vec<u8> = (0..10_000).map(|_| rand::random::<u8>()).collect();
    let mut batch: Vec<_> = (0..5).map(|o| message(0, o, b"ok")).collect();
    batch[2].key = Some(huge_key.clone());
    let cancel = CancellationToken::new();
    let outcome = persist_batch(&db.pool, trigger_id, &batch, &quick_retry(), &cancel, |_| {}).await.unwrap();
    assert_eq!(outcome, BatchOutcome { stored: 4, duplicates: 0, failed: 1, filtered: 0 });
    let (key, error): (Option<Vec<u8>>, String) =
        sqlx::query_as("SELECT key, error FROM ingest_failures WHERE trigger_id = $1")
            .bind(trigger_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(key, Some(huge_key), "the failure keeps the key byte for byte");
    assert!(error.contains("54000"), "{error}");
    db.drop().await;
}

/// The candidate-set side of a batch: a new key creates a ready set and is
/// announced; more messages for a ready, unclaimed set leave its row alone
/// and are not announced (its head precedes them); a claimed set has its
/// `ingest_seq` bumped so the worker draining it cannot go idle past them;
/// an idle set wakes up and is announced again.
#[tokio::test]
async fn test_batches_touch_a_set_only_to_wake_it_or_warn_its_worker() {
    let (db, trigger_id) = setup().await;
    let marker = Uuid::now_v7();
    insert_trigger(&db.pool, marker, "marker").await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool).await.unwrap();
    listener.listen(kt_data_plane::store::SETS_NOTIFY_CHANNEL).await.unwrap();
    let keyed = |offset: i64| IngestMessage { key: Some(b"user-1".to_vec()), ..message(0, offset, b"{}") };
    let set = || async {
        sqlx::query_as::<_, (String, bool, i64, chrono::DateTime<Utc>)>(
            "SELECT state, lock_id IS NOT NULL, ingest_seq, updated_at FROM message_sets WHERE trigger_id = $1",
        )
        .bind(trigger_id)
        .fetch_one(&db.pool)
        .await
        .unwrap()
    };
    // The next announcement must be `expected`: announcements of the
    // trigger in between would arrive first.
    let mut next_announced = async |expected: Uuid| {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv()).await.expect("a notification").unwrap();
        assert_eq!(n.payload(), expected.to_string(), "unexpected announcement");
    };
    let mut offset = 0;
    let mut marker_offset = 0;
    let mut store_marker = async || {
        marker_offset += 1;
        store(
            &db,
            marker,
            &[IngestMessage {
                key: Some(format!("m{marker_offset}").into_bytes()),
                ..message(0, marker_offset, b"{}")
            }],
        )
        .await;
    };

    // What the control plane and the workers do to the set.
    let update_set = async |change: &str| {
        let sql = format!("UPDATE message_sets {change} WHERE trigger_id = $1");
        sqlx::query(&sql).bind(trigger_id).execute(&db.pool).await.unwrap();
    };

    store(&db, trigger_id, &[keyed(offset)]).await;
    next_announced(trigger_id).await;
    let (state, claimed, seq, created) = set().await;
    assert_eq!((state.as_str(), claimed, seq), ("ready", false, 0));

    // Still waiting for a grant; more messages arrive: nothing to say.
    offset += 1;
    store(&db, trigger_id, &[keyed(offset)]).await;
    assert_eq!(set().await, ("ready".to_owned(), false, 0, created), "a ready set is not rewritten");
    store_marker().await;
    next_announced(marker).await;

    // A worker claims it: the next batch tells it more arrived, silently.
    update_set("SET lock_id = gen_random_uuid(), lock_expires = now() + interval '1 minute'").await;
    offset += 1;
    store(&db, trigger_id, &[keyed(offset)]).await;
    let (state, _, seq, _) = set().await;
    assert_eq!((state.as_str(), seq), ("ready", 1), "a claimed set's ingest_seq is bumped");
    store_marker().await;
    next_announced(marker).await;

    // The worker drained it and marked it idle; a new message wakes it.
    update_set("SET state = 'idle', lock_id = NULL, lock_expires = NULL").await;
    offset += 1;
    store(&db, trigger_id, &[keyed(offset)]).await;
    let (state, claimed, seq, _) = set().await;
    assert_eq!((state.as_str(), claimed, seq), ("ready", false, 2));
    next_announced(trigger_id).await;
    drop(listener);
    db.drop().await;
}
