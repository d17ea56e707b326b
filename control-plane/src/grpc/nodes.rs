//! `kafka_triggers.internal.v1.NodeService`: one bidirectional session per
//! data-plane node. The control plane sends the node's full desired state
//! whenever it changes, plus heartbeats; the node sends heartbeats and
//! pipeline reports. A peer silent for three heartbeat intervals is gone.

use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use kt_common::tasks::Supervisor;
use kt_proto::internal::control_message::Msg as ControlMsg;
use kt_proto::internal::node_message::Msg as NodeMsg;
use kt_proto::internal::node_service_server::NodeService;
use kt_proto::internal::{ControlMessage, Heartbeat, NodeMessage, PipelineReport, PipelineState};
use kt_proto::status::{invalid_argument, FieldViolation};
use serde_json::json;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::time::{interval, Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use super::peer::NodeIdentity;
use crate::events::{self, EventKind};
use crate::nodes::{desired_assignment, NodeRegistry};
use crate::triggers::TriggerService;

/// Messages queued towards one node; a node that does not read them is
/// disconnected rather than buffered without bound.
const SESSION_OUTBOUND_CAPACITY: usize = 16;
/// Missed heartbeats after which a peer is considered dead.
const DEAD_AFTER_HEARTBEATS: u32 = 3;

pub struct NodeHandler {
    pub triggers: TriggerService,
    pub registry: NodeRegistry,
    pub pool: PgPool,
    pub heartbeat: Duration,
    pub shutdown: CancellationToken,
    /// Runs each session's task.
    pub tasks: Supervisor,
    /// Seeded from the clock so plan versions keep increasing across restarts.
    pub plan_version: Arc<AtomicI64>,
}

impl NodeHandler {
    pub fn new(
        triggers: TriggerService,
        pool: PgPool,
        registry: NodeRegistry,
        heartbeat: Duration,
        shutdown: CancellationToken,
        tasks: Supervisor,
    ) -> Self {
        let seed = chrono::Utc::now().timestamp_millis() * 1_000;
        Self { triggers, registry, pool, heartbeat, shutdown, tasks, plan_version: Arc::new(AtomicI64::new(seed)) }
    }
}

#[tonic::async_trait]
impl NodeService for NodeHandler {
    type SessionStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

    async fn session(&self, req: Request<Streaming<NodeMessage>>) -> Result<Response<Self::SessionStream>, Status> {
        let certificate = NodeIdentity::of(&req);
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(NodeMessage { msg: Some(NodeMsg::Hello(hello)) }) => hello,
            _ => {
                return Err(invalid_argument(&[FieldViolation::new(
                    "msg",
                    "the first message of a session must be hello",
                )]))
            }
        };
        let node_id = hello.node_id.trim().to_owned();
        if node_id.is_empty() || node_id.len() > 200 {
            return Err(invalid_argument(&[FieldViolation::new("hello.node_id", "must be 1-200 characters")]));
        }
        NodeIdentity::admit(certificate.as_ref(), &node_id)?;
        let expected = kt_common::db::expected_schema_version();
        if hello.schema_version != expected {
            return Err(Status::failed_precondition(format!(
                "node {node_id} was built for schema version {}, the control plane runs {expected}; upgrade the node",
                hello.schema_version
            )));
        }

        let (tx, rx) = mpsc::channel(SESSION_OUTBOUND_CAPACITY);
        let session = Session {
            node_id,
            id: Uuid::now_v7(),
            triggers: self.triggers.clone(),
            registry: self.registry.clone(),
            pool: self.pool.clone(),
            heartbeat: self.heartbeat,
            plan_version: self.plan_version.clone(),
            shutdown: self.shutdown.clone(),
        };
        self.tasks.spawn_isolated("node session", session.run(inbound, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Session {
    node_id: String,
    id: Uuid,
    triggers: TriggerService,
    registry: NodeRegistry,
    pool: PgPool,
    heartbeat: Duration,
    plan_version: Arc<AtomicI64>,
    shutdown: CancellationToken,
}

type Outbound = mpsc::Sender<Result<ControlMessage, Status>>;

impl Session {
    async fn run(self, mut inbound: Streaming<NodeMessage>, tx: Outbound) {
        self.registry.joined(&self.node_id, self.id);
        metrics::gauge!("kt_node_sessions").increment(1.0);
        tracing::info!(node_id = %self.node_id, "node joined");
        self.event(EventKind::NodeJoined, None, json!({})).await;

        let mut changes = self.triggers.subscribe();
        changes.mark_changed();
        let mut ticks = interval(self.heartbeat);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut last_seen = Instant::now();
        let dead_after = self.heartbeat * DEAD_AFTER_HEARTBEATS;

        let reason = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break "control plane shutting down",
                _ = tx.closed() => break "node closed the stream",
                changed = changes.changed() => {
                    if changed.is_err() {
                        break "trigger service stopped";
                    }
                    if !self.send_assignment(&tx).await {
                        break "node not reading";
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
                        self.registry.seen(&self.node_id);
                        if let NodeMsg::Pipeline(report) = msg {
                            self.on_report(report).await;
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
        metrics::gauge!("kt_node_sessions").decrement(1.0);
        if self.registry.left(&self.node_id, self.id) {
            tracing::info!(node_id = %self.node_id, reason, "node left");
            self.event(EventKind::NodeLeft, None, json!({"reason": reason})).await;
        }
    }

    /// Sends the current desired state; `false` when the node is gone or does
    /// not read. A database failure is logged and retried on the next change
    /// or reconnect; the node keeps running what it has.
    async fn send_assignment(&self, tx: &Outbound) -> bool {
        let version = self.plan_version.fetch_add(1, Ordering::SeqCst) + 1;
        match desired_assignment(&self.triggers, version).await {
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
        let previous = self.registry.report(&self.node_id, report);
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
        if let Err(error) = events::record(&self.pool, kind, trigger_id, Some(&self.node_id), details).await {
            tracing::warn!(node_id = %self.node_id, kind = kind.as_str(), %error, "cannot record event");
        }
    }
}
