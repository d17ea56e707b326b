//! The transitions of a worker's round, each one statement over many sets:
//! read the candidates of granted sets, commit the successes of a group of
//! deliveries (work order, message removal, next candidate or release), and
//! record the attempts that did not succeed. Every write is fenced by the
//! claim's lock id; a set whose claim was lost is left alone and reported
//! as such.
//!
//! Rows are bound in (trigger, topic, key) order, the order in which ingest
//! locks set rows, so a group commit and an ingest batch cannot deadlock.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::PgExecutor;
use uuid::Uuid;

use super::candidate::{candidates_of, message_key, Candidate, HeadColumns, HEAD_COLUMNS};
use super::state::{work_order_id, AfterAttempt, Attempt, SetState};

/// The columns `src` passes through to a [`Candidate`].
const CANDIDATE_PASS: &[&str] =
    &["set_id", "lock_id", "trigger_id", "topic", "set_key", "set_offset", "state", "retry_at", "ingest_seq"];

fn candidate_select() -> String {
    let pass: Vec<String> = CANDIDATE_PASS.iter().map(|c| format!("c.{c}")).collect();
    format!("{}, {HEAD_COLUMNS}", pass.join(", "))
}

/// The statement of [`read_candidates`], built once.
static READ_SQL: LazyLock<String> = LazyLock::new(|| {
    let src = "(SELECT s.id AS set_id, i.lock_id, s.trigger_id, s.topic, s.key AS set_key,
                       s.partition AS set_partition, s.\"offset\" AS set_offset, s.state, s.retry_at, s.ingest_seq,
                       NULL::int4 AS after_partition, NULL::int8 AS after_offset
                  FROM unnest($1::int8[], $2::uuid[]) AS i(set_id, lock_id)
                  JOIN message_sets s ON s.id = i.set_id AND s.lock_id = i.lock_id
                 -- Repeated as an array condition so the planner probes the
                 -- primary key instead of scanning the table.
                 WHERE s.id = ANY($1))";
    format!("SELECT {} FROM {}", candidate_select(), candidates_of(src, CANDIDATE_PASS))
});

/// The candidates of the sets claimed with these (set, lock id) pairs; a set
/// whose claim no longer holds is missing from the result. One statement,
/// no write: the claim was written when the set was granted.
pub async fn read_candidates(db: impl PgExecutor<'_>, claims: &[(i64, Uuid)]) -> Result<Vec<Candidate>, sqlx::Error> {
    let ids: Vec<i64> = claims.iter().map(|c| c.0).collect();
    let locks: Vec<Uuid> = claims.iter().map(|c| c.1).collect();
    sqlx::query_as(&READ_SQL).bind(&ids).bind(&locks).fetch_all(db).await
}

/// A candidate that was POSTed: its set and claim, the message, the exact
/// body sent and the attempt.
#[derive(Debug, Clone)]
pub struct Posted {
    pub set_id: i64,
    pub lock_id: Uuid,
    pub trigger_id: Uuid,
    pub topic: String,
    pub set_key: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    pub body: String,
    /// The attempt this outcome records; `None` when the outcome records
    /// none (a work order that failed earlier becomes a dead letter).
    pub attempt: Option<Attempt>,
}

/// The columns every group write binds, rows in (trigger, topic, key,
/// partition) order: the order ingest locks set rows in (keyed sets by key,
/// partition sets by partition), so the two cannot deadlock.
pub(crate) struct PostedColumns<'a> {
    /// Input positions in bind order.
    pub(crate) order: Vec<usize>,
    ids: Vec<i64>,
    locks: Vec<Uuid>,
    partitions: Vec<i32>,
    offsets: Vec<i64>,
    wo_ids: Vec<Uuid>,
    bodies: Vec<&'a str>,
    attempts: Vec<Option<Json<&'a Attempt>>>,
    ats: Vec<Option<DateTime<Utc>>>,
}

