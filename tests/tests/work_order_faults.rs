//! Faults during delivery (DESIGN §7): a data-plane node killed with
//! SIGKILL mid-delivery, a control-plane restart mid-flow, a webhook that
//! times out or answers slowly, a task that panics (supervision, issue 14
//! item 1). After each: every message has exactly one work order, per-key
//! order held, one work order of a key in flight at a time, nothing left
//! behind.

mod work_order_checks;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use kt_common::tasks::Failpoints;
use kt_proto::v1::message_set_service_client::MessageSetServiceClient;
use kt_proto::v1::*;
use kt_tests::webhook::Reply;
use kt_tests::{wait_for, workspace_binary, ControlPlaneOptions, TestControlPlane, TestNode};
use work_order_checks::*;

fn reply(status: u16, delay_ms: u64) -> Reply {
    Reply { status, retry_after: None, delay: Some(Duration::from_millis(delay_ms)) }
}

fn keys(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Messages stored so far (pending or already delivered and deleted).
async fn stored(s: &Stack) -> usize {
    count(
        &s.pool,
        "SELECT count(*) FROM (SELECT partition, \"offset\" FROM messages
                               UNION SELECT partition, \"offset\" FROM work_orders) m",
    )
    .await as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_node_killed_mid_delivery_leaves_no_duplicate_work_order() {
    let started = Instant::now();
    let s = Stack::start("killed", 2).await;
    // Slow answers, so that deliveries are in flight when the node dies.
    const DELAY_MS: u64 = 400;
    let probe = Probe::install(&s.receiver, |_, _, _| reply(200, DELAY_MS));
    let target = Target::new(1_000, retry(5, 20, 100));
    let trigger = s.create_trigger("killed", &target).await;

    let binary = workspace_binary("data-plane").unwrap();
    let child = tokio::process::Command::new(binary)
        .env("DATABASE_URL", &s.db.url)
        .env("KT_CONTROL_PLANE_URL", s.cp().url())
        .env("KT_NODE_ID", "node-doomed")
        .env("KT_NODE_TOKEN", kt_tests::TEST_NODE_TOKEN)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let mut messages = interleaved(&keys("k", 10), 6, 0, 0);
    messages.extend(messages_for(None, 1_000, 10));
    let produced = ids(&s.produce("killed", messages).await);
    assert_eq!(produced.len(), 70);

    // Everything stored by the doomed node, so the replacement need not wait
    // for the consumer group to notice the dead member.
    let watched = std::cell::RefCell::new(child);
    wait_for("all messages stored", WAIT, || async {
        if let Ok(Some(status)) = watched.borrow_mut().try_wait() {
            panic!("the data-plane child exited early: {status}");
        }
        (stored(&s).await == produced.len()).then_some(())
    })
    .await
    .unwrap();
    let mut child = watched.into_inner();

    // SIGKILL right after a POST reached the target, once a good part of the
    // work is done: that delivery is in flight for another DELAY_MS.
    let mut posts = probe.subscribe();
    let killed_at = tokio::time::timeout(WAIT, async {
        loop {
            posts.changed().await.unwrap();
            if s.receiver.successes().len() >= 20 {
                child.start_kill().unwrap();
                return Instant::now();
            }
        }
    })
    .await
    .expect("20 deliveries before the kill");
    child.wait().await.unwrap();
    let in_flight: Vec<Seen> = probe.seen().into_iter().filter(|p| p.answered_at() > killed_at).collect();
    assert!(!in_flight.is_empty(), "a delivery was in flight when the node was killed");
    let done_before_kill = count(&s.pool, "SELECT count(*) FROM work_orders WHERE state = 'success'").await as usize;

    // A replacement node; the dead node's claims expire (within the claim
    // lease, no longer renewed) and the janitor releases them.
    let _node = TestNode::start(&s.db, &s.cp().url(), |_| {}).await;
    wait_succeeded(&s.pool, trigger, produced.len()).await;
    let recovered = killed_at.elapsed();

    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), true).await;
    // The work order in flight at the kill was delivered again: same work
    // order, POSTed twice, stored once.
    let wos = work_orders(&s.pool, trigger).await;
    let deliveries = s.receiver.deliveries();
    for p in &in_flight {
        let again = probe.seen().iter().filter(|q| q.message == p.message && q.at > killed_at).count();
        assert!(again >= 1, "{:?} in flight at the kill was not delivered again", p.message);
        let wo = &wos[&p.message];
        assert_eq!(wo.state, "success");
        let ids: HashSet<&str> = deliveries
            .iter()
            .filter(|d| (d.partition(), d.offset()) == p.message)
            .map(|d| d.work_order_id.as_str())
            .collect();
        assert_eq!(ids, HashSet::from([wo.id.to_string().as_str()]));
    }
    eprintln!(
        "killed after {done_before_kill} work orders with {} in flight; recovered in {recovered:?}; test took {:?}",
        in_flight.len(),
        started.elapsed()
    );
}

