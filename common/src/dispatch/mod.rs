//! The state machine of message sets and work orders, in one place: their
//! typed states and event kinds ([`state`]), the candidate query
//! ([`candidate`]), and every transition, as SQL generic over the executor
//! so that transitions compose in one transaction:
//!
//! - [`grant`]: the scheduler claims grantable sets for the workers it
//!   grants them to, gives back claims it could not hand out, and releases
//!   expired claims;
//! - [`lease`]: a worker renews the short leases of the claims it holds;
//! - [`round`]: a worker reads the candidates of its granted sets, commits
//!   a group of successes, records attempts that failed, parks or releases;
//! - [`operator`]: retry, skip, discard and `CompleteWorkOrder`;
//! - [`dead_letter`]: a worker records dead letters (the key moves on, as
//!   after a success); `ReplayDeadLetter` puts one back as its set's head;
//! - [`announce`]: how ingest (and the benchmark's seeding) creates and
//!   wakes sets for stored messages.
//!
//! The life of a set: ingest creates it `ready` (or wakes it from `idle`)
//! and notifies; the scheduler claims it (lock id + a short lease, which the
//! worker renews while it holds the set) and grants it; the worker delivers
//! its candidates one after another, each success committed before the
//! next POST, until the set is empty (`idle`; an unkeyed set is removed),
//! its time slice is used up (released `ready`), or a delivery fails
//! (`waiting` with a retry time, or `blocked` once it failed for good). A
//! 202 leaves it `waiting` until `CompleteWorkOrder`. A claim whose lease
//! runs out (its worker died) is released by the scheduler's janitor.

pub mod announce;
pub mod candidate;
pub mod dead_letter;
pub mod grant;
pub mod lease;
pub mod operator;
pub mod round;
pub mod state;

pub use candidate::Candidate;
pub use state::{work_order_id, AfterAttempt, Attempt, EventKind, SetState, WorkOrderState};

/// The Postgres channel ingest notifies (payload: the trigger id) when it
/// made sets grantable; the scheduler wakes on it. A wake-up only: readiness
/// itself is in `message_sets`.
pub const SETS_CHANNEL: &str = "kt_sets";
