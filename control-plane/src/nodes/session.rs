//! One node's session, once admitted: sends the node its full desired state
//! whenever it changes, plus heartbeats; takes its heartbeats and pipeline
//! reports into the registry and the event log. A peer silent for three
//! heartbeat intervals is gone.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use kt_proto::internal::control_message::Msg as ControlMsg;
use kt_proto::internal::node_message::Msg as NodeMsg;
use kt_proto::internal::{ControlMessage, Heartbeat, NodeMessage, PipelineReport, PipelineState};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use super::{desired_assignment, ConnectionTests, NodeRegistry};
use crate::events::{self, EventKind};
use crate::triggers::TriggerService;

/// Messages queued towards one node; a node that does not read them is
/// disconnected rather than buffered without bound.
pub const SESSION_OUTBOUND_CAPACITY: usize = 16;
/// Missed heartbeats after which a peer is considered dead.
const DEAD_AFTER_HEARTBEATS: u32 = 3;

/// What every session shares.
#[derive(Clone)]
pub struct SessionEnv {
    pub triggers: TriggerService,
    pub registry: NodeRegistry,
    /// Where API calls hand connection tests to nodes.
    pub connection_tests: ConnectionTests,
    pub pool: PgPool,
    pub heartbeat: Duration,
    pub shutdown: CancellationToken,
    /// Seeded from the clock so plan versions keep increasing across restarts.
    pub plan_version: Arc<AtomicI64>,
}

impl SessionEnv {
    pub fn new(
        triggers: TriggerService,
        pool: PgPool,
        registry: NodeRegistry,
        connection_tests: ConnectionTests,
        heartbeat: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        let seed = chrono::Utc::now().timestamp_millis() * 1_000;
        let plan_version = Arc::new(AtomicI64::new(seed));
        Self { triggers, registry, connection_tests, pool, heartbeat, shutdown, plan_version }
    }
}

/// Why a node's session is refused before it starts.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the first message of a session must be hello")]
    NoHello,
    #[error("must be 1-200 characters")]
    BadNodeId,
    #[error("node {node_id} was built for schema version {node}, the control plane runs {ours}; upgrade the node")]
    SchemaVersion { node_id: String, node: i64, ours: i64 },
}

/// The node id of a session whose first message is `first`, if it is a
/// hello this control plane can serve.
pub fn admit(first: Option<NodeMessage>) -> Result<String, Refused> {
    let Some(NodeMessage { msg: Some(NodeMsg::Hello(hello)) }) = first else {
        return Err(Refused::NoHello);
    };
    let node_id = hello.node_id.trim().to_owned();
    if node_id.is_empty() || node_id.len() > 200 {
        return Err(Refused::BadNodeId);
    }
    let ours = kt_common::db::expected_schema_version();
    if hello.schema_version != ours {
        return Err(Refused::SchemaVersion { node_id, node: hello.schema_version, ours });
    }
    Ok(node_id)
}

/// Where a session sends: the node's response stream.
pub type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

pub struct Session {
    node_id: String,
    id: Uuid,
    env: SessionEnv,
}

impl Session {
    pub fn new(node_id: String, env: SessionEnv) -> Self {
        Self { node_id, id: Uuid::now_v7(), env }
    }

