//! Dead letters as set transitions: a worker records a group of them (the
//! message moved into `dead_letters`, its work order failed, the key moved
//! on, like a success), and `ReplayDeadLetter` puts one back as the head of
//! its set. Both are fenced like every other transition: the worker's by
//! its claim's lock id, the replay by the set row it locks.

use std::sync::LazyLock;

use sqlx::{PgExecutor, Postgres, Transaction};
use uuid::Uuid;

use super::announce;
use super::candidate::message_key;
use super::operator::{self, LockedSet};
use super::round::{advance_sql, advanced, AdvanceRow, AfterSuccess, Posted, PostedColumns};

/// A work order that failed for good under the dead-letter policy.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The delivery; its attempt is `None` when the work order had failed
    /// before (its dead letter could not be produced then).
    pub posted: Posted,
    /// The dead letter's id (v7).
    pub id: Uuid,
    /// Where it was produced, acknowledged, if the trigger has a topic.
    pub produced: Option<Produced>,
    /// Keep the claim and return the next candidate, as a success does.
    pub keep: bool,
}

/// An acknowledged produce to the dead-letter topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Produced {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// The statement of [`commit_dead_letters`], built once.
static DEAD_LETTER_SQL: LazyLock<String> = LazyLock::new(|| {
    let key = message_key("n.set_key", "n.trigger_id", "n.topic", "n.after_partition", "n.after_offset");
    let finish = "wo AS (
            INSERT INTO work_orders AS w
                   (id, trigger_id, set_id, topic, partition, \"offset\", key, state, attempts, last_error,
                    attempt_log, body, first_attempt_at)
            SELECT n.wo_id, n.trigger_id, n.set_id, n.topic, n.after_partition, n.after_offset, {message_key}, 'failed',
                   CASE WHEN n.attempt IS NULL THEN 0 ELSE 1 END, i.error,
                   CASE WHEN n.attempt IS NULL THEN '[]'::jsonb ELSE jsonb_build_array(n.attempt) END, n.body, n.at
              FROM snap n JOIN held h ON h.id = n.set_id JOIN input i ON i.set_id = n.set_id
            ON CONFLICT (trigger_id, topic, partition, \"offset\") DO UPDATE
               SET state = 'failed', attempts = w.attempts + EXCLUDED.attempts,
                   last_error = COALESCE(EXCLUDED.last_error, w.last_error),
                   attempt_log = w.attempt_log || EXCLUDED.attempt_log,
                   first_attempt_at = COALESCE(w.first_attempt_at, EXCLUDED.first_attempt_at), updated_at = now()
            RETURNING w.id, w.trigger_id, w.set_id, w.topic, w.partition, w.\"offset\", w.attempts, w.attempt_log,
                      w.last_error, (w.xmax = 0) AS created),
         -- The message is read in the statement's snapshot, which `gone`
         -- does not change.
         dl AS (
            INSERT INTO dead_letters
                   (id, trigger_id, topic, partition, \"offset\", key, value, header_names, header_values, ts,
                    work_order_id, attempts, attempt_log, last_error, produced_topic, produced_partition,
                    produced_offset)
            SELECT i.dl_id, wo.trigger_id, wo.topic, wo.partition, wo.\"offset\", m.key, m.value, m.header_names,
                   m.header_values, m.ts, wo.id, wo.attempts, wo.attempt_log, wo.last_error, i.produced_topic,
                   i.produced_partition, i.produced_offset
              FROM wo JOIN input i ON i.wo_id = wo.id
              JOIN messages m ON m.trigger_id = wo.trigger_id AND m.topic = wo.topic
                             AND m.partition = wo.partition AND m.\"offset\" = wo.\"offset\"
            ON CONFLICT ON CONSTRAINT dead_letters_message_key DO NOTHING),
         gone AS (
            DELETE FROM messages m USING wo
             WHERE m.trigger_id = wo.trigger_id AND m.topic = wo.topic
               AND m.partition = wo.partition AND m.\"offset\" = wo.\"offset\"),
         ev AS (
            INSERT INTO events (kind, trigger_id, details)
            SELECT k.kind, wo.trigger_id,
                   jsonb_build_object('work_order_id', wo.id, 'set_id', wo.set_id, 'attempts', wo.attempts,
                                      'error', wo.last_error, 'topic', wo.topic, 'partition', wo.partition,
                                      'offset', wo.\"offset\", 'dead_letter_id', i.dl_id,
                                      'dead_letter_topic', i.produced_topic)
              FROM wo JOIN input i ON i.wo_id = wo.id CROSS JOIN LATERAL unnest(
                     CASE WHEN wo.created THEN ARRAY['work_order_created'] ELSE ARRAY[]::text[] END
                  || CASE WHEN i.attempt IS NOT NULL THEN ARRAY['work_order_failed'] ELSE ARRAY[]::text[] END
                  || ARRAY['message_dead_lettered']) WITH ORDINALITY AS k(kind, n)
             ORDER BY wo.set_id, k.n)"
        .replace("{message_key}", &key);
    advance_sql(
        ", $10::uuid[], $11::text[], $12::text[], $13::int4[], $14::int8[]",
        ", dl_id, error, produced_topic, produced_partition, produced_offset",
        &finish,
    )
});

/// Records a group of dead letters in one statement: per set, the work
/// order failed (with the attempt, if any, appended), the message copied
/// into `dead_letters` and deleted, its events; then the set moves on
/// exactly as after a success ([`super::round::commit_successes`]).
///
/// Returns one entry per input, in input order.
pub async fn commit_dead_letters(
    db: impl PgExecutor<'_>,
    dead: &[DeadLetter],
) -> Result<Vec<(i64, AfterSuccess)>, sqlx::Error> {
    let c = PostedColumns::new(dead.iter().map(|d| &d.posted).collect());
    let in_order = || c.order.iter().map(|i| &dead[*i]);
    let keeps: Vec<bool> = in_order().map(|d| d.keep).collect();
    let ids: Vec<Uuid> = in_order().map(|d| d.id).collect();
    let errors: Vec<Option<&str>> =
        in_order().map(|d| d.posted.attempt.as_ref().and_then(|a| a.error.as_deref())).collect();
    let topics: Vec<Option<&str>> = in_order().map(|d| d.produced.as_ref().map(|p| p.topic.as_str())).collect();
    let partitions: Vec<Option<i32>> = in_order().map(|d| d.produced.as_ref().map(|p| p.partition)).collect();
    let offsets: Vec<Option<i64>> = in_order().map(|d| d.produced.as_ref().map(|p| p.offset)).collect();
    let rows: Vec<AdvanceRow> = c
        .bind(sqlx::query_as(&DEAD_LETTER_SQL))
        .bind(&keeps)
        .bind(&ids)
        .bind(&errors)
        .bind(&topics)
        .bind(&partitions)
        .bind(&offsets)
        .fetch_all(db)
        .await?;
    Ok(advanced(rows, dead.iter().map(|d| d.posted.set_id)))
}

/// Where a dead letter's message belongs.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StoredDeadLetter {
    pub id: Uuid,
    pub trigger_id: Uuid,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub work_order_id: Uuid,
}

