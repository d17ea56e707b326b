//! Operator look-ups against a real control plane and Postgres: message
//! sets by key, work orders by key and by offset range, their validation,
//! and plans that walk an index (no full-table scan) on a large table.

use kt_proto::v1::message_set_service_client::MessageSetServiceClient;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::work_order_service_client::WorkOrderServiceClient;
use kt_proto::v1::*;
use kt_tests::{sample_trigger, ControlPlaneOptions, TestControlPlane, TestDb};
use tonic::Code;
use tonic_types::StatusExt as _;
use uuid::Uuid;

async fn setup() -> (TestDb, TestControlPlane, sqlx::PgPool, Uuid) {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut triggers = TriggerServiceClient::new(cp.channel().await.unwrap());
    let request = CreateTriggerRequest { trigger: Some(sample_trigger("lookups", "b:9092", "a")) };
    let id = triggers.create_trigger(request).await.unwrap().into_inner().id;
    let pool = db.pool().await.unwrap();
    (db, cp, pool, Uuid::parse_str(&id).unwrap())
}

fn violations(status: &tonic::Status) -> Vec<String> {
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    status.get_details_bad_request().unwrap().field_violations.iter().map(|v| v.field.clone()).collect()
}

#[tokio::test]
async fn test_message_sets_filtered_by_key() {
    let (_db, cp, pool, trigger) = setup().await;
    sqlx::query(
        "INSERT INTO message_sets (trigger_id, topic, key, partition, \"offset\", state, blocked_since)
         VALUES ($1, 'a', 'k1', NULL, NULL, 'ready', NULL), ($1, 'b', 'k1', NULL, NULL, 'blocked', now()),
                ($1, 'a', 'k2', NULL, NULL, 'ready', NULL), ($1, 'a', '', NULL, NULL, 'ready', NULL),
                ($1, 'a', '\\xff00', NULL, NULL, 'ready', NULL), ($1, 'a', NULL, 0, 7, 'ready', NULL)",
    )
    .bind(trigger)
    .execute(&pool)
    .await
    .unwrap();
    let client = MessageSetServiceClient::new(cp.channel().await.unwrap());
    let mut sets = client.clone();
    let list = |req: ListMessageSetsRequest| {
        let mut sets = client.clone();
        async move { sets.list_message_sets(req).await.map(|r| r.into_inner().message_sets) }
    };
    let topics = |sets: &[MessageSet]| sets.iter().map(|s| (s.topic.clone(), s.key.clone())).collect::<Vec<_>>();
    let k1 = || Some(b"k1".to_vec());

    let by_text = list(ListMessageSetsRequest { key_utf8: Some("k1".into()), ..Default::default() }).await.unwrap();
    assert_eq!(topics(&by_text), [("a".into(), k1()), ("b".into(), k1())], "one set per topic");
    let by_bytes = list(ListMessageSetsRequest { key: k1(), trigger_id: trigger.to_string(), ..Default::default() });
    assert_eq!(topics(&by_bytes.await.unwrap()), topics(&by_text));
    let blocked = ListMessageSetsRequest { key: k1(), state: MessageSetState::Blocked.into(), ..Default::default() };
    assert_eq!(topics(&list(blocked).await.unwrap()), [("b".into(), k1())]);
    let binary = list(ListMessageSetsRequest { key: Some(vec![0xff, 0]), ..Default::default() }).await.unwrap();
    assert_eq!(topics(&binary), [("a".into(), Some(vec![0xff, 0]))]);
    // The empty key is a key; an unkeyed set is never listed by a key.
    let empty = list(ListMessageSetsRequest { key: Some(vec![]), ..Default::default() }).await.unwrap();
    assert_eq!(topics(&empty), [("a".into(), Some(vec![]))]);
    assert!(list(ListMessageSetsRequest { key_utf8: Some("none".into()), ..Default::default() })
        .await
        .unwrap()
        .is_empty());
    let paged = ListMessageSetsRequest { key: k1(), page_size: 1, ..Default::default() };
    let first = sets.list_message_sets(paged.clone()).await.unwrap().into_inner();
    assert_eq!(topics(&first.message_sets), [("a".into(), k1())]);
    let next = ListMessageSetsRequest { page_token: first.next_page_token, ..paged };
    assert_eq!(topics(&sets.list_message_sets(next).await.unwrap().into_inner().message_sets), [("b".into(), k1())]);

    let both = ListMessageSetsRequest { key: k1(), key_utf8: Some("k1".into()), ..Default::default() };
    assert_eq!(violations(&list(both).await.unwrap_err()), ["key_utf8"]);
}

