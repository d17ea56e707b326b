//! MessageSetService and WorkOrderService end to end: a real control plane
//! on port 0, a real database, generated clients over real gRPC. Triggers
//! come from the TriggerService API; the sets, messages and work orders of
//! each state are written with SQL, as ingest and the workers would leave
//! them (no Kafka, no data plane).

use std::time::Duration;

use kt_proto::internal::work_service_client::WorkServiceClient;
use kt_proto::internal::worker_message::Msg;
use kt_proto::internal::{Credit, WorkGrant, WorkerHello, WorkerMessage};
use kt_proto::v1::message_set_service_client::MessageSetServiceClient;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::work_order_service_client::WorkOrderServiceClient;
use kt_proto::v1::*;
use kt_tests::{sample_trigger, ControlPlaneOptions, TestControlPlane, TestDb};
use serde_json::Value;
use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Code;
use tonic_types::StatusExt;
use uuid::Uuid;

const TOPIC: &str = "orders";

struct Sandbox {
    _db: TestDb,
    cp: TestControlPlane,
    pool: PgPool,
    sets: MessageSetServiceClient<Channel>,
    work_orders: WorkOrderServiceClient<Channel>,
    triggers: TriggerServiceClient<Channel>,
}

async fn sandbox() -> Sandbox {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let pool = db.pool().await.unwrap();
    let channel = cp.channel().await.unwrap();
    Sandbox {
        _db: db,
        cp,
        pool,
        sets: MessageSetServiceClient::new(channel.clone()),
        work_orders: WorkOrderServiceClient::new(channel.clone()),
        triggers: TriggerServiceClient::new(channel),
    }
}

impl Sandbox {
    async fn trigger(&mut self, name: &str) -> Uuid {
        let t = sample_trigger(name, "127.0.0.1:9092", TOPIC);
        let created =
            self.triggers.create_trigger(CreateTriggerRequest { trigger: Some(t) }).await.unwrap().into_inner();
        Uuid::parse_str(&created.id).unwrap()
    }

    /// Stores messages of one key (or one unkeyed message per position).
    async fn messages(&self, trigger: Uuid, key: Option<&[u8]>, at: &[(i32, i64)]) {
        for (partition, offset) in at {
            sqlx::query(
                "INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value) VALUES ($1, $2, $3, $4, $5, $6)",
            )
            .bind(trigger)
            .bind(TOPIC)
            .bind(partition)
            .bind(offset)
            .bind(key)
            .bind(format!("{{\"offset\":{offset}}}").into_bytes())
            .execute(&self.pool)
            .await
            .unwrap();
        }
    }

    /// A keyed set in `state` (blocked sets get a blocked_since).
    async fn keyed_set(&self, trigger: Uuid, key: &[u8], state: &str) -> i64 {
        self.set_row(trigger, Some(key), None, state).await
    }

    async fn unkeyed_set(&self, trigger: Uuid, at: (i32, i64), state: &str) -> i64 {
        self.set_row(trigger, None, Some(at), state).await
    }

    async fn set_row(&self, trigger: Uuid, key: Option<&[u8]>, at: Option<(i32, i64)>, state: &str) -> i64 {
        sqlx::query_scalar(
            "INSERT INTO message_sets (trigger_id, topic, key, partition, \"offset\", state, blocked_since)
             VALUES ($1, $2, $3, $4, $5, $6, CASE WHEN $6 = 'blocked' THEN now() - interval '5 minutes' END)
             RETURNING id",
        )
        .bind(trigger)
        .bind(TOPIC)
        .bind(key)
        .bind(at.map(|a| a.0))
        .bind(at.map(|a| a.1))
        .bind(state)
        .fetch_one(&self.pool)
        .await
        .unwrap()
    }

