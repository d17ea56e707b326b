//! What both planes share: the trigger model and its validation, encryption of
//! credentials, the database pool and migrations, telemetry, retry backoff, the
//! webhook target policy, and the supervisor every long-lived task is
//! spawned through (`tasks`).

pub mod backoff;
pub mod crypto;
pub mod db;
pub mod dispatch;
pub mod filter;
pub mod secret;
pub mod tasks;
pub mod telemetry;
pub mod tls;
pub mod trigger;
pub mod webhook_policy;
