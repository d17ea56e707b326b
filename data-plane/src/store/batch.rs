//! The SQL of ingest: one set-based statement stores a whole batch (dedup
//! records first, then only the new messages), one upsert moves the partition
//! checkpoints forward (and counts the messages the trigger's filter did not
//! match, which keep only their dedup records), and a row-by-row variant
//! isolates rows the database rejects so they can be recorded as ingest
//! failures.

use std::collections::{BTreeMap, HashSet};

use chrono::{DateTime, Utc};
use kt_common::dispatch::announce::{
    lock_ordering_shared, KEYED_SET_UPSERT, ORDERING_OF_TRIGGER, PARTITION_SET_UPSERT, UNKEYED_SET_INSERT,
};
use kt_common::dispatch::SETS_CHANNEL;
use sqlx::{Acquire, Executor, PgConnection, Postgres, Transaction};
use uuid::Uuid;

use super::{write_error_kind, BatchOutcome, IngestMessage, WriteErrorKind};

/// The last offset and timestamp seen in one partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub topic: String,
    pub partition: i32,
    pub last_offset: i64,
    pub last_ts: Option<DateTime<Utc>>,
    /// Messages of this write the filter did not match, first seen now:
    /// added to the partition's count.
    pub filtered: i64,
}

/// Stores `batch` inside `tx`: dedup records and messages for the messages
/// not seen before, then the partition checkpoints. Fails as a whole (the
/// caller rolls back) when the database rejects any row; see
/// [`write_rows_isolated`] for the fallback.
pub async fn write_batch(
    tx: &mut Transaction<'_, Postgres>,
    trigger_id: Uuid,
    batch: &[IngestMessage],
) -> Result<BatchOutcome, sqlx::Error> {
    let (rows, repeated) = unique_sorted(batch);
    let mut outcome = BatchOutcome { duplicates: repeated, ..Default::default() };
    let (filtered, rows): (Vec<&IngestMessage>, Vec<&IngestMessage>) = rows.into_iter().partition(|m| m.filtered);
    let checkpoints = record_filtered(tx, trigger_id, batch, &filtered, &mut outcome).await?;
    let (readable, unreadable): (Vec<&IngestMessage>, Vec<&IngestMessage>) =
        rows.into_iter().partition(|m| m.headers.is_some());
    if !readable.is_empty() {
        // Before the mode is read: a change of ordering waits for us.
        lock_ordering_shared(tx, trigger_id).await?;
    }
    let (fresh, stored) = insert_new_messages(tx, trigger_id, &readable).await?;
    outcome.stored += stored;
    outcome.duplicates += readable.len() as u64 - stored;
    debug_assert!(fresh >= stored);
    for message in unreadable {
        tracing::error!(
            %trigger_id,
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            error = UNREADABLE_HEADERS,
            "message cannot be stored; recording it as an ingest failure"
        );
        if record_failure(&mut **tx, trigger_id, message, UNREADABLE_HEADERS).await? {
            outcome.failed += 1;
        } else {
            outcome.duplicates += 1;
        }
    }
    upsert_checkpoints(&mut **tx, trigger_id, &checkpoints).await?;
    Ok(outcome)
}

const UNREADABLE_HEADERS: &str = "the message headers could not be read (a header name is not valid UTF-8)";

