//! The pipeline supervisor: owns the set of pipelines running on this node
//! and reconciles it with the full desired set the control plane assigns:
//! new triggers start, a changed generation restarts (after the old
//! consumer has committed and left), removed triggers stop. One task owns
//! the state; others talk to it through [`SupervisorHandle`].

mod supervise;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use kt_proto::ids::TriggerId;
use kt_proto::internal::PipelineState;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::assignment::{AssignedTrigger, Assignment};
use crate::consumer::IngestSettings;
use crate::status::StatusBoard;

/// Commands waiting for the supervisor. Assignments are full states, so a
/// short queue is plenty: callers wait for each to be applied.
pub const COMMAND_CHANNEL_CAPACITY: usize = 8;

/// What every pipeline of the node shares.
#[derive(Clone)]
pub struct SupervisorEnv {
    pub pool: PgPool,
    pub settings: Arc<IngestSettings>,
    pub board: StatusBoard,
    /// librdkafka client.id of this node's consumers.
    pub client_id: String,
    /// This node's id (static group membership is derived from it).
    pub node_id: String,
}

/// What one reconciliation changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplySummary {
    pub started: Vec<TriggerId>,
    pub restarted: Vec<TriggerId>,
    pub stopped: Vec<TriggerId>,
    /// Pipelines that cannot run (trigger id as sent, reason); reported as
    /// FAILED.
    pub rejected: Vec<(String, String)>,
}

enum Command {
    Apply { assignment: Assignment, reply: oneshot::Sender<ApplySummary> },
    Running { reply: oneshot::Sender<Vec<(TriggerId, i64)>> },
}

#[derive(Clone)]
pub struct SupervisorHandle {
    tx: mpsc::Sender<Command>,
}

/// The supervisor has shut down.
#[derive(Debug, thiserror::Error)]
#[error("the pipeline supervisor has stopped")]
pub struct SupervisorGone;

impl SupervisorHandle {
    /// Reconciles the running pipelines with `assignment`, the complete
    /// desired set (not a delta). Returns once started/stopped, not once the
    /// consumers are up.
    pub async fn apply(&self, assignment: Assignment) -> Result<ApplySummary, SupervisorGone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Apply { assignment, reply }).await.map_err(|_| SupervisorGone)?;
        rx.await.map_err(|_| SupervisorGone)
    }

    /// The pipelines running (or restarting), with their generation.
    pub async fn running(&self) -> Result<Vec<(TriggerId, i64)>, SupervisorGone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Running { reply }).await.map_err(|_| SupervisorGone)?;
        rx.await.map_err(|_| SupervisorGone)
    }
}

struct Running {
    generation: i64,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

struct Supervisor {
    env: SupervisorEnv,
    running: HashMap<TriggerId, Running>,
    /// Trigger ids whose assigned pipeline could not be built (by the
    /// generation reported FAILED).
    rejected: HashMap<String, i64>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Starts the supervisor task. On `cancel` it stops every pipeline and
/// finishes once all of them have committed and closed.
pub fn spawn_supervisor(env: SupervisorEnv, cancel: CancellationToken) -> (SupervisorHandle, JoinHandle<()>) {
    let (handle, run) = pipeline_supervisor(env, cancel);
    (handle, tokio::spawn(run))
}

/// The supervisor's handle and the task to run it in (until `cancel`).
pub fn pipeline_supervisor(
    env: SupervisorEnv,
    cancel: CancellationToken,
) -> (SupervisorHandle, impl std::future::Future<Output = ()> + Send + 'static) {
    let (tx, rx) = mpsc::channel(COMMAND_CHANNEL_CAPACITY);
    let supervisor =
        Supervisor { env, running: HashMap::new(), rejected: HashMap::new(), tracker: TaskTracker::new(), cancel };
    (SupervisorHandle { tx }, supervisor.run(rx))
}

impl Supervisor {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => break,
                command = rx.recv() => match command {
                    Some(Command::Apply { assignment, reply }) => {
                        let summary = self.apply(assignment);
                        let _ = reply.send(summary);
                    }
                    Some(Command::Running { reply }) => {
                        let mut running: Vec<_> = self.running.iter().map(|(id, r)| (*id, r.generation)).collect();
                        running.sort();
                        let _ = reply.send(running);
                    }
                    None => break,
                },
            }
        }
        // Pipelines share the root token's children: cancelling ours stops
        // them all; wait until each has committed what it stored.
        for running in self.running.values() {
            running.cancel.cancel();
        }
        tracing::info!(pipelines = self.running.len(), "stopping pipelines");
        self.tracker.close();
        self.tracker.wait().await;
        tracing::info!("all pipelines stopped");
    }

    fn apply(&mut self, assignment: Assignment) -> ApplySummary {
        let mut summary = ApplySummary::default();
        let desired: HashMap<TriggerId, Arc<AssignedTrigger>> =
            assignment.triggers.into_iter().map(|t| (t.id, t)).collect();
        let mut rejected: HashMap<String, (i64, String)> = HashMap::new();
        for r in assignment.rejected {
            if r.id.is_empty() {
                summary.rejected.push((r.id, r.reason));
            } else {
                rejected.insert(r.id, (r.generation, r.reason));
            }
        }

        // A pipeline whose new configuration is unusable stops too: running
        // the old one would hide that the assignment cannot be applied.
        let to_stop: Vec<TriggerId> = self.running.keys().filter(|id| !desired.contains_key(id)).copied().collect();
        for id in to_stop {
            if let Some(running) = self.running.remove(&id) {
                tracing::info!(trigger_id = %id, generation = running.generation, "stopping pipeline");
                running.cancel.cancel();
                summary.stopped.push(id);
            }
        }

        for (id, def) in desired {
            let previous = match self.running.remove(&id) {
                Some(r) if r.generation == def.generation => {
                    self.running.insert(id, r);
                    continue;
                }
                Some(r) => {
                    tracing::info!(trigger_id = %id, from = r.generation, to = def.generation, "restarting pipeline with a new configuration");
                    r.cancel.cancel();
                    summary.restarted.push(id);
                    Some(r.task)
                }
                None => {
                    tracing::info!(trigger_id = %id, generation = def.generation, "starting pipeline");
                    summary.started.push(id);
                    None
                }
            };
            // On the board at once, so the old generation's last reports are
            // recognised as stale.
            self.env.board.pipeline(id.to_string(), def.generation).set_state(PipelineState::Starting, None);
            let cancel = self.cancel.child_token();
            let generation = def.generation;
            let task = self.tracker.spawn(supervise::supervise(def, self.env.clone(), cancel.clone(), previous));
            self.running.insert(id, Running { generation, cancel, task });
        }

        for (id, (generation, reason)) in &rejected {
            tracing::error!(trigger_id = %id, generation, error = %reason, "cannot run assigned pipeline");
            self.env.board.pipeline(id.clone(), *generation).set_state(PipelineState::Failed, Some(reason.clone()));
            summary.rejected.push((id.clone(), reason.clone()));
        }
        // Forget what is neither running nor rejected any more: stopped
        // pipelines and earlier rejections.
        let keep: HashSet<String> =
            self.running.keys().map(ToString::to_string).chain(rejected.keys().cloned()).collect();
        for (id, report) in self.env.board.snapshot() {
            let stopped = report.state() == PipelineState::Stopped;
            let was_rejected = self.rejected.contains_key(&id);
            if !keep.contains(&id) && (stopped || was_rejected) {
                self.env.board.remove(&id, report.generation);
            }
        }
        self.rejected = rejected.into_iter().map(|(id, (generation, _))| (id, generation)).collect();
        summary
    }
}