    /// A work order as the workers leave it after `attempts` attempts.
    #[allow(clippy::too_many_arguments)]
    async fn work_order(
        &self,
        trigger: Uuid,
        set: i64,
        key: Option<&[u8]>,
        at: (i32, i64),
        state: &str,
        attempts: i32,
        last_error: Option<&str>,
    ) -> Uuid {
        let id = Uuid::now_v7();
        let log: Vec<Value> =
            (0..attempts).map(|_| serde_json::json!({"outcome": "failure", "error": last_error})).collect();
        sqlx::query(
            "INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", key, state, attempts,
                                      last_error, attempt_log, body, first_attempt_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,
                     CASE WHEN $9 > 0 THEN now() - interval '1 hour' END)",
        )
        .bind(id)
        .bind(trigger)
        .bind(set)
        .bind(TOPIC)
        .bind(at.0)
        .bind(at.1)
        .bind(key)
        .bind(state)
        .bind(attempts)
        .bind(last_error)
        .bind(sqlx::types::Json(log))
        .bind(format!("{{\"data\":{{\"offset\":{}}}}}", at.1))
        .execute(&self.pool)
        .await
        .unwrap();
        id
    }

    /// A worker's live claim on the set.
    async fn claim(&self, set: i64, expires_in_secs: i64) {
        sqlx::query(
            "UPDATE message_sets SET lock_id = $2, lock_expires = now() + make_interval(secs => $3) WHERE id = $1",
        )
        .bind(set)
        .bind(Uuid::now_v7())
        .bind(expires_in_secs as f64)
        .execute(&self.pool)
        .await
        .unwrap();
    }

    /// (state, no retry time pending, blocked since set). The scheduler may
    /// claim a ready set at any moment, so the claim is not compared.
    async fn set_columns(&self, set: i64) -> (String, bool, bool) {
        sqlx::query_as("SELECT state, retry_at IS NULL, blocked_since IS NOT NULL FROM message_sets WHERE id = $1")
            .bind(set)
            .fetch_one(&self.pool)
            .await
            .unwrap()
    }

    async fn work_order_columns(&self, id: Uuid) -> (String, i32, bool, Value) {
        let (state, attempts, first, log): (String, i32, bool, sqlx::types::Json<Value>) = sqlx::query_as(
            "SELECT state, attempts, first_attempt_at IS NOT NULL, attempt_log FROM work_orders WHERE id = $1",
        )
        .bind(id)
        .fetch_one(&self.pool)
        .await
        .unwrap();
        (state, attempts, first, log.0)
    }

    async fn stored_offsets(&self, trigger: Uuid) -> Vec<(i32, i64)> {
        sqlx::query_as(
            "SELECT partition, \"offset\" FROM messages WHERE trigger_id = $1 ORDER BY partition, \"offset\"",
        )
        .bind(trigger)
        .fetch_all(&self.pool)
        .await
        .unwrap()
    }

    async fn events(&self, kind: &str) -> Vec<Value> {
        let rows: Vec<sqlx::types::Json<Value>> =
            sqlx::query_scalar("SELECT details FROM events WHERE kind = $1 ORDER BY id")
                .bind(kind)
                .fetch_all(&self.pool)
                .await
                .unwrap();
        rows.into_iter().map(|j| j.0).collect()
    }

    async fn list_sets(&mut self, trigger: Option<Uuid>, state: MessageSetState) -> Vec<String> {
        let req = ListMessageSetsRequest {
            trigger_id: trigger.map(|t| t.to_string()).unwrap_or_default(),
            state: state.into(),
            ..Default::default()
        };
        self.sets.list_message_sets(req).await.unwrap().into_inner().message_sets.into_iter().map(|s| s.id).collect()
    }

    async fn get_set(&mut self, id: i64) -> MessageSet {
        self.sets.get_message_set(GetMessageSetRequest { id: id.to_string() }).await.unwrap().into_inner()
    }
}

fn violations(status: &tonic::Status) -> Vec<String> {
    status
        .get_details_bad_request()
        .map(|b| b.field_violations.into_iter().map(|v| v.field).collect())
        .unwrap_or_default()
}

/// A worker stream that asked for sets, as a data-plane node opens it. The
/// sender is returned so the stream stays open.
async fn worker_stream(cp: &TestControlPlane) -> (mpsc::Sender<WorkerMessage>, tonic::Streaming<WorkGrant>) {
    let mut client = WorkServiceClient::new(cp.authed(kt_tests::TEST_NODE_TOKEN).await.unwrap());
    let (tx, rx) = mpsc::channel(8);
    tx.send(WorkerMessage { msg: Some(Msg::Hello(WorkerHello { node_id: "operator-test".into() })) }).await.unwrap();
    tx.send(WorkerMessage { msg: Some(Msg::Credit(Credit { sets: 10 })) }).await.unwrap();
    let grants = client.work(ReceiverStream::new(rx)).await.unwrap().into_inner();
    (tx, grants)
}