/// Locks a dead letter for the rest of the transaction.
pub async fn lock(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Option<StoredDeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, trigger_id, topic, partition, \"offset\", key, work_order_id FROM dead_letters WHERE id = $1
            FOR UPDATE",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await
}

/// Locks the set the dead letter's message belongs to under the trigger's
/// ordering mode, creating it (idle) when it is gone: a keyed or partition
/// set row is removed by a discard or a change of mode, a set of one
/// message when its message is done. Takes the ordering lock first, as
/// ingest does: the message is stored again.
pub async fn lock_set(tx: &mut Transaction<'_, Postgres>, dl: &StoredDeadLetter) -> Result<LockedSet, sqlx::Error> {
    announce::lock_ordering_shared(tx, dl.trigger_id).await?;
    let mode: Option<String> = sqlx::query_scalar(&format!("SELECT {}", announce::ORDERING_OF_TRIGGER))
        .bind(dl.trigger_id)
        .fetch_one(&mut **tx)
        .await?;
    let (insert, find) = match (mode.as_deref(), &dl.key) {
        (Some("partition"), _) => (
            "INSERT INTO message_sets (trigger_id, topic, partition, state) VALUES ($1, $2, $4, 'idle')
             ON CONFLICT (trigger_id, topic, partition) WHERE key IS NULL AND \"offset\" IS NULL DO NOTHING",
            "key IS NULL AND partition = $4 AND \"offset\" IS NULL",
        ),
        (Some("key") | None, Some(_)) => (
            "INSERT INTO message_sets (trigger_id, topic, key, state) VALUES ($1, $2, $3, 'idle')
             ON CONFLICT (trigger_id, topic, key) WHERE key IS NOT NULL DO NOTHING",
            "key = $3",
        ),
        _ => (
            "INSERT INTO message_sets (trigger_id, topic, partition, \"offset\", state)
             VALUES ($1, $2, $4, $5, 'idle') ON CONFLICT DO NOTHING",
            "key IS NULL AND partition = $4 AND \"offset\" = $5",
        ),
    };
    let id: i64 = sqlx::query_scalar(&format!(
        "WITH new AS ({insert} RETURNING id)
         SELECT id FROM new
         UNION ALL SELECT id FROM message_sets WHERE trigger_id = $1 AND topic = $2 AND {find}"
    ))
    .bind(dl.trigger_id)
    .bind(&dl.topic)
    .bind(&dl.key)
    .bind(dl.partition)
    .bind(dl.offset)
    .fetch_one(&mut **tx)
    .await?;
    Ok(operator::lock(tx, id).await?.expect("the set row was just found or created in this transaction"))
}

/// Moves the dead letter's message back into `messages` (its original
/// position, so it is the head of `set`), resets its work order to pending
/// with a fresh retry budget (`attempt_log` keeps the history), removes the
/// dead letter and makes the set ready.
pub async fn put_back(
    tx: &mut Transaction<'_, Postgres>,
    dl: &StoredDeadLetter,
    set: &LockedSet,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "WITH dl AS (DELETE FROM dead_letters WHERE id = $1 RETURNING *),
              msg AS (
                INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value, header_names,
                                      header_values, ts)
                SELECT trigger_id, topic, partition, \"offset\", key, value, header_names, header_values, ts FROM dl)
         UPDATE work_orders w
            SET state = 'pending', attempts = 0, first_attempt_at = NULL, set_id = $2, updated_at = now()
           FROM dl WHERE w.id = dl.work_order_id",
    )
    .bind(dl.id)
    .bind(set.id)
    .execute(&mut **tx)
    .await?;
    operator::mark_ready(tx, set.id).await
}
