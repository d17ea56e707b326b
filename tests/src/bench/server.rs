//! The Postgres server the bench's databases live on: by default a
//! throwaway cluster of its own with the server's default settings
//! (autovacuum on, as in production), or an existing server named with
//! `--database-url`. Every result line says which, with the settings that
//! change what the numbers mean.

use anyhow::Context as _;
use sqlx::{Connection as _, PgConnection, PgPool};

use super::report;
use crate::postgres::PgCluster;

/// What the bench needs beyond the server's defaults: statement counts
/// (`statements_per_work_order`) need pg_stat_statements loaded at start,
/// and a scenario holds a control plane's, a node's and the bench's own
/// pools, plus the limits' databases, at once.
pub const OWNED_CLUSTER_SETTINGS: &[(&str, &str)] =
    &[("shared_preload_libraries", "pg_stat_statements"), ("max_connections", "200")];

/// Where the bench creates (and drops) its databases.
#[derive(Debug, Clone)]
pub struct PostgresServer {
    /// A URL of the server's maintenance database, where databases are
    /// created and server-wide statistics are read.
    pub admin_url: String,
    /// The bench started this server itself (and removes it at exit).
    pub owned: bool,
}

impl PostgresServer {
    /// An existing server: nothing is changed on it beyond creating and
    /// dropping the bench's own databases.
    pub fn external(admin_url: impl Into<String>) -> Self {
        Self { admin_url: admin_url.into(), owned: false }
    }

    /// `postgres_server` in every result line.
    pub fn kind(&self) -> &'static str {
        if self.owned {
            "bench-owned"
        } else {
            "external"
        }
    }
}

/// Starts the bench's own cluster and prepares its maintenance database:
/// the pg_stat_statements view is created there, so statistics are read
/// from outside the databases they describe (reading them does not count
/// in them).
pub async fn start_owned() -> anyhow::Result<(PgCluster, PostgresServer)> {
    let cluster = PgCluster::start(OWNED_CLUSTER_SETTINGS).await.context("failed to start the bench's own Postgres")?;
    let server = PostgresServer { admin_url: cluster.url(), owned: true };
    let mut admin = PgConnection::connect(&server.admin_url).await?;
    sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(&mut admin)
        .await
        .context("failed to create pg_stat_statements in the bench's own cluster")?;
    admin.close().await?;
    Ok((cluster, server))
}

/// Reads the server settings reported with the results, once; warns when
/// autovacuum is off (nothing then refreshes planner statistics or removes
/// dead rows, which a production server does). `current_setting` rather
/// than `pg_settings.setting`, so sizes carry their unit (`128MB`, not
/// `16384` pages).
pub async fn record_settings(pool: &PgPool) -> anyhow::Result<()> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let rows: Vec<(String, String)> =
        sqlx::query_as("SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY($1) ORDER BY name")
            .bind(report::POSTGRES_SETTINGS)
            .fetch_all(pool)
            .await?;
    if rows.iter().any(|(k, v)| k == "autovacuum" && v == "off") {
        WARNED.call_once(|| {
            eprintln!(
                "warning: autovacuum is off on this Postgres server: statistics go stale and dead rows pile \
                 up during long runs, unlike on a production server"
            )
        });
    }
    report::set_postgres_settings(rows.into_iter().map(|(k, v)| (k, serde_json::Value::from(v))).collect());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn test_owned_cluster_has_autovacuum_and_statement_statistics() {
        let (_cluster, server) = start_owned().await.unwrap();
        assert_eq!(server.kind(), "bench-owned");
        let mut c = PgConnection::connect(&server.admin_url).await.unwrap();
        let autovacuum: String = sqlx::query_scalar("SHOW autovacuum").fetch_one(&mut c).await.unwrap();
        assert_eq!(autovacuum, "on");
        let calls: Option<i64> = sqlx::query_scalar("SELECT sum(calls)::int8 FROM pg_stat_statements")
            .fetch_one(&mut c)
            .await
            .expect("pg_stat_statements is loaded and readable from the maintenance database");
        assert!(calls.is_some());
    }
}
