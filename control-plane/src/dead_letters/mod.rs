//! Dead letters as operators see them: list, get, replay (the message goes
//! back as the head of its set), delete. Each action is one transaction
//! with its event.

mod service;
mod store;

pub use service::{DeadLetterError, DeadLetterService};
pub use store::DeadLetterRow;
