//! Message candidate sets as operators see them: listing (blocked sets
//! first of all) and the actions that unstick a set — retry, skip, discard.

mod error;
mod service;
pub mod store;

pub use error::SetError;
pub use service::{
    Discarded, SetFilter, SetListQuery, SetService, SetState, SetView, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE,
};
