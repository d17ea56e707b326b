//! What both planes share: the trigger model and its validation (`trigger`),
//! trigger filters (`filter`), the set and work-order state machine with the
//! SQL both planes run on it (`dispatch`), encryption of credentials
//! (`crypto`, `secret`), the database pool, error classes and migrations
//! (`db`), telemetry, retry backoff, TLS files (`tls`), the webhook target
//! policy, and the supervisor every long-lived task is spawned through
//! (`tasks`).

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
