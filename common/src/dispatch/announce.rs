//! How stored messages join their sets: a keyed message joins the set of its
//! (trigger, topic, key), an unkeyed one is a set of its own. Ingest runs
//! these clauses inside its batch statement; the benchmark's seeding runs
//! them over a backlog it stored with COPY.

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
pub const KEYED_SET_UPSERT: &str = "ON CONFLICT (trigger_id, topic, key) WHERE key IS NOT NULL DO UPDATE
       SET ingest_seq = message_sets.ingest_seq + 1,
           state = CASE WHEN message_sets.state = 'idle' THEN 'ready' ELSE message_sets.state END,
           updated_at = now()
     WHERE message_sets.state = 'idle' OR message_sets.lock_id IS NOT NULL
    RETURNING lock_id IS NULL AS announce";

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
