//! EventService.StreamEvents: live tail, replay from a cursor without gaps,
//! filters, commit-order safety, and cutting off a client that cannot keep up.

use std::time::Duration;

use kt_proto::v1::event_service_client::EventServiceClient;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::*;
use kt_tests::{sample_trigger, ControlPlaneOptions, TestControlPlane, TestDb};
use tonic::{Code, Streaming};

const WAIT: Duration = Duration::from_secs(10);

async fn next(stream: &mut Streaming<Event>) -> Event {
    tokio::time::timeout(WAIT, stream.message()).await.expect("an event in time").unwrap().unwrap()
}

fn kind(e: &Event) -> EventKind {
    EventKind::try_from(e.kind).unwrap()
}

#[tokio::test]
async fn test_live_replay_and_filters() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut events = EventServiceClient::new(cp.channel().await.unwrap());

    let mut live = events.stream_events(StreamEventsRequest::default()).await.unwrap().into_inner();
    let a = triggers
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("a", "b:1", "t")) })
        .await
        .unwrap()
        .into_inner();
    let first = next(&mut live).await;
    assert_eq!(kind(&first), EventKind::TriggerCreated);
    assert_eq!(first.trigger_id, a.id);
    assert!(first.details.contains("\"name\": \"a\"") || first.details.contains("\"name\":\"a\""), "{}", first.details);

    let b = triggers
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("b", "b:1", "t")) })
        .await
        .unwrap()
        .into_inner();
    triggers.disable_trigger(DisableTriggerRequest { id: a.id.clone() }).await.unwrap();
    triggers.delete_trigger(DeleteTriggerRequest { id: b.id.clone() }).await.unwrap();
    let mut seen = vec![first.clone()];
    for _ in 0..3 {
        seen.push(next(&mut live).await);
    }
    let kinds: Vec<_> = seen.iter().map(kind).collect();
    assert_eq!(
        kinds,
        [EventKind::TriggerCreated, EventKind::TriggerCreated, EventKind::TriggerDisabled, EventKind::TriggerDeleted]
    );

    // Resume after the first event: the same three follow, in order, then live.
    let mut resumed = events
        .stream_events(StreamEventsRequest { after_cursor: first.cursor.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    for expected in &seen[1..] {
        assert_eq!(next(&mut resumed).await.cursor, expected.cursor);
    }
    triggers.enable_trigger(EnableTriggerRequest { id: a.id.clone() }).await.unwrap();
    let enabled = next(&mut resumed).await;
    assert_eq!(kind(&enabled), EventKind::TriggerEnabled);
    assert_eq!(next(&mut live).await.cursor, enabled.cursor);

    // Filters: only trigger b, only deletions.
    let mut filtered = events
        .stream_events(StreamEventsRequest {
            trigger_ids: vec![b.id.clone()],
            kinds: vec![EventKind::TriggerDeleted.into()],
            after_cursor: first.cursor.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let only = next(&mut filtered).await;
    assert_eq!((kind(&only), only.trigger_id.as_str()), (EventKind::TriggerDeleted, b.id.as_str()));
    assert!(
        tokio::time::timeout(Duration::from_millis(500), filtered.message()).await.is_err(),
        "nothing else matches"
    );
}

#[tokio::test]
async fn test_an_event_committed_late_is_not_skipped() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let pool = db.pool().await.unwrap();
    let mut events = EventServiceClient::new(cp.channel().await.unwrap());
    let mut live = events.stream_events(StreamEventsRequest::default()).await.unwrap().into_inner();

    // Transaction A takes a lower event id but commits after B.
    let mut a = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO events (kind, details) VALUES ('trigger_updated', '{\"tx\": \"a\"}')")
        .execute(&mut *a)
        .await
        .unwrap();
    sqlx::query("INSERT INTO events (kind, details) VALUES ('trigger_updated', '{\"tx\": \"b\"}')")
        .execute(&pool)
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(700), live.message()).await.is_err(),
        "B must wait until A, which may precede it, has finished"
    );
    a.commit().await.unwrap();
    let first = next(&mut live).await;
    let second = next(&mut live).await;
    assert!(first.details.contains("\"a\""), "{}", first.details);
    assert!(second.details.contains("\"b\""), "{}", second.details);

    // A replay from before both sees both, in the same order.
    let mut replay = events
        .stream_events(StreamEventsRequest { after_cursor: "0-0".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(next(&mut replay).await.cursor, first.cursor);
    assert_eq!(next(&mut replay).await.cursor, second.cursor);
}

#[tokio::test]
async fn test_bad_requests_and_slow_clients() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let pool = db.pool().await.unwrap();
    let mut events = EventServiceClient::new(cp.channel().await.unwrap());

    let status = events
        .stream_events(StreamEventsRequest {
            trigger_ids: vec!["nope".into()],
            kinds: vec![999],
            after_cursor: "x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    for field in ["trigger_ids[0]", "kinds[0]", "after_cursor"] {
        assert!(status.message().contains(field), "{}", status.message());
    }
    // Pins issue #10 item 8: a cursor no event can have was accepted, and
    // the stream then stayed silent.
    let status = events
        .stream_events(StreamEventsRequest { after_cursor: format!("{}-0", i64::MAX), ..Default::default() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("after_cursor") && status.message().contains("ahead"), "{}", status.message());

    // A client that does not read while far more events than the buffer
    // arrive is cut off with a status that says how to resume.
    let mut slow = events.stream_events(StreamEventsRequest::default()).await.unwrap().into_inner();
    sqlx::query("INSERT INTO events (kind) SELECT 'trigger_updated' FROM generate_series(1, 40000)")
        .execute(&pool)
        .await
        .unwrap();
    let mut received = 0;
    let status = loop {
        match tokio::time::timeout(Duration::from_secs(30), slow.message()).await.expect("stream ends in time") {
            Ok(Some(_)) => {
                received += 1;
                // Read slowly at first, so the server's buffer overflows.
                if received == 1 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            Ok(None) => panic!("stream ended without an error after {received} events"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("after_cursor"), "{}", status.message());
    assert!(received < 40_000);
}

#[tokio::test]
async fn test_data_path_events_reach_the_stream() {
    use kt_kafka_testing::mock::MockKafka;
    use kt_kafka_testing::produce::{produce_to, TestMessage};
    use kt_tests::webhook::WebhookReceiver;
    use rand::RngCore as _;

    let db = TestDb::create().await.unwrap();
    let kafka = MockKafka::new(1).unwrap();
    kafka.create_topic("ev", 1).unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let receiver = WebhookReceiver::start("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // The first attempt fails, so the work order is recorded before it
    // succeeds (work_order_created); a first-attempt success records only
    // work_order_succeeded.
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    receiver.script(move |_| {
        let n = attempts.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        kt_tests::webhook::Reply::status(if n == 0 { 500 } else { 200 })
    });
    let _node = kt_tests::TestNode::start(&db, &cp.url(), |_| {}).await;
    let mut events = EventServiceClient::new(cp.channel().await.unwrap());
    let wanted = [
        EventKind::TriggerUpdated,
        EventKind::WorkOrderCreated,
        EventKind::WorkOrderSucceeded,
        EventKind::PersistenceFailed,
    ];
    let mut stream = events
        .stream_events(StreamEventsRequest { kinds: wanted.iter().map(|k| *k as i32).collect(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();

    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let mut t = sample_trigger("ev", &kafka.bootstrap_servers(), "ev");
    t.webhook.as_mut().unwrap().url = receiver.url();
    let created = triggers.create_trigger(CreateTriggerRequest { trigger: Some(t) }).await.unwrap().into_inner();
    let mut renamed = created.clone();
    renamed.name = "ev-renamed".into();
    triggers.update_trigger(UpdateTriggerRequest { trigger: Some(renamed), update_mask: None }).await.unwrap();

    // A key too large for the set index cannot be stored: recorded as a
    // persistence failure, while the ordinary message flows.
    let mut huge_key = vec![0u8; 8 * 1024];
    rand::thread_rng().fill_bytes(&mut huge_key);
    let messages = [TestMessage::new(r#"{"ok":true}"#).key("fine"), TestMessage::new("{}").key(huge_key)];
    produce_to(&kafka.bootstrap_servers(), "ev", messages).await.unwrap();

    let mut seen = std::collections::HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.len() < wanted.len() {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let e = tokio::time::timeout(left, stream.message()).await.expect("every kind in time").unwrap().unwrap();
        assert_eq!(e.trigger_id, created.id);
        seen.insert(kind(&e));
        if kind(&e) == EventKind::PersistenceFailed {
            assert!(e.details.contains("\"offset\""), "{}", e.details);
        }
    }
}

/// A control plane that stops serving (shutdown, or a replica stepping
/// down) ends its open event streams with UNAVAILABLE and the cursor to
/// resume from, instead of keeping them, and with them its drain, open.
/// Regression test: before, `stop` waited for as long as a client followed.
#[tokio::test]
async fn test_open_event_streams_end_when_the_control_plane_stops() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut events = EventServiceClient::new(cp.channel().await.unwrap());
    let mut live = events.stream_events(StreamEventsRequest::default()).await.unwrap().into_inner();
    TriggerServiceClient::new(cp.channel().await.unwrap())
        .create_trigger(CreateTriggerRequest { trigger: Some(sample_trigger("a", "b:1", "t")) })
        .await
        .unwrap();
    let seen = next(&mut live).await;
    tokio::time::timeout(WAIT, cp.stop()).await.expect("the control plane stopped in time").unwrap();
    let end = tokio::time::timeout(WAIT, live.message()).await.expect("the stream ended in time");
    let status = end.expect_err("the stream ends with a status");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&seen.cursor), "{status:?}");
}
