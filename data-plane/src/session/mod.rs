//! The node's session with the control plane: one bidirectional stream
//! over the node's [`ControlPlane`] connection (TLS, node token). The node
//! says hello, sends heartbeats (its own, and an answer to each of the
//! control plane's) and pipeline reports; the control plane sends
//! assignments (full desired state, versioned), heartbeats and connection
//! tests to run (answered on the same stream). A lost
//! session is reconnected with jittered backoff; meanwhile the pipelines
//! keep running as last assigned.

mod assembly;

pub use assembly::{Plan, PlanAssembler};

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kt_common::backoff::Backoff;
use kt_proto::internal::node_service_client::NodeServiceClient;
use kt_proto::internal::{
    control_message, node_message, ConnectionTestRequest, ConnectionTestResult, ControlMessage, Heartbeat, Hello,
    NodeMessage, PipelineReport, PipelineState,
};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::assignment::{AssignedTrigger, Assignment, TriggerDirectory};
use crate::consumer::{probe, IngestSettings};
use crate::control_plane::{ControlPlane, ControlPlaneError};
use crate::pipelines::SupervisorHandle;
use crate::status::{Reports, StatusBoard};

/// Messages queued towards the control plane. Reports are sent as diffs of
/// the status board, so the queue only ever holds a burst of them.
pub const OUTBOUND_CAPACITY: usize = 64;

/// At shutdown, how long the control plane gets to end the session after
/// the node ended its side.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

#[derive(Debug, Clone)]
pub struct SessionSettings {
    /// Where to connect (replicas tried in turn), how, with which token.
    pub control_plane: ControlPlane,
    pub node_id: String,
    pub heartbeat_interval: Duration,
    /// Without any message from the control plane for this long, the
    /// session is considered dead and reconnected.
    pub peer_timeout: Duration,
    pub reconnect_backoff: Backoff,
    /// Where the workers look up the triggers of this node's assignment
    /// (webhook target, secrets, retry policy); replaced on every assignment.
    pub triggers: Option<TriggerDirectory>,
    /// What connection tests build their consumer from: the pipelines'
    /// settings.
    pub ingest: Arc<IngestSettings>,
}

