//! Trigger operations: validate, encrypt credentials, write the row and its
//! event in one transaction, then tell the assignment loop that the desired
//! state changed.

use std::sync::Arc;
use std::time::Duration;

use kt_common::backoff::Backoff;
use kt_common::crypto::Keyring;
use kt_common::db::{classify, DbErrorKind};
use kt_common::dispatch::announce;
use kt_common::trigger::{spec_to_proto, validate_trigger, TriggerSecrets, TriggerSpec, ValidatedTrigger};
use kt_common::webhook_policy::{self, WebhookPolicy};
use kt_proto::status::FieldViolation;
use kt_proto::v1;
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

use super::store::{self, TriggerRow};
use super::{mask, TriggerError};
use crate::events::{self, EventKind};
use crate::paging;

pub use crate::paging::MAX_PAGE_SIZE;

/// Triggers re-encrypted per listing round of [`TriggerService::rotate_keys`].
const ROTATE_BATCH: i64 = 500;
/// Attempts of a trigger delete that lost a deadlock (see
/// [`TriggerService::delete`]), and the pause between them.
const DELETE_TRIES: u32 = 5;
const DELETE_RETRY: Backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
/// Where the fields of a request's trigger are.
const PREFIX: &str = "trigger.";
const URL_FIELD: &str = "trigger.webhook.url";

/// What [`TriggerService::connection_target`] resolves.
pub enum ConnectionTarget<'a> {
    Stored(Uuid),
    Given(&'a v1::Trigger),
}

/// What [`TriggerService::rotate_keys`] did.
#[derive(Debug, Default)]
pub struct Rotation {
    /// Triggers whose secrets are now under the current key.
    pub rotated: u64,
    /// Triggers whose secrets could not be decrypted, and why.
    pub failed: Vec<(Uuid, String)>,
}

#[derive(Clone)]
pub struct TriggerService {
    pool: PgPool,
    keys: Keyring,
    /// Bumped after every committed change; the assignment loop watches it.
    changes: watch::Sender<u64>,
    webhook_policy: Arc<WebhookPolicy>,
}

impl TriggerService {
    pub fn new(pool: PgPool, keys: Keyring) -> Self {
        Self { pool, keys, changes: watch::Sender::new(0), webhook_policy: Arc::default() }
    }

    /// Checks webhook targets against `policy` instead of the default one.
    pub fn with_webhook_policy(mut self, policy: WebhookPolicy) -> Self {
        self.webhook_policy = Arc::new(policy);
        self
    }

