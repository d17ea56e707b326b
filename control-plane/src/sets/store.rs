//! SQL of the operator view of `message_sets`. Listing walks the set indexes
//! only (`message_sets_state_idx`, the claims index, `message_sets_key_idx`
//! for a key filter); per-row details (head
//! message, stored count, head work order) are looked up for the rows of
//! one page through `messages_set_idx`, the messages primary key and the
//! work-order unique key, never by scanning `messages`.
//!
//! The actions' writes are transitions of the shared state machine
//! (`kt_common::dispatch::operator`), re-exported here.

use chrono::{DateTime, Utc};
pub use kt_common::dispatch::operator::*;
use sqlx::PgExecutor;
use uuid::Uuid;

/// A set with what the operator needs to know about its head.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SetRow {
    pub id: i64,
    pub trigger_id: Uuid,
    pub topic: String,
    pub key: Option<Vec<u8>>,
    /// The partition of a partition set (the set has no offset).
    pub partition_set: Option<i32>,
    pub state: String,
    /// The claim's expiry while a worker holds a live claim, else `None`.
    pub claimed_until: Option<DateTime<Utc>>,
    pub retry_at: Option<DateTime<Utc>>,
    pub blocked_since: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub stored_messages: i64,
    pub head_partition: Option<i32>,
    pub head_offset: Option<i64>,
    pub wo_id: Option<Uuid>,
    pub wo_state: Option<String>,
    pub wo_attempts: Option<i32>,
    pub wo_last_error: Option<String>,
}