async fn granted(grants: &mut tonic::Streaming<WorkGrant>, set: i64, within: Duration) -> bool {
    tokio::time::timeout(within, async {
        while let Ok(Some(grant)) = grants.message().await {
            if grant.sets.iter().any(|g| g.set_id == set) {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false)
}

#[tokio::test]
async fn test_list_message_sets_filters_by_state_and_trigger() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let b = sb.trigger("b").await;

    let ready = sb.keyed_set(a, b"k-ready", "ready").await;
    sb.messages(a, Some(b"k-ready"), &[(1, 0), (0, 7)]).await;
    let blocked = sb.keyed_set(a, b"k-blocked", "blocked").await;
    sb.messages(a, Some(b"k-blocked"), &[(0, 3)]).await;
    let wo = sb.work_order(a, blocked, Some(b"k-blocked"), (0, 3), "failed", 3, Some("HTTP 500")).await;
    let waiting = sb.keyed_set(a, b"k-waiting", "waiting").await;
    sb.messages(a, Some(b"k-waiting"), &[(0, 4)]).await;
    sb.work_order(a, waiting, Some(b"k-waiting"), (0, 4), "pending", 1, Some("timeout")).await;
    sqlx::query("UPDATE message_sets SET retry_at = now() + interval '1 hour' WHERE id = $1")
        .bind(waiting)
        .execute(&sb.pool)
        .await
        .unwrap();
    let in_flight = sb.keyed_set(a, b"k-in-flight", "ready").await;
    sb.messages(a, Some(b"k-in-flight"), &[(0, 5)]).await;
    sb.claim(in_flight, 600).await;
    let idle = sb.keyed_set(a, b"k-idle", "idle").await;
    let unkeyed = sb.unkeyed_set(a, (2, 100), "ready").await;
    sb.messages(a, None, &[(2, 100)]).await;
    let other_blocked = sb.keyed_set(b, b"k", "blocked").await;
    sb.messages(b, Some(b"k"), &[(0, 0)]).await;

    use MessageSetState as S;
    assert_eq!(sb.list_sets(Some(a), S::Unspecified).await, ids(&[ready, blocked, waiting, in_flight, unkeyed]));
    assert_eq!(sb.list_sets(Some(a), S::Ready).await, ids(&[ready, unkeyed]));
    assert_eq!(sb.list_sets(Some(a), S::InFlight).await, ids(&[in_flight]));
    assert_eq!(sb.list_sets(Some(a), S::Waiting).await, ids(&[waiting]));
    assert_eq!(sb.list_sets(Some(a), S::Blocked).await, ids(&[blocked]));
    assert_eq!(sb.list_sets(Some(a), S::Idle).await, ids(&[idle]));
    assert_eq!(sb.list_sets(None, S::Blocked).await, ids(&[blocked, other_blocked]));
    assert_eq!(sb.list_sets(Some(b), S::Unspecified).await, ids(&[other_blocked]));
    assert_eq!(sb.list_sets(Some(Uuid::now_v7()), S::Unspecified).await, Vec::<String>::new());

    // The blocked set tells the operator what is wrong.
    let set = sb.get_set(blocked).await;
    assert_eq!(set.state(), S::Blocked);
    assert_eq!(set.trigger_id, a.to_string());
    assert_eq!(set.topic, TOPIC);
    assert_eq!(set.key.as_deref(), Some(&b"k-blocked"[..]));
    assert_eq!(set.stored_messages, 1);
    assert_eq!((set.head_partition, set.head_offset), (0, 3));
    assert_eq!(set.head_work_order_id, wo.to_string());
    assert_eq!(set.head_work_order_state(), WorkOrderState::Failed);
    assert_eq!(set.attempts, 3);
    assert_eq!(set.last_error, "HTTP 500");
    assert!(set.blocked_since.is_some());
    assert_eq!(set.reason, format!("work order {wo} failed after 3 attempt(s): HTTP 500"));

    // The head of a keyed set is its lowest (partition, offset).
    let set = sb.get_set(ready).await;
    assert_eq!(set.state(), S::Ready);
    assert_eq!(set.stored_messages, 2);
    assert_eq!((set.head_partition, set.head_offset), (0, 7));
    assert!(set.head_work_order_id.is_empty());
    assert!(set.blocked_since.is_none());

    let set = sb.get_set(waiting).await;
    assert_eq!(set.state(), S::Waiting);
    assert!(set.retry_at.is_some());
    assert!(set.reason.contains("next attempt at"), "{}", set.reason);

    let set = sb.get_set(in_flight).await;
    assert_eq!(set.state(), S::InFlight);
    assert!(set.claimed_until.is_some());

    let set = sb.get_set(unkeyed).await;
    assert_eq!(set.key, None);
    assert_eq!(set.stored_messages, 1);
    assert_eq!((set.head_partition, set.head_offset), (2, 100));

    let set = sb.get_set(idle).await;
    assert_eq!(set.state(), S::Idle);
    assert_eq!(set.stored_messages, 0);
}

fn ids(sets: &[i64]) -> Vec<String> {
    sets.iter().map(i64::to_string).collect()
}

#[tokio::test]
async fn test_list_message_sets_pages_through_every_set_once() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let b = sb.trigger("b").await;
    let mut all = Vec::new();
    for i in 0..7i64 {
        let trigger = if i % 2 == 0 { a } else { b };
        let key = format!("k{i}");
        let state = if i % 3 == 0 { "blocked" } else { "ready" };
        all.push(sb.keyed_set(trigger, key.as_bytes(), state).await);
        sb.messages(trigger, Some(key.as_bytes()), &[(0, i)]).await;
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = sb
            .sets
            .list_message_sets(ListMessageSetsRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.message_sets.len() <= 2);
        seen.extend(page.message_sets.into_iter().map(|s| s.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ids(&all));

    let bad = |req: ListMessageSetsRequest| {
        let mut client = sb.sets.clone();
        async move { client.list_message_sets(req).await.unwrap_err() }
    };
    let err = bad(ListMessageSetsRequest { page_size: 1001, ..Default::default() }).await;
    assert_eq!((err.code(), violations(&err)), (Code::InvalidArgument, vec!["page_size".to_string()]));
    let err = bad(ListMessageSetsRequest { page_token: "garbage".into(), ..Default::default() }).await;
    assert_eq!(violations(&err), ["page_token"]);
    let err = bad(ListMessageSetsRequest { trigger_id: "not-a-uuid".into(), ..Default::default() }).await;
    assert_eq!(violations(&err), ["trigger_id"]);
    let err = bad(ListMessageSetsRequest { state: 99, ..Default::default() }).await;
    assert_eq!(violations(&err), ["state"]);
}

#[tokio::test]
async fn test_get_message_set_rejects_malformed_and_unknown_ids() {
    let mut sb = sandbox().await;
    for id in ["", "abc", "-1", "0", "1.5"] {
        let err = sb.sets.get_message_set(GetMessageSetRequest { id: id.into() }).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
        assert_eq!(violations(&err), ["id"]);
    }
    let err = sb.sets.get_message_set(GetMessageSetRequest { id: "424242".into() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("424242"), "{}", err.message());
    for err in [
        sb.sets.retry_message_set(RetryMessageSetRequest { id: "424242".into() }).await.unwrap_err(),
        sb.sets.skip_message(SkipMessageRequest { id: "424242".into() }).await.unwrap_err(),
        sb.sets.discard_message_set(DiscardMessageSetRequest { id: "424242".into() }).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::NotFound);
    }
    let err = sb.sets.retry_message_set(RetryMessageSetRequest { id: "x".into() }).await.unwrap_err();
    assert_eq!(violations(&err), ["id"]);
}

#[tokio::test]
async fn test_retry_blocked_set_restarts_the_head_and_reschedules_at_once() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "blocked").await;
    sb.messages(a, Some(b"k"), &[(0, 1), (0, 2)]).await;
    let wo = sb.work_order(a, set, Some(b"k"), (0, 1), "failed", 5, Some("HTTP 503")).await;
    let (_worker, mut grants) = worker_stream(&sb.cp).await;

    let retried = sb.sets.retry_message_set(RetryMessageSetRequest { id: set.to_string() }).await.unwrap().into_inner();
    assert_eq!(retried.state(), MessageSetState::Ready);
    assert_eq!(retried.head_work_order_state(), WorkOrderState::Pending);
    assert_eq!(retried.attempts, 0);
    assert!(retried.blocked_since.is_none());

    // A fresh retry budget, the history kept.
    let (state, attempts, first_attempt, log) = sb.work_order_columns(wo).await;
    assert_eq!((state.as_str(), attempts, first_attempt), ("pending", 0, false));
    assert_eq!(log.as_array().unwrap().len(), 5);
    assert_eq!(sb.set_columns(set).await, ("ready".into(), true, false));
    let events = sb.events("set_unblocked").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["action"], "retry");
    assert_eq!(events[0]["set_id"], set);
    assert_eq!(events[0]["work_order_id"], wo.to_string());

    // Grantable again: RetryMessageSet wakes the scheduler, which grants it.
    assert!(granted(&mut grants, set, Duration::from_secs(5)).await, "set {set} was not granted after the retry");
}

