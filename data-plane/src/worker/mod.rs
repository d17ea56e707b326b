//! Workers: a node's capacity to act on message sets. The node holds one
//! `WorkService.Work` stream to the control plane, offers its capacity as
//! credits, receives granted (already claimed) sets, acts on them in rounds
//! ([`engine`]) and reports each set's outcome, which returns its credit.

pub mod dead_letters;
pub mod engine;
pub mod lease;
mod parked;

use std::sync::Arc;
use std::time::Duration;

use kt_common::backoff::Backoff;
use kt_common::tasks::Failpoints;
use kt_common::webhook_policy::WebhookPolicy;
use kt_proto::internal::work_service_client::WorkServiceClient;
use kt_proto::internal::worker_message::Msg;
use kt_proto::internal::{Credit, SetOutcomes, WorkerHello, WorkerMessage};
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

pub use engine::{Context, Engine, TIME_SLICE};

use crate::assignment::TriggerDirectory;
use crate::control_plane::ControlPlane;
use crate::delivery::WebhookClient;

/// Messages queued towards the control plane on the work stream.
const OUTBOUND_CAPACITY: usize = 1_024;
/// How long a stopping node waits for the grants the control plane sent
/// before it saw the node leave (to give them back).
const GIVE_BACK_WAIT: Duration = Duration::from_secs(5);
/// Reconnect backoff of the work stream.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The same connection settings as the node's session.
    pub control_plane: ControlPlane,
    pub node_id: String,
    /// Sets processed at once by this node.
    pub capacity: u32,
    /// Which addresses webhooks may reach, checked at every connection.
    pub webhook_policy: WebhookPolicy,
    /// `workers`, hit for every grant (tests).
    pub failpoints: Failpoints,
}

/// Runs the work stream until `shutdown`: reconnects with backoff; on
/// shutdown stops taking grants, lets the sets in hand finish (each within a
/// time slice plus one delivery) and reports them.
pub async fn run(
    config: WorkerConfig,
    pool: PgPool,
    triggers: TriggerDirectory,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let webhook = WebhookClient::new(config.webhook_policy.clone())?;
    let ctx = Arc::new(Context { pool, webhook, dead_letters: Default::default() });
    let mut failures = 0;
    let mut tries = 0;
    while !shutdown.is_cancelled() {
        let url = config.control_plane.url(tries);
        tries = tries.wrapping_add(1);
        match session(&config, &url, &ctx, &triggers, &shutdown).await {
            Ok(()) => failures = 0,
            Err(error) => {
                failures += 1;
                tracing::warn!(%error, "work stream to the control plane failed; reconnecting");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(RECONNECT.delay(failures)) => {}
        }
    }
    Ok(())
}

async fn session(
    config: &WorkerConfig,
    url: &str,
    ctx: &Arc<Context>,
    triggers: &TriggerDirectory,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let mut client = WorkServiceClient::new(config.control_plane.connect(url).await?);
    let (out, rx) = mpsc::channel(OUTBOUND_CAPACITY);
    out.send(WorkerMessage { msg: Some(Msg::Hello(WorkerHello { node_id: config.node_id.clone() })) }).await?;
    out.send(WorkerMessage { msg: Some(Msg::Credit(Credit { sets: config.capacity })) }).await?;
    let mut grants = client.work(config.control_plane.request(ReceiverStream::new(rx))).await?.into_inner();
    tracing::info!(node_id = %config.node_id, capacity = config.capacity, "work stream connected");

    let mut engine = Engine::new(ctx.clone(), triggers.clone());
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            grant = grants.message() => match grant {
                Ok(Some(grant)) => {
                    config.failpoints.hit("workers");
                    engine.grant(grant)
                }
                Ok(None) => break Err(anyhow::anyhow!("control plane closed the work stream")),
                Err(status) => break Err(status.into()),
            },
            Some(()) = engine.next(), if engine.busy() => {}
        }
        if !send_outcomes(&out, &mut engine).await {
            break Err(anyhow::anyhow!("work stream closed"));
        }
    };
    // Sets in hand finish their current delivery and are released whatever
    // happened to the stream; their outcomes reach the control plane if the
    // stream is still up (otherwise their claims are already released).
    // Grants that still arrive were claimed for us: they are given back.
    engine.drain();
    let mut open = result.is_ok();
    while engine.busy() {
        tokio::select! {
            Some(()) = engine.next() => {}
            grant = grants.message(), if open => match grant {
                Ok(Some(grant)) => engine.grant(grant),
                _ => open = false,
            },
        }
        send_outcomes(&out, &mut engine).await;
    }
    // Half-close: the control plane ends the session, and the grant stream
    // ends after the grants it had already sent, which are given back too.
    drop(out);
    let deadline = tokio::time::Instant::now() + GIVE_BACK_WAIT;
    while open {
        match tokio::time::timeout_at(deadline, grants.message()).await {
            Ok(Ok(Some(grant))) => engine.grant(grant),
            _ => open = false,
        }
    }
    while engine.next().await.is_some() {}
    debug_assert_eq!(engine.held(), 0);
    result
}

/// Sends the engine's new outcomes, if any; false when the stream is gone.
async fn send_outcomes(out: &mpsc::Sender<WorkerMessage>, engine: &mut Engine) -> bool {
    let outcomes = engine.take_outcomes();
    outcomes.is_empty() || out.send(WorkerMessage { msg: Some(Msg::Outcomes(SetOutcomes { outcomes })) }).await.is_ok()
}
