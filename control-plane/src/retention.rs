//! Bounded growth: rows that are only history (events, finished work
//! orders) are removed after their retention period, in bounded chunks, by
//! one periodic task. Dedup records are the data plane's (`store::dedup`).

use std::time::Duration;

use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows removed per statement: a long backlog of old rows never becomes
/// one long transaction.
pub const CHUNK: i64 = 10_000;
/// How often the cleanup runs.
const INTERVAL: Duration = Duration::from_secs(600);

/// What is kept, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub events: Duration,
    pub work_orders: Duration,
}

/// Deletes events older than `retention`, in chunks of `chunk`.
pub async fn remove_old_events(pool: &PgPool, retention: Duration, chunk: i64) -> Result<u64, sqlx::Error> {
    in_chunks(
        pool,
        "DELETE FROM events WHERE id IN (
            SELECT id FROM events WHERE created_at < now() - make_interval(secs => $1) LIMIT $2)",
        retention,
        chunk,
    )
    .await
}

/// Deletes work orders that finished (succeeded or skipped) longer than
/// `retention` ago, in chunks of `chunk`, through `work_orders_finished_idx`.
/// Failed, pending and running ones stay until an operator acts: their set
/// still waits on them.
pub async fn remove_finished_work_orders(pool: &PgPool, retention: Duration, chunk: i64) -> Result<u64, sqlx::Error> {
    in_chunks(
        pool,
        "DELETE FROM work_orders WHERE id IN (
            SELECT id FROM work_orders
             WHERE state IN ('success', 'skipped') AND updated_at < now() - make_interval(secs => $1)
             LIMIT $2)",
        retention,
        chunk,
    )
    .await
}

/// Runs `sql` (binding the retention in seconds and the chunk size) until
/// a statement removes less than a chunk.
async fn in_chunks(pool: &PgPool, sql: &str, retention: Duration, chunk: i64) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let n = sqlx::query(sql).bind(retention.as_secs_f64()).bind(chunk).execute(pool).await?.rows_affected();
        total += n;
        if (n as i64) < chunk {
            return Ok(total);
        }
    }
}

/// Runs both cleanups now and every [`INTERVAL`] until `shutdown`.
pub async fn run(pool: PgPool, retention: Retention, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(INTERVAL);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {
                match remove_old_events(&pool, retention.events, CHUNK).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "old events removed"),
                    Err(error) => tracing::warn!(%error, "event retention cleanup failed"),
                }
                match remove_finished_work_orders(&pool, retention.work_orders, CHUNK).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(deleted = n, "finished work orders removed"),
                    Err(error) => tracing::warn!(%error, "work-order retention cleanup failed"),
                }
            }
        }
    }
}