#[tokio::test]
async fn test_retry_refuses_a_set_that_is_not_blocked() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let ready = sb.keyed_set(a, b"r", "ready").await;
    let waiting = sb.keyed_set(a, b"w", "waiting").await;
    let claimed = sb.keyed_set(a, b"c", "ready").await;
    sb.claim(claimed, 600).await;
    for (set, state) in [(ready, "ready"), (waiting, "waiting"), (claimed, "in flight")] {
        let err = sb.sets.retry_message_set(RetryMessageSetRequest { id: set.to_string() }).await.unwrap_err();
        assert_eq!(err.code(), Code::FailedPrecondition);
        assert_eq!(err.message(), format!("message set {set} is {state}; only a blocked set can be retried"));
    }
    assert!(sb.events("set_unblocked").await.is_empty());
}

#[tokio::test]
async fn test_skip_deletes_the_head_and_the_next_message_becomes_the_candidate() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "blocked").await;
    sb.messages(a, Some(b"k"), &[(0, 1), (0, 2), (1, 0)]).await;
    let wo = sb.work_order(a, set, Some(b"k"), (0, 1), "failed", 3, Some("HTTP 400")).await;
    let (_worker, mut grants) = worker_stream(&sb.cp).await;

    let skipped = sb.sets.skip_message(SkipMessageRequest { id: set.to_string() }).await.unwrap().into_inner();
    assert_eq!(skipped.state(), MessageSetState::Ready);
    assert_eq!(skipped.stored_messages, 2);
    assert_eq!((skipped.head_partition, skipped.head_offset), (0, 2));
    assert!(skipped.head_work_order_id.is_empty(), "the next message has no work order yet");

    assert_eq!(sb.work_order_columns(wo).await.0, "skipped");
    assert_eq!(sb.stored_offsets(a).await, [(0, 2), (1, 0)]);
    assert_eq!(sb.set_columns(set).await, ("ready".into(), true, false));
    let events = sb.events("set_skipped").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["work_order_id"], wo.to_string());
    assert_eq!((events[0]["partition"].as_i64(), events[0]["offset"].as_i64()), (Some(0), Some(1)));
    assert_eq!(sb.events("set_unblocked").await[0]["action"], "skip");
    assert!(granted(&mut grants, set, Duration::from_secs(5)).await, "set {set} was not granted after the skip");

    // Now granted (claimed for the worker stream): nothing is stuck, nothing to skip.
    let err = sb.sets.skip_message(SkipMessageRequest { id: set.to_string() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("being processed by a worker"), "{}", err.message());
}