/// Like [`write_batch`], but each message in its own savepoint: a message the
/// database rejects is rolled back alone and recorded in `ingest_failures`
/// (once: its dedup record is written with it). Errors that are not about a
/// row (connection lost, permissions...) still fail the whole call.
pub async fn write_rows_isolated(
    tx: &mut Transaction<'_, Postgres>,
    trigger_id: Uuid,
    batch: &[IngestMessage],
) -> Result<BatchOutcome, sqlx::Error> {
    let (rows, repeated) = unique_sorted(batch);
    let mut outcome = BatchOutcome { duplicates: repeated, ..Default::default() };
    let (filtered, rows): (Vec<&IngestMessage>, Vec<&IngestMessage>) = rows.into_iter().partition(|m| m.filtered);
    let checkpoints = record_filtered(tx, trigger_id, batch, &filtered, &mut outcome).await?;
    if rows.iter().any(|m| m.headers.is_some()) {
        lock_ordering_shared(tx, trigger_id).await?;
    }
    for message in rows {
        let error = match &message.headers {
            None => UNREADABLE_HEADERS.to_owned(),
            Some(_) => {
                let mut savepoint = tx.begin().await?;
                match insert_new_messages(&mut savepoint, trigger_id, &[message]).await {
                    Ok((_, stored)) => {
                        savepoint.commit().await?;
                        outcome.stored += stored;
                        outcome.duplicates += 1 - stored;
                        continue;
                    }
                    Err(e) if write_error_kind(&e) == WriteErrorKind::BadRow => {
                        savepoint.rollback().await?;
                        describe_db_error(&e)
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        // Error level: reported to Sentry (when configured) with these ids.
        tracing::error!(
            %trigger_id,
            topic = %message.topic,
            partition = message.partition,
            offset = message.offset,
            error = %error,
            "message cannot be stored; recording it as an ingest failure"
        );
        if record_failure(&mut **tx, trigger_id, message, &error).await? {
            outcome.failed += 1;
        } else {
            outcome.duplicates += 1;
        }
    }
    upsert_checkpoints(&mut **tx, trigger_id, &checkpoints).await?;
    Ok(outcome)
}

/// Writes the dedup records of the `filtered` messages of `batch` (no
/// message: they get no work order), counts in `outcome` those seen for the
/// first time, and returns the checkpoints of `batch` carrying those counts
/// per partition. Without filtered messages it costs no statement.
async fn record_filtered(
    tx: &mut Transaction<'_, Postgres>,
    trigger_id: Uuid,
    batch: &[IngestMessage],
    filtered: &[&IngestMessage],
    outcome: &mut BatchOutcome,
) -> Result<Vec<Checkpoint>, sqlx::Error> {
    let mut checkpoints = checkpoints_of(batch);
    if filtered.is_empty() {
        return Ok(checkpoints);
    }
    let topics: Vec<&str> = filtered.iter().map(|m| m.topic.as_str()).collect();
    let partitions: Vec<i32> = filtered.iter().map(|m| m.partition).collect();
    let offsets: Vec<i64> = filtered.iter().map(|m| m.offset).collect();
    let fresh: Vec<(String, i32, i64)> = sqlx::query_as(
        r#"
        WITH fresh AS (
            INSERT INTO message_records (trigger_id, topic, partition, "offset")
            SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::int8[])
            ON CONFLICT DO NOTHING
            RETURNING topic, partition
        )
        SELECT topic, partition, count(*) FROM fresh GROUP BY topic, partition
        "#,
    )
    .bind(trigger_id)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .fetch_all(&mut **tx)
    .await?;
    let mut first_seen = 0;
    for (topic, partition, n) in fresh {
        first_seen += n as u64;
        if let Some(c) = checkpoints.iter_mut().find(|c| c.topic == topic && c.partition == partition) {
            c.filtered += n;
        }
    }
    outcome.filtered += first_seen;
    outcome.duplicates += filtered.len() as u64 - first_seen;
    Ok(checkpoints)
}

/// SQLSTATE and message of a database error, for the failure record.
fn describe_db_error(err: &sqlx::Error) -> String {
    match err {
        sqlx::Error::Database(db) => {
            format!("database rejected the message ({}): {}", db.code().unwrap_or_default(), db.message())
        }
        other => format!("database rejected the message: {other}"),
    }
}

/// The batch without repeats of the same (topic, partition, offset) (first
/// occurrence wins), sorted by it so concurrent writers take row locks in one
/// order and cannot deadlock; plus how many repeats were dropped.
fn unique_sorted(batch: &[IngestMessage]) -> (Vec<&IngestMessage>, u64) {
    let mut seen = HashSet::with_capacity(batch.len());
    let mut rows: Vec<&IngestMessage> =
        batch.iter().filter(|m| seen.insert((m.topic.as_str(), m.partition, m.offset))).collect();
    let repeated = (batch.len() - rows.len()) as u64;
    rows.sort_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    (rows, repeated)
}

/// Inserts the dedup records of `rows` and, for those that were new, the
/// messages, in one statement. Returns (new records, new messages); they
/// differ only when a message outlived its dedup record.
async fn insert_new_messages(
    conn: &mut PgConnection,
    trigger_id: Uuid,
    rows: &[&IngestMessage],
) -> Result<(u64, u64), sqlx::Error> {
    if rows.is_empty() {
        return Ok((0, 0));
    }
    let n = rows.len();
    let mut topics = Vec::with_capacity(n);
    let mut partitions = Vec::with_capacity(n);
    let mut offsets = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut values = Vec::with_capacity(n);
    let mut timestamps = Vec::with_capacity(n);
    // Headers are ragged (any number per message), which Postgres arrays
    // cannot be: they travel flattened with the 1-based row they belong to
    // and are folded back with array_agg.
    let mut header_rows: Vec<i64> = Vec::new();
    let mut header_names: Vec<&str> = Vec::new();
    let mut header_values: Vec<Option<&[u8]>> = Vec::new();
    for (i, m) in rows.iter().enumerate() {
        topics.push(m.topic.as_str());
        partitions.push(m.partition);
        offsets.push(m.offset);
        keys.push(m.key.as_deref());
        values.push(m.value.as_deref());
        timestamps.push(m.timestamp);
        for h in m.headers.iter().flatten() {
            header_rows.push(i as i64 + 1);
            header_names.push(h.name.as_str());
            header_values.push(h.value.as_deref());
        }
    }
    let sql = format!(
        r#"
        WITH input AS (
            SELECT *
            FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::bytea[], $6::bytea[], $7::timestamptz[])
                WITH ORDINALITY AS t(topic, partition, "offset", key, value, ts, row_no)
        ),
        fresh AS (
            INSERT INTO message_records (trigger_id, topic, partition, "offset")
            SELECT $1, topic, partition, "offset" FROM input ORDER BY row_no
            ON CONFLICT DO NOTHING
            RETURNING topic, partition, "offset"
        ),
        headers AS (
            SELECT row_no, array_agg(name ORDER BY ord) AS names, array_agg(value ORDER BY ord) AS vals
            FROM UNNEST($8::int8[], $9::text[], $10::bytea[]) WITH ORDINALITY AS h(row_no, name, value, ord)
            GROUP BY row_no
        ),
        stored AS (
            INSERT INTO messages
                (trigger_id, topic, partition, "offset", key, value, header_names, header_values, ts)
            SELECT $1, i.topic, i.partition, i."offset", i.key, i.value,
                   COALESCE(h.names, '{{}}'), COALESCE(h.vals, '{{}}'), i.ts
            FROM input i
            JOIN fresh f ON f.topic = i.topic AND f.partition = i.partition AND f."offset" = i."offset"
            LEFT JOIN headers h ON h.row_no = i.row_no
            ORDER BY i.row_no
            -- A message can outlive its dedup record (a set blocked longer
            -- than the retention): it is then a duplicate, not an error.
            ON CONFLICT DO NOTHING
            RETURNING topic, partition, "offset", key
        ),
        -- Candidate sets (kt_common::dispatch::announce), by the trigger's
        -- ordering mode (read after the ordering lock): per key (unkeyed
        -- messages each a set of their own), per partition, or each message
        -- its own. Sorted, so concurrent batches lock set rows in the same
        -- order.
        mode AS (SELECT {ORDERING_OF_TRIGGER} AS ordering),
        keyed_sets AS (
            INSERT INTO message_sets (trigger_id, topic, key)
            SELECT DISTINCT $1::uuid, topic, key FROM stored, mode WHERE key IS NOT NULL AND mode.ordering = 'key'
            ORDER BY 2, 3
            {KEYED_SET_UPSERT}
        ),
        partition_sets AS (
            INSERT INTO message_sets (trigger_id, topic, partition)
            SELECT DISTINCT $1::uuid, topic, partition FROM stored, mode WHERE mode.ordering = 'partition'
            ORDER BY 2, 3
            {PARTITION_SET_UPSERT}
        ),
        unkeyed_sets AS (
            INSERT INTO message_sets (trigger_id, topic, partition, "offset")
            SELECT $1, topic, partition, "offset" FROM stored, mode
             WHERE mode.ordering = 'unordered' OR (key IS NULL AND mode.ordering = 'key')
            {UNKEYED_SET_INSERT}
        )
        SELECT (SELECT count(*) FROM fresh),
               (SELECT count(*) FROM stored),
               (SELECT count(*) FROM keyed_sets WHERE announce) + (SELECT count(*) FROM partition_sets WHERE announce)
                   + (SELECT count(*) FROM unkeyed_sets)
        "#
    );
    let (fresh, stored, ready): (i64, i64, i64) = sqlx::query_as(&sql)
        .bind(trigger_id)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&keys)
        .bind(&values)
        .bind(&timestamps)
        .bind(&header_rows)
        .bind(&header_names)
        .bind(&header_values)
        .fetch_one(&mut *conn)
        .await?;
    if ready > 0 {
        // Delivered at commit (and only then): the control plane takes the
        // sets this batch made ready. Skipped when there are none: a
        // notifying commit serializes on a global lock.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(SETS_CHANNEL)
            .bind(trigger_id.to_string())
            .execute(&mut *conn)
            .await?;
    }
    Ok((fresh as u64, stored as u64))
}

/// The channel the control plane's scheduler listens on for ready sets.
pub const SETS_NOTIFY_CHANNEL: &str = SETS_CHANNEL;

/// Records `message` in `ingest_failures` together with its dedup record, so
/// a redelivered copy is a duplicate rather than a second failure. Returns
/// whether it was recorded (false: it had been ingested before).
pub async fn record_failure<'e, E>(
    executor: E,
    trigger_id: Uuid,
    message: &IngestMessage,
    error: &str,
) -> Result<bool, sqlx::Error>
where
    E: Executor<'e, Database = Postgres>,
{
    let names: Option<Vec<&str>> = message.headers.as_ref().map(|hs| hs.iter().map(|h| h.name.as_str()).collect());
    let values: Option<Vec<Option<&[u8]>>> =
        message.headers.as_ref().map(|hs| hs.iter().map(|h| h.value.as_deref()).collect());
    let id: Option<i64> = sqlx::query_scalar(
        r#"
        WITH fresh AS (
            INSERT INTO message_records (trigger_id, topic, partition, "offset")
            VALUES ($1, $2, $3, $4)
            ON CONFLICT DO NOTHING
            RETURNING 1
        )
        , failure AS (
            INSERT INTO ingest_failures
                (trigger_id, topic, partition, "offset", key, value, header_names, header_values, ts, error)
            SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10 FROM fresh
            RETURNING id
        ), event AS (
            INSERT INTO events (kind, trigger_id, details)
            SELECT 'persistence_failed', $1,
                   jsonb_build_object('failure_id', id, 'topic', $2, 'partition', $3, 'offset', $4, 'error', $10)
              FROM failure
        )
        SELECT id FROM failure
        "#,
    )
    .bind(trigger_id)
    .bind(&message.topic)
    .bind(message.partition)
    .bind(message.offset)
    .bind(message.key.as_deref())
    .bind(message.value.as_deref())
    .bind(names)
    .bind(values)
    .bind(message.timestamp)
    .bind(error)
    .fetch_optional(executor)
    .await?;
    Ok(id.is_some())
}