/// The scheduler is fatal to its control plane: a panic in it ends the
/// control plane with an error that names it (the binary exits non-zero on
/// it), instead of leaving one that answers the API and grants nothing. The
/// replacement (an orchestrator's restart) starts with fresh state and
/// delivers everything.
#[tokio::test]
async fn test_a_panicking_scheduler_stops_its_control_plane_with_the_error() {
    let points = Failpoints::armable();
    let cp = ControlPlaneOptions { failpoints: Some(points.clone()), ..Default::default() };
    let mut s = Stack::start_with("sched-panic", 2, cp).await;
    let probe = Probe::install(&s.receiver, |_, _, _| reply(200, 5));
    let target = Target::new(2_000, retry(5, 20, 100));
    let trigger = s.create_trigger("sched-panic", &target).await;
    points.arm("scheduler");
    // The node's work stream joining is the scheduler's next command.
    let node = TestNode::start(&s.db, &s.cp().url(), |c| c.workers = 4).await;

    let mut cp = s.cp.take().unwrap();
    let ended = tokio::time::timeout(WAIT, &mut cp.task).await.expect("the control plane stops").unwrap();
    let error = format!("{:#}", ended.expect_err("it stops with an error"));
    assert!(error.contains("task `scheduler` panicked: failpoint `scheduler` fired"), "{error}");

    // The failed term closes its listener as it stops; the replacement
    // takes the port once it is free.
    let restarted = wait_for("the port of the failed control plane", WAIT, || async {
        TestControlPlane::start(&s.db, ControlPlaneOptions { listen: Some(cp.addr), ..Default::default() }).await.ok()
    })
    .await
    .unwrap();
    s.cp = Some(restarted);
    let produced = ids(&s.produce("sched-panic", interleaved(&keys("k", 4), 5, 5, 0)).await);
    wait_succeeded(&s.pool, trigger, produced.len()).await;
    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), false).await;
    drop(node);
}

/// A node's worker loop restarts after a panic: the sets it was granted are
/// released when its stream ends and granted again, and every message is
/// delivered once, in order; without supervision the node would keep its
/// pipelines running and deliver nothing more.
#[tokio::test]
async fn test_a_panicking_worker_loop_is_restarted_and_delivers_everything() {
    let s = Stack::start("worker-panic", 2).await;
    let probe = Probe::install(&s.receiver, |_, _, _| reply(200, 5));
    let target = Target::new(2_000, retry(5, 20, 100));
    let trigger = s.create_trigger("worker-panic", &target).await;
    let points = Failpoints::armable();
    points.arm("workers");
    let node = TestNode::start(&s.db, &s.cp().url(), |c| {
        c.workers = 4;
        c.failpoints = points.clone();
    })
    .await;
    let produced = ids(&s.produce("worker-panic", interleaved(&keys("k", 4), 5, 5, 0)).await);
    wait_succeeded(&s.pool, trigger, produced.len()).await;
    assert!(!points.is_armed("workers"), "the worker loop panicked on its first grant");
    assert!(!node.task.is_finished(), "the node runs on");
    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), false).await;
    assert_eq!(s.receiver.deliveries().len(), produced.len(), "no message POSTed twice");
}

#[tokio::test]
async fn test_control_plane_restart_mid_flow_resumes_without_loss() {
    let mut s = Stack::start("restart", 3).await;
    let probe = Probe::install(&s.receiver, |_, _, _| reply(200, 15));
    let target = Target::new(2_000, retry(5, 20, 100));
    let trigger = s.create_trigger("restart", &target).await;
    let nodes = [
        TestNode::start(&s.db, &s.cp().url(), |c| c.workers = 4).await,
        TestNode::start(&s.db, &s.cp().url(), |c| c.workers = 4).await,
    ];
    let keys = keys("k", 10);
    let mut produced = ids(&s.produce("restart", interleaved(&keys, 12, 20, 0)).await);
    let first = produced.len();

    wait_for("a third delivered", WAIT, || async { (s.receiver.successes().len() >= first / 3).then_some(()) })
        .await
        .unwrap();
    let cp = s.cp.take().unwrap();
    let addr = cp.addr;
    cp.stop().await.unwrap();
    let stopped_at = Instant::now();
    // Ingest goes on without the control plane; the new one finds these
    // sets at start, not from a notification.
    produced.extend(ids(&s.produce("restart", interleaved(&keys, 4, 10, 100)).await));
    wait_for("ingest while the control plane is down", WAIT, || async {
        (stored(&s).await == produced.len()).then_some(())
    })
    .await
    .unwrap();
    let delivered_while_down = s.receiver.successes().len();

    s.cp = Some(
        TestControlPlane::start(&s.db, ControlPlaneOptions { listen: Some(addr), ..Default::default() }).await.unwrap(),
    );
    produced.extend(ids(&s.produce("restart", interleaved(&keys, 2, 5, 200)).await));
    wait_succeeded(&s.pool, trigger, produced.len()).await;
    eprintln!(
        "{} messages; {delivered_while_down} delivered before the restart; done {:?} after the stop",
        produced.len(),
        stopped_at.elapsed()
    );
    assert_all_invariants(&s, &probe, trigger, &produced, target.timeout(), false).await;
    assert_eq!(s.receiver.deliveries().len(), produced.len(), "no message POSTed twice");
    drop(nodes);
}

