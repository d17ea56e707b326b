//! `TriggerService.TestTriggerConnection` runs on a data-plane node, with the
//! node's own view of the network and exactly its pipelines' Kafka
//! configuration: the control plane never talks to brokers. This is the
//! hand-off: a test goes to one connected node (round robin) as a message on
//! its session, and its answer comes back on the same session, matched by
//! request id. A node that leaves with tests outstanding fails them at once.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kt_proto::internal::{ConnectionTestRequest, ConnectionTestResult};
use kt_proto::v1::{TestTriggerConnectionResponse, Trigger};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// Tests queued towards one node's session; a node this far behind is not
/// asked for more.
const QUEUE_PER_NODE: usize = 8;
/// How long past the trigger's connect timeout an answer may take: the
/// round trip to the node and the client's set-up.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

/// Why a connection test has no answer.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionTestError {
    #[error("no data-plane node is connected to run the connection test")]
    NoNode,
    #[error("node {0} left before it answered the connection test; try again")]
    NodeLeft(String),
    #[error("node {node} did not answer the connection test within {seconds} s")]
    NoAnswer { node: String, seconds: u64 },
}

/// The nodes that can run connection tests, and the tests they owe.
#[derive(Clone, Default)]
pub struct ConnectionTests {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    runners: Vec<Runner>,
    /// Which runner the next test goes to.
    next: usize,
    pending: HashMap<String, Pending>,
}

struct Runner {
    node_id: String,
    session: Uuid,
    tx: mpsc::Sender<ConnectionTestRequest>,
}

struct Pending {
    session: Uuid,
    reply: oneshot::Sender<TestTriggerConnectionResponse>,
}

impl ConnectionTests {
    /// Makes the session `session` of `node_id` a runner: it forwards what
    /// the returned receiver yields to its node.
    pub fn attach(&self, node_id: &str, session: Uuid) -> mpsc::Receiver<ConnectionTestRequest> {
        let (tx, rx) = mpsc::channel(QUEUE_PER_NODE);
        self.lock().runners.push(Runner { node_id: node_id.to_owned(), session, tx });
        rx
    }

    /// The session ended: it runs no more tests, and the ones it owes fail
    /// (their callers see [`ConnectionTestError::NodeLeft`]).
    pub fn detach(&self, session: Uuid) {
        let mut inner = self.lock();
        inner.runners.retain(|r| r.session != session);
        inner.pending.retain(|_, p| p.session != session);
    }

    /// A node's answer; one nobody waits for any more is dropped.
    pub fn answered(&self, session: Uuid, answer: ConnectionTestResult) {
        let mut inner = self.lock();
        // Only the session the test was sent to may answer it.
        if let Entry::Occupied(pending) = inner.pending.entry(answer.request_id) {
            if pending.get().session == session {
                let _ = pending.remove().reply.send(answer.result.unwrap_or_default());
            }
        }
    }

    /// Runs the test of `trigger` (validated, secrets filled in) on a node.
    /// The node answers within the trigger's connect timeout; past it (and
    /// [`ANSWER_GRACE`]) the node is taken to be stuck.
    pub async fn run(&self, trigger: Trigger) -> Result<TestTriggerConnectionResponse, ConnectionTestError> {
        let connect = trigger.kafka.as_ref().and_then(|k| k.connect_timeout_seconds).unwrap_or(0);
        let timeout = Duration::from_secs(u64::from(connect.max(1))) + ANSWER_GRACE;
        self.run_within(trigger, timeout).await
    }

    async fn run_within(
        &self,
        trigger: Trigger,
        timeout: Duration,
    ) -> Result<TestTriggerConnectionResponse, ConnectionTestError> {
        let request_id = Uuid::now_v7().to_string();
        let (node, answer) =
            self.send(ConnectionTestRequest { request_id: request_id.clone(), trigger: Some(trigger) })?;
        let outcome = tokio::time::timeout(timeout, answer).await;
        self.lock().pending.remove(&request_id);
        match outcome {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(ConnectionTestError::NodeLeft(node)),
            Err(_) => Err(ConnectionTestError::NoAnswer { node, seconds: timeout.as_secs() }),
        }
    }

