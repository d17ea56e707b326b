//! SQL for the `triggers` table. Functions take any executor so callers
//! compose them inside transactions; no business rules here.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgExecutor, Postgres, Transaction};
use uuid::Uuid;

use kt_common::trigger::TriggerSpec;

/// A row of `triggers`, secrets still encrypted.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TriggerRow {
    pub id: Uuid,
    pub name: String,
    pub enabled: bool,
    pub generation: i64,
    pub spec: Json<TriggerSpec>,
    pub secrets_ciphertext: Option<Vec<u8>>,
    pub secrets_key_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLUMNS: &str = "id, name, enabled, generation, spec, secrets_ciphertext, secrets_key_id, created_at, updated_at";

pub async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    spec: &TriggerSpec,
    enabled: bool,
    secrets: Option<(&str, &[u8])>,
) -> Result<TriggerRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "INSERT INTO triggers (id, name, enabled, generation, group_id, spec, secrets_key_id, secrets_ciphertext)
         VALUES ($1, $2, $3, 1, $4, $5, $6, $7)
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&spec.name)
    .bind(enabled)
    .bind(&spec.kafka.group_id)
    .bind(Json(spec))
    .bind(secrets.map(|s| s.0))
    .bind(secrets.map(|s| s.1))
    .fetch_one(&mut **tx)
    .await
}

pub async fn get(db: impl PgExecutor<'_>, id: Uuid) -> Result<Option<TriggerRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM triggers WHERE id = $1")).bind(id).fetch_optional(db).await
}

/// Locks the row for the rest of the transaction (updates are read-modify-write).
/// `NO KEY UPDATE`, the lock an update of the row takes anyway: it orders
/// updates against each other but not against the foreign-key checks of
/// ingest, which a change of ordering mode waits for while holding it
/// (see `kt_common::dispatch::announce::lock_ordering_for_change`).
pub async fn get_for_update(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Option<TriggerRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM triggers WHERE id = $1 FOR NO KEY UPDATE"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// Up to `limit` triggers with ids greater than `after`, in id order (v7 ids,
/// so creation order).
pub async fn list(db: impl PgExecutor<'_>, after: Uuid, limit: i64) -> Result<Vec<TriggerRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM triggers WHERE id > $1 ORDER BY id LIMIT $2"))
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await
}

pub async fn list_enabled(db: impl PgExecutor<'_>) -> Result<Vec<TriggerRow>, sqlx::Error> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM triggers WHERE enabled ORDER BY id")).fetch_all(db).await
}

/// Writes a new configuration and bumps the generation.
pub async fn update(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    spec: &TriggerSpec,
    secrets: Option<(&str, &[u8])>,
) -> Result<TriggerRow, sqlx::Error> {
    sqlx::query_as(&format!(
        "UPDATE triggers
            SET name = $2, spec = $3, secrets_key_id = $4, secrets_ciphertext = $5,
                generation = generation + 1, updated_at = now()
          WHERE id = $1
         RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(&spec.name)
    .bind(Json(spec))
    .bind(secrets.map(|s| s.0))
    .bind(secrets.map(|s| s.1))
    .fetch_one(&mut **tx)
    .await
}

/// Ids of the triggers whose secrets are encrypted with another key than
/// `key_id`, up to `limit`, after `after` in id order.
pub async fn sealed_with_other_key(
    db: impl PgExecutor<'_>,
    key_id: &str,
    after: Option<Uuid>,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM triggers
          WHERE secrets_ciphertext IS NOT NULL AND secrets_key_id IS DISTINCT FROM $1
            AND ($2::uuid IS NULL OR id > $2)
          ORDER BY id LIMIT $3",
    )
    .bind(key_id)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Replaces the ciphertext of a trigger's secrets. The configuration is
/// unchanged, so the generation is not bumped: no pipeline restarts.
pub async fn reseal(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    key_id: &str,
    ciphertext: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE triggers SET secrets_key_id = $2, secrets_ciphertext = $3 WHERE id = $1")
        .bind(id)
        .bind(key_id)
        .bind(ciphertext)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Sets the enabled flag; bumps the generation only when it changes.
pub async fn set_enabled(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    enabled: bool,
) -> Result<Option<(TriggerRow, bool)>, sqlx::Error> {
    let Some(row) = get_for_update(tx, id).await? else {
        return Ok(None);
    };
    if row.enabled == enabled {
        return Ok(Some((row, false)));
    }
    let row = sqlx::query_as(&format!(
        "UPDATE triggers SET enabled = $2, generation = generation + 1, updated_at = now()
          WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(enabled)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Some((row, true)))
}

pub async fn delete(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<Option<String>, sqlx::Error> {
    sqlx::query_scalar("DELETE FROM triggers WHERE id = $1 RETURNING name").bind(id).fetch_optional(&mut **tx).await
}