impl<'a> PostedColumns<'a> {
    /// Binds $1-$8: set, lock, partition, offset, work order id, body,
    /// attempt and its time.
    pub(crate) fn bind<'q, O>(
        &'q self,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(&self.ids)
            .bind(&self.locks)
            .bind(&self.partitions)
            .bind(&self.offsets)
            .bind(&self.wo_ids)
            .bind(&self.bodies)
            .bind(&self.attempts)
            .bind(&self.ats)
    }

    pub(crate) fn new(posted: Vec<&'a Posted>) -> Self {
        let mut order: Vec<usize> = (0..posted.len()).collect();
        let key = |p: &'a Posted| (p.trigger_id, &p.topic, &p.set_key, p.partition, p.set_id);
        order.sort_by(|a, b| key(posted[*a]).cmp(&key(posted[*b])));
        let rows: Vec<&Posted> = order.iter().map(|i| posted[*i]).collect();
        Self {
            ids: rows.iter().map(|p| p.set_id).collect(),
            locks: rows.iter().map(|p| p.lock_id).collect(),
            partitions: rows.iter().map(|p| p.partition).collect(),
            offsets: rows.iter().map(|p| p.offset).collect(),
            wo_ids: rows.iter().map(|p| work_order_id(p.trigger_id, &p.topic, p.partition, p.offset)).collect(),
            bodies: rows.iter().map(|p| p.body.as_str()).collect(),
            attempts: rows.iter().map(|p| p.attempt.as_ref().map(Json)).collect(),
            ats: rows.iter().map(|p| p.attempt.as_ref().map(|a| a.at)).collect(),
            order,
        }
    }
}

/// A delivery the target accepted with a 2xx (other than 202).
#[derive(Debug, Clone)]
pub struct Success {
    pub posted: Posted,
    /// Keep the claim and return the next candidate (the worker's time
    /// slice is not used up); otherwise release the set.
    pub keep: bool,
}

/// What a committed success (or dead letter) left the set as.
#[derive(Debug, Clone)]
pub enum AfterSuccess {
    /// Still claimed: act on this next candidate.
    Next(Box<Candidate>),
    /// Released: `Idle` (no stored messages) or `Ready` (more to do, for
    /// another grant).
    Released(SetState),
    /// A set of one message: the message is done and the set row removed.
    Dropped,
    /// The claim no longer held: nothing was written for this set.
    Lost,
}

#[derive(sqlx::FromRow)]
pub(crate) struct AdvanceRow {
    #[sqlx(flatten)]
    candidate: Candidate,
    released_state: Option<String>,
    dropped: bool,
    kept: bool,
}

/// A statement that finishes the head messages of a group of claimed sets
/// and moves each set on: it keeps its claim with its next candidate (read
/// in the same statement as the first message after the finished one), or
/// is released (idle when empty and nothing arrived since the snapshot,
/// else ready), or, unkeyed, removed. Rows come out as [`AdvanceRow`]s.
///
/// `input` binds $1-$9 (set, lock, partition, offset, work order id, body,
/// attempt, its time, keep) and `extra` more arrays named `extra_names`;
/// `finish` is the CTEs (after `held`, the sets whose claim held) that
/// record the outcome: its work order, the message's removal, its events.
pub(crate) fn advance_sql(extra: &str, extra_names: &str, finish: &str) -> String {
    let src = "(SELECT s.id AS set_id, i.lock_id, s.trigger_id, s.topic, s.key AS set_key,
                       s.partition AS set_partition, s.\"offset\" AS set_offset, s.state, s.retry_at, s.ingest_seq,
                       i.d_partition AS after_partition, i.d_offset AS after_offset,
                       i.wo_id, i.body, i.attempt, i.at, i.keep, i.ord
                  FROM input i JOIN message_sets s ON s.id = i.set_id AND s.lock_id = i.lock_id
                 WHERE s.id = ANY($1))";
    let mut pass = CANDIDATE_PASS.to_vec();
    pass.extend(["after_partition", "after_offset", "wo_id", "body", "attempt", "at", "keep", "ord"]);
    format!(
        "WITH input AS (
            SELECT * FROM unnest($1::int8[], $2::uuid[], $3::int4[], $4::int8[], $5::uuid[], $6::text[],
                                 $7::jsonb[], $8::timestamptz[], $9::bool[]{extra})
                     WITH ORDINALITY AS t(set_id, lock_id, d_partition, d_offset, wo_id, body, attempt, at, keep{extra_names}, ord)),
         snap AS MATERIALIZED (SELECT * FROM {candidates}),
         -- Sets that keep their claim are only locked: no row version is
         -- written for a key that is being drained.
         fence AS (
            SELECT s.id FROM message_sets s JOIN snap n ON s.id = n.set_id AND s.lock_id = n.lock_id
             WHERE n.keep AND n.partition IS NOT NULL
             ORDER BY n.ord
               FOR NO KEY UPDATE OF s),
         -- The comparison of ingest_seq runs against the newest row version
         -- (a concurrent ingest commit is re-checked), while n.ingest_seq is
         -- of the snapshot that found no next message.
         released AS (
            UPDATE message_sets s
               SET state = CASE WHEN n.partition IS NULL AND s.ingest_seq = n.ingest_seq THEN 'idle' ELSE 'ready' END,
                   lock_id = NULL, lock_expires = NULL, retry_at = NULL, blocked_since = NULL, updated_at = now()
              FROM snap n
             WHERE s.id = n.set_id AND s.lock_id = n.lock_id AND n.set_offset IS NULL
               AND NOT (n.keep AND n.partition IS NOT NULL)
            RETURNING s.id, s.state),
         dropped AS (
            DELETE FROM message_sets s USING snap n
             WHERE s.id = n.set_id AND s.lock_id = n.lock_id AND n.set_offset IS NOT NULL
            RETURNING s.id),
         held AS (SELECT id FROM fence UNION ALL SELECT id FROM released UNION ALL SELECT id FROM dropped),
         {finish}
         SELECT {select}, r.state AS released_state, (d.id IS NOT NULL) AS dropped, (f.id IS NOT NULL) AS kept
           FROM snap c
           LEFT JOIN released r ON r.id = c.set_id
           LEFT JOIN dropped d ON d.id = c.set_id
           LEFT JOIN fence f ON f.id = c.set_id",
        candidates = candidates_of(src, &pass),
        select = candidate_select(),
    )
}

