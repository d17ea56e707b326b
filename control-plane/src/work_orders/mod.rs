//! Work orders as operators and asynchronous runners see them: listing,
//! inspection, and `CompleteWorkOrder` for a work order the target accepted
//! with 202.

mod error;
mod service;
pub mod store;

pub use error::WorkOrderError;
pub use service::{
    OffsetRange, WorkOrderListQuery, WorkOrderService, WorkOrderState, DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE,
};