    pub async fn run(self, mut inbound: Streaming<NodeMessage>, tx: Outbound) {
        self.env.registry.joined(&self.node_id, self.id);
        metrics::gauge!("kt_node_sessions").increment(1.0);
        tracing::info!(node_id = %self.node_id, "node joined");
        self.event(EventKind::NodeJoined, None, json!({})).await;
        let mut connection_tests = self.env.connection_tests.attach(&self.node_id, self.id);

        let mut changes = self.env.triggers.subscribe();
        changes.mark_changed();
        let mut ticks = interval(self.env.heartbeat);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let dead_after = self.env.heartbeat * DEAD_AFTER_HEARTBEATS;

        let reason = loop {
            tokio::select! {
                _ = self.env.shutdown.cancelled() => break "control plane shutting down",
                _ = tx.closed() => break "node closed the stream",
                changed = changes.changed() => {
                    if changed.is_err() {
                        break "trigger service stopped";
                    }
                    if !self.send_assignment(&tx).await {
                        break "node not reading";
                    }
                }
                Some(test) = connection_tests.recv() => {
                    let msg = ControlMessage { msg: Some(ControlMsg::ConnectionTest(test)) };
                    if tx.send(Ok(msg)).await.is_err() {
                        break "node closed the stream";
                    }
                }
                _ = ticks.tick() => {
                    if last_seen.elapsed() > dead_after {
                        break "node missed its heartbeats";
                    }
                    let beat = ControlMessage { msg: Some(ControlMsg::Heartbeat(Heartbeat { unix_ms: chrono::Utc::now().timestamp_millis() })) };
                    if tx.try_send(Ok(beat)).is_err() {
                        break "node not reading";
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(NodeMessage { msg: Some(msg) })) => {
                        last_seen = Instant::now();
                        self.env.registry.seen(&self.node_id);
                        match msg {
                            NodeMsg::Pipeline(report) => self.on_report(report).await,
                            NodeMsg::ConnectionTest(answer) => self.env.connection_tests.answered(self.id, answer),
                            NodeMsg::Hello(_) | NodeMsg::Heartbeat(_) => {}
                        }
                    }
                    Ok(Some(NodeMessage { msg: None })) => last_seen = Instant::now(),
                    Ok(None) => break "node ended the session",
                    Err(status) => {
                        tracing::debug!(node_id = %self.node_id, %status, "session stream error");
                        break "session stream broken";
                    }
                },
            }
        };
        self.env.connection_tests.detach(self.id);
        metrics::gauge!("kt_node_sessions").decrement(1.0);
        if self.env.registry.left(&self.node_id, self.id) {
            tracing::info!(node_id = %self.node_id, reason, "node left");
            self.event(EventKind::NodeLeft, None, json!({"reason": reason})).await;
        }
    }

    /// Sends the current desired state; `false` when the node is gone or does
    /// not read. A database failure is logged and retried on the next change
    /// or reconnect; the node keeps running what it has.
    async fn send_assignment(&self, tx: &Outbound) -> bool {
        let version = self.env.plan_version.fetch_add(1, Ordering::SeqCst) + 1;
        match desired_assignment(&self.env.triggers, version).await {
            Ok(parts) => {
                let pipelines: usize = parts.iter().map(|p| p.pipelines.len()).sum();
                tracing::debug!(node_id = %self.node_id, plan_version = version, pipelines, parts = parts.len(), "sending assignment");
                for part in parts {
                    let msg = ControlMessage { msg: Some(ControlMsg::Assignment(part)) };
                    if tx.send(Ok(msg)).await.is_err() {
                        return false;
                    }
                }
                true
            }
            Err(error) => {
                tracing::warn!(node_id = %self.node_id, %error, "cannot compute assignment");
                true
            }
        }
    }

    async fn on_report(&self, report: PipelineReport) {
        let trigger_id = report.trigger_id.clone();
        let state = PipelineState::try_from(report.state).unwrap_or(PipelineState::Unspecified);
        let error = report.error.clone();
        let generation = report.generation;
        let previous = self.env.registry.report(&self.node_id, report);
        if previous == Some(state) {
            return;
        }
        let kind = match state {
            PipelineState::Running => EventKind::PipelineStarted,
            PipelineState::Stopped => EventKind::PipelineStopped,
            PipelineState::Failed => EventKind::PipelineFailed,
            _ => return,
        };
        if state == PipelineState::Failed {
            tracing::warn!(node_id = %self.node_id, %trigger_id, %error, "pipeline failed");
        }
        let trigger = Uuid::parse_str(&trigger_id).ok();
        self.event(kind, trigger, json!({"generation": generation, "error": error})).await;
    }

    async fn event(&self, kind: EventKind, trigger_id: Option<Uuid>, details: serde_json::Value) {
        if let Err(error) = events::record(&self.env.pool, kind, trigger_id, Some(&self.node_id), details).await {
            tracing::warn!(node_id = %self.node_id, kind = kind.as_str(), %error, "cannot record event");
        }
    }
}
