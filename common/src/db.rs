//! The Postgres pool, the embedded migrations (the `migrations/` folder is the
//! only schema source), and the mapping of SQLSTATE codes to error kinds.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The newest migration this build knows; a node refuses to start against a
/// database at another version.
pub fn expected_schema_version() -> i64 {
    MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0)
}

pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let options: PgConnectOptions = url.parse()?;
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options.application_name("kafka-triggers"))
        .await
}

/// A pool beside `pool`, to the same server, for the hot path of dispatch
/// (the scheduler's claims, the workers' rounds):
///
/// - its connections always use generic plans: the statements' parameters
///   are the arrays of a round, a custom plan for each call costs as much as
///   running it, and the generic plan is the same plan;
/// - a connection is not pinged before each use: that is a round trip per
///   statement on a path whose every statement waits on the one before. A
///   connection that died is found by the statement instead, which fails
///   and is retried by its caller like any other database error.
pub fn dispatch_pool(pool: &PgPool, max_connections: u32) -> PgPool {
    let options = pool.connect_options().as_ref().clone().options([("plan_cache_mode", "force_generic_plan")]);
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .test_before_acquire(false)
        .connect_lazy_with(options)
}

pub async fn migrate(pool: &PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The newest successfully applied migration, 0 for an empty database.
pub async fn applied_schema_version(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL").fetch_one(pool).await?;
    if !exists {
        return Ok(0);
    }
    sqlx::query_scalar("SELECT COALESCE(MAX(version), 0) FROM _sqlx_migrations WHERE success").fetch_one(pool).await
}

/// What a database error means to the caller, by SQLSTATE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbErrorKind {
    /// 23505: a unique constraint; carries no detail, see [`constraint`].
    UniqueViolation,
    /// 23503.
    ForeignKeyViolation,
    /// 23xxx other than the above: the row itself is bad.
    IntegrityViolation,
    /// 40001 / 40P01: try the transaction again.
    Retryable,
    /// Connection lost, server shutting down, pool exhausted: try later.
    Unavailable,
    Other,
}

pub fn classify(err: &sqlx::Error) -> DbErrorKind {
    match err {
        sqlx::Error::Database(db) => match db.code().as_deref() {
            Some("23505") => DbErrorKind::UniqueViolation,
            Some("23503") => DbErrorKind::ForeignKeyViolation,
            Some(c) if c.starts_with("23") || c.starts_with("22") => DbErrorKind::IntegrityViolation,
            Some("40001" | "40P01") => DbErrorKind::Retryable,
            // 08: connection exception; 57P0x: admin shutdown / crash / cannot connect now.
            Some(c) if c.starts_with("08") || c.starts_with("57P") || c == "53300" => DbErrorKind::Unavailable,
            _ => DbErrorKind::Other,
        },
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Tls(_) => {
            DbErrorKind::Unavailable
        }
        _ => DbErrorKind::Other,
    }
}

/// The constraint a database error names, if any.
pub fn constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}
