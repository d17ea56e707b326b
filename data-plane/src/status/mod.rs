//! What every pipeline on this node is doing, as the control plane will be
//! told: one [`PipelineReport`] per trigger, latest state wins. Pipelines
//! write their entry; the node session watches the board and sends what
//! changed. A `watch` channel holds it: bounded (one value), never blocks a
//! pipeline, and a slow or disconnected session only coalesces updates.

use std::collections::BTreeMap;
use std::sync::Arc;

use kt_proto::internal::{PartitionReport, PipelineReport, PipelineState};
use tokio::sync::watch;

/// Reports by trigger id.
pub type Reports = BTreeMap<String, PipelineReport>;

#[derive(Clone)]
pub struct StatusBoard {
    tx: Arc<watch::Sender<Reports>>,
}

impl Default for StatusBoard {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusBoard {
    pub fn new() -> Self {
        Self { tx: Arc::new(watch::Sender::new(Reports::new())) }
    }

    pub fn subscribe(&self) -> watch::Receiver<Reports> {
        self.tx.subscribe()
    }

    pub fn snapshot(&self) -> Reports {
        self.tx.borrow().clone()
    }

    pub fn get(&self, trigger_id: &str) -> Option<PipelineReport> {
        self.tx.borrow().get(trigger_id).cloned()
    }

    /// The handle one pipeline (trigger, generation) writes through.
    pub fn pipeline(&self, trigger_id: impl Into<String>, generation: i64) -> PipelineStatus {
        PipelineStatus { board: self.clone(), trigger_id: trigger_id.into(), generation }
    }

    /// Drops the entry of `trigger_id` if it is still at `generation` (a
    /// newer generation's entry is left alone). The session reports a
    /// vanished entry as stopped.
    pub fn remove(&self, trigger_id: &str, generation: i64) {
        self.tx.send_if_modified(|reports| match reports.get(trigger_id) {
            Some(r) if r.generation <= generation => {
                reports.remove(trigger_id);
                true
            }
            _ => false,
        });
    }

    /// Applies `f` to the entry of (trigger, generation), creating it; an
    /// update from an older generation than the entry's is ignored, so a
    /// pipeline being replaced cannot overwrite its successor.
    fn update(&self, trigger_id: &str, generation: i64, f: impl FnOnce(&mut PipelineReport)) {
        self.tx.send_if_modified(|reports| {
            let entry = reports.entry(trigger_id.to_owned()).or_insert_with(|| PipelineReport {
                trigger_id: trigger_id.to_owned(),
                generation,
                state: PipelineState::Unspecified.into(),
                ..Default::default()
            });
            if entry.generation > generation {
                return false;
            }
            let before = entry.clone();
            if entry.generation < generation {
                *entry = PipelineReport { trigger_id: trigger_id.to_owned(), generation, ..Default::default() };
            }
            f(entry);
            *entry != before
        });
    }
}

/// One pipeline's entry on the board.
#[derive(Clone)]
pub struct PipelineStatus {
    board: StatusBoard,
    trigger_id: String,
    generation: i64,
}

impl PipelineStatus {
    pub fn trigger_id(&self) -> &str {
        &self.trigger_id
    }

    pub fn generation(&self) -> i64 {
        self.generation
    }

    /// Moves to `state`. `error` replaces the error text (`None` keeps it,
    /// so a restarting pipeline still shows why it failed).
    pub fn set_state(&self, state: PipelineState, error: Option<String>) {
        self.board.update(&self.trigger_id, self.generation, |r| {
            r.state = state.into();
            if let Some(e) = error {
                r.error = e;
            }
        });
    }

    /// Sets or clears the error text without changing the state (e.g. the
    /// database is down while the pipeline keeps running).
    pub fn set_error(&self, error: Option<String>) {
        self.board.update(&self.trigger_id, self.generation, |r| r.error = error.unwrap_or_default());
    }

    pub fn set_partitions(&self, partitions: Vec<PartitionReport>) {
        self.board.update(&self.trigger_id, self.generation, |r| r.partitions = partitions);
    }

    pub fn remove(&self) {
        self.board.remove(&self.trigger_id, self.generation);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_an_old_generation_cannot_overwrite_a_newer_one() {
        let board = StatusBoard::new();
        board.pipeline("t1", 2).set_state(PipelineState::Running, None);
        board.pipeline("t1", 1).set_state(PipelineState::Stopped, None);
        board.remove("t1", 1);
        let r = board.get("t1").unwrap();
        assert_eq!((r.generation, r.state()), (2, PipelineState::Running));
    }

    #[test]
    fn test_errors_stay_until_replaced() {
        let board = StatusBoard::new();
        let p = board.pipeline("t1", 1);
        p.set_state(PipelineState::Failed, Some("boom".into()));
        p.set_state(PipelineState::Starting, None);
        assert_eq!(board.get("t1").unwrap().error, "boom");
        p.set_state(PipelineState::Running, Some(String::new()));
        assert_eq!(board.get("t1").unwrap().error, "");
    }

    #[test]
    fn test_unchanged_updates_do_not_notify() {
        let board = StatusBoard::new();
        let mut rx = board.subscribe();
        let p = board.pipeline("t1", 1);
        p.set_state(PipelineState::Running, None);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        p.set_state(PipelineState::Running, None);
        assert!(!rx.has_changed().unwrap());
    }
}
