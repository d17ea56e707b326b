//! `grpc.health.v1.Health` against a real control plane: every public
//! service and the server as a whole answer SERVING while it serves, with a
//! health client and with grpcurl, and turn NOT_SERVING when it stops.

use std::time::Duration;

use kt_tests::readme::grpcurl;
use kt_tests::{ControlPlaneOptions, TestControlPlane, TestDb};
use tokio_stream::StreamExt as _;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Every public service, and the whole server.
const NAMES: [&str; 6] = [
    "",
    "kafka_triggers.v1.TriggerService",
    "kafka_triggers.v1.MessageSetService",
    "kafka_triggers.v1.WorkOrderService",
    "kafka_triggers.v1.EventService",
    "kafka_triggers.v1.DeadLetterService",
];

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest { service: service.into() }
}

async fn grpcurl_out(args: &[&str]) -> String {
    let out = tokio::process::Command::new(grpcurl().unwrap()).args(args).output().await.unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "grpcurl {args:?}: {text}");
    text
}

#[tokio::test]
async fn test_health_reports_every_public_service_serving() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let mut health = HealthClient::new(cp.channel().await.unwrap());
    for name in NAMES {
        let status = health.check(check(name)).await.unwrap_or_else(|e| panic!("{name:?}: {e}")).into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{name:?}");
    }
    let unknown = health.check(check("kafka_triggers.v1.NoSuchService")).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // What reflection lists is what health reports: a public service added
    // later cannot be forgotten here.
    let addr = cp.addr.to_string();
    let listed = grpcurl_out(&["-plaintext", &addr, "list"]).await;
    let public: Vec<&str> = listed.lines().map(str::trim).filter(|l| l.starts_with("kafka_triggers.v1.")).collect();
    assert_eq!(public.len(), NAMES.len() - 1, "{listed}");
    for name in public {
        assert!(NAMES.contains(&name), "{name} is public but not in the test's list");
        let body = format!("{{\"service\": \"{name}\"}}");
        let out = grpcurl_out(&["-plaintext", "-d", &body, &addr, "grpc.health.v1.Health/Check"]).await;
        assert!(out.contains("\"status\": \"SERVING\""), "{name}: {out}");
    }
}

#[tokio::test]
async fn test_health_turns_not_serving_when_the_control_plane_stops_serving() {
    let db = TestDb::create().await.unwrap();
    let cp = TestControlPlane::start(&db, ControlPlaneOptions::default()).await.unwrap();
    let channel = cp.channel().await.unwrap();
    let mut watches = Vec::new();
    for name in NAMES {
        let mut stream = HealthClient::new(channel.clone()).watch(check(name)).await.unwrap().into_inner();
        let first = stream.next().await.unwrap().unwrap();
        assert_eq!(first.status, ServingStatus::Serving as i32, "{name:?}");
        watches.push((name, stream));
    }

    // The end of a term (a step-down cancels the same token as a shutdown).
    cp.shutdown.cancel();
    for (name, mut stream) in watches {
        // A watch may repeat the status it already sent.
        let next = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let status = stream.next().await.unwrap().unwrap().status;
                if status != ServingStatus::Serving as i32 {
                    return status;
                }
            }
        });
        assert_eq!(next.await.expect("an update in time"), ServingStatus::NotServing as i32, "{name:?}");
        // Then the watch ends, so it does not hold the drain open.
        let end = tokio::time::timeout(Duration::from_secs(10), stream.next()).await.expect("the watch ends");
        assert!(end.as_ref().is_none_or(|item| item.is_err()), "{name:?}: {end:?}");
    }
    let stopped = tokio::time::timeout(Duration::from_secs(10), cp.stop()).await.expect("the server drains");
    stopped.unwrap();
}
