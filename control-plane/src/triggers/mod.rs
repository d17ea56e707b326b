//! Trigger configuration: validation, encryption of credentials, storage and
//! the change notifications that drive pipeline assignment, and the
//! trigger's status (`status/`).

mod error;
mod mask;
mod service;
pub mod status;
pub mod store;

pub use error::TriggerError;
pub use service::{ConnectionTarget, Rotation, TriggerService, MAX_PAGE_SIZE};
