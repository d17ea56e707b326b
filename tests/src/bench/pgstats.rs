//! The server's own count of what a run cost in one database: transactions
//! committed (`pg_stat_database.xact_commit`) and statements executed
//! (`sum(calls)` of `pg_stat_statements`). Read from a connection to the
//! maintenance database, so reading them does not count in them.
//!
//! Postgres publishes a backend's transaction counts late (at most once a
//! second while it is busy, up to 10 s later once it is idle) but always
//! when it exits; statement counts are published as each statement ends.
//! So the end of a window is read after every connection to the database
//! has gone ([`Observer::wait_disconnected`]).

use std::time::Duration;

use anyhow::Context as _;
use serde_json::{json, Value};
use sqlx::{Connection as _, PgConnection};

/// Counters of one database at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub commits: i64,
    /// `None` when pg_stat_statements cannot be read on this server.
    pub statements: Option<i64>,
}

/// Reads the counters of one database.
pub struct Observer {
    conn: PgConnection,
    database: String,
    /// Why statements cannot be counted, when they cannot.
    statements_unavailable: Option<String>,
}

impl Observer {
    /// Connects to `admin_url` (the maintenance database) to observe
    /// `database`. An external server may not have pg_stat_statements
    /// (loaded and created in the maintenance database): statements are then
    /// not counted, and [`Observer::note`] says why.
    pub async fn connect(admin_url: &str, database: &str) -> anyhow::Result<Self> {
        let mut conn = PgConnection::connect(admin_url).await.context("failed to connect the statistics reader")?;
        let statements_unavailable =
            match sqlx::query_scalar::<_, i64>("SELECT count(*) FROM pg_stat_statements LIMIT 1")
                .fetch_one(&mut conn)
                .await
            {
                Ok(_) => None,
                Err(e) => Some(format!(
                    "statements not counted: pg_stat_statements is not readable in the maintenance database ({e}); \
                     it needs shared_preload_libraries = 'pg_stat_statements' and CREATE EXTENSION there"
                )),
            };
        Ok(Self { conn, database: database.to_owned(), statements_unavailable })
    }

    pub fn note(&self) -> Option<&str> {
        self.statements_unavailable.as_deref()
    }

    pub async fn snapshot(&mut self) -> anyhow::Result<Counters> {
        // Each statement is a transaction of its own, so each read sees the
        // counters as published now (not a snapshot cached earlier).
        let commits: i64 = sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
            .bind(&self.database)
            .fetch_one(&mut self.conn)
            .await
            .context("failed to read pg_stat_database")?;
        let statements = match self.statements_unavailable {
            Some(_) => None,
            None => Some(
                sqlx::query_scalar(
                    "SELECT COALESCE(sum(calls), 0)::int8 FROM pg_stat_statements
                      WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)",
                )
                .bind(&self.database)
                .fetch_one(&mut self.conn)
                .await
                .context("failed to read pg_stat_statements")?,
            ),
        };
        Ok(Counters { commits, statements })
    }

    /// Waits until no backend is connected to the database (each published
    /// its counts as it exited), for at most `timeout`; returns how many are
    /// still there. Past Postgres's 10 s idle flush, those left have
    /// published all but their last second of work.
    pub async fn wait_disconnected(&mut self, timeout: Duration) -> anyhow::Result<i64> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE datname = $1")
                .bind(&self.database)
                .fetch_one(&mut self.conn)
                .await?;
            if left == 0 || tokio::time::Instant::now() >= deadline {
                return Ok(left);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `(after - before - own) / work_orders`: what the system did per work
/// order, without `own` (the bench's polling) in the window. `None` with no
/// work orders, or when a counter went backwards (statistics were reset).
pub fn per_work_order(before: i64, after: i64, own: i64, work_orders: usize) -> Option<f64> {
    let delta = after - before - own;
    (work_orders > 0 && delta >= 0).then(|| delta as f64 / work_orders as f64)
}

/// What a run cost the database, per work order: the fields of a result
/// line, and the raw counts they come from.
pub fn report(before: Counters, after: Counters, own_polls: i64, work_orders: usize, note: Option<&str>) -> Value {
    let commits = per_work_order(before.commits, after.commits, own_polls, work_orders);
    let statements = match (before.statements, after.statements) {
        (Some(b), Some(a)) => per_work_order(b, a, own_polls, work_orders),
        _ => None,
    };
    json!({
        "commits_per_work_order": commits.map(|c| super::report::round(c, 3)),
        "statements_per_work_order": statements.map(|s| super::report::round(s, 3)),
        "commits": after.commits - before.commits,
        "statements": after.statements.zip(before.statements).map(|(a, b)| a - b),
        "bench_polls_subtracted": own_polls,
        "note": note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_per_work_order_subtracts_the_bench_own_polls() {
        assert_eq!(per_work_order(100, 2_150, 50, 1_000), Some(2.0));
        assert_eq!(per_work_order(0, 10, 0, 0), None);
        // A reset between the two reads: no number rather than a wrong one.
        assert_eq!(per_work_order(500, 10, 0, 100), None);
    }

    #[test]
    fn test_report_is_null_where_statements_are_not_counted() {
        let before = Counters { commits: 10, statements: None };
        let after = Counters { commits: 1_010, statements: None };
        let r = report(before, after, 0, 500, Some("statements not counted"));
        assert_eq!(r["commits_per_work_order"], 2.0);
        assert!(r["statements_per_work_order"].is_null());
        assert_eq!(r["note"], "statements not counted");
    }

    #[tokio::test]
    async fn test_observer_counts_commits_after_the_connections_are_gone() {
        let db = crate::TestDb::create().await.unwrap();
        let mut observer = Observer::connect(&crate::admin_database_url(), &db.name).await.unwrap();
        let before = observer.snapshot().await.unwrap();
        let mut c = PgConnection::connect(&db.url).await.unwrap();
        for _ in 0..5 {
            sqlx::query("SELECT 1").execute(&mut c).await.unwrap();
        }
        c.close().await.unwrap();
        assert_eq!(observer.wait_disconnected(Duration::from_secs(10)).await.unwrap(), 0);
        let after = observer.snapshot().await.unwrap();
        // The five statements, and whatever connecting itself runs.
        assert!(after.commits - before.commits >= 5, "{before:?} -> {after:?}");
        if let (Some(b), Some(a)) = (before.statements, after.statements) {
            assert!(a - b >= 5, "{before:?} -> {after:?}");
        }
    }
}
