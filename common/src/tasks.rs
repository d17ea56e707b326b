//! Supervised tasks: every long-lived task of a binary is spawned through a
//! [`Supervisor`], under a name and a [`Policy`] that says what its end
//! means. A bare `tokio::spawn` whose handle is dropped turns a panic into
//! silence: a control plane whose scheduler died still answers the API and
//! never grants work again. Here a task that fails (returns an error,
//! panics, or returns before it was asked to stop) is either restarted
//! with backoff, or stops the supervisor with an error that the binary
//! reports and exits on, or, for the task of one client's stream, ends just
//! that stream; each is logged with the task's name and counted.
//!
//! The supervisor tracks its tasks (a [`TaskTracker`]) so that whoever owns
//! it can wait for them all at shutdown, or for one (each `spawn_*` returns
//! the handle of the supervised task, which ends when it is not restarted). It does not cancel them itself:
//! each task obeys the token it is given, so an owner can stop its tasks in
//! stages (a node stops its workers before its pipelines).

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backoff::Backoff;

/// What a task's failure means; each has its `spawn_*` method.
#[derive(Debug, Clone, Copy)]
enum Policy {
    /// The process cannot do its job without the task: its failure stops the
    /// supervisor ([`Supervisor::failed`] resolves), and the binary exits
    /// with the error and a non-zero status so that its orchestrator (or a
    /// standby) takes over with clean state.
    Fatal,
    /// The task rebuilds its state from the database and its peers: start it
    /// again after a backoff delay, for as long as it is not asked to stop.
    Restart(Backoff),
    /// The task serves one client (a stream): its failure ends that stream
    /// only; the client reconnects.
    Isolated,
}

/// How a task run ended, when it was not asked to.
#[derive(Debug)]
enum Failure {
    Error(String),
    Panic(String),
    /// A fatal or restarting task returned while its token was not cancelled.
    Returned,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Error(e) => write!(f, "failed: {e}"),
            Failure::Panic(p) => write!(f, "panicked: {p}"),
            Failure::Returned => f.write_str("stopped on its own"),
        }
    }
}

/// What a task returns: nothing, or a result whose error is a failure.
pub trait TaskOutput: Send + 'static {
    fn into_failure(self) -> Option<String>;
}

impl TaskOutput for () {
    fn into_failure(self) -> Option<String> {
        None
    }
}

impl<E: std::fmt::Display + Send + 'static> TaskOutput for Result<(), E> {
    fn into_failure(self) -> Option<String> {
        // anyhow's alternate form prints the whole chain on one line.
        self.err().map(|e| format!("{e:#}"))
    }
}

/// The first fatal failure of a supervisor's tasks.
#[derive(Debug, Clone, thiserror::Error)]
#[error("task `{task}` {reason}")]
pub struct TaskFailed {
    pub task: &'static str,
    pub reason: String,
}

/// Spawns and tracks named tasks; see the module header.
#[derive(Clone, Default)]
pub struct Supervisor {
    tracker: TaskTracker,
    failed: CancellationToken,
    first: Arc<Mutex<Option<TaskFailed>>>,
}

impl Supervisor {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `name`, which the process cannot do without: when it fails,
    /// or returns before `stop` is cancelled, [`failed`](Self::failed)
    /// resolves with the reason.
    pub fn spawn_fatal<Fut>(&self, name: &'static str, stop: &CancellationToken, task: Fut) -> JoinHandle<()>
    where
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        self.supervise(name, Policy::Fatal, stop, once(task))
    }

    /// Spawns `name`, made by `make` and made again after each failure (an
    /// error, a panic, or returning before `stop` is cancelled) once a
    /// `backoff` delay has passed.
    pub fn spawn_restarting<F, Fut>(
        &self,
        name: &'static str,
        backoff: Backoff,
        stop: &CancellationToken,
        make: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        self.supervise(name, Policy::Restart(backoff), stop, make)
    }

    /// Spawns `name`, the task of one client's stream, which may end at any
    /// time; a failure is logged and ends only that stream.
    pub fn spawn_isolated<Fut>(&self, name: &'static str, task: Fut) -> JoinHandle<()>
    where
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        self.supervise(name, Policy::Isolated, &CancellationToken::new(), once(task))
    }