    /// Changes of the desired pipeline state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn notify(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    pub async fn create(&self, input: &v1::Trigger) -> Result<TriggerRow, TriggerError> {
        let refused = self.refused_dns_answer(input).await;
        let valid = self.validate(input, None, refused)?;
        // Absent means enabled, as before the field had presence.
        let enabled = input.enabled.unwrap_or(true);
        let id = Uuid::now_v7();
        let sealed = self.seal(id, &valid.secrets)?;
        let mut tx = self.pool.begin().await?;
        let row =
            store::insert(&mut tx, id, &valid.spec, enabled, sealed.as_ref().map(|(k, c)| (k.as_str(), c.as_slice())))
                .await
                .map_err(|e| TriggerError::from_write(e, &valid.spec.name))?;
        let details = json!({"name": row.name, "generation": row.generation, "enabled": enabled});
        events::record(&mut *tx, EventKind::TriggerCreated, Some(id), None, details).await?;
        if !enabled {
            // What a disable emits, so that a consumer following the enabled
            // flag through `trigger_disabled` / `trigger_enabled` sees it.
            let details = json!({"generation": row.generation});
            events::record(&mut *tx, EventKind::TriggerDisabled, Some(id), None, details).await?;
        }
        tx.commit().await?;
        tracing::info!(trigger_id = %id, name = %row.name, enabled, "trigger created");
        self.notify();
        Ok(row)
    }

    pub async fn get(&self, id: Uuid) -> Result<TriggerRow, TriggerError> {
        store::get(&self.pool, id).await?.ok_or(TriggerError::NotFound(id))
    }

    /// A page of triggers and the token of the next page (empty on the last).
    pub async fn list(&self, page_size: i32, page_token: &str) -> Result<(Vec<TriggerRow>, String), TriggerError> {
        let (limit, after) = paging::page(page_size, page_token).map_err(|v| TriggerError::Invalid(vec![v]))?;
        let mut rows = store::list(&self.pool, after, limit + 1).await?;
        let next = paging::next_token(&mut rows, limit, |r| r.id);
        Ok((rows, next))
    }

    pub async fn update(&self, id: Uuid, patch: &v1::Trigger, paths: &[String]) -> Result<TriggerRow, TriggerError> {
        // The webhook host is looked up before the row is locked: a lookup
        // may take seconds, and the lock holds back this trigger's work-order
        // inserts. A concurrent update that changes the URL meanwhile makes
        // the lookup run again, on the URL that will be stored.
        let unlocked = store::get(&self.pool, id).await?.ok_or(TriggerError::NotFound(id))?;
        let looked_up = merge(&unlocked.spec, patch, paths)?;
        let mut refused = self.refused_dns_answer(&looked_up).await;
        let mut tx = self.pool.begin().await?;
        let row = store::get_for_update(&mut tx, id).await?.ok_or(TriggerError::NotFound(id))?;
        let stored = self.open(&row)?;
        let merged = merge(&row.spec, patch, paths)?;
        let url = |t: &v1::Trigger| t.webhook.as_ref().map(|w| w.url.clone());
        if url(&merged) != url(&looked_up) {
            refused = self.refused_dns_answer(&merged).await;
        }
        // The API never returns secrets, so a client echoing a trigger back
        // sends them empty; validation keeps the stored values then.
        let valid: ValidatedTrigger = self.validate(&merged, Some((&row.spec, &stored)), refused)?;
        if valid.spec == row.spec.0 && valid.secrets == stored {
            // Nothing to change, but secrets under an old key move to the
            // current one, as `rotate-keys` would do.
            if row.secrets_key_id.is_some() && row.secrets_key_id.as_deref() != self.keys.primary_id() {
                if let Some((key_id, sealed)) = self.seal(id, &stored)? {
                    store::reseal(&mut tx, id, &key_id, &sealed).await?;
                    tx.commit().await?;
                    return store::get(&self.pool, id).await?.ok_or(TriggerError::NotFound(id));
                }
            }
            return Ok(row);
        }
        if valid.spec.ordering != row.spec.ordering {
            // Messages stored under one mode must not be delivered beside
            // later ones under another: the change waits for the ingest
            // batches in flight and is refused while anything is stored.
            if announce::lock_ordering_for_change(&mut tx, id).await? {
                return Err(TriggerError::OrderingChangeRefused(id));
            }
            announce::drop_unclaimed_sets(&mut tx, id).await?;
        }
        let sealed = self.seal(id, &valid.secrets)?;
        let row = store::update(&mut tx, id, &valid.spec, sealed.as_ref().map(|(k, c)| (k.as_str(), c.as_slice())))
            .await
            .map_err(|e| TriggerError::from_write(e, &valid.spec.name))?;
        events::record(
            &mut *tx,
            EventKind::TriggerUpdated,
            Some(id),
            None,
            json!({"name": row.name, "generation": row.generation}),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(trigger_id = %id, generation = row.generation, "trigger updated");
        self.notify();
        Ok(row)
    }

    /// Validation, with the webhook target policy: `refused` is what
    /// [`Self::refused_dns_answer`] said of the webhook host, added to the
    /// other violations unless the URL has one already.
    fn validate(
        &self,
        t: &v1::Trigger,
        existing: Option<(&TriggerSpec, &TriggerSecrets)>,
        refused: Option<String>,
    ) -> Result<ValidatedTrigger, TriggerError> {
        let mut violations = match validate_trigger(t, PREFIX, existing, Some(&self.webhook_policy)) {
            Ok(valid) if refused.is_none() => return Ok(valid),
            Ok(_) => Vec::new(),
            Err(violations) => violations,
        };
        if let Some(why) = refused.filter(|_| violations.iter().all(|v| v.field != URL_FIELD)) {
            violations.push(FieldViolation::new(URL_FIELD, why));
        }
        Err(TriggerError::Invalid(violations))
    }

    /// Why the webhook host's DNS answers are refused by the target policy,
    /// if one is. A name that does not resolve (in time) is no violation:
    /// the nodes check every connection again.
    async fn refused_dns_answer(&self, t: &v1::Trigger) -> Option<String> {
        let url = &t.webhook.as_ref()?.url;
        self.webhook_policy.refused_dns_answer(url, webhook_policy::LOOKUP_TIMEOUT).await
    }

    pub async fn set_enabled(&self, id: Uuid, enabled: bool) -> Result<TriggerRow, TriggerError> {
        let mut tx = self.pool.begin().await?;
        let (row, changed) = store::set_enabled(&mut tx, id, enabled).await?.ok_or(TriggerError::NotFound(id))?;
        if changed {
            let kind = if enabled { EventKind::TriggerEnabled } else { EventKind::TriggerDisabled };
            events::record(&mut *tx, kind, Some(id), None, json!({"generation": row.generation})).await?;
        }
        tx.commit().await?;
        if changed {
            tracing::info!(trigger_id = %id, enabled, "trigger enabled flag changed");
            self.notify();
        }
        Ok(row)
    }

    /// Deletes a trigger and, by cascade, its sets, work orders and stored
    /// messages. A worker may be writing those rows (it locks its set,
    /// then inserts a work order, which share-locks the trigger row), so
    /// Postgres may pick the delete as the victim of a deadlock: the
    /// transaction is then tried again, up to [`DELETE_TRIES`] times.
    pub async fn delete(&self, id: Uuid) -> Result<(), TriggerError> {
        let mut tries = 1;
        loop {
            match self.delete_once(id).await {
                Err(TriggerError::Database(e)) if classify(&e) == DbErrorKind::Retryable && tries < DELETE_TRIES => {
                    tracing::info!(trigger_id = %id, error = %e, "trigger delete conflicted with a worker; trying again");
                    tokio::time::sleep(DELETE_RETRY.delay(tries)).await;
                    tries += 1;
                }
                other => return other,
            }
        }
    }

    async fn delete_once(&self, id: Uuid) -> Result<(), TriggerError> {
        let mut tx = self.pool.begin().await?;
        let name = store::delete(&mut tx, id).await?.ok_or(TriggerError::NotFound(id))?;
        events::record(&mut *tx, EventKind::TriggerDeleted, Some(id), None, json!({"name": name})).await?;
        tx.commit().await?;
        tracing::info!(trigger_id = %id, "trigger deleted");
        self.notify();
        Ok(())
    }

    /// Every enabled trigger with its decrypted secrets: the desired pipeline
    /// set of every data-plane node. A trigger whose secrets cannot be
    /// decrypted (its key was removed) is left out and logged, rather than
    /// stopping every other pipeline.
    pub async fn enabled_with_secrets(&self) -> Result<Vec<(TriggerRow, TriggerSecrets)>, TriggerError> {
        let rows = store::list_enabled(&self.pool).await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match self.open(&row) {
                Ok(secrets) => Some((row, secrets)),
                Err(error) => {
                    tracing::error!(trigger_id = %row.id, %error, "cannot decrypt trigger credentials; pipeline not assigned");
                    None
                }
            })
            .collect())
    }

    /// The trigger a connection test runs with, secrets filled in as in an
    /// assignment: the stored one, or `given`, validated as a create would
    /// validate it (a fresh consumer group when it names none) and never
    /// stored, with the nil id.
    pub async fn connection_target(&self, target: ConnectionTarget<'_>) -> Result<v1::Trigger, TriggerError> {
        let (id, generation, spec, secrets) = match target {
            ConnectionTarget::Stored(id) => {
                let row = self.get(id).await?;
                let secrets = self.open(&row)?;
                (id, row.generation, row.spec.0, secrets)
            }
            ConnectionTarget::Given(given) => {
                let valid = self.validate(given, None, None)?;
                (Uuid::nil(), 0, valid.spec, valid.secrets)
            }
        };
        Ok(v1::Trigger { id: id.to_string(), generation, ..spec_to_proto(&spec, Some(&secrets)) })
    }

    /// Re-encrypts every trigger's secrets that are under another key than
    /// the current one, so the old keys can be dropped. One short
    /// transaction per trigger (its row locked against a concurrent
    /// update); a trigger whose key is not configured is reported, not
    /// fatal, so one lost key does not hold back the others.
    pub async fn rotate_keys(&self) -> Result<Rotation, TriggerError> {
        let primary = self.keys.primary_id().ok_or(kt_common::crypto::CryptoError::NoKey)?.to_owned();
        let mut rotation = Rotation::default();
        let mut after = None;
        loop {
            let ids = store::sealed_with_other_key(&self.pool, &primary, after, ROTATE_BATCH).await?;
            let Some(last) = ids.last() else { break };
            after = Some(*last);
            for id in ids {
                let mut tx = self.pool.begin().await?;
                let Some(row) = store::get_for_update(&mut tx, id).await? else { continue };
                if row.secrets_key_id.as_deref() == Some(primary.as_str()) {
                    continue;
                }
                let secrets = match self.open(&row) {
                    Ok(secrets) => secrets,
                    Err(error) => {
                        tracing::error!(trigger_id = %id, %error, "cannot re-encrypt trigger credentials");
                        rotation.failed.push((id, error.to_string()));
                        continue;
                    }
                };
                if let Some((key_id, sealed)) = self.seal(id, &secrets)? {
                    store::reseal(&mut tx, id, &key_id, &sealed).await?;
                }
                tx.commit().await?;
                rotation.rotated += 1;
            }
        }
        Ok(rotation)
    }

    /// Encrypts non-empty secrets, bound to the trigger id.
    fn seal(&self, id: Uuid, secrets: &TriggerSecrets) -> Result<Option<(String, Vec<u8>)>, TriggerError> {
        if secrets.is_empty() {
            return Ok(None);
        }
        let plain = serde_json::to_vec(secrets).expect("secrets serialize");
        Ok(Some(self.keys.encrypt(id.as_bytes(), &plain)?))
    }

    fn open(&self, row: &TriggerRow) -> Result<TriggerSecrets, TriggerError> {
        match (&row.secrets_key_id, &row.secrets_ciphertext) {
            (Some(key_id), Some(sealed)) => {
                let plain = self.keys.decrypt(key_id, row.id.as_bytes(), sealed)?;
                serde_json::from_slice(&plain)
                    .map_err(|_| TriggerError::Crypto(kt_common::crypto::CryptoError::Decrypt(key_id.clone())))
            }
            _ => Ok(TriggerSecrets::default()),
        }
    }
}

/// The stored trigger with `patch` applied to its `paths`.
fn merge(spec: &TriggerSpec, patch: &v1::Trigger, paths: &[String]) -> Result<v1::Trigger, TriggerError> {
    let mut merged = spec_to_proto(spec, None);
    mask::apply(&mut merged, patch, paths).map_err(TriggerError::Invalid)?;
    Ok(merged)
}