/// The highest offset and timestamp per partition of `batch`, sorted by
/// partition (a stable lock order for the upsert).
pub(crate) fn checkpoints_of(batch: &[IngestMessage]) -> Vec<Checkpoint> {
    type Last = (i64, Option<DateTime<Utc>>);
    let mut by_partition: BTreeMap<(&str, i32), Last> = BTreeMap::new();
    for m in batch {
        let entry = by_partition.entry((m.topic.as_str(), m.partition)).or_insert((m.offset, m.timestamp));
        entry.0 = entry.0.max(m.offset);
        // Option's order puts None first, so max keeps any timestamp.
        entry.1 = entry.1.max(m.timestamp);
    }
    by_partition
        .into_iter()
        .map(|((topic, partition), (last_offset, last_ts))| Checkpoint {
            topic: topic.to_owned(),
            partition,
            last_offset,
            last_ts,
            filtered: 0,
        })
        .collect()
}

/// Moves the checkpoints of `trigger_id` forward, never back: a late or
/// replayed batch cannot lower them. Touches only checkpoint rows, never the
/// trigger row.
pub async fn upsert_checkpoints<'e, E>(
    executor: E,
    trigger_id: Uuid,
    checkpoints: &[Checkpoint],
) -> Result<(), sqlx::Error>
where
    E: Executor<'e, Database = Postgres>,
{
    if checkpoints.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = checkpoints.iter().map(|c| c.topic.as_str()).collect();
    let partitions: Vec<i32> = checkpoints.iter().map(|c| c.partition).collect();
    let offsets: Vec<i64> = checkpoints.iter().map(|c| c.last_offset).collect();
    let timestamps: Vec<Option<DateTime<Utc>>> = checkpoints.iter().map(|c| c.last_ts).collect();
    let filtered: Vec<i64> = checkpoints.iter().map(|c| c.filtered).collect();
    sqlx::query(
        r#"
        INSERT INTO partition_checkpoints (trigger_id, topic, partition, last_offset, last_ts, filtered)
        SELECT $1, * FROM UNNEST($2::text[], $3::int4[], $4::int8[], $5::timestamptz[], $6::int8[])
        ON CONFLICT (trigger_id, topic, partition) DO UPDATE
        SET last_offset = GREATEST(partition_checkpoints.last_offset, EXCLUDED.last_offset),
            -- GREATEST ignores nulls: a message without a timestamp keeps the last one.
            last_ts = GREATEST(partition_checkpoints.last_ts, EXCLUDED.last_ts),
            filtered = partition_checkpoints.filtered + EXCLUDED.filtered,
            updated_at = now()
        "#,
    )
    .bind(trigger_id)
    .bind(&topics)
    .bind(&partitions)
    .bind(&offsets)
    .bind(&timestamps)
    .bind(&filtered)
    .execute(executor)
    .await?;
    Ok(())
}

