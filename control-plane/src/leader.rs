//! High availability: several control-plane replicas share one Postgres and
//! exactly one is active. The active one holds a session-level advisory lock
//! on a connection of its own; the others wait for it. A replica that loses
//! that connection (and so, possibly, the lock) stops serving at once and
//! stands by again, trying for the lock like any standby (see `run` in the
//! crate root): a lone replica outlives a Postgres restart.
//!
//! Fencing: two replicas may both believe they are active for at most one
//! check interval. Nothing they do in that window can break an invariant:
//! trigger changes are transactions, and every write of a set is guarded by
//! the claim's lock id in the database, so two schedulers granting the same
//! set lead to one claim and one `Busy` outcome.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::{Connection, PgConnection};
use tokio_util::sync::CancellationToken;

/// The advisory lock key of the active control plane ("kt_leade").
pub const LEADER_LOCK_KEY: i64 = 0x6b74_5f6c_6561_6465;
/// How often a standby tries for the lock, and the leader checks it still
/// has its connection.
pub const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// While the database cannot be reached, a standby says so this often (it
/// keeps trying every [`CHECK_INTERVAL`]).
const UNREACHABLE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Leadership held; dropping it releases the lock (the connection closes).
pub struct Leadership {
    /// Cancelled when leadership is lost.
    pub lost: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Waits until this replica holds the lock (or `shutdown`: `Ok(None)`).
pub async fn acquire(database_url: &str, shutdown: &CancellationToken) -> anyhow::Result<Option<Leadership>> {
    let mut announced = false;
    let mut warned: Option<tokio::time::Instant> = None;
    loop {
        let attempt = async {
            let mut conn =
                PgConnection::connect(database_url).await.context("failed to connect for the leader lock")?;
            let held: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                .bind(LEADER_LOCK_KEY)
                .fetch_one(&mut conn)
                .await?;
            anyhow::Ok(held.then_some(conn))
        };
        match attempt.await {
            Ok(Some(conn)) => {
                tracing::info!("this control plane is now the active one");
                let lost = CancellationToken::new();
                let task = tokio::spawn(hold(conn, lost.clone()));
                return Ok(Some(Leadership { lost, task }));
            }
            Ok(None) if !announced => {
                tracing::info!("another control plane is active; standing by");
                announced = true;
            }
            Ok(None) => {}
            Err(error) if warned.is_none_or(|at| at.elapsed() >= UNREACHABLE_LOG_INTERVAL) => {
                tracing::warn!(error = format!("{error:#}"), "cannot try the leader lock; standing by and retrying");
                warned = Some(tokio::time::Instant::now());
            }
            Err(error) => tracing::debug!(error = format!("{error:#}"), "cannot try the leader lock; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(CHECK_INTERVAL) => {}
        }
    }
}

/// Keeps the lock's connection busy enough to notice its loss.
async fn hold(mut conn: PgConnection, lost: CancellationToken) {
    loop {
        tokio::time::sleep(CHECK_INTERVAL).await;
        let alive = tokio::time::timeout(CHECK_INTERVAL * 4, sqlx::query("SELECT 1").execute(&mut conn)).await;
        if !matches!(alive, Ok(Ok(_))) {
            tracing::error!("lost the leader lock's database connection; stepping down");
            lost.cancel();
            return;
        }
    }
}