/// Adds the per-row details to `source`, a query returning `message_sets`
/// rows (at most one page of them).
fn with_details(source: &str) -> String {
    format!(
        "SELECT s.id, s.trigger_id, s.topic, s.key,
                CASE WHEN s.key IS NULL AND s.\"offset\" IS NULL THEN s.partition END AS partition_set, s.state,
                CASE WHEN s.lock_id IS NOT NULL AND s.lock_expires > now() THEN s.lock_expires END AS claimed_until,
                s.retry_at, s.blocked_since, s.updated_at,
                CASE WHEN s.key IS NULL AND s.\"offset\" IS NOT NULL THEN (h.partition IS NOT NULL)::int::bigint
                     ELSE c.n END AS stored_messages,
                h.partition AS head_partition, h.\"offset\" AS head_offset,
                w.id AS wo_id, w.state AS wo_state, w.attempts AS wo_attempts, w.last_error AS wo_last_error
           FROM ({source}) s
           LEFT JOIN LATERAL (
                (SELECT m.partition, m.\"offset\" FROM messages m
                  WHERE s.key IS NOT NULL AND m.trigger_id = s.trigger_id AND m.topic = s.topic AND m.key = s.key
                  ORDER BY m.partition, m.\"offset\" LIMIT 1)
                UNION ALL
                (SELECT m.partition, m.\"offset\" FROM messages m
                  WHERE s.key IS NULL AND s.\"offset\" IS NOT NULL AND m.trigger_id = s.trigger_id
                    AND m.topic = s.topic AND m.partition = s.partition AND m.\"offset\" = s.\"offset\")
                UNION ALL
                (SELECT m.partition, m.\"offset\" FROM messages m
                  WHERE s.key IS NULL AND s.\"offset\" IS NULL AND m.trigger_id = s.trigger_id
                    AND m.topic = s.topic AND m.partition = s.partition
                  ORDER BY m.\"offset\" LIMIT 1)
           ) h ON true
           LEFT JOIN LATERAL (
                SELECT (SELECT count(*) FROM messages m
                         WHERE s.key IS NOT NULL AND m.trigger_id = s.trigger_id AND m.topic = s.topic
                           AND m.key = s.key)
                     -- A partition set's messages are a large share of the
                     -- table: the ORDER BY has them counted along the primary
                     -- key, never by reading the whole table.
                     + (SELECT count(*) FROM (SELECT FROM messages m
                         WHERE s.key IS NULL AND s.\"offset\" IS NULL AND m.trigger_id = s.trigger_id
                           AND m.topic = s.topic AND m.partition = s.partition
                         ORDER BY m.\"offset\") p) AS n
           ) c ON true
           LEFT JOIN work_orders w
             ON w.trigger_id = s.trigger_id AND w.topic = s.topic
            AND w.partition = h.partition AND w.\"offset\" = h.\"offset\"
          ORDER BY s.id"
    )
}

pub async fn get(db: impl PgExecutor<'_>, id: i64) -> Result<Option<SetRow>, sqlx::Error> {
    sqlx::query_as(&with_details("SELECT * FROM message_sets WHERE id = $1")).bind(id).fetch_optional(db).await
}

/// Up to `limit` sets with id > `after` in the given states, of one trigger
/// or of every trigger, in id order. `with_live_claims = false` leaves out
/// sets a worker holds right now.
///
/// Each (trigger, state) pair reads at most `limit` rows from
/// `message_sets_state_idx` (trigger_id, state, id); the union is cut to
/// `limit`. Triggers are few, so this stays an index walk whatever the
/// number of sets in other states (idle keys pile up over time).
pub async fn list_in_states(
    db: impl PgExecutor<'_>,
    trigger: Option<Uuid>,
    states: &[kt_common::dispatch::SetState],
    with_live_claims: bool,
    after: i64,
    limit: i64,
) -> Result<Vec<SetRow>, sqlx::Error> {
    let source = "SELECT p.* FROM (SELECT id FROM triggers WHERE $1::uuid IS NULL OR id = $1) t
                   CROSS JOIN unnest($2::text[]) AS st(state)
                   CROSS JOIN LATERAL (
                        SELECT ms.* FROM message_sets ms
                         WHERE ms.trigger_id = t.id AND ms.state = st.state AND ms.id > $3
                           AND ($5::boolean OR ms.lock_id IS NULL OR ms.lock_expires <= now())
                         ORDER BY ms.id LIMIT $4) p
                  ORDER BY p.id LIMIT $4";
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    sqlx::query_as(&with_details(source))
        .bind(trigger)
        .bind(states)
        .bind(after)
        .bind(limit)
        .bind(with_live_claims)
        .fetch_all(db)
        .await
}

/// Up to `limit` sets a worker holds a live claim on, through the claims
/// index (live claims are bounded by the number of workers).
pub async fn list_claimed(
    db: impl PgExecutor<'_>,
    trigger: Option<Uuid>,
    after: i64,
    limit: i64,
) -> Result<Vec<SetRow>, sqlx::Error> {
    let source = "SELECT ms.* FROM message_sets ms
                   WHERE ms.lock_id IS NOT NULL AND ms.lock_expires > now()
                     AND ms.state IN ('ready', 'waiting')
                     AND ($1::uuid IS NULL OR ms.trigger_id = $1) AND ms.id > $2
                   ORDER BY ms.id LIMIT $3";
    sqlx::query_as(&with_details(source)).bind(trigger).bind(after).bind(limit).fetch_all(db).await
}

/// The query of [`list_by_key`] (public for the EXPLAIN test).
pub fn by_key_query() -> String {
    with_details(
        "SELECT ms.* FROM message_sets ms
          WHERE ms.key = $1 AND ms.key IS NOT NULL AND ($2::uuid IS NULL OR ms.trigger_id = $2)
            AND ms.state = ANY($3::text[]) AND ms.id > $4
            AND CASE WHEN $6::boolean THEN ms.lock_id IS NOT NULL AND ms.lock_expires > now()
                     ELSE $5::boolean OR ms.lock_id IS NULL OR ms.lock_expires <= now() END
          ORDER BY ms.id LIMIT $7",
    )
}

/// Up to `limit` keyed sets of `key` with id > `after`, of one trigger or
/// of every trigger, in `states`, in id order, through
/// `message_sets_key_idx` (a key has one set per trigger and topic).
/// `claimed_only` keeps only sets a worker holds a live claim on;
/// otherwise `with_live_claims = false` leaves them out.
#[allow(clippy::too_many_arguments)]
pub async fn list_by_key(
    db: impl PgExecutor<'_>,
    key: &[u8],
    trigger: Option<Uuid>,
    states: &[kt_common::dispatch::SetState],
    with_live_claims: bool,
    claimed_only: bool,
    after: i64,
    limit: i64,
) -> Result<Vec<SetRow>, sqlx::Error> {
    let states: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
    sqlx::query_as(&by_key_query())
        .bind(key)
        .bind(trigger)
        .bind(states)
        .bind(after)
        .bind(with_live_claims)
        .bind(claimed_only)
        .bind(limit)
        .fetch_all(db)
        .await
}
