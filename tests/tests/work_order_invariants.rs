//! Invariants of candidate sets and work orders under randomised
//! interleavings and races (DESIGN §3, §7): exactly one work order per
//! message, per-key order, one work order of a key in flight at a time, a
//! claim held by one worker at a time and fenced once lost, and a blocked
//! key that holds back only itself.

mod work_order_checks;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use kt_common::dispatch::grant::{self, Room};
use kt_common::dispatch::round::{self, AfterSuccess, Failure, Posted, Success};
use kt_common::dispatch::{work_order_id, AfterAttempt, Attempt, SetState};
use kt_proto::v1::work_order_service_client::WorkOrderServiceClient;
use kt_proto::v1::CompleteWorkOrderRequest;
use kt_tests::webhook::Reply;
use kt_tests::{wait_for, TestDb, TestNode};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use sqlx::PgPool;
use tokio::sync::{mpsc, Barrier};
use tokio::task::JoinSet;
use uuid::Uuid;
use work_order_checks::*;

/// SplitMix64: a well-mixed 64-bit hash, so that each (seed, message,
/// attempt) gets its own answer whatever order the attempts come in.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn hash(seed: u64, (partition, offset): MessageId, attempt: u32) -> u64 {
    mix(mix(mix(seed) ^ partition as u64) ^ offset as u64 ^ (u64::from(attempt) << 48))
}

fn ms(n: u64) -> Option<Duration> {
    Some(Duration::from_millis(n))
}

/// The target's answer to one attempt: 200 (quick or slow, always within
/// the timeout), 500, 429 with `Retry-After` 0 or 1 s, or 202 (the test then
/// completes the work order shortly after).
fn random_reply(seed: u64, message: MessageId, attempt: u32) -> Reply {
    let h = hash(seed, message, attempt);
    let jitter = 1 + (h >> 20) % 15;
    match h % 100 {
        0..=44 => Reply { status: 200, retry_after: None, delay: ms(jitter) },
        45..=59 => Reply { status: 500, retry_after: None, delay: ms(jitter) },
        60..=69 => Reply { status: 429, retry_after: Some(((h >> 12) & 1) as u32), delay: ms(jitter) },
        70..=79 => Reply { status: 202, retry_after: None, delay: ms(jitter) },
        _ => Reply { status: 200, retry_after: None, delay: ms(50 + (h >> 24) % 200) },
    }
}