#[tokio::test]
async fn test_work_orders_filtered_by_key_and_offset_range() {
    let (_db, cp, pool, trigger) = setup().await;
    // Partition 0 offsets 0..10 keyed k<offset % 2>; partition 1 offsets
    // 0..3 keyed k0; one unkeyed in partition 2.
    sqlx::query(
        "INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", key, state, body)
         SELECT gen_random_uuid(), $1, 1, 'a', p, o, CASE WHEN p = 2 THEN NULL ELSE ('k' || o % 2)::bytea END,
                CASE WHEN o = 3 THEN 'failed' ELSE 'success' END, '{}'
           FROM (SELECT 0 AS p, generate_series(0, 9) AS o
                 UNION ALL SELECT 1, generate_series(0, 2) UNION ALL SELECT 2, 0) m",
    )
    .bind(trigger)
    .execute(&pool)
    .await
    .unwrap();
    let work_orders = WorkOrderServiceClient::new(cp.channel().await.unwrap());
    let list = |req: ListWorkOrdersRequest| {
        let mut client = work_orders.clone();
        async move { client.list_work_orders(req).await.map(|r| r.into_inner()) }
    };
    let offsets = |r: &ListWorkOrdersResponse| {
        let mut o: Vec<(i32, i64)> = r.work_orders.iter().map(|w| (w.partition, w.offset)).collect();
        o.sort();
        o
    };
    let range = |from: Option<i64>, to: Option<i64>| ListWorkOrdersRequest {
        topic: "a".into(),
        partition: Some(0),
        offset_from: from,
        offset_to: to,
        ..Default::default()
    };

    let k0 = list(ListWorkOrdersRequest { key_utf8: Some("k0".into()), ..Default::default() }).await.unwrap();
    assert_eq!(offsets(&k0), [(0, 0), (0, 2), (0, 4), (0, 6), (0, 8), (1, 0), (1, 2)]);
    let failed_k1 = ListWorkOrdersRequest {
        key: Some(b"k1".to_vec()),
        state: WorkOrderState::Failed.into(),
        trigger_id: trigger.to_string(),
        ..Default::default()
    };
    assert_eq!(offsets(&list(failed_k1).await.unwrap()), [(0, 3)]);

    // From inclusive, to exclusive.
    assert_eq!(offsets(&list(range(Some(2), Some(5))).await.unwrap()), [(0, 2), (0, 3), (0, 4)]);
    assert_eq!(offsets(&list(range(Some(8), None)).await.unwrap()), [(0, 8), (0, 9)]);
    assert_eq!(offsets(&list(range(None, Some(2))).await.unwrap()), [(0, 0), (0, 1)]);
    assert!(list(range(Some(4), Some(4))).await.unwrap().work_orders.is_empty(), "from = to is empty");
    let keyed = ListWorkOrdersRequest { key_utf8: Some("k1".into()), ..range(Some(2), Some(6)) };
    assert_eq!(offsets(&list(keyed).await.unwrap()), [(0, 3), (0, 5)]);
    // Pages of a range: every work order once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = list(ListWorkOrdersRequest { page_size: 3, page_token: token, ..range(Some(1), Some(9)) });
        let page = page.await.unwrap();
        seen.extend(offsets(&page));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    seen.sort();
    assert_eq!(seen, (1..9).map(|o| (0, o)).collect::<Vec<_>>());

    let no_partition = ListWorkOrdersRequest { topic: "a".into(), offset_from: Some(1), ..Default::default() };
    assert_eq!(violations(&list(no_partition).await.unwrap_err()), ["partition"]);
    let no_topic = ListWorkOrdersRequest { partition: Some(0), ..Default::default() };
    assert_eq!(violations(&list(no_topic).await.unwrap_err()), ["topic"]);
    assert_eq!(violations(&list(range(Some(5), Some(4))).await.unwrap_err()), ["offset_from"]);
    let everything_wrong = ListWorkOrdersRequest {
        key: Some(vec![1]),
        key_utf8: Some("x".into()),
        partition: Some(-1),
        offset_to: Some(-2),
        ..Default::default()
    };
    assert_eq!(violations(&list(everything_wrong).await.unwrap_err()), ["key_utf8", "topic", "partition", "offset_to"]);
}