#[tokio::test]
async fn test_skip_of_a_waiting_set_skips_its_running_work_order() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.unkeyed_set(a, (0, 9), "waiting").await;
    sb.messages(a, None, &[(0, 9)]).await;
    let wo = sb.work_order(a, set, None, (0, 9), "running", 1, None).await;
    assert!(sb.get_set(set).await.reason.contains("waiting for CompleteWorkOrder"));

    let skipped = sb.sets.skip_message(SkipMessageRequest { id: set.to_string() }).await.unwrap().into_inner();
    assert_eq!(skipped.stored_messages, 0);
    assert_eq!(sb.work_order_columns(wo).await.0, "skipped");
    assert!(sb.stored_offsets(a).await.is_empty());
    assert!(sb.events("set_unblocked").await.is_empty(), "the set was not blocked");

    // The runner's late report finds the work order skipped.
    let err = sb
        .work_orders
        .complete_work_order(CompleteWorkOrderRequest { id: wo.to_string(), success: true, error: String::new() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("is skipped"), "{}", err.message());
}

#[tokio::test]
async fn test_skip_records_a_skipped_work_order_for_a_head_without_one() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    // A message from a lower partition arrived after the set blocked: the
    // head has no work order yet.
    let set = sb.keyed_set(a, b"k", "blocked").await;
    sb.messages(a, Some(b"k"), &[(0, 0), (1, 5)]).await;
    sb.work_order(a, set, Some(b"k"), (1, 5), "failed", 1, Some("HTTP 400")).await;

    sb.sets.skip_message(SkipMessageRequest { id: set.to_string() }).await.unwrap();
    let (state, body): (String, String) = sqlx::query_as(
        "SELECT state, body FROM work_orders WHERE trigger_id = $1 AND partition = 0 AND \"offset\" = 0",
    )
    .bind(a)
    .fetch_one(&sb.pool)
    .await
    .unwrap();
    assert_eq!((state.as_str(), body.as_str()), ("skipped", "{}"));
    assert_eq!(sb.stored_offsets(a).await, [(1, 5)]);
}