/// The seeds to run: `KT_TEST_SEED` to replay one, else three fresh ones.
fn seeds() -> Vec<u64> {
    match std::env::var("KT_TEST_SEED") {
        Ok(seed) => vec![seed.trim().parse().expect("KT_TEST_SEED is an unsigned 64-bit integer")],
        Err(_) => {
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64;
            (0..3).map(|i| mix(now.wrapping_add(i))).collect()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_randomized_interleavings_keep_order_and_exactly_once() {
    for seed in seeds() {
        eprintln!("randomized interleavings: seed {seed} (replay with KT_TEST_SEED={seed})");
        let started = Instant::now();
        let (messages, posts) = run_randomized(seed).await;
        eprintln!("seed {seed}: {messages} messages, {posts} POSTs in {:?}", started.elapsed());
    }
}

/// One randomised run; returns the messages produced and the POSTs made.
async fn run_randomized(seed: u64) -> (usize, usize) {
    const TOPIC: &str = "random";
    const KEYS: u64 = 20;
    let s = Stack::start(TOPIC, 3).await;
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel::<MessageId>();
    let probe = Probe::install(&s.receiver, move |_, message, attempt| {
        let reply = random_reply(seed, message, attempt);
        if reply.status == 202 {
            // The receiver of the channel lives as long as the test.
            let _ = accepted_tx.send(message);
        }
        reply
    });
    // Enough attempts that nothing blocks (a failure is 25% likely; 50 in a row never happen).
    let target = Target::new(2_000, retry(50, 10, 50));
    let trigger = s.create_trigger(TOPIC, &target).await;
    let nodes = [
        TestNode::start(&s.db, &s.cp().url(), |c| c.workers = 4).await,
        TestNode::start(&s.db, &s.cp().url(), |c| c.workers = 4).await,
    ];

    // The asynchronous runner: completes each accepted work order after a while.
    let mut completions = JoinSet::new();
    let runner = {
        let (pool, probe) = (s.pool.clone(), probe.clone());
        let client = WorkOrderServiceClient::new(s.cp().channel().await.unwrap());
        tokio::spawn(async move {
            while let Some(message) = accepted.recv().await {
                let (pool, probe, client) = (pool.clone(), probe.clone(), client.clone());
                completions.spawn(async move {
                    // Work done by the runner; not a synchronisation.
                    tokio::time::sleep(Duration::from_millis(5 + hash(seed, message, 0) % 60)).await;
                    // The id is known from the message alone; until the worker
                    // has recorded the 202 the work order does not exist yet
                    // (NOT_FOUND), is still in delivery (UNAVAILABLE) or pending
                    // (FAILED_PRECONDITION).
                    let _ = &pool;
                    let id = work_order_id(trigger, TOPIC, message.0, message.1);
                    wait_for("CompleteWorkOrder accepted", WAIT, || {
                        let (mut client, probe) = (client.clone(), probe.clone());
                        async move {
                            let asked = Instant::now();
                            let req =
                                CompleteWorkOrderRequest { id: id.to_string(), success: true, error: String::new() };
                            match client.complete_work_order(req).await {
                                Ok(_) => {
                                    probe.completed(message, asked);
                                    Some(())
                                }
                                Err(status)
                                    if matches!(
                                        status.code(),
                                        tonic::Code::Unavailable
                                            | tonic::Code::FailedPrecondition
                                            | tonic::Code::NotFound
                                    ) =>
                                {
                                    None
                                }
                                Err(status) => panic!("CompleteWorkOrder {id}: {status}"),
                            }
                        }
                    })
                    .await
                    .unwrap();
                });
            }
            while let Some(done) = completions.join_next().await {
                done.unwrap();
            }
        })
    };

    // Bursts produced while earlier ones are being delivered.
    let mut rng = StdRng::seed_from_u64(seed);
    let mut produced = Vec::new();
    for burst in 0..4 {
        let n = rng.gen_range(40..70);
        let messages = (0..n)
            .map(|i| {
                let m = kt_kafka_testing::produce::TestMessage::new(format!(r#"{{"burst":{burst},"i":{i}}}"#));
                if rng.gen_bool(0.85) {
                    m.key(format!("key-{}", rng.gen_range(0..KEYS)))
                } else {
                    m
                }
            })
            .collect();
        produced.extend(ids(&s.produce(TOPIC, messages).await));
        wait_succeeded(&s.pool, trigger, produced.len() / 2).await;
    }

    wait_succeeded(&s.pool, trigger, produced.len()).await;
    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), false).await;
    // Every POST is one recorded attempt; none lost, none invented.
    let mut posts: HashMap<MessageId, i32> = HashMap::new();
    for seen in probe.seen() {
        *posts.entry(seen.message).or_default() += 1;
    }
    for (message, wo) in work_orders(&s.pool, trigger).await {
        assert_eq!(wo.attempts, posts[&message], "attempts of {message:?}");
    }
    let total_posts = probe.seen().len();
    drop(nodes);
    drop(probe);
    runner.abort();
    (produced.len(), total_posts)
}

// ---------------------------------------------------------------------------

async fn race_db() -> (TestDb, PgPool, Uuid) {
    let db = TestDb::create().await.unwrap();
    let pool = kt_common::db::connect(&db.url, 20).await.unwrap();
    kt_common::db::migrate(&pool).await.unwrap();
    let trigger = Uuid::now_v7();
    sqlx::query("INSERT INTO triggers (id, name, enabled, generation, group_id, spec) VALUES ($1, 'race', true, 1, 'race', '{}')")
        .bind(trigger)
        .execute(&pool)
        .await
        .unwrap();
    (db, pool, trigger)
}

async fn lock_of(pool: &PgPool, set: i64) -> Option<Uuid> {
    sqlx::query_scalar("SELECT lock_id FROM message_sets WHERE id = $1").bind(set).fetch_one(pool).await.unwrap()
}

fn room(trigger: Uuid, sets: i32, lease_secs: f64) -> [Room; 1] {
    [Room { trigger_id: trigger, sets, lease_secs }]
}

/// `claimers` tasks claim from `trigger` at the same moment, one set each;
/// returns the (set, lock) pairs they won.
async fn claim_all_at_once(pool: &PgPool, trigger: Uuid, claimers: usize) -> Vec<(i64, Uuid)> {
    let barrier = Arc::new(Barrier::new(claimers));
    let mut tasks = JoinSet::new();
    for _ in 0..claimers {
        let (pool, barrier) = (pool.clone(), barrier.clone());
        tasks.spawn(async move {
            barrier.wait().await;
            grant::claim_grantable(&pool, &room(trigger, 1, 30.0), 1).await.unwrap()
        });
    }
    let mut winners = Vec::new();
    while let Some(done) = tasks.join_next().await {
        winners.extend(done.unwrap().into_iter().map(|c| (c.set_id, c.lock_id)));
    }
    winners
}

fn posted(set: i64, lock: Uuid, trigger: Uuid, key: &str, offset: i64, attempt: Attempt) -> Posted {
    Posted {
        set_id: set,
        lock_id: lock,
        trigger_id: trigger,
        topic: "race".into(),
        set_key: Some(key.as_bytes().to_vec()),
        partition: 0,
        offset,
        body: "{}".into(),
        attempt: Some(attempt),
    }
}

fn success(set: i64, lock: Uuid, trigger: Uuid, key: &str, offset: i64) -> Success {
    let attempt = Attempt { at: Utc::now(), ms: 1, outcome: "success", error: None };
    Success { posted: posted(set, lock, trigger, key, offset, attempt), keep: true }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_two_claimers_never_get_the_same_set() {
    let (_db, pool, trigger) = race_db().await;
    let sets: Vec<i64> = sqlx::query_scalar(
        "INSERT INTO message_sets (trigger_id, topic, key)
         SELECT $1, 'race', convert_to('key-' || i, 'UTF8') FROM generate_series(1, 6) i RETURNING id",
    )
    .bind(trigger)
    .fetch_all(&pool)
    .await
    .unwrap();

    // 1. Many claimers (schedulers), each claiming a few sets, holding them a
    //    moment and releasing them, over the same few sets: a set is never
    //    held by two at once.
    let held: Arc<Vec<AtomicBool>> = Arc::new(sets.iter().map(|_| AtomicBool::new(false)).collect());
    let wins: Arc<Vec<AtomicUsize>> = Arc::new(sets.iter().map(|_| AtomicUsize::new(0)).collect());
    let empty = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for task in 0..16u64 {
        let (pool, sets, held, wins, empty) = (pool.clone(), sets.clone(), held.clone(), wins.clone(), empty.clone());
        tasks.spawn(async move {
            let mut rng = StdRng::seed_from_u64(task);
            for _ in 0..30 {
                let claimed = grant::claim_grantable(&pool, &room(trigger, 2, 30.0), 2).await.unwrap();
                if claimed.is_empty() {
                    empty.fetch_add(1, Ordering::SeqCst);
                }
                for c in &claimed {
                    let i = sets.iter().position(|s| *s == c.set_id).unwrap();
                    assert!(!held[i].swap(true, Ordering::SeqCst), "set {} claimed while held", c.set_id);
                    wins[i].fetch_add(1, Ordering::SeqCst);
                }
                // Work under the claims; not a synchronisation.
                tokio::time::sleep(Duration::from_micros(rng.gen_range(0..2_000))).await;
                for c in &claimed {
                    let i = sets.iter().position(|s| *s == c.set_id).unwrap();
                    held[i].store(false, Ordering::SeqCst);
                    assert!(
                        round::release_ready(&pool, c.set_id, c.lock_id).await.unwrap(),
                        "the holder's release counts"
                    );
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let wins: Vec<usize> = wins.iter().map(|w| w.load(Ordering::SeqCst)).collect();
    let empty = empty.load(Ordering::SeqCst);
    assert!(wins.iter().all(|w| *w > 0), "every set was claimed: {wins:?}");
    assert!(empty > 0, "the claimers contended");
    eprintln!("claims won per set {wins:?}, {empty} claims found nothing free");

    // 2. All at once: no set is won twice (a claimer that finds its pick
    //    locked skips it); then claiming until nothing is left takes every
    //    set exactly once.
    let mut winners = claim_all_at_once(&pool, trigger, 12).await;
    let mut won: Vec<i64> = winners.iter().map(|w| w.0).collect();
    won.sort();
    won.dedup();
    assert_eq!(won.len(), winners.len(), "a set won twice: {winners:?}");
    assert!(!winners.is_empty());
    loop {
        let more = grant::claim_grantable(&pool, &room(trigger, 6, 30.0), 6).await.unwrap();
        if more.is_empty() {
            break;
        }
        winners.extend(more.into_iter().map(|c| (c.set_id, c.lock_id)));
    }
    let mut won: Vec<i64> = winners.iter().map(|w| w.0).collect();
    won.sort();
    assert_eq!(won, sets, "every set once, none twice");
    for (set, lock) in &winners {
        assert_eq!(lock_of(&pool, *set).await, Some(*lock));
        assert!(round::release_ready(&pool, *set, *lock).await.unwrap());
    }

    // 3. An expired claim is released by the janitor and claimed afresh;
    //    the stale holder's fenced writes then change nothing.
    let set = sets[0];
    sqlx::query(
        "INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value)
         VALUES ($1, 'race', 0, 100, 'key-1', '{}'), ($1, 'race', 0, 101, 'key-1', '{}')",
    )
    .bind(trigger)
    .execute(&pool)
    .await
    .unwrap();
    // Only set 0 is grantable now.
    sqlx::query("UPDATE message_sets SET state = 'idle' WHERE id <> $1").bind(set).execute(&pool).await.unwrap();
    let stale = grant::claim_grantable(&pool, &room(trigger, 1, 0.3), 1).await.unwrap()[0].lock_id;
    assert_eq!(claim_all_at_once(&pool, trigger, 4).await.len(), 0, "a live claim is not claimed again");
    let read = round::read_candidates(&pool, &[(set, stale)]).await.unwrap();
    assert_eq!(read[0].head.position(), Some((0, 100)));
    wait_for("the janitor to release the expired claim", WAIT, || async {
        (grant::release_expired_claims(&pool).await.ok()? == 1).then_some(())
    })
    .await
    .unwrap();
    assert!(round::read_candidates(&pool, &[(set, stale)]).await.unwrap().is_empty(), "a released claim reads nothing");
    let winners = claim_all_at_once(&pool, trigger, 12).await;
    assert_eq!(winners.len(), 1, "one claimer takes the released set");
    let fresh = winners[0].1;

    let attempt = Attempt { at: Utc::now(), ms: 1, outcome: "failure", error: Some("boom".into()) };
    let failure = Failure { posted: posted(set, stale, trigger, "key-1", 100, attempt), after: AfterAttempt::Failed };
    let after = round::commit_successes(&pool, &[success(set, stale, trigger, "key-1", 100)]).await.unwrap();
    assert!(matches!(after[0].1, AfterSuccess::Lost), "stale success: {:?}", after[0].1);
    assert!(round::record_failures(&pool, &[failure]).await.unwrap().is_empty(), "stale failure");
    assert!(!round::park(&pool, set, stale, AfterAttempt::Failed).await.unwrap(), "stale park");
    assert!(!round::release_ready(&pool, set, stale).await.unwrap(), "stale release");
    assert_eq!(round::finish_empty(&pool, set, stale, true, 0).await.unwrap(), None, "stale finish_empty");
    assert!(!round::delete_finished_head(&pool, set, stale, &read[0]).await.unwrap(), "stale delete");
    // Nothing changed: the claim, the work orders, the messages.
    assert_eq!(lock_of(&pool, set).await, Some(fresh));
    assert_eq!(count(&pool, "SELECT count(*) FROM work_orders").await, 0);
    assert_eq!(count(&pool, "SELECT count(*) FROM messages").await, 2);
    assert_eq!(count(&pool, "SELECT count(*) FROM events").await, 0);
    // The new holder's writes do count, and hand it the next candidate.
    let after = round::commit_successes(&pool, &[success(set, fresh, trigger, "key-1", 100)]).await.unwrap();
    match &after[0].1 {
        AfterSuccess::Next(c) => assert_eq!(c.head.position(), Some((0, 101))),
        other => panic!("expected the next candidate, got {other:?}"),
    }
    assert_eq!(count(&pool, "SELECT count(*) FROM messages").await, 1);
    let wo: (Uuid, String, i32) =
        sqlx::query_as("SELECT id, state, attempts FROM work_orders").fetch_one(&pool).await.unwrap();
    assert_eq!(wo, (work_order_id(trigger, "race", 0, 100), "success".to_owned(), 1));
    // Its last message: released idle.
    let after = round::commit_successes(&pool, &[success(set, fresh, trigger, "key-1", 101)]).await.unwrap();
    assert!(matches!(after[0].1, AfterSuccess::Released(SetState::Idle)), "{:?}", after[0].1);
    assert_eq!(lock_of(&pool, set).await, None);
}

// ---------------------------------------------------------------------------

#[tokio::test]
async fn test_blocked_key_never_delays_other_keys() {
    const TOPIC: &str = "blocking";
    // One partition: the bad key's messages sit in the same log as everyone's.
    let s = Stack::start(TOPIC, 1).await;
    let probe = Probe::install(&s.receiver, |key, _, _| match key {
        Some("bad") => Reply::status(500),
        _ => Reply { status: 200, retry_after: None, delay: ms(2) },
    });
    // One attempt: the first failure blocks. One work order in flight for the
    // whole trigger: were the blocked set to keep its slot, nothing would move.
    let target = Target { max_in_flight: Some(1), ..Target::new(2_000, retry(1, 10, 50)) };
    let trigger = s.create_trigger(TOPIC, &target).await;
    let _node = TestNode::start(&s.db, &s.cp().url(), |_| {}).await;

    let mut keys: Vec<String> = (0..30).map(|i| format!("ok-{i}")).collect();
    keys.push("bad".into());
    let mut messages = messages_for(Some("bad"), 0, 1);
    messages.extend(interleaved(&keys, 5, 0, 1));
    let mut sent = s.produce(TOPIC, messages).await;

    let blocked_since: chrono::DateTime<Utc> = wait_for("bad blocked", WAIT, || async {
        sqlx::query_scalar("SELECT blocked_since FROM message_sets WHERE key = 'bad' AND state = 'blocked'")
            .fetch_optional(&s.pool)
            .await
            .ok()
            .flatten()
    })
    .await
    .unwrap();
    // More for everyone, the bad key included, while it is blocked.
    sent.extend(s.produce(TOPIC, interleaved(&keys, 5, 10, 100)).await);

    let (bad, good): (Vec<Sent>, Vec<Sent>) = sent.into_iter().partition(|m| m.key.as_deref() == Some("bad"));
    let good = ids(&good);
    let bad = ids(&bad);
    let started = Instant::now();
    wait_succeeded(&s.pool, trigger, good.len()).await;
    eprintln!("{} messages of other keys delivered {:?} after the second burst", good.len(), started.elapsed());

    // The other keys: exactly once, in order, one in flight per key.
    let wos = work_orders(&s.pool, trigger).await;
    assert_eq!(wos.len(), good.len() + 1, "one work order per good message, plus bad's head");
    for m in &good {
        assert_eq!(wos[m].state, "success", "{m:?}");
    }
    assert_one_work_order_id_per_message(&s.receiver.deliveries(), &wos);
    assert_per_key_order(&probe, target.timeout(), false);
    assert_one_in_flight_per_key(&probe, target.timeout());
    assert_attempt_logs_sequential(&s.pool, trigger).await;
    assert_eq!(probe.seen().len(), good.len() + 1, "one POST per good message, one for bad");

    // The bad key: its head failed once, the set is still blocked since then,
    // its later messages are stored and untouched.
    let head = &wos[&bad[0]];
    assert_eq!((head.state.as_str(), head.attempts), ("failed", 1));
    assert!(head.last_error.as_deref().unwrap_or_default().contains("500"), "{:?}", head.last_error);
    for m in &bad[1..] {
        assert!(!wos.contains_key(m), "bad's message {m:?} got a work order while the set is blocked");
    }
    let (state, since, locked): (String, Option<chrono::DateTime<Utc>>, bool) =
        sqlx::query_as("SELECT state, blocked_since, lock_id IS NOT NULL FROM message_sets WHERE key = 'bad'")
            .fetch_one(&s.pool)
            .await
            .unwrap();
    assert_eq!((state.as_str(), since, locked), ("blocked", Some(blocked_since), false));
    assert_eq!(count(&s.pool, "SELECT count(*) FROM messages").await, bad.len() as i64);
    assert_eq!(count(&s.pool, "SELECT count(*) FROM messages WHERE key = 'bad'").await, bad.len() as i64);
    wait_for("other sets at rest", WAIT, || async {
        let busy = count(
            &s.pool,
            "SELECT count(*) FROM message_sets WHERE state NOT IN ('idle', 'blocked') OR lock_id IS NOT NULL",
        )
        .await;
        (busy == 0).then_some(())
    })
    .await
    .unwrap();
}

// ---------------------------------------------------------------------------

/// The checks above catch what they are meant to: overlapping attempts of a
/// key, successes out of order or repeated, a 202 never completed.
#[test]
fn test_invariant_checks_catch_violations() {
    let t0 = Instant::now();
    let post = |message: MessageId, attempt: u32, at_ms: u64, status: u16, delay_ms: u64| Seen {
        key: Some("k".into()),
        message,
        attempt,
        reply: Reply { status, retry_after: None, delay: ms(delay_ms) },
        at: t0 + Duration::from_millis(at_ms),
    };
    let timeout = Duration::from_millis(1_000);
    let fails = |probe: Probe, allow_repeats: bool| {
        let caught = |f: &dyn Fn()| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err();
        let order = caught(&|| assert_per_key_order(&probe, timeout, allow_repeats));
        let overlap = caught(&|| assert_one_in_flight_per_key(&probe, timeout));
        (order, overlap)
    };
    // In order, one at a time, a retry after a 500, a 202 completed before the next.
    let good = vec![
        post((0, 1), 1, 0, 500, 10),
        post((0, 1), 2, 20, 200, 10),
        post((0, 2), 1, 40, 202, 5),
        post((0, 3), 1, 100, 200, 5),
    ];
    assert_eq!(
        fails(Probe::recorded(good.clone(), vec![((0, 2), t0 + Duration::from_millis(90))]), false),
        (false, false)
    );
    // The 202 never completed, yet the next message went out.
    assert!(fails(Probe::recorded(good, vec![]), false).1);
    // The second message started while the first was still being answered.
    let overlap = vec![post((0, 1), 1, 0, 200, 100), post((0, 2), 1, 50, 200, 60)];
    assert_eq!(fails(Probe::recorded(overlap, vec![]), false), (false, true));
    // A timed-out attempt counts as in flight for half the timeout only.
    let late = vec![post((0, 1), 1, 0, 200, 3_000), post((0, 1), 2, 600, 200, 10)];
    assert_eq!(fails(Probe::recorded(late, vec![]), false), (false, false));
    // Out of order, and the same message twice.
    let reversed = vec![post((0, 2), 1, 0, 200, 1), post((0, 1), 1, 10, 200, 1)];
    assert_eq!(fails(Probe::recorded(reversed, vec![]), false), (true, false));
    let twice = vec![post((0, 1), 1, 0, 200, 1), post((0, 1), 2, 10, 200, 1)];
    assert_eq!(fails(Probe::recorded(twice.clone(), vec![]), false), (true, false));
    assert_eq!(
        fails(Probe::recorded(twice, vec![]), true),
        (false, false),
        "an at-least-once repeat is allowed when asked"
    );
}

// ---------------------------------------------------------------------------

/// A worker finds its set empty and marks it idle; before its `Idle`
/// outcome reaches the control plane, a message arrives, ingest wakes the
/// set and notifies. The set must be granted again once the outcome is in
/// (the control plane's memory holds no copy of readiness that could
/// disagree). Pinned a bug of the earlier in-memory ready queue, seen as a
/// rare hang of `test_randomized_interleavings_keep_order_and_exactly_once`.
#[tokio::test]
async fn test_a_message_arriving_as_its_set_goes_idle_is_not_stranded() {
    use kt_control_plane::scheduler::Scheduler;
    use kt_proto::internal::{SetOutcome, SetOutcomeKind};

    let (_db, pool, trigger) = race_db().await;
    let set: i64 =
        sqlx::query_scalar("INSERT INTO message_sets (trigger_id, topic, key) VALUES ($1, 'race', 'k') RETURNING id")
            .bind(trigger)
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value) VALUES ($1, 'race', 0, 0, 'k', '{}')")
        .bind(trigger)
        .execute(&pool)
        .await
        .unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let keys = kt_common::crypto::Keyring::from_base64([kt_tests::TEST_ENCRYPTION_KEY]).unwrap();
    let triggers = kt_control_plane::triggers::TriggerService::new(pool.clone(), keys);
    let lease = kt_common::dispatch::lease::DEFAULT_LEASE;
    let tasks = kt_common::tasks::Supervisor::new();
    let scheduler =
        Scheduler::start(pool.clone(), triggers, lease, shutdown.clone(), &tasks, Default::default()).await.unwrap();
    // A fake worker stream with room for one set.
    let session = Uuid::now_v7();
    let (grants_tx, mut grants) = mpsc::channel(16);
    scheduler.join(session, "fake-node".into(), grants_tx).await;
    scheduler.credit(session, 1).await;
    let granted = tokio::time::timeout(WAIT, grants.recv()).await.expect("a grant").unwrap();
    assert_eq!(granted.sets[0].set_id, set);
    let lock = Uuid::parse_str(&granted.sets[0].lock_id).unwrap();

    // The worker drains the set: its one message is delivered and deleted,
    // the set found empty and marked idle.
    let read = round::read_candidates(&pool, &[(set, lock)]).await.unwrap();
    sqlx::query("DELETE FROM messages").execute(&pool).await.unwrap();
    assert_eq!(round::finish_empty(&pool, set, lock, true, read[0].ingest_seq).await.unwrap(), Some(SetState::Idle));

    // Before the worker's outcome is in, a message arrives: what ingest does
    // (kt_common::dispatch::announce), then its NOTIFY.
    sqlx::query("INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value) VALUES ($1, 'race', 0, 1, 'k', '{}')")
        .bind(trigger)
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    kt_common::dispatch::announce::announce_stored(&mut tx, trigger, "race", true).await.unwrap();
    tx.commit().await.unwrap();
    // No credit until the outcome: nothing is granted meanwhile.
    let stats = scheduler.stats().await;
    assert_eq!((stats.in_flight, stats.credits), (1, 0), "the set is still in flight when it is announced again");

    // The worker's outcome: the set was empty when it looked.
    let idle = SetOutcome {
        set_id: set,
        trigger_id: trigger.to_string(),
        kind: SetOutcomeKind::Idle.into(),
        retry_at_unix_ms: 0,
    };
    scheduler.outcomes(session, vec![idle]).await;
    let again = tokio::time::timeout(Duration::from_secs(5), grants.recv()).await;
    let state: String =
        sqlx::query_scalar("SELECT state FROM message_sets WHERE id = $1").bind(set).fetch_one(&pool).await.unwrap();
    assert!(
        matches!(&again, Ok(Some(g)) if g.sets.iter().any(|s| s.set_id == set)),
        "set {set} ({state}, 1 message) was never granted again: stranded"
    );
    shutdown.cancel();
}

/// One group commit over a mixed round (DESIGN §3, "Dispatch at speed"):
/// sets that succeed and go on, succeed and go idle, succeed while a new
/// message arrived mid-round, fail (retry later), and one whose claim was
/// lost — each gets its own outcome, and the lost one writes nothing.
#[tokio::test]
async fn test_a_mixed_round_commits_each_set_by_its_outcome() {
    let (_db, pool, trigger) = race_db().await;
    // key -> offsets stored before the round.
    let keys: [(&str, &[i64]); 5] = [("a", &[1]), ("b", &[10]), ("c", &[20]), ("d", &[30]), ("e", &[40, 41])];
    for (key, offsets) in keys {
        for offset in offsets {
            sqlx::query("INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value) VALUES ($1, 'race', 0, $2, $3, '{}')")
                .bind(trigger)
                .bind(offset)
                .bind(key.as_bytes())
                .execute(&pool)
                .await
                .unwrap();
        }
    }
    let mut tx = pool.begin().await.unwrap();
    kt_common::dispatch::announce::announce_stored(&mut tx, trigger, "race", true).await.unwrap();
    tx.commit().await.unwrap();
    let claimed = grant::claim_grantable(&pool, &room(trigger, 10, 30.0), 10).await.unwrap();
    assert_eq!(claimed.len(), 5);
    let claims: Vec<(i64, Uuid)> = claimed.iter().map(|c| (c.set_id, c.lock_id)).collect();
    let read = round::read_candidates(&pool, &claims).await.unwrap();
    let by_key = |k: &str| read.iter().find(|c| c.set_key.as_deref() == Some(k.as_bytes())).unwrap().clone();
    let (a, b, c, d, e) = (by_key("a"), by_key("b"), by_key("c"), by_key("d"), by_key("e"));

    // Mid-round: c's claim is taken over; a new message of `a` arrives.
    sqlx::query("UPDATE message_sets SET lock_id = gen_random_uuid() WHERE id = $1")
        .bind(c.set_id)
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO messages (trigger_id, topic, partition, \"offset\", key, value) VALUES ($1, 'race', 0, 2, 'a', '{}')")
        .bind(trigger)
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    kt_common::dispatch::announce::announce_stored(&mut tx, trigger, "race", true).await.unwrap();
    tx.commit().await.unwrap();

    let ok = |cand: &kt_common::dispatch::Candidate, keep: bool| {
        let (partition, offset) = cand.head.position().unwrap();
        let key = String::from_utf8(cand.set_key.clone().unwrap()).unwrap();
        let mut s = success(cand.set_id, cand.lock_id, trigger, &key, offset);
        s.posted.partition = partition;
        s.keep = keep;
        s
    };
    let retry_at = Utc::now() + chrono::Duration::seconds(30);
    let attempt = Attempt { at: Utc::now(), ms: 1, outcome: "failure", error: Some("HTTP 503".into()) };
    let failure = Failure {
        posted: posted(b.set_id, b.lock_id, trigger, "b", 10, attempt),
        after: AfterAttempt::RetryAt(retry_at),
    };
    let mut tx = pool.begin().await.unwrap();
    let after =
        round::commit_successes(&mut *tx, &[ok(&a, false), ok(&c, true), ok(&d, false), ok(&e, true)]).await.unwrap();
    let failed = round::record_failures(&mut *tx, &[failure]).await.unwrap();
    tx.commit().await.unwrap();

    assert!(matches!(after[0].1, AfterSuccess::Released(SetState::Ready)), "a: more arrived: {:?}", after[0].1);
    assert!(matches!(after[1].1, AfterSuccess::Lost), "c: {:?}", after[1].1);
    assert!(matches!(after[2].1, AfterSuccess::Released(SetState::Idle)), "d: {:?}", after[2].1);
    match &after[3].1 {
        AfterSuccess::Next(next) => assert_eq!(next.head.position(), Some((0, 41)), "e goes on with its next message"),
        other => panic!("e: {other:?}"),
    }
    assert_eq!(failed, [b.set_id]);

    let sets: Vec<(String, String, bool, bool)> = sqlx::query_as(
        "SELECT convert_from(key, 'UTF8'), state, lock_id IS NOT NULL, retry_at IS NOT NULL FROM message_sets ORDER BY key",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let expect = [
        ("a", "ready", false, false),
        ("b", "waiting", false, true),
        ("c", "ready", true, false),
        ("d", "idle", false, false),
        ("e", "ready", true, false),
    ];
    let expect: Vec<(String, String, bool, bool)> =
        expect.iter().map(|(k, s, l, r)| (k.to_string(), s.to_string(), *l, *r)).collect();
    assert_eq!(sets, expect);
    let wos: Vec<(i64, String, i32)> =
        sqlx::query_as("SELECT \"offset\", state, attempts FROM work_orders ORDER BY \"offset\"")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        wos,
        [(1, "success".into(), 1), (10, "pending".into(), 1), (30, "success".into(), 1), (40, "success".into(), 1)],
        "no work order for the lost set c"
    );
    let stored: Vec<i64> =
        sqlx::query_scalar("SELECT \"offset\" FROM messages ORDER BY \"offset\"").fetch_all(&pool).await.unwrap();
    assert_eq!(stored, [2, 10, 20, 41]);
    let events: Vec<String> =
        sqlx::query_scalar("SELECT kind FROM events ORDER BY kind").fetch_all(&pool).await.unwrap();
    assert_eq!(events, ["work_order_created", "work_order_succeeded", "work_order_succeeded", "work_order_succeeded"]);
}
