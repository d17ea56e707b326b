//! Trigger configuration: validation, encryption of credentials, storage and
//! the change notifications that drive pipeline assignment.

mod error;
mod mask;
mod service;
pub mod store;

pub use error::TriggerError;
pub use service::{Rotation, TriggerService, MAX_PAGE_SIZE};