#[tokio::test]
async fn test_discard_drops_every_message_of_the_set() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "blocked").await;
    sb.messages(a, Some(b"k"), &[(0, 1), (0, 2), (1, 0)]).await;
    let wo = sb.work_order(a, set, Some(b"k"), (0, 1), "failed", 2, Some("HTTP 500")).await;
    let other = sb.keyed_set(a, b"other", "ready").await;
    sb.messages(a, Some(b"other"), &[(0, 3)]).await;
    let unkeyed = sb.unkeyed_set(a, (2, 0), "ready").await;
    sb.messages(a, None, &[(2, 0)]).await;

    let res = sb.sets.discard_message_set(DiscardMessageSetRequest { id: set.to_string() }).await.unwrap().into_inner();
    assert_eq!((res.discarded_messages, res.skipped_work_orders), (3, 1));
    assert_eq!(sb.work_order_columns(wo).await.0, "skipped");
    assert_eq!(sb.stored_offsets(a).await, [(0, 3), (2, 0)], "other sets keep their messages");
    let err = sb.sets.get_message_set(GetMessageSetRequest { id: set.to_string() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let events = sb.events("set_discarded").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["discarded_messages"], 3);
    assert_eq!(events[0]["key"], "k");
    assert_eq!(sb.events("set_unblocked").await[0]["action"], "discard");
    assert_eq!(sb.get_set(other).await.stored_messages, 1);

    let res =
        sb.sets.discard_message_set(DiscardMessageSetRequest { id: unkeyed.to_string() }).await.unwrap().into_inner();
    assert_eq!((res.discarded_messages, res.skipped_work_orders), (1, 0));
    assert_eq!(sb.stored_offsets(a).await, [(0, 3)]);
}

#[tokio::test]
async fn test_actions_refuse_a_set_a_worker_holds() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "waiting").await;
    sb.messages(a, Some(b"k"), &[(0, 1)]).await;
    sb.work_order(a, set, Some(b"k"), (0, 1), "pending", 1, Some("timeout")).await;
    sb.claim(set, 600).await;
    assert_eq!(sb.get_set(set).await.state(), MessageSetState::InFlight);

    let err = sb.sets.skip_message(SkipMessageRequest { id: set.to_string() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("is being processed"), "{}", err.message());
    let err = sb.sets.discard_message_set(DiscardMessageSetRequest { id: set.to_string() }).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("is being processed"), "{}", err.message());
    assert_eq!(sb.stored_offsets(a).await, [(0, 1)], "nothing was touched");

    // An expired claim is no claim: its worker is gone, and the action
    // clears the lock so that worker's late writes are fenced off.
    sb.claim(set, -5).await;
    sb.sets.skip_message(SkipMessageRequest { id: set.to_string() }).await.unwrap();
    let lock: Option<Uuid> = sqlx::query_scalar("SELECT lock_id FROM message_sets WHERE id = $1")
        .bind(set)
        .fetch_one(&sb.pool)
        .await
        .unwrap();
    assert_eq!(lock, None);
}

#[tokio::test]
async fn test_complete_work_order_success_lets_the_next_message_go() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "waiting").await;
    sb.messages(a, Some(b"k"), &[(0, 5), (0, 6)]).await;
    let wo = sb.work_order(a, set, Some(b"k"), (0, 5), "running", 1, None).await;
    // A worker looking at the running head right now: its claim is fenced
    // off, or its `park` would put the set back to waiting.
    sb.claim(set, 600).await;
    let stale: Option<Uuid> = sqlx::query_scalar("SELECT lock_id FROM message_sets WHERE id = $1")
        .bind(set)
        .fetch_one(&sb.pool)
        .await
        .unwrap();
    let (_worker, mut grants) = worker_stream(&sb.cp).await;

    let done = sb
        .work_orders
        .complete_work_order(CompleteWorkOrderRequest { id: wo.to_string(), success: true, error: String::new() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), WorkOrderState::Success);
    assert_eq!(done.attempts, 1, "the report completes the attempt that got the 202");
    let log: Value = serde_json::from_str(&done.attempt_log).unwrap();
    assert_eq!(log.as_array().unwrap().last().unwrap()["source"], "complete_work_order");

    assert_eq!(sb.stored_offsets(a).await, [(0, 6)]);
    assert_eq!(sb.set_columns(set).await, ("ready".into(), true, false));
    let lock: Option<Uuid> = sqlx::query_scalar("SELECT lock_id FROM message_sets WHERE id = $1")
        .bind(set)
        .fetch_one(&sb.pool)
        .await
        .unwrap();
    assert!(stale.is_some());
    assert_ne!(lock, stale, "the stale claim is cleared (the set may be claimed afresh for the worker stream)");
    let view = sb.get_set(set).await;
    assert!(matches!(view.state(), MessageSetState::Ready | MessageSetState::InFlight), "{:?}", view.state());
    assert_eq!(view.head_offset, 6);
    let events = sb.events("work_order_succeeded").await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["work_order_id"], wo.to_string());
    assert!(granted(&mut grants, set, Duration::from_secs(5)).await, "set {set} was not granted after completion");
}

