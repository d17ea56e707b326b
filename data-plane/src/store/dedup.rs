//! Retention of dedup records: records older than the configured retention
//! are deleted in bounded chunks, by a periodic task on every node (chunks
//! are claimed with SKIP LOCKED, so nodes never wait on each other).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Rows deleted per statement: keeps each transaction short and its locks
/// few, whatever the backlog.
pub const CLEANUP_CHUNK_ROWS: i64 = 5_000;

#[derive(Debug, Clone, Copy)]
pub struct DedupCleanupSettings {
    /// How long a dedup record is kept after it was written.
    pub retention: Duration,
    /// How often the cleanup runs.
    pub interval: Duration,
}

impl Default for DedupCleanupSettings {
    fn default() -> Self {
        Self { retention: Duration::from_secs(7 * 24 * 3600), interval: Duration::from_secs(600) }
    }
}

/// Deletes dedup records created more than `older_than` ago, chunk by chunk,
/// and returns how many were deleted. A record whose message is still stored
/// is kept: it still guards that message against being stored twice.
pub async fn cleanup_dedup_records(pool: &PgPool, older_than: Duration) -> Result<u64, sqlx::Error> {
    // The cutoff is fixed once, on the database clock, so the loop ends even
    // while new records keep ageing past a moving cutoff.
    let cutoff: DateTime<Utc> = sqlx::query_scalar("SELECT now() - make_interval(secs => $1)")
        .bind(older_than.as_secs_f64())
        .fetch_one(pool)
        .await?;
    let mut total = 0;
    loop {
        let deleted = sqlx::query(
            r#"
            DELETE FROM message_records
            WHERE ctid IN (
                SELECT r.ctid
                FROM message_records r
                WHERE r.created_at < $1
                  AND NOT EXISTS (
                      SELECT 1 FROM messages m
                      WHERE m.trigger_id = r.trigger_id AND m.topic = r.topic
                        AND m.partition = r.partition AND m."offset" = r."offset")
                LIMIT $2
                FOR UPDATE SKIP LOCKED
            )
            "#,
        )
        .bind(cutoff)
        .bind(CLEANUP_CHUNK_ROWS)
        .execute(pool)
        .await?
        .rows_affected();
        total += deleted;
        if deleted < CLEANUP_CHUNK_ROWS as u64 {
            return Ok(total);
        }
    }
}

/// Runs [`cleanup_dedup_records`] every `settings.interval` until `cancel`.
/// Failures are logged and retried at the next tick: a late cleanup only
/// costs disk space.
pub async fn run_dedup_cleanup(pool: PgPool, settings: DedupCleanupSettings, cancel: CancellationToken) {
    let mut ticker = tokio::time::interval(settings.interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let result = tokio::select! {
            _ = cancel.cancelled() => return,
            result = cleanup_dedup_records(&pool, settings.retention) => result,
        };
        match result {
            Ok(0) => tracing::debug!("no dedup records past retention"),
            Ok(deleted) => {
                metrics::counter!("kt_dedup_records_deleted_total").increment(deleted);
                tracing::info!(deleted, retention_s = settings.retention.as_secs(), "deleted expired dedup records");
            }
            Err(e) => tracing::warn!(error = %e, "dedup cleanup failed; will retry at the next interval"),
        }
    }
}