impl SessionSettings {
    pub fn new(control_plane: ControlPlane, node_id: impl Into<String>) -> Self {
        Self {
            control_plane,
            node_id: node_id.into(),
            heartbeat_interval: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(30),
            reconnect_backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            triggers: None,
            ingest: Arc::new(IngestSettings::default()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    ControlPlane(#[from] ControlPlaneError),
    #[error("control plane session failed: {0}")]
    Rpc(#[source] tonic::Status),
    #[error("control plane closed the session")]
    Closed,
    #[error("no message from the control plane for {0:?}")]
    PeerTimeout(Duration),
    #[error("the pipeline supervisor has stopped")]
    SupervisorGone,
}

/// Keeps a session open until `cancel`; then sends the final pipeline
/// reports and closes the stream.
pub async fn run_session(
    settings: SessionSettings,
    supervisor: SupervisorHandle,
    board: StatusBoard,
    cancel: CancellationToken,
) {
    let mut attempt: u32 = 0;
    let mut tries: usize = 0;
    loop {
        let started = Instant::now();
        // With several control-plane replicas listed, each attempt tries the
        // next one: only the active replica accepts connections.
        let url = settings.control_plane.url(tries);
        tries = tries.wrapping_add(1);
        match session_once(&settings, &url, &supervisor, &board, &cancel).await {
            Ok(()) => return,
            Err(SessionError::SupervisorGone) => return,
            Err(e) => {
                tracing::warn!(%url, error = %e, "control plane session lost; pipelines keep running")
            }
        }
        // A session that lasted a while was healthy: start backing off anew.
        if started.elapsed() > settings.peer_timeout {
            attempt = 0;
        }
        let delay = settings.reconnect_backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

async fn session_once(
    settings: &SessionSettings,
    url: &str,
    supervisor: &SupervisorHandle,
    board: &StatusBoard,
    cancel: &CancellationToken,
) -> Result<(), SessionError> {
    let channel = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        channel = settings.control_plane.connect(url) => channel?,
    };
    let mut client = NodeServiceClient::new(channel);
    let (out, out_rx) = mpsc::channel(OUTBOUND_CAPACITY);
    let outbound = Outbound { tx: out, timeout: settings.peer_timeout };
    outbound
        .send(node_message::Msg::Hello(Hello {
            node_id: settings.node_id.clone(),
            schema_version: kt_common::db::expected_schema_version(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
        .await?;
    let request = settings.control_plane.request(ReceiverStream::new(out_rx));
    let mut inbound = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        response = client.session(request) => response.map_err(SessionError::Rpc)?.into_inner(),
    };
    tracing::info!(%url, node_id = %settings.node_id, "connected to the control plane");

    let mut reports = board.subscribe();
    let mut sent = HashMap::new();
    let current = reports.borrow_and_update().clone();
    send_report_changes(&current, &mut sent, &outbound).await?;
    let mut heartbeat = tokio::time::interval(settings.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();
    // Plan versions only ever grow within a session; the first assignment
    // of a session is always applied (it is a full state, so applying it
    // twice is harmless, and a restarted control plane may count anew).
    let mut plan_version: Option<i64> = None;
    let mut plans = PlanAssembler::default();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => {
                let current = board.snapshot();
                send_report_changes(&current, &mut sent, &outbound).await?;
                tracing::info!("closing the control plane session");
                // Half-close: ending our stream flushes what is queued; then
                // give the control plane a moment to end its side. Dropping
                // the response stream first would reset the HTTP/2 stream
                // and could lose the final reports.
                drop(outbound);
                let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
                let _ = tokio::time::timeout(CLOSE_GRACE.min(settings.peer_timeout), drain).await;
                return Ok(());
            }
            message = inbound.message() => {
                let message = message.map_err(SessionError::Rpc)?.ok_or(SessionError::Closed)?;
                last_heard = Instant::now();
                if matches!(message.msg, Some(control_message::Msg::Heartbeat(_))) {
                    // Answered at once: the control plane judges liveness by
                    // its own interval, which may be shorter than ours.
                    outbound.send(node_message::Msg::Heartbeat(Heartbeat { unix_ms: unix_ms() })).await?;
                }
                if let Some(control_message::Msg::ConnectionTest(request)) = message.msg {
                    spawn_connection_test(request, settings, outbound.tx.clone());
                    continue;
                }
                handle_control_message(message, &mut plans, &mut plan_version, supervisor, settings.triggers.as_ref()).await?;
            }
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > settings.peer_timeout {
                    return Err(SessionError::PeerTimeout(settings.peer_timeout));
                }
                outbound.send(node_message::Msg::Heartbeat(Heartbeat { unix_ms: unix_ms() })).await?;
            }
            changed = reports.changed() => {
                if changed.is_err() {
                    return Err(SessionError::SupervisorGone);
                }
                let current = reports.borrow_and_update().clone();
                send_report_changes(&current, &mut sent, &outbound).await?;
            }
        }
    }
}

async fn handle_control_message(
    message: ControlMessage,
    plans: &mut PlanAssembler,
    plan_version: &mut Option<i64>,
    supervisor: &SupervisorHandle,
    triggers: Option<&TriggerDirectory>,
) -> Result<(), SessionError> {
    let Some(control_message::Msg::Assignment(part)) = message.msg else {
        return Ok(());
    };
    let Some(plan) = plans.accept(part) else {
        return Ok(());
    };
    if plan_version.is_some_and(|v| plan.version <= v) {
        tracing::debug!(plan_version = plan.version, "ignoring a stale assignment");
        return Ok(());
    }
    // Validated once, for the pipelines and the workers alike.
    let assignment = Assignment::validate(&plan.pipelines);
    if let Some(directory) = triggers {
        directory.replace(&assignment.triggers);
    }
    let summary = supervisor.apply(assignment).await.map_err(|_| SessionError::SupervisorGone)?;
    *plan_version = Some(plan.version);
    tracing::info!(
        plan_version = plan.version,
        started = summary.started.len(),
        restarted = summary.restarted.len(),
        stopped = summary.stopped.len(),
        rejected = summary.rejected.len(),
        "applied assignment"
    );
    Ok(())
}

/// Runs a connection test on a blocking thread (librdkafka calls) and
/// answers it on the session; a session gone meanwhile drops the answer
/// (the control plane gives up on its own).
fn spawn_connection_test(request: ConnectionTestRequest, settings: &SessionSettings, tx: mpsc::Sender<NodeMessage>) {
    let (ingest, client_id, node_id) =
        (settings.ingest.clone(), crate::consumer::client_id(&settings.node_id), settings.node_id.clone());
    tokio::spawn(async move {
        let ConnectionTestRequest { request_id, trigger } = request;
        let run = tokio::task::spawn_blocking(move || {
            let trigger = trigger.ok_or_else(|| "no trigger to test".to_owned());
            match trigger.and_then(|t| AssignedTrigger::from_proto(&t)) {
                Ok(trigger) => probe::test_connection(&trigger, &ingest, &client_id),
                Err(error) => probe::not_run(error),
            }
        });
        let mut result = run.await.unwrap_or_else(|e| probe::not_run(format!("the connection test failed: {e}")));
        result.node_id = node_id;
        let answer = ConnectionTestResult { request_id, result: Some(result) };
        let _ = tx.send(NodeMessage { msg: Some(node_message::Msg::ConnectionTest(answer)) }).await;
    });
}

/// Sends the reports that differ from what was last sent; an entry that
/// left the board is reported stopped.
async fn send_report_changes(
    current: &Reports,
    sent: &mut HashMap<String, PipelineReport>,
    outbound: &Outbound,
) -> Result<(), SessionError> {
    for (id, report) in current {
        if sent.get(id) != Some(report) {
            outbound.send(node_message::Msg::Pipeline(report.clone())).await?;
            sent.insert(id.clone(), report.clone());
        }
    }
    let gone: Vec<String> = sent.keys().filter(|id| !current.contains_key(*id)).cloned().collect();
    for id in gone {
        if let Some(mut report) = sent.remove(&id) {
            if report.state() != PipelineState::Stopped {
                report.set_state(PipelineState::Stopped);
                report.partitions.clear();
                outbound.send(node_message::Msg::Pipeline(report)).await?;
            }
        }
    }
    Ok(())
}

struct Outbound {
    tx: mpsc::Sender<NodeMessage>,
    timeout: Duration,
}

impl Outbound {
    /// Queues a message; a control plane that stops reading for longer than
    /// the peer timeout is treated as gone.
    async fn send(&self, msg: node_message::Msg) -> Result<(), SessionError> {
        match tokio::time::timeout(self.timeout, self.tx.send(NodeMessage { msg: Some(msg) })).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SessionError::Closed),
            Err(_) => Err(SessionError::PeerTimeout(self.timeout)),
        }
    }
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default()
}