#[tokio::test]
async fn test_complete_work_order_failure_blocks_the_set() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "waiting").await;
    sb.messages(a, Some(b"k"), &[(0, 5), (0, 6)]).await;
    let wo = sb.work_order(a, set, Some(b"k"), (0, 5), "running", 1, None).await;

    let done = sb
        .work_orders
        .complete_work_order(CompleteWorkOrderRequest {
            id: wo.to_string(),
            success: false,
            error: "runner crashed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(done.state(), WorkOrderState::Failed);
    assert_eq!(done.last_error, "runner crashed");

    assert_eq!(sb.stored_offsets(a).await, [(0, 5), (0, 6)], "a failed message stays");
    assert_eq!(sb.set_columns(set).await, ("blocked".into(), true, true));
    assert_eq!(sb.list_sets(Some(a), MessageSetState::Blocked).await, ids(&[set]));
    let view = sb.get_set(set).await;
    assert_eq!(view.reason, format!("work order {wo} failed after 1 attempt(s): runner crashed"));
    assert_eq!(sb.events("work_order_failed").await.len(), 1);
    let blocked = sb.events("set_blocked").await;
    assert_eq!(blocked.len(), 1);
    assert_eq!(blocked[0]["error"], "runner crashed");

    // The operator retries: the same work order starts over.
    sb.sets.retry_message_set(RetryMessageSetRequest { id: set.to_string() }).await.unwrap();
    assert_eq!(sb.work_order_columns(wo).await.0, "pending");
}

#[tokio::test]
async fn test_complete_work_order_refuses_wrong_state_and_bad_ids() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let set = sb.keyed_set(a, b"k", "waiting").await;
    sb.messages(a, Some(b"k"), &[(0, 5)]).await;
    let pending = sb.work_order(a, set, Some(b"k"), (0, 5), "pending", 0, None).await;

    let complete = |id: String, success: bool| {
        let mut client = sb.work_orders.clone();
        async move { client.complete_work_order(CompleteWorkOrderRequest { id, success, error: String::new() }).await }
    };
    let err = complete(pending.to_string(), true).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        format!("work order {pending} is pending; only a running work order (accepted by the target with 202) can be completed")
    );
    let err = complete(Uuid::now_v7().to_string(), true).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    for id in ["", "xyz", "12"] {
        let err = complete(id.into(), false).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{id:?}");
        assert_eq!(violations(&err), ["id"]);
    }
    assert_eq!(sb.work_order_columns(pending).await.0, "pending", "nothing changed");

    // A report racing the delivery (the worker has not recorded the 202 yet)
    // is told to come again, not that it is wrong.
    sb.claim(set, 600).await;
    let err = complete(pending.to_string(), true).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("being delivered"), "{}", err.message());
    sb.claim(set, -5).await;

    // Completing twice: the second report finds it finished.
    sqlx::query("UPDATE work_orders SET state = 'running' WHERE id = $1")
        .bind(pending)
        .execute(&sb.pool)
        .await
        .unwrap();
    complete(pending.to_string(), false).await.unwrap();
    let err = complete(pending.to_string(), true).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("is failed"), "{}", err.message());
}