    /// Queues `request` on the next runner that takes it and records it as
    /// pending (under the same lock, so the answer cannot come first):
    /// the runner's node id and where its answer arrives.
    fn send(
        &self,
        request: ConnectionTestRequest,
    ) -> Result<(String, oneshot::Receiver<TestTriggerConnectionResponse>), ConnectionTestError> {
        let mut inner = self.lock();
        let request_id = request.request_id.clone();
        let mut request = request;
        for _ in 0..inner.runners.len() {
            let index = inner.next % inner.runners.len();
            inner.next = index + 1;
            let runner = &inner.runners[index];
            match runner.tx.try_send(request) {
                Ok(()) => {
                    let (node, session) = (runner.node_id.clone(), runner.session);
                    let (reply, answer) = oneshot::channel();
                    inner.pending.insert(request_id, Pending { session, reply });
                    return Ok((node, answer));
                }
                Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) => request = r,
            }
        }
        Err(ConnectionTestError::NoNode)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("connection tests lock")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(request: &ConnectionTestRequest, node: &str) -> ConnectionTestResult {
        let result = TestTriggerConnectionResponse { ok: true, node_id: node.into(), ..Default::default() };
        ConnectionTestResult { request_id: request.request_id.clone(), result: Some(result) }
    }

    #[tokio::test]
    async fn test_without_a_node_there_is_no_test() {
        let tests = ConnectionTests::default();
        let outcome = tests.run_within(Trigger::default(), Duration::from_secs(1)).await;
        assert!(matches!(outcome, Err(ConnectionTestError::NoNode)), "{outcome:?}");
    }

    #[tokio::test]
    async fn test_tests_go_round_robin_and_only_their_session_answers_them() {
        let tests = ConnectionTests::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut rx_a = tests.attach("node-a", a);
        let mut rx_b = tests.attach("node-b", b);
        let answering = {
            let tests = tests.clone();
            tokio::spawn(async move {
                for _ in 0..2 {
                    let to_a = rx_a.recv().await.expect("a test for a");
                    // An answer from the wrong session is ignored.
                    tests.answered(b, answer(&to_a, "impostor"));
                    tests.answered(a, answer(&to_a, "node-a"));
                    let to_b = rx_b.recv().await.expect("a test for b");
                    tests.answered(b, answer(&to_b, "node-b"));
                }
            })
        };
        let mut answered_by = Vec::new();
        for _ in 0..4 {
            let answer = tests.run_within(Trigger::default(), Duration::from_secs(5)).await.expect("answered");
            answered_by.push(answer.node_id);
        }
        answering.await.unwrap();
        assert_eq!(answered_by, ["node-a", "node-b", "node-a", "node-b"]);
        assert!(tests.lock().pending.is_empty());
    }

    #[tokio::test]
    async fn test_a_node_that_leaves_fails_its_tests_and_a_silent_one_times_out() {
        let tests = ConnectionTests::default();
        let session = Uuid::now_v7();
        let mut rx = tests.attach("node-a", session);
        let leaving = {
            let tests = tests.clone();
            tokio::spawn(async move {
                rx.recv().await.expect("a test");
                tests.detach(session);
            })
        };
        let outcome = tests.run_within(Trigger::default(), Duration::from_secs(5)).await;
        assert!(matches!(&outcome, Err(ConnectionTestError::NodeLeft(n)) if n == "node-a"), "{outcome:?}");
        leaving.await.unwrap();

        let _rx = tests.attach("node-b", Uuid::now_v7());
        let outcome = tests.run_within(Trigger::default(), Duration::from_millis(50)).await;
        assert!(matches!(&outcome, Err(ConnectionTestError::NoAnswer { node, .. }) if node == "node-b"), "{outcome:?}");
        assert!(tests.lock().pending.is_empty(), "a test given up on is no longer pending");
    }
}
