//! Persistence of ingested Kafka messages: the batch write (messages, dedup
//! records and partition checkpoints in one transaction), the retry and
//! isolation policy around it, and the retention cleanup of dedup records.

mod batch;
mod dedup;
mod persist;

use chrono::{DateTime, Utc};

pub use batch::{
    load_checkpoints, record_failure, upsert_checkpoints, write_batch, write_rows_isolated, Checkpoint,
    SETS_NOTIFY_CHANNEL,
};
pub use dedup::{cleanup_dedup_records, run_dedup_cleanup, DedupCleanupSettings, CLEANUP_CHUNK_ROWS};
pub use persist::{persist_batch, PersistError, PersistSettings};

/// One Kafka message as it is stored, owned and detached from librdkafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestMessage {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    /// In the order Kafka delivered them; `None` when the headers could not
    /// be read (the message is then recorded as an ingest failure).
    pub headers: Option<Vec<Header>>,
    /// The message timestamp (create or log-append time), if it has one that
    /// fits a timestamp.
    pub timestamp: Option<DateTime<Utc>>,
    /// The trigger's filter did not match it: only its dedup record is
    /// written (and it is counted), no message, so it gets no work order.
    pub filtered: bool,
}

/// A Kafka header: a string name and an optional binary value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: Option<Vec<u8>>,
}

/// What a batch write did with its messages. `stored + duplicates + failed
/// + filtered` is the number of messages in the batch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Newly stored in `messages`.
    pub stored: u64,
    /// Already ingested before (or repeated within the batch): ignored.
    pub duplicates: u64,
    /// Rejected by the database and recorded in `ingest_failures`.
    pub failed: u64,
    /// Seen for the first time and not matched by the trigger's filter.
    pub filtered: u64,
}

impl std::ops::AddAssign for BatchOutcome {
    fn add_assign(&mut self, other: Self) {
        self.stored += other.stored;
        self.duplicates += other.duplicates;
        self.failed += other.failed;
        self.filtered += other.filtered;
    }
}

/// How a failed write is handled, decided by SQLSTATE (never by message
/// text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteErrorKind {
    /// The data of some row is what the database rejects (constraint, bad
    /// value, a key too large for the index): isolate the row and record it.
    BadRow,
    /// The database is unreachable, or asked us to try again: retry the
    /// whole batch later, committing nothing meanwhile.
    Transient,
    /// The trigger row is gone (foreign key): nothing for this trigger can be
    /// stored; wait until the pipeline is stopped.
    TriggerMissing,
    /// Anything else (permissions, a missing table, a bug): it will not go
    /// away by isolating rows; retry later and make it visible.
    Systemic,
}

pub fn write_error_kind(err: &sqlx::Error) -> WriteErrorKind {
    use kt_common::db::{classify, DbErrorKind};
    match classify(err) {
        DbErrorKind::UniqueViolation | DbErrorKind::IntegrityViolation => WriteErrorKind::BadRow,
        DbErrorKind::ForeignKeyViolation => WriteErrorKind::TriggerMissing,
        DbErrorKind::Retryable | DbErrorKind::Unavailable => WriteErrorKind::Transient,
        // Class 54 (program limit exceeded) is what a key too large for the
        // set index raises: it is about that row, not about the database.
        DbErrorKind::Other if sqlstate(err).is_some_and(|c| c.starts_with("54")) => WriteErrorKind::BadRow,
        DbErrorKind::Other => match err {
            // A protocol-level failure of the connection itself.
            sqlx::Error::Protocol(_) | sqlx::Error::WorkerCrashed => WriteErrorKind::Transient,
            _ => WriteErrorKind::Systemic,
        },
    }
}

/// The SQLSTATE of a database error.
pub fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}