/// The partition checkpoints of `trigger_id`: where a consumer group that
/// lost its committed offsets starts again.
pub async fn load_checkpoints<'e, E>(executor: E, trigger_id: Uuid) -> Result<Vec<Checkpoint>, sqlx::Error>
where
    E: Executor<'e, Database = Postgres>,
{
    let rows: Vec<(String, i32, i64, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT topic, partition, last_offset, last_ts FROM partition_checkpoints \
         WHERE trigger_id = $1 ORDER BY topic, partition",
    )
    .bind(trigger_id)
    .fetch_all(executor)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(topic, partition, last_offset, last_ts)| Checkpoint {
            topic,
            partition,
            last_offset,
            last_ts,
            filtered: 0,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, partition: i32, offset: i64, ts_ms: Option<i64>) -> IngestMessage {
        IngestMessage {
            topic: topic.into(),
            partition,
            offset,
            key: None,
            value: None,
            headers: Some(vec![]),
            filtered: false,
            timestamp: ts_ms.and_then(DateTime::from_timestamp_millis),
        }
    }

    #[test]
    fn test_checkpoints_take_the_highest_offset_and_timestamp_per_partition() {
        let batch = [
            msg("a", 1, 7, Some(2_000)),
            msg("a", 0, 3, None),
            msg("a", 1, 5, Some(3_000)),
            msg("b", 0, 1, Some(1_000)),
            msg("a", 0, 4, None),
        ];
        let cps = checkpoints_of(&batch);
        let got: Vec<_> = cps.iter().map(|c| (c.topic.as_str(), c.partition, c.last_offset)).collect();
        assert_eq!(got, [("a", 0, 4), ("a", 1, 7), ("b", 0, 1)]);
        assert_eq!(cps[0].last_ts, None);
        assert_eq!(cps[1].last_ts, DateTime::from_timestamp_millis(3_000));
    }

    #[test]
    fn test_repeats_within_a_batch_are_dropped_and_rows_sorted() {
        let batch = [msg("b", 0, 1, None), msg("a", 0, 2, None), msg("a", 0, 1, None), msg("b", 0, 1, None)];
        let (rows, repeated) = unique_sorted(&batch);
        assert_eq!(repeated, 1);
        let got: Vec<_> = rows.iter().map(|m| (m.topic.as_str(), m.offset)).collect();
        assert_eq!(got, [("a", 1), ("a", 2), ("b", 1)]);
    }
}