#[tokio::test]
async fn test_webhook_timeouts_and_slow_answers_are_retried_then_blocked() {
    let s = Stack::start("slow", 2).await;
    const TIMEOUT_MS: u32 = 300;
    const TOO_SLOW_MS: u64 = 700;
    // "late": its first message is answered too late twice, then at once;
    // "dead": never answers in time; "slow": answers slowly but in time.
    let probe = Probe::install(&s.receiver, move |key, _, attempt| match key {
        Some("late") if attempt <= 2 => reply(503, TOO_SLOW_MS),
        Some("dead") => reply(200, TOO_SLOW_MS),
        Some("slow") => reply(200, u64::from(TIMEOUT_MS) / 3),
        _ => reply(200, 0),
    });
    let target = Target::new(TIMEOUT_MS, retry(3, 20, 100));
    let trigger = s.create_trigger("slow", &target).await;
    let _node = TestNode::start(&s.db, &s.cp().url(), |_| {}).await;

    let mut all_keys = keys("ok", 4);
    all_keys.extend(["late", "dead", "slow"].map(String::from));
    let sent = s.produce("slow", interleaved(&all_keys, 5, 5, 0)).await;

    // Everything but "dead" goes through; "dead" blocks on its first message.
    let sets = MessageSetServiceClient::new(s.cp().channel().await.unwrap());
    let blocked = wait_for("dead blocked", WAIT, || {
        let mut sets = sets.clone();
        async move {
            let list = sets
                .list_message_sets(ListMessageSetsRequest {
                    trigger_id: trigger.to_string(),
                    state: MessageSetState::Blocked.into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            list.message_sets.into_iter().next()
        }
    })
    .await
    .unwrap();
    assert_eq!(blocked.key.as_deref(), Some(&b"dead"[..]));
    assert_eq!(blocked.attempts, 3);
    assert!(blocked.last_error.contains("timed out"), "{}", blocked.last_error);
    assert_eq!(blocked.stored_messages, 5);

    let dead: Vec<MessageId> = sent.iter().filter(|m| m.key.as_deref() == Some("dead")).map(|m| m.message).collect();
    assert_eq!((blocked.head_partition, blocked.head_offset), dead[0], "the first message of dead is the head");
    let rest: Vec<MessageId> = sent.iter().filter(|m| m.key.as_deref() != Some("dead")).map(|m| m.message).collect();
    wait_succeeded(&s.pool, trigger, rest.len()).await;

    let wos = work_orders(&s.pool, trigger).await;
    assert_eq!(wos.len(), rest.len() + 1, "one work order per delivered message, plus dead's head");
    for m in &rest {
        assert_eq!(wos[m].state, "success", "{m:?}");
    }
    let head = &wos[&dead[0]];
    assert_eq!((head.state.as_str(), head.attempts), ("failed", 3));
    let error = head.last_error.as_deref().unwrap_or_default();
    assert!(error.contains("timed out") && error.contains("300 ms"), "{error}");
    for m in &dead[1..] {
        assert!(!wos.contains_key(m), "dead's later message {m:?} untouched while the set is blocked");
    }
    let dead_posts: Vec<Seen> = probe.seen().into_iter().filter(|p| p.key.as_deref() == Some("dead")).collect();
    assert_eq!(dead_posts.len(), 3, "max_attempts POSTs, then blocked");
    assert!(dead_posts.iter().all(|p| p.message == dead[0]));

    // "late" took three attempts on its first message: two timeouts, then success.
    let late_first = sent.iter().find(|m| m.key.as_deref() == Some("late")).unwrap().message;
    assert_eq!(wos[&late_first].attempts, 3);
    let log: String = sqlx::query_scalar("SELECT attempt_log::text FROM work_orders WHERE id = $1")
        .bind(wos[&late_first].id)
        .fetch_one(&s.pool)
        .await
        .unwrap();
    let log: serde_json::Value = serde_json::from_str(&log).unwrap();
    let outcomes: Vec<(&str, &str)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|a| (a["outcome"].as_str().unwrap(), a["error"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(outcomes.len(), 3, "{log}");
    assert!(outcomes[..2].iter().all(|(o, e)| *o == "failure" && e.contains("timed out")), "{log}");
    assert_eq!(outcomes[2], ("success", ""));
    // Slow answers within the timeout succeed at the first attempt.
    for w in wos.values().filter(|w| w.key.as_deref() == Some(b"slow")) {
        assert_eq!(w.attempts, 1, "slow but in time: {:?}", (w.partition, w.offset));
    }

    assert_one_work_order_id_per_message(&s.receiver.deliveries(), &wos);
    assert_per_key_order(&probe, target.timeout(), false);
    assert_one_in_flight_per_key(&probe, target.timeout());
    assert_attempt_logs_sequential(&s.pool, trigger).await;
    // Only dead's messages are left, its set still blocked.
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
    assert_eq!(count(&s.pool, "SELECT count(*) FROM messages").await, 5);
    assert_eq!(count(&s.pool, "SELECT count(*) FROM message_sets WHERE state = 'blocked'").await, 1);
}
