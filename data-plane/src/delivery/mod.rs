//! Webhook delivery of work orders: the body built from a stored message
//! ([`body`]) or the CloudEvent made of it ([`cloudevent`]), one HTTP
//! attempt and its outcome ([`webhook`]), which addresses it may reach
//! ([`target_policy`]), and when to try again ([`retry`]). Storage and scheduling of work orders live elsewhere.

pub mod body;
pub mod cloudevent;
pub mod retry;
pub mod target_policy;
pub mod webhook;

pub use body::{build_body, MessageForBody};
pub use cloudevent::cloud_event;
pub use retry::{next_step, RetryDecision, RETRY_AFTER_CAP};
pub use webhook::{DeliveryOutcome, Payload, WebhookClient, WebhookClientError};
