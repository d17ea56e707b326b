//! The live event stream. One tail task reads committed events in
//! (transaction id, id) order — see migration 0004 for why that order has no
//! gaps — and broadcasts them; each subscriber first replays from its cursor
//! in Postgres, then follows the broadcast, dropping what it already sent.
//! A subscriber that falls behind the broadcast buffer is cut off with a
//! clear status instead of slowing anyone down.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use kt_common::tasks::Supervisor;
use sqlx::PgPool;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Events buffered for live subscribers; one this far behind is cut off.
pub const BROADCAST_CAPACITY: usize = 8_192;
/// Rows read per query, when tailing and when replaying.
pub const PAGE: i64 = 1_000;
/// How often the tail reads new events. Not a NOTIFY: a notifying
/// transaction takes a global lock at commit, and events are written by every
/// worker transaction (see migration 0004). One indexed read per tick.
const TAIL_TICK: Duration = Duration::from_millis(100);

/// Position in the stream: after (transaction id, event id).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Cursor {
    pub tx: u64,
    pub id: i64,
}

impl fmt::Display for Cursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.tx, self.id)
    }
}

impl FromStr for Cursor {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        let (tx, id) = s.split_once('-').ok_or(())?;
        Ok(Cursor { tx: tx.parse().map_err(|_| ())?, id: id.parse().map_err(|_| ())? })
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub tx: i64,
    pub id: i64,
    pub kind: String,
    pub trigger_id: Option<Uuid>,
    pub node_id: Option<String>,
    pub details: String,
    pub created_at: DateTime<Utc>,
}

impl EventRow {
    pub fn cursor(&self) -> Cursor {
        Cursor { tx: self.tx as u64, id: self.id }
    }
}

/// Committed events after `after` that no running transaction can precede.
pub async fn read_after(pool: &PgPool, after: Cursor, limit: i64) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT tx_id::text::bigint AS tx, id, kind, trigger_id, node_id, details::text AS details, created_at
           FROM events
          WHERE (tx_id, id) > ($1::text::xid8, $2)
            AND tx_id < pg_snapshot_xmin(pg_current_snapshot())
          ORDER BY tx_id, id
          LIMIT $3",
    )
    .bind(after.tx.to_string())
    .bind(after.id)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The position a live-only subscriber starts from: everything older is past.
pub async fn current(pool: &PgPool) -> Result<Cursor, sqlx::Error> {
    let tx: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetch_one(pool).await?;
    Ok(Cursor { tx: (tx as u64).saturating_sub(1), id: i64::MAX })
}

/// Whether `cursor` names a transaction that has not started yet: no event
/// can have it, so it was not given by this database (made up, or from
/// another one) and a stream from it would wait, silently, for a
/// transaction id this cluster may take days to reach.
pub async fn is_from_the_future(pool: &PgPool, cursor: Cursor) -> Result<bool, sqlx::Error> {
    let next: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint").fetch_one(pool).await?;
    Ok(cursor.tx >= next as u64)
}

/// Shares committed events with every subscriber.
#[derive(Clone)]
pub struct EventHub {
    pool: PgPool,
    tx: broadcast::Sender<Arc<EventRow>>,
    /// Cancelled when the hub stops (shutdown, or this replica stepped
    /// down): subscribers end their streams then instead of waiting for
    /// events that will not come, which would also hold up the server's
    /// drain.
    stopped: CancellationToken,
}

impl EventHub {
    /// Starts the tail until `shutdown`. It is fatal: without it every
    /// subscriber would silently stop receiving events.
    pub async fn start(pool: PgPool, shutdown: CancellationToken, tasks: &Supervisor) -> Result<Self, sqlx::Error> {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        let hub = EventHub { pool: pool.clone(), tx, stopped: shutdown.clone() };
        let start = current(&pool).await?;
        tasks.spawn_fatal("event tail", &shutdown, hub.clone().tail(start, shutdown.clone()));
        Ok(hub)
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<EventRow>> {
        self.tx.subscribe()
    }

    /// Resolves when the hub has stopped.
    pub async fn stopped(&self) {
        self.stopped.cancelled().await
    }

    pub fn subscribers(&self) -> usize {
        self.tx.receiver_count()
    }

    async fn tail(self, mut cursor: Cursor, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(TAIL_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // Read everything readable, page by page.
            loop {
                match read_after(&self.pool, cursor, PAGE).await {
                    Ok(rows) => {
                        let full = rows.len() as i64 == PAGE;
                        for row in rows {
                            cursor = row.cursor();
                            // No subscriber is not an error.
                            let _ = self.tx.send(Arc::new(row));
                        }
                        if !full {
                            break;
                        }
                    }
                    Err(error) => {
                        tracing::warn!(%error, "event tail cannot read events");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_cursors_round_trip_and_order() {
        let c = Cursor { tx: 42, id: 7 };
        assert_eq!(c.to_string().parse::<Cursor>(), Ok(c));
        assert!(Cursor { tx: 41, id: 100 } < Cursor { tx: 42, id: 1 });
        for bad in ["", "42", "a-b", "42-", "-1-2"] {
            assert!(bad.parse::<Cursor>().is_err(), "{bad}");
        }
    }
}
