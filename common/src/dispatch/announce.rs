//! How stored messages join their sets, by the trigger's ordering mode:
//!
//! - `key`: a keyed message joins the set of its (trigger, topic, key), an
//!   unkeyed one is a set of its own;
//! - `partition`: every message joins the set of its (trigger, topic,
//!   partition);
//! - `unordered`: every message is a set of its own.
//!
//! Ingest runs these clauses inside its batch statement, reading the mode
//! from the trigger's spec after [`lock_ordering_shared`]; the benchmark's
//! seeding runs them over a backlog it stored with COPY. A change of mode
//! ([`lock_ordering_for_change`]) waits for the batches in flight and is
//! refused while messages are stored, so no message is ever in a set of
//! one mode while later ones of its key or partition join sets of another.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::SETS_CHANNEL;

/// The conflict clause of `INSERT INTO message_sets (trigger_id, topic, key)`.
///
/// An existing set is only written when that changes something: an idle one
/// wakes up (ready), and a claimed one gets its `ingest_seq` bumped so the
/// worker draining it cannot mark it idle past the new messages. Any other
/// set (ready, waiting, blocked; unclaimed) already has a head that precedes
/// them: it is only locked (ON CONFLICT locks the latest row version even
/// when the WHERE is false), which orders the batch against a concurrent
/// claim, and is not rewritten. `RETURNING announce` is true for sets the
/// scheduler must hear of (new or woken, unclaimed).
pub const KEYED_SET_UPSERT: &str =
    concat!("ON CONFLICT (trigger_id, topic, key) WHERE key IS NOT NULL", wake_or_lock!());

/// The same for `INSERT INTO message_sets (trigger_id, topic, partition)`:
/// a partition set, woken and bumped like a keyed one.
pub const PARTITION_SET_UPSERT: &str =
    concat!("ON CONFLICT (trigger_id, topic, partition) WHERE key IS NULL AND \"offset\" IS NULL", wake_or_lock!());

/// The update part of the set upserts (see [`KEYED_SET_UPSERT`]).
macro_rules! wake_or_lock {
    () => {
        " DO UPDATE
       SET ingest_seq = message_sets.ingest_seq + 1,
           state = CASE WHEN message_sets.state = 'idle' THEN 'ready' ELSE message_sets.state END,
           updated_at = now()
     WHERE message_sets.state = 'idle' OR message_sets.lock_id IS NOT NULL
    RETURNING lock_id IS NULL AS announce"
    };
}
use wake_or_lock;

/// The trigger's ordering mode as the spec stores it (`key` when absent),
/// as an SQL expression over the trigger id `$1`.
pub const ORDERING_OF_TRIGGER: &str = "(SELECT COALESCE(t.spec->>'ordering', 'key') FROM triggers t WHERE t.id = $1)";

/// The advisory lock that orders ingest against changes of a trigger's
/// ordering mode: (a namespace of ours, the trigger). Advisory, so that
/// ingest takes it without writing the trigger row.
fn ordering_lock(trigger: Uuid) -> (i32, i32) {
    const NAMESPACE: i32 = 0x6b74_6f72; // "ktor"
    let b = trigger.as_bytes();
    let folded =
        (0..4).fold(0u32, |acc, i| acc ^ u32::from_be_bytes([b[i * 4], b[i * 4 + 1], b[i * 4 + 2], b[i * 4 + 3]]));
    (NAMESPACE, folded as i32)
}

/// Taken by every ingest transaction that stores messages, before it reads
/// the ordering mode: shared, so batches never wait for each other.
pub async fn lock_ordering_shared(tx: &mut Transaction<'_, Postgres>, trigger: Uuid) -> Result<(), sqlx::Error> {
    let (ns, key) = ordering_lock(trigger);
    sqlx::query("SELECT pg_advisory_xact_lock_shared($1, $2)").bind(ns).bind(key).execute(&mut **tx).await?;
    Ok(())
}

/// Taken by a change of the trigger's ordering mode: waits for the ingest
/// batches in flight, holds new ones back until the change commits, and
/// returns whether the trigger has stored messages (the change is refused
/// if so).
pub async fn lock_ordering_for_change(tx: &mut Transaction<'_, Postgres>, trigger: Uuid) -> Result<bool, sqlx::Error> {
    let (ns, key) = ordering_lock(trigger);
    sqlx::query("SELECT pg_advisory_xact_lock($1, $2)").bind(ns).bind(key).execute(&mut **tx).await?;
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM messages WHERE trigger_id = $1)")
        .bind(trigger)
        .fetch_one(&mut **tx)
        .await
}

/// After a change of ordering mode (no message stored): drops the sets of
/// the old mode that no worker holds. They are all empty; a claimed one is
/// settled by its worker.
pub async fn drop_unclaimed_sets(tx: &mut Transaction<'_, Postgres>, trigger: Uuid) -> Result<u64, sqlx::Error> {
    let n = sqlx::query("DELETE FROM message_sets WHERE trigger_id = $1 AND lock_id IS NULL")
        .bind(trigger)
        .execute(&mut **tx)
        .await?
        .rows_affected();
    Ok(n)
}

/// The conflict clause of `INSERT INTO message_sets (trigger_id, topic,
/// partition, "offset")` for unkeyed messages.
pub const UNKEYED_SET_INSERT: &str = "ON CONFLICT DO NOTHING RETURNING 1";

/// Creates or wakes the sets of every stored message of `trigger`/`topic`
/// (keyed or unkeyed ones), as ingest does, and notifies the scheduler at
/// commit. For a backlog stored directly (the benchmark).
pub async fn announce_stored(
    tx: &mut Transaction<'_, Postgres>,
    trigger: Uuid,
    topic: &str,
    keyed: bool,
) -> Result<u64, sqlx::Error> {
    let sql = if keyed {
        format!(
            "WITH s AS (
               INSERT INTO message_sets (trigger_id, topic, key)
               SELECT $1, $2, key FROM messages
                WHERE trigger_id = $1 AND topic = $2 AND key IS NOT NULL
                GROUP BY key ORDER BY min(partition), min(\"offset\")
               {KEYED_SET_UPSERT})
             SELECT count(*) FROM s"
        )
    } else {
        format!(
            "WITH s AS (
               INSERT INTO message_sets (trigger_id, topic, partition, \"offset\")
               SELECT $1, $2, partition, \"offset\" FROM messages
                WHERE trigger_id = $1 AND topic = $2 AND key IS NULL
                ORDER BY partition, \"offset\"
               {UNKEYED_SET_INSERT})
             SELECT count(*) FROM s"
        )
    };
    let n: i64 = sqlx::query_scalar(&sql).bind(trigger).bind(topic).fetch_one(&mut **tx).await?;
    notify(tx, trigger).await?;
    Ok(n as u64)
}

/// Wakes the scheduler when `tx` commits (delivered at commit, and only then).
pub async fn notify(tx: &mut Transaction<'_, Postgres>, trigger: Uuid) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)").bind(SETS_CHANNEL).bind(trigger.to_string()).execute(&mut **tx).await?;
    Ok(())
}