#[tokio::test]
async fn test_list_and_get_work_orders() {
    let mut sb = sandbox().await;
    let a = sb.trigger("a").await;
    let b = sb.trigger("b").await;
    let binary_key: &[u8] = &[0xff, 0x00, 0x80];
    let set_a = sb.keyed_set(a, binary_key, "waiting").await;
    let set_b = sb.keyed_set(b, b"k", "waiting").await;
    let w1 = sb.work_order(a, set_a, Some(binary_key), (0, 1), "success", 1, None).await;
    let w2 = sb.work_order(b, set_b, Some(b"k"), (0, 1), "failed", 3, Some("HTTP 500")).await;
    let w3 = sb.work_order(a, set_a, Some(binary_key), (0, 2), "failed", 2, Some("HTTP 502")).await;
    let w4 = sb.work_order(a, set_a, Some(binary_key), (0, 3), "running", 1, None).await;
    let w5 = sb.work_order(b, set_b, Some(b"k"), (0, 2), "pending", 0, None).await;

    let client = sb.work_orders.clone();
    let list = |trigger: Option<Uuid>, state: WorkOrderState, page_size: i32, page_token: String| {
        let mut client = client.clone();
        async move {
            client
                .list_work_orders(ListWorkOrdersRequest {
                    trigger_id: trigger.map(|t| t.to_string()).unwrap_or_default(),
                    state: state.into(),
                    page_size,
                    page_token,
                    ..Default::default()
                })
                .await
        }
    };
    let all_ids = |ws: &[Uuid]| ws.iter().map(Uuid::to_string).collect::<Vec<_>>();

    // Every work order once, in id order, page by page.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(None, WorkOrderState::Unspecified, 2, token.clone()).await.unwrap().into_inner();
        assert!(page.work_orders.len() <= 2);
        assert!(page.work_orders.iter().all(|w| w.body.is_empty()), "lists carry no bodies");
        seen.extend(page.work_orders.into_iter().map(|w| w.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, all_ids(&[w1, w2, w3, w4, w5]));

    let ids_of = |r: ListWorkOrdersResponse| r.work_orders.into_iter().map(|w| w.id).collect::<Vec<_>>();
    let page = list(Some(a), WorkOrderState::Unspecified, 0, String::new()).await.unwrap().into_inner();
    assert_eq!(ids_of(page), all_ids(&[w1, w3, w4]));
    let page = list(None, WorkOrderState::Failed, 0, String::new()).await.unwrap().into_inner();
    assert_eq!(ids_of(page), all_ids(&[w2, w3]));
    let page = list(Some(a), WorkOrderState::Failed, 0, String::new()).await.unwrap().into_inner();
    assert_eq!(ids_of(page), all_ids(&[w3]));
    // Paging a filtered list.
    let first = list(Some(a), WorkOrderState::Unspecified, 1, String::new()).await.unwrap().into_inner();
    assert_eq!(first.next_page_token, w1.to_string());
    let second = list(Some(a), WorkOrderState::Unspecified, 2, first.next_page_token).await.unwrap().into_inner();
    assert_eq!((ids_of(second.clone()), second.next_page_token.as_str()), (all_ids(&[w3, w4]), ""));

    let got = sb.work_orders.get_work_order(GetWorkOrderRequest { id: w3.to_string() }).await.unwrap().into_inner();
    assert_eq!(got.trigger_id, a.to_string());
    assert_eq!(got.set_id, set_a.to_string());
    assert_eq!(got.key.as_deref(), Some(binary_key), "key bytes as stored");
    assert_eq!((got.partition, got.offset), (0, 2));
    assert_eq!(got.state(), WorkOrderState::Failed);
    assert_eq!((got.attempts, got.last_error.as_str()), (2, "HTTP 502"));
    assert_eq!(got.body, "{\"data\":{\"offset\":2}}");
    assert_eq!(serde_json::from_str::<Value>(&got.attempt_log).unwrap().as_array().unwrap().len(), 2);
    assert!(got.create_time.is_some() && got.update_time.is_some());

    let err = sb.work_orders.get_work_order(GetWorkOrderRequest { id: Uuid::now_v7().to_string() }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = sb.work_orders.get_work_order(GetWorkOrderRequest { id: "nope".into() }).await.unwrap_err();
    assert_eq!(violations(&err), ["id"]);
    let err = list(None, WorkOrderState::Unspecified, -1, String::new()).await.unwrap_err();
    assert_eq!(violations(&err), ["page_size"]);
    let err = list(None, WorkOrderState::Unspecified, 0, "garbage".into()).await.unwrap_err();
    assert_eq!(violations(&err), ["page_token"]);
    let mut client = sb.work_orders.clone();
    let err = client.list_work_orders(ListWorkOrdersRequest { state: 42, ..Default::default() }).await.unwrap_err();
    assert_eq!(violations(&err), ["state"]);
}