    fn supervise<F, Fut>(
        &self,
        name: &'static str,
        policy: Policy,
        stop: &CancellationToken,
        mut make: F,
    ) -> JoinHandle<()>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future + Send + 'static,
        Fut::Output: TaskOutput,
    {
        let stop = stop.clone();
        let this = self.clone();
        self.tracker.spawn(async move {
            let mut restarts = 0u32;
            loop {
                let failure = match AssertUnwindSafe(make()).catch_unwind().await {
                    Ok(output) => match output.into_failure() {
                        Some(error) => Failure::Error(error),
                        None if stop.is_cancelled() || matches!(policy, Policy::Isolated) => return,
                        None => Failure::Returned,
                    },
                    Err(panic) => Failure::Panic(panic_message(panic.as_ref())),
                };
                metrics::counter!("kt_task_failures_total", "task" => name).increment(1);
                match policy {
                    Policy::Isolated => {
                        tracing::error!(task = name, "task {failure}; only its stream ends");
                        return;
                    }
                    Policy::Fatal => {
                        tracing::error!(task = name, "task {failure}; stopping");
                        this.fail(TaskFailed { task: name, reason: failure.to_string() });
                        return;
                    }
                    Policy::Restart(backoff) => {
                        let delay = backoff.delay(restarts);
                        restarts = restarts.saturating_add(1);
                        tracing::error!(
                            task = name,
                            retry_in_ms = delay.as_millis() as u64,
                            "task {failure}; restarting"
                        );
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(delay) => {}
                        }
                        metrics::counter!("kt_task_restarts_total", "task" => name).increment(1);
                    }
                }
            }
        })
    }

    fn fail(&self, failure: TaskFailed) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.get_or_insert(failure);
        self.failed.cancel();
    }

    /// Resolves with the first fatal failure; pending while there is none.
    pub async fn failed(&self) -> TaskFailed {
        self.failed.cancelled().await;
        let first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        first.clone().expect("the failed token is cancelled only with a failure recorded")
    }

    /// Waits for every task to end (after the owner cancelled their tokens).
    pub async fn wait(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// A factory for a task that is made once: fatal and isolated tasks are
/// never made again.
fn once<Fut>(task: Fut) -> impl FnMut() -> Fut + Send + 'static
where
    Fut: Future + Send + 'static,
{
    let mut task = Some(task);
    move || task.take().expect("a task spawned once is not restarted")
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a non-text panic payload".to_owned())
}

/// Named points where a test makes a running task panic on purpose, to see
/// its supervisor react. Production configurations hold the inert default,
/// for which [`Failpoints::hit`] is one branch.
#[derive(Debug, Clone, Default)]
pub struct Failpoints(Option<Arc<Mutex<Vec<&'static str>>>>);

impl Failpoints {
    /// Failpoints that can be armed (tests).
    pub fn armable() -> Self {
        Self(Some(Arc::default()))
    }

    /// The next [`hit`](Self::hit) of `name` panics (once).
    pub fn arm(&self, name: &'static str) {
        if let Some(armed) = &self.0 {
            armed.lock().unwrap_or_else(|e| e.into_inner()).push(name);
        }
    }

    /// Whether `name` is armed (has not fired yet).
    pub fn is_armed(&self, name: &'static str) -> bool {
        self.0.as_ref().is_some_and(|armed| armed.lock().unwrap_or_else(|e| e.into_inner()).contains(&name))
    }

    /// Panics if `name` is armed, disarming it.
    pub fn hit(&self, name: &'static str) {
        let Some(armed) = &self.0 else { return };
        let fire = {
            let mut armed = armed.lock().unwrap_or_else(|e| e.into_inner());
            let at = armed.iter().position(|n| *n == name);
            at.map(|at| armed.remove(at)).is_some()
        };
        if fire {
            panic!("failpoint `{name}` fired");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::time::Duration;

    use super::*;

    const FAST: Backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));

    #[tokio::test]
    async fn test_a_fatal_task_that_panics_fails_the_supervisor_with_its_name() {
        let sup = Supervisor::new();
        let stop = CancellationToken::new();
        sup.spawn_fatal("scheduler", &stop, async { panic!("boom") as () });
        let failed = sup.failed().await;
        assert_eq!(failed.task, "scheduler");
        assert_eq!(failed.to_string(), "task `scheduler` panicked: boom");
    }

    #[tokio::test]
    async fn test_a_fatal_task_that_returns_unasked_is_a_failure_but_not_once_stopped() {
        let sup = Supervisor::new();
        let stop = CancellationToken::new();
        stop.cancel();
        sup.spawn_fatal("tail", &stop, async {});
        sup.wait().await;
        assert!(!sup.failed.is_cancelled(), "a task that was asked to stop did not fail");

        let sup = Supervisor::new();
        sup.spawn_fatal("tail", &CancellationToken::new(), async {});
        assert_eq!(sup.failed().await.reason, "stopped on its own");
    }

    #[tokio::test]
    async fn test_a_restarting_task_runs_again_after_errors_and_panics_until_stopped() {
        let sup = Supervisor::new();
        let stop = CancellationToken::new();
        let runs = Arc::new(AtomicU32::new(0));
        let (counted, token) = (runs.clone(), stop.clone());
        sup.spawn_restarting("worker", FAST, &stop, move || {
            let (runs, stop) = (counted.clone(), token.clone());
            async move {
                match runs.fetch_add(1, Ordering::SeqCst) {
                    0 => panic!("first run"),
                    1 => Err("second run"),
                    _ => {
                        stop.cancel();
                        Ok(())
                    }
                }
            }
        });
        sup.wait().await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert!(!sup.failed.is_cancelled());
    }

    #[tokio::test]
    async fn test_an_isolated_task_ends_alone() {
        let sup = Supervisor::new();
        sup.spawn_isolated("events stream", async { panic!("bad row") as () });
        sup.wait().await;
        assert!(!sup.failed.is_cancelled());
    }

    #[test]
    fn test_failpoints_fire_once_and_only_when_armed() {
        Failpoints::default().hit("scheduler");
        let points = Failpoints::armable();
        points.hit("scheduler");
        points.arm("scheduler");
        points.hit("worker");
        assert!(points.is_armed("scheduler"));
        assert!(std::panic::catch_unwind(|| points.hit("scheduler")).is_err());
        assert!(!points.is_armed("scheduler"));
        points.hit("scheduler");
    }
}