/// The plan of `sql` with its generic plan (what a prepared statement may
/// settle on), as text.
async fn generic_plan(pool: &sqlx::PgPool, sql: &str, types: &str, args: &str) -> String {
    let mut conn = pool.acquire().await.unwrap();
    sqlx::query("SET plan_cache_mode = force_generic_plan").execute(&mut *conn).await.unwrap();
    sqlx::raw_sql(&format!("PREPARE q({types}) AS {sql}")).execute(&mut *conn).await.unwrap();
    let rows: Vec<String> =
        sqlx::query_scalar(&format!("EXPLAIN EXECUTE q({args})")).fetch_all(&mut *conn).await.unwrap();
    sqlx::raw_sql("DEALLOCATE q").execute(&mut *conn).await.unwrap();
    rows.join("\n")
}

#[tokio::test]
async fn test_lookups_walk_an_index_on_large_tables() {
    let (_db, _cp, pool, trigger) = setup().await;
    // 50 000 rows each; the details of a page (head message, stored count)
    // read `messages`.
    let fills = [
        "INSERT INTO message_sets (trigger_id, topic, key, state)
         SELECT $1, 'a', ('key-' || i)::bytea, CASE WHEN i % 10 = 0 THEN 'blocked' ELSE 'idle' END
           FROM generate_series(1, 50000) i",
        "INSERT INTO work_orders (id, trigger_id, set_id, topic, partition, \"offset\", key, state, body)
         SELECT gen_random_uuid(), $1, 1, 'a', i % 4, i, ('key-' || i % 5000)::bytea, 'success', '{}'
           FROM generate_series(1, 50000) i",
        "INSERT INTO messages (trigger_id, topic, partition, \"offset\", key)
         SELECT $1, 'a', i % 4, i, ('key-' || i % 5000)::bytea FROM generate_series(1, 50000) i",
    ];
    for fill in fills {
        sqlx::query(fill).bind(trigger).execute(&pool).await.unwrap();
    }
    sqlx::raw_sql("ANALYZE message_sets; ANALYZE work_orders; ANALYZE messages").execute(&pool).await.unwrap();

    let t = format!("'{trigger}'");
    let nil = "'00000000-0000-0000-0000-000000000000'";
    let cases = [
        (
            "message_sets_key_idx",
            kt_control_plane::sets::store::by_key_query(),
            "bytea, uuid, text[], bigint, boolean, boolean, bigint",
            "'key-7', NULL, '{ready,waiting,blocked}', 0, true, false, 101".to_owned(),
        ),
        (
            "work_orders_key_idx",
            kt_control_plane::work_orders::store::by_key_query(),
            "bytea, uuid, text[], uuid, bigint",
            format!("'key-7', {t}, '{{success}}', {nil}, 101"),
        ),
        (
            "work_orders_message_key",
            kt_control_plane::work_orders::store::in_range_query(),
            "uuid, text, integer, bigint, bigint, bytea, text[], uuid, bigint",
            format!("NULL, 'a', 1, 100, NULL, NULL, '{{success,failed}}', {nil}, 101"),
        ),
    ];
    for (index, sql, types, args) in cases {
        let plan = generic_plan(&pool, &sql, types, &args).await;
        for table in ["message_sets", "work_orders", "messages"] {
            assert!(!plan.contains(&format!("Seq Scan on {table}")), "scans {table}:\n{plan}");
        }
        assert!(
            plan.contains(&format!("Index Scan using {index} on")) || plan.contains(&format!("Index Scan on {index}")),
            "not through {index}:\n{plan}"
        );
    }
}