/// The statement of [`commit_successes`], built once.
static COMMIT_SQL: LazyLock<String> = LazyLock::new(|| {
    let key = message_key("n.set_key", "n.trigger_id", "n.topic", "n.after_partition", "n.after_offset");
    advance_sql(
        "",
        "",
        &format!(
            "wo AS (
            INSERT INTO work_orders AS w
                   (id, trigger_id, set_id, topic, partition, \"offset\", key, state, attempts, attempt_log, body,
                    first_attempt_at)
            SELECT n.wo_id, n.trigger_id, n.set_id, n.topic, n.after_partition, n.after_offset, {key},
                   'success', 1, jsonb_build_array(n.attempt), n.body, n.at
              FROM snap n JOIN held h ON h.id = n.set_id
            ON CONFLICT (trigger_id, topic, partition, \"offset\") DO UPDATE
               SET state = 'success', attempts = w.attempts + 1, last_error = NULL,
                   attempt_log = w.attempt_log || EXCLUDED.attempt_log,
                   first_attempt_at = COALESCE(w.first_attempt_at, EXCLUDED.first_attempt_at), updated_at = now()
            RETURNING w.id, w.trigger_id, w.set_id, w.topic, w.partition, w.\"offset\", w.attempts),
         gone AS (
            DELETE FROM messages m USING wo
             WHERE m.trigger_id = wo.trigger_id AND m.topic = wo.topic
               AND m.partition = wo.partition AND m.\"offset\" = wo.\"offset\"),
         ev AS (
            INSERT INTO events (kind, trigger_id, details)
            SELECT 'work_order_succeeded', wo.trigger_id,
                   jsonb_build_object('work_order_id', wo.id, 'set_id', wo.set_id, 'attempts', wo.attempts,
                                      'topic', wo.topic, 'partition', wo.partition, 'offset', wo.\"offset\")
              FROM wo)"
        ),
    )
});

/// Commits a group of successes in one statement: per set, the work order
/// (inserted as succeeded, or an earlier attempt's row updated), its message
/// deleted, one event; then the set keeps its claim with its next
/// candidate, or is released (idle when empty and nothing arrived since the
/// snapshot, else ready), or, unkeyed, removed. The next candidate is read
/// in the same statement as the first message after the delivered one.
///
/// Returns one entry per input, in input order.
pub async fn commit_successes(
    db: impl PgExecutor<'_>,
    successes: &[Success],
) -> Result<Vec<(i64, AfterSuccess)>, sqlx::Error> {
    let c = PostedColumns::new(successes.iter().map(|s| &s.posted).collect());
    let keeps: Vec<bool> = c.order.iter().map(|i| successes[*i].keep).collect();
    let rows: Vec<AdvanceRow> = c.bind(sqlx::query_as(&COMMIT_SQL)).bind(&keeps).fetch_all(db).await?;
    Ok(advanced(rows, successes.iter().map(|s| s.posted.set_id)))
}

/// What [`advance_sql`] left each set as, in the order of `sets` (the input).
pub(crate) fn advanced(rows: Vec<AdvanceRow>, sets: impl Iterator<Item = i64>) -> Vec<(i64, AfterSuccess)> {
    let mut by_set: std::collections::HashMap<i64, AdvanceRow> =
        rows.into_iter().map(|r| (r.candidate.set_id, r)).collect();
    sets.map(|set_id| {
        let after = match by_set.remove(&set_id) {
            None => AfterSuccess::Lost,
            Some(r) if r.kept => AfterSuccess::Next(Box::new(r.candidate)),
            Some(r) if r.dropped => AfterSuccess::Dropped,
            Some(r) => match r.released_state.as_deref().and_then(SetState::parse) {
                Some(state) => AfterSuccess::Released(state),
                None => AfterSuccess::Lost,
            },
        };
        (set_id, after)
    })
    .collect()
}

/// A delivery attempt that did not succeed (or was accepted with 202).
#[derive(Debug, Clone)]
pub struct Failure {
    pub posted: Posted,
    pub after: AfterAttempt,
}

/// The statement of [`record_failures`], built once.
static FAILURES_SQL: LazyLock<String> = LazyLock::new(|| {
    let key = message_key("s.key", "s.trigger_id", "s.topic", "i.partition", "i.\"offset\"");
    format!(
        "WITH input AS (
            SELECT * FROM unnest($1::int8[], $2::uuid[], $3::int4[], $4::int8[], $5::uuid[], $6::text[],
                                 $7::jsonb[], $8::timestamptz[], $9::text[], $10::text[], $11::text[], $12::timestamptz[])
                     AS t(set_id, lock_id, partition, \"offset\", wo_id, body, attempt, at, error, wo_state,
                          set_state, retry_at)),
         sets AS (
            UPDATE message_sets s
               SET state = i.set_state, retry_at = i.retry_at, lock_id = NULL, lock_expires = NULL,
                   blocked_since = CASE WHEN i.set_state = 'blocked' THEN now() END, updated_at = now()
              FROM input i
             WHERE s.id = i.set_id AND s.lock_id = i.lock_id AND s.id = ANY($1)
            RETURNING s.id, s.trigger_id, s.topic, s.key),
         wo AS (
            INSERT INTO work_orders AS w
                   (id, trigger_id, set_id, topic, partition, \"offset\", key, state, attempts, last_error,
                    attempt_log, body, first_attempt_at)
            SELECT i.wo_id, s.trigger_id, s.id, s.topic, i.partition, i.\"offset\", {key}, i.wo_state, 1, i.error,
                   jsonb_build_array(i.attempt), i.body, i.at
              FROM input i JOIN sets s ON s.id = i.set_id
            ON CONFLICT (trigger_id, topic, partition, \"offset\") DO UPDATE
               SET state = EXCLUDED.state, attempts = w.attempts + 1, last_error = EXCLUDED.last_error,
                   attempt_log = w.attempt_log || EXCLUDED.attempt_log,
                   first_attempt_at = COALESCE(w.first_attempt_at, EXCLUDED.first_attempt_at), updated_at = now()
            RETURNING w.id, w.trigger_id, w.set_id, w.topic, w.partition, w.\"offset\", w.attempts, w.state,
                      w.last_error, (w.xmax = 0) AS created),
         ev AS (
            INSERT INTO events (kind, trigger_id, details)
            SELECT k.kind, wo.trigger_id,
                   jsonb_build_object('work_order_id', wo.id, 'set_id', wo.set_id, 'attempts', wo.attempts,
                                      'error', wo.last_error, 'topic', wo.topic, 'partition', wo.partition,
                                      'offset', wo.\"offset\")
              FROM wo JOIN input i ON i.wo_id = wo.id CROSS JOIN LATERAL unnest(
                     CASE WHEN wo.created THEN ARRAY['work_order_created'] ELSE ARRAY[]::text[] END
                  || CASE WHEN wo.state = 'failed' THEN ARRAY['work_order_failed'] ELSE ARRAY[]::text[] END
                  -- A failed work order waiting to become a dead letter does
                  -- not block its set.
                  || CASE WHEN i.set_state = 'blocked' THEN ARRAY['set_blocked'] ELSE ARRAY[]::text[] END)
                     WITH ORDINALITY AS k(kind, n)
             ORDER BY wo.set_id, k.n)
         SELECT id FROM sets"
    )
});

/// Records a group of attempts that did not succeed, in one statement: the
/// work order (created on its first attempt, `work_order_created`) with the
/// attempt appended; the set released waiting (retry time, or a 202 runner)
/// or blocked (`work_order_failed`, `set_blocked`). Returns the sets whose
/// claim still held.
pub async fn record_failures(db: impl PgExecutor<'_>, failures: &[Failure]) -> Result<Vec<i64>, sqlx::Error> {
    let c = PostedColumns::new(failures.iter().map(|f| &f.posted).collect());
    let in_order = || c.order.iter().map(|i| &failures[*i]);
    let errors: Vec<Option<&str>> =
        in_order().map(|f| f.posted.attempt.as_ref().and_then(|a| a.error.as_deref())).collect();
    let wo_states: Vec<&str> = in_order().map(|f| f.after.work_order_state().as_str()).collect();
    let set_states: Vec<&str> = in_order().map(|f| f.after.set_state().as_str()).collect();
    let retry_ats: Vec<Option<DateTime<Utc>>> = in_order().map(|f| f.after.retry_at()).collect();
    let sql = sqlx::query_as::<_, (i64,)>(&FAILURES_SQL);
    let rows = c.bind(sql).bind(&errors).bind(&wo_states).bind(&set_states).bind(&retry_ats).fetch_all(db).await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Releases the claim of a set whose head work order already waits (running,
/// retry scheduled) or failed (set blocked). Returns whether the claim held.
pub async fn park(db: impl PgExecutor<'_>, set_id: i64, lock: Uuid, after: AfterAttempt) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE message_sets
            SET state = $3, retry_at = $4, lock_id = NULL, lock_expires = NULL,
                blocked_since = CASE WHEN $3 = 'blocked' THEN COALESCE(blocked_since, now()) END,
                updated_at = now()
          WHERE id = $1 AND lock_id = $2",
    )
    .bind(set_id)
    .bind(lock)
    .bind(after.set_state().as_str())
    .bind(after.retry_at())
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Releases the claim of a set that still has a candidate to act on.
pub async fn release_ready(db: impl PgExecutor<'_>, set_id: i64, lock: Uuid) -> Result<bool, sqlx::Error> {
    let n = sqlx::query(
        "UPDATE message_sets SET state = 'ready', retry_at = NULL, lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE id = $1 AND lock_id = $2",
    )
    .bind(set_id)
    .bind(lock)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Releases an emptied set: a keyed or partition set (`keyed`: it outlives
/// its messages) becomes idle unless ingest added to it since `seen_seq`
/// was read (then it is released ready: the next grant finds the new
/// message); a set of one message is removed. Returns what it became,
/// `None` when the claim no longer held.
pub async fn finish_empty(
    db: impl PgExecutor<'_>,
    set_id: i64,
    lock: Uuid,
    keyed: bool,
    seen_seq: i64,
) -> Result<Option<SetState>, sqlx::Error> {
    if !keyed {
        let n = sqlx::query("DELETE FROM message_sets WHERE id = $1 AND lock_id = $2")
            .bind(set_id)
            .bind(lock)
            .execute(db)
            .await?
            .rows_affected();
        return Ok((n == 1).then_some(SetState::Idle));
    }
    let state: Option<String> = sqlx::query_scalar(
        "UPDATE message_sets
            SET state = CASE WHEN ingest_seq = $3 THEN 'idle' ELSE 'ready' END,
                retry_at = NULL, lock_id = NULL, lock_expires = NULL, updated_at = now()
          WHERE id = $1 AND lock_id = $2
         RETURNING state",
    )
    .bind(set_id)
    .bind(lock)
    .bind(seen_seq)
    .fetch_optional(db)
    .await?;
    Ok(state.as_deref().and_then(SetState::parse))
}

/// Removes the head message whose work order already finished (success or
/// skipped) before the worker that finished it could delete it.
pub async fn delete_finished_head(
    db: impl PgExecutor<'_>,
    set_id: i64,
    lock: Uuid,
    candidate: &Candidate,
) -> Result<bool, sqlx::Error> {
    let Some((partition, offset)) = candidate.head.position() else { return Ok(false) };
    let n = sqlx::query(
        "DELETE FROM messages m
          WHERE m.trigger_id = $3 AND m.topic = $4 AND m.partition = $5 AND m.\"offset\" = $6
            AND EXISTS (SELECT 1 FROM message_sets WHERE id = $1 AND lock_id = $2)",
    )
    .bind(set_id)
    .bind(lock)
    .bind(candidate.trigger_id)
    .bind(&candidate.topic)
    .bind(partition)
    .bind(offset)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// Whether the claim still holds.
pub async fn still_claimed(db: impl PgExecutor<'_>, set_id: i64, lock: Uuid) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM message_sets WHERE id = $1 AND lock_id = $2)")
        .bind(set_id)
        .bind(lock)
        .fetch_one(db)
        .await
}

impl HeadColumns {
    /// The headers of the candidate, names with values, in Kafka order.
    pub fn headers(&self) -> Vec<(String, Option<Vec<u8>>)> {
        let names = self.header_names.clone().unwrap_or_default();
        let values = self.header_values.clone().unwrap_or_default();
        names.into_iter().zip(values).collect()
    }
}
