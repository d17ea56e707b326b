//! The policy around a batch write: a batch is stored, or retried until it
//! is. Transient failures (database down, serialization conflicts) are
//! retried with backoff forever; a batch with a row the database rejects is
//! written again row by row so only that row ends up in `ingest_failures`.
//! Nothing is ever skipped without a record, and the caller commits Kafka
//! offsets only after this returns `Ok`.

use std::time::Duration;

use kt_common::backoff::Backoff;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{write_batch, write_error_kind, write_rows_isolated, BatchOutcome, IngestMessage, WriteErrorKind};

#[derive(Debug, Clone, Copy)]
pub struct PersistSettings {
    /// Delay between attempts while the database cannot take the batch.
    pub retry_backoff: Backoff,
}

impl Default for PersistSettings {
    fn default() -> Self {
        Self { retry_backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(10)) }
    }
}

/// Why an attempt to store a batch failed. Each is retried; only
/// [`PersistError::Cancelled`] ends [`persist_batch`] without storing.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("database unavailable while storing messages of trigger {trigger_id}: {source}")]
    Unavailable {
        trigger_id: Uuid,
        #[source]
        source: sqlx::Error,
    },
    #[error("trigger {trigger_id} no longer exists in the database; its messages cannot be stored")]
    TriggerMissing {
        trigger_id: Uuid,
        #[source]
        source: sqlx::Error,
    },
    #[error("database error while storing messages of trigger {trigger_id}: {source}")]
    Database {
        trigger_id: Uuid,
        #[source]
        source: sqlx::Error,
    },
    #[error("storing messages of trigger {trigger_id} was abandoned at shutdown")]
    Cancelled { trigger_id: Uuid },
}

impl PersistError {
    fn new(trigger_id: Uuid, source: sqlx::Error) -> Self {
        match write_error_kind(&source) {
            WriteErrorKind::Transient => Self::Unavailable { trigger_id, source },
            WriteErrorKind::TriggerMissing => Self::TriggerMissing { trigger_id, source },
            WriteErrorKind::BadRow | WriteErrorKind::Systemic => Self::Database { trigger_id, source },
        }
    }
}

/// Stores `batch` for `trigger_id`, retrying until it is stored or `cancel`
/// fires. `on_retry` sees every failed attempt (for status and metrics)
/// before the backoff sleep.
pub async fn persist_batch(
    pool: &PgPool,
    trigger_id: Uuid,
    batch: &[IngestMessage],
    settings: &PersistSettings,
    cancel: &CancellationToken,
    mut on_retry: impl FnMut(&PersistError),
) -> Result<BatchOutcome, PersistError> {
    let mut attempt: u32 = 0;
    loop {
        let result = tokio::select! {
            // A hung statement (a locked table, a half-open connection) must
            // not hold up shutdown; dropping the transaction rolls it back.
            _ = cancel.cancelled() => return Err(PersistError::Cancelled { trigger_id }),
            result = store_once(pool, trigger_id, batch) => result,
        };
        let err = match result {
            Ok(outcome) => {
                if attempt > 0 {
                    tracing::info!(%trigger_id, attempts = attempt + 1, "stored batch after retrying");
                }
                return Ok(outcome);
            }
            Err(e) => PersistError::new(trigger_id, e),
        };
        tracing::warn!(%trigger_id, attempt, error = %err, "failed to store batch; will retry");
        on_retry(&err);
        let delay = settings.retry_backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return Err(PersistError::Cancelled { trigger_id }),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One attempt: the batch in one transaction, or row by row when a row is
/// bad.
async fn store_once(pool: &PgPool, trigger_id: Uuid, batch: &[IngestMessage]) -> Result<BatchOutcome, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let err = match write_batch(&mut tx, trigger_id, batch).await {
        Ok(outcome) => {
            tx.commit().await?;
            return Ok(outcome);
        }
        Err(e) => e,
    };
    if write_error_kind(&err) != WriteErrorKind::BadRow {
        return Err(err);
    }
    tx.rollback().await?;
    tracing::info!(%trigger_id, messages = batch.len(), error = %err, "batch rejected; storing it row by row");
    let mut tx = pool.begin().await?;
    let outcome = write_rows_isolated(&mut tx, trigger_id, batch).await?;
    tx.commit().await?;
    Ok(outcome)
}
