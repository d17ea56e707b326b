//! The life of one pipeline generation: wait for the generation it
//! replaces to finish, run, restart with backoff after a failure or a
//! panic, and report each state on the status board.

use kt_proto::internal::PipelineState;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SupervisorEnv;
use std::sync::Arc;

use crate::assignment::AssignedTrigger;
use crate::consumer::{run_pipeline, PipelineEnv};

pub(super) async fn supervise(
    def: Arc<AssignedTrigger>,
    env: SupervisorEnv,
    cancel: CancellationToken,
    previous: Option<JoinHandle<()>>,
) {
    let trigger_id = def.id;
    let generation = def.generation;
    let status = env.board.pipeline(trigger_id.to_string(), generation);
    if let Some(previous) = previous {
        // The old generation commits what it stored and leaves the group
        // before its successor joins: one consumer per trigger per node.
        let _ = previous.await;
    }
    let settings = env.settings.clone();
    let mut attempt: u32 = 0;
    while !cancel.is_cancelled() {
        status.set_state(PipelineState::Starting, None);
        let started = Instant::now();
        let pipeline_env = PipelineEnv {
            pool: env.pool.clone(),
            settings: settings.clone(),
            client_id: env.client_id.clone(),
            node_id: env.node_id.clone(),
            status: status.clone(),
        };
        // Its own task, so that a panic is a failure to restart from, not
        // the end of supervision.
        let run = tokio::spawn(run_pipeline(def.clone(), pipeline_env, cancel.clone()));
        let error = match run.await {
            Ok(Ok(())) => break,
            Ok(Err(e)) => e.to_string(),
            Err(e) => format!("pipeline of trigger {trigger_id} panicked: {e}"),
        };
        if started.elapsed() >= settings.healthy_after {
            attempt = 0;
        }
        let delay = settings.restart_backoff.delay(attempt);
        attempt = attempt.saturating_add(1);
        let retry_in_ms = delay.as_millis() as u64;
        tracing::error!(%trigger_id, generation, error = %error, failures = attempt, retry_in_ms, "pipeline failed");
        metrics::counter!("kt_pipeline_failures_total", "trigger_id" => trigger_id.to_string()).increment(1);
        let error = format!("{error} (failure #{attempt} in a row; restarting in {retry_in_ms} ms)");
        status.set_state(PipelineState::Failed, Some(error));
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    // The entry stays (STOPPED) until the supervisor prunes it, so the
    // session reports the stop.
    status.set_state(PipelineState::Stopped, None);
}
