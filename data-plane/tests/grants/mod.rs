//! The worker engine with a set granted before this node's assignment names
//! its trigger (the work stream and the session are separate streams): the
//! grant waits for the assignment, not for a timer, and a grant whose
//! trigger the next assignment does not name is released.

use std::sync::Arc;
use std::time::Duration;

use kt_common::dispatch::grant::{claim_grantable, Claimed, Room};
use kt_common::webhook_policy::WebhookPolicy;
use kt_data_plane::assignment::{AssignedTrigger, TriggerDirectory};
use kt_data_plane::delivery::WebhookClient;
use kt_data_plane::worker::{Context, Engine};
use kt_proto::internal::{SetGrant, SetOutcome, SetOutcomeKind, WorkGrant};
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::support::{insert_trigger, trigger_proto, TestDb};

const T: Duration = Duration::from_secs(30);
/// Far longer than `T`: within a test's wait, only an assignment can end a
/// grant's parking, never its lease.
const LEASE_MS: u32 = 600_000;

/// An HTTP target that answers every request 200 and says so, one request
/// per connection.
async fn webhook() -> (String, mpsc::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                // The body is small: the request is whole once the headers
                // and the announced length are in.
                while !complete(&request) {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = socket.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").await;
                let _ = tx.send(()).await;
            });
        }
    });
    (url, rx)
}

fn complete(request: &[u8]) -> bool {
    let text = String::from_utf8_lossy(request);
    let Some(end) = text.find("\r\n\r\n") else { return false };
    let length = text[..end]
        .lines()
        .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
        .unwrap_or(0);
    request.len() >= end + 4 + length
}

/// A stored keyed message, its ready set, and the claim the scheduler would
/// have made for a grant.
async fn claimed_set(pool: &PgPool, trigger: Uuid) -> Claimed {
    sqlx::query(
        r#"INSERT INTO messages (trigger_id, topic, partition, "offset", key, value) VALUES ($1, 'orders', 0, 0, 'k', '{}')"#,
    )
    .bind(trigger)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query("INSERT INTO message_sets (trigger_id, topic, key) VALUES ($1, 'orders', 'k')")
        .bind(trigger)
        .execute(pool)
        .await
        .unwrap();
    let room = Room { trigger_id: trigger, sets: 1, lease_secs: f64::from(LEASE_MS) / 1000.0 };
    let mut claimed = claim_grantable(pool, &[room], 1).await.unwrap();
    assert_eq!(claimed.len(), 1, "the set is grantable");
    claimed.remove(0)
}

fn grant(c: &Claimed) -> WorkGrant {
    WorkGrant {
        sets: vec![SetGrant { set_id: c.set_id, trigger_id: c.trigger_id.to_string(), lock_id: c.lock_id.to_string() }],
        lease_ms: LEASE_MS,
    }
}

fn engine(pool: &PgPool, directory: &TriggerDirectory) -> Engine {
    let webhook = WebhookClient::new(WebhookPolicy::new(Vec::new(), Vec::new())).unwrap();
    let ctx = Arc::new(Context { pool: pool.clone(), webhook, dead_letters: Default::default() });
    Engine::new(ctx, directory.clone())
}

/// Runs the engine until it reports an outcome.
async fn first_outcomes(engine: &mut Engine) -> Vec<SetOutcome> {
    tokio::time::timeout(T, async {
        loop {
            let outcomes = engine.take_outcomes();
            if !outcomes.is_empty() {
                return outcomes;
            }
            engine.next().await.expect("the engine has work under way");
        }
    })
    .await
    .expect("no outcome")
}

/// An engine with an empty directory, granted one claimed set of trigger `id`.
struct Granted {
    db: TestDb,
    id: Uuid,
    directory: TriggerDirectory,
    engine: Engine,
    claimed: Claimed,
}

async fn granted_unknown() -> Granted {
    let db = TestDb::new().await;
    let id = Uuid::now_v7();
    insert_trigger(&db.pool, id, "g").await;
    let directory = TriggerDirectory::default();
    let mut engine = engine(&db.pool, &directory);
    let claimed = claimed_set(&db.pool, id).await;
    engine.grant(grant(&claimed));
    Granted { db, id, directory, engine, claimed }
}

async fn set_state(pool: &PgPool, set_id: i64) -> (String, Option<Uuid>) {
    sqlx::query_as("SELECT state, lock_id FROM message_sets WHERE id = $1").bind(set_id).fetch_one(pool).await.unwrap()
}

fn kinds(outcomes: &[SetOutcome]) -> Vec<SetOutcomeKind> {
    outcomes.iter().map(|o| o.kind()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_set_granted_before_its_trigger_is_assigned_is_delivered_once_it_is() {
    let Granted { db, id, directory, mut engine, .. } = granted_unknown().await;
    let (url, mut posts) = webhook().await;
    let mut trigger = trigger_proto(id, 1, "127.0.0.1:9092", &["orders"], "g");
    trigger.webhook.as_mut().unwrap().url = url;
    let assigned = Arc::new(AssignedTrigger::from_proto(&trigger).unwrap());

    assert!(engine.busy(), "the grant waits for its trigger");
    assert_eq!(engine.held(), 0, "not in hand before the trigger is known");

    // The assignment arrives on the session: the parked grant is taken in
    // hand and worked on with its original claim, never handed back.
    directory.replace(&[assigned]);
    let outcomes = first_outcomes(&mut engine).await;
    assert_eq!(kinds(&outcomes), [SetOutcomeKind::Idle], "delivered and drained, not released");
    tokio::time::timeout(T, posts.recv()).await.expect("the webhook got the POST").unwrap();
    let state: (String, i64) = sqlx::query_as(
        "SELECT state, (SELECT count(*) FROM messages WHERE trigger_id = $1) FROM work_orders WHERE trigger_id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state, ("success".to_owned(), 0));
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_set_whose_trigger_the_next_assignment_does_not_name_is_released() {
    let Granted { db, directory, mut engine, claimed, .. } = granted_unknown().await;

    // An assignment without the trigger (it was disabled meanwhile, say):
    // the set goes back at once, not when its lease would end.
    let other = trigger_proto(Uuid::now_v7(), 1, "127.0.0.1:9092", &["orders"], "g");
    directory.replace(&[Arc::new(AssignedTrigger::from_proto(&other).unwrap())]);
    let outcomes = first_outcomes(&mut engine).await;
    assert_eq!(kinds(&outcomes), [SetOutcomeKind::Retry]);
    assert_eq!(set_state(&db.pool, claimed.set_id).await, ("ready".to_owned(), None), "grantable again");
    assert!(!engine.busy());
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_parked_grant_is_given_back_when_the_node_stops() {
    let Granted { db, mut engine, claimed, .. } = granted_unknown().await;
    engine.drain();
    let outcomes = first_outcomes(&mut engine).await;
    assert_eq!(kinds(&outcomes), [SetOutcomeKind::Ready], "given back as it was");
    assert_eq!(set_state(&db.pool, claimed.set_id).await, ("ready".to_owned(), None));
    db.drop().await;
}
