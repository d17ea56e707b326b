//! Webhook delivery against a real HTTP server on 127.0.0.1: a scriptable
//! hyper server that records every request it receives and answers each one
//! as the test says.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{HeaderMap, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use kt_common::secret::Secret;
use kt_common::trigger::{TriggerSecrets, WebhookFormat, WebhookHeader, WebhookTarget};
use kt_common::webhook_policy::WebhookPolicy;
use kt_data_plane::delivery::target_policy::REFUSED;
use kt_data_plane::delivery::{build_body, cloud_event, DeliveryOutcome, MessageForBody, Payload, WebhookClient};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long a test waits for the server to report a request before failing.
const RECEIVE_TIMEOUT: Duration = Duration::from_secs(5);
const RECORDED_CAPACITY: usize = 16;

/// What the server saw.
#[derive(Debug)]
struct Received {
    method: Method,
    path: String,
    headers: HeaderMap,
    body: Bytes,
}

/// What the server answers.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
    /// Held before answering, to play a slow target.
    delay: Option<Duration>,
}

impl Reply {
    fn status(status: u16) -> Self {
        Self { status, headers: Vec::new(), body: String::new(), delay: None }
    }

    fn body(mut self, body: impl Into<String>) -> Self {
        self.body = body.into();
        self
    }

    fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }
}

type Script = Arc<dyn Fn(usize) -> Reply + Send + Sync>;

struct TestServer {
    addr: SocketAddr,
    received: mpsc::Receiver<Received>,
}

impl TestServer {
    /// Serves until the test's runtime shuts down; `script` gets the 0-based
    /// index of each request.
    async fn start(script: impl Fn(usize) -> Reply + Send + Sync + 'static) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind test server");
        let addr = listener.local_addr().unwrap();
        let (tx, received) = mpsc::channel(RECORDED_CAPACITY);
        let script: Script = Arc::new(script);
        let counter = Arc::new(AtomicUsize::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (tx, script, counter) = (tx.clone(), script.clone(), counter.clone());
                let service = service_fn(move |req: Request<Incoming>| {
                    let (tx, script, counter) = (tx.clone(), script.clone(), counter.clone());
                    async move {
                        let index = counter.fetch_add(1, Ordering::SeqCst);
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                        let _ = tx
                            .send(Received {
                                method: parts.method,
                                path: parts.uri.path().to_owned(),
                                headers: parts.headers,
                                body,
                            })
                            .await;
                        let reply = script(index);
                        if let Some(delay) = reply.delay {
                            tokio::time::sleep(delay).await;
                        }
                        let mut response = Response::new(Full::new(Bytes::from(reply.body)));
                        *response.status_mut() = StatusCode::from_u16(reply.status).unwrap();
                        for (name, value) in reply.headers {
                            response.headers_mut().insert(name, value.parse().unwrap());
                        }
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { addr, received }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/orders", self.addr)
    }

    async fn next_request(&mut self) -> Received {
        tokio::time::timeout(RECEIVE_TIMEOUT, self.received.recv())
            .await
            .expect("server received no request in time")
            .expect("server stopped")
    }
}

fn target(url: String, timeout_ms: u32) -> WebhookTarget {
    WebhookTarget {
        url,
        headers: vec![
            WebhookHeader { name: "X-Source".into(), value: "kafka-triggers-test".into(), secret: false },
            WebhookHeader { name: "Authorization".into(), value: String::new(), secret: true },
        ],
        timeout_ms,
        format: WebhookFormat::Json,
    }
}

const TOKEN: &str = "Bearer tok-9f8e7d6c5b4a";

fn secrets() -> TriggerSecrets {
    TriggerSecrets {
        headers: [("Authorization".to_owned(), Secret::new(TOKEN))].into_iter().collect(),
        ..TriggerSecrets::default()
    }
}

fn sample_body() -> String {
    build_body(&MessageForBody {
        topic: "orders".into(),
        partition: 1,
        offset: 99,
        key: Some(b"customer-7".to_vec()),
        value: Some(br#"{"order": 7, "total": 12.50}"#.to_vec()),
        ts_ms: Some(1_700_000_000_123),
        headers: vec![("trace-id".into(), Some(b"t-1".to_vec())), ("bin".into(), Some(vec![0xff]))],
    })
}

async fn deliver_once(server_url: String, timeout_ms: u32) -> DeliveryOutcome {
    let client = WebhookClient::new(WebhookPolicy::default()).expect("client");
    client.deliver(&target(server_url, timeout_ms), &secrets(), Payload::json(sample_body()), "wo-123").await
}

fn retryable(outcome: &DeliveryOutcome) -> (&str, Option<Duration>) {
    match outcome {
        DeliveryOutcome::RetryableFailure { error, retry_after } => (error, *retry_after),
        other => panic!("expected a retryable failure, got {other:?}"),
    }
}

#[tokio::test]
async fn test_200_succeeds_and_server_sees_body_and_headers() {
    let mut server = TestServer::start(|_| Reply::status(200).body("ok")).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    assert_eq!(outcome, DeliveryOutcome::Succeeded);

    let req = server.next_request().await;
    assert_eq!(req.method, Method::POST);
    assert_eq!(req.path, "/hooks/orders");
    assert_eq!(req.body, Bytes::from(sample_body()), "the server must receive the built body byte for byte");
    assert_eq!(req.headers["content-type"], "application/json");
    assert_eq!(req.headers["authorization"], TOKEN, "secret header carries the stored value");
    assert_eq!(req.headers["x-source"], "kafka-triggers-test");
    assert_eq!(req.headers["idempotency-key"], "wo-123");
    assert_eq!(req.headers["x-work-order-id"], "wo-123");
    assert!(req.headers["user-agent"].to_str().unwrap().starts_with("kafka-triggers/"));

    let json: serde_json::Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(json["data"]["order"], 7);
    assert_eq!(json["request"]["offset"], 99);
}

#[tokio::test]
async fn test_a_cloud_event_reaches_the_server_as_built() {
    let mut server = TestServer::start(|_| Reply::status(200)).await;
    let client = WebhookClient::new(WebhookPolicy::default()).expect("client");
    let message = MessageForBody {
        topic: "orders".into(),
        partition: 1,
        offset: 99,
        key: Some(b"customer-7".to_vec()),
        value: Some(b"plain text".to_vec()),
        ts_ms: Some(1_700_000_000_123),
        headers: vec![("traceparent".into(), Some(b"00-ab-cd-01".to_vec()))],
    };
    let mut target = target(server.url(), 5_000);
    target.format = WebhookFormat::CloudEvents;
    let outcome = client.deliver(&target, &secrets(), cloud_event(&message, "wo-5"), "wo-5").await;
    assert_eq!(outcome, DeliveryOutcome::Succeeded);

    let req = server.next_request().await;
    assert_eq!(req.body, Bytes::from_static(b"plain text"));
    assert_eq!(req.headers["content-type"], "application/octet-stream");
    for (name, value) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "wo-5"),
        ("ce-source", "kafka://orders#1"),
        ("ce-type", "dev.kafka-triggers.message"),
        ("ce-time", "2023-11-14T22:13:20.123Z"),
        ("ce-subject", "customer-7"),
        ("ce-traceparent", "00-ab-cd-01"),
        ("idempotency-key", "wo-5"),
        ("authorization", TOKEN),
        ("x-source", "kafka-triggers-test"),
    ] {
        assert_eq!(req.headers[name], value, "{name}");
    }
}

#[tokio::test]
async fn test_other_2xx_succeeds() {
    let server = TestServer::start(|_| Reply::status(204)).await;
    assert_eq!(deliver_once(server.url(), 5_000).await, DeliveryOutcome::Succeeded);
}

#[tokio::test]
async fn test_202_is_accepted() {
    let server = TestServer::start(|_| Reply::status(202).body(r#"{"run": "r-1"}"#)).await;
    assert_eq!(deliver_once(server.url(), 5_000).await, DeliveryOutcome::Accepted);
}

#[tokio::test]
async fn test_500_is_retryable_with_status_and_body_snippet() {
    let server = TestServer::start(|_| Reply::status(500).body("database\nis down")).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (error, retry_after) = retryable(&outcome);
    assert_eq!(error, "HTTP 500 Internal Server Error (server error): database is down");
    assert_eq!(retry_after, None);
}

#[tokio::test]
async fn test_long_error_body_is_truncated() {
    let server = TestServer::start(|_| Reply::status(503).body("x".repeat(100_000))).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (error, _) = retryable(&outcome);
    assert!(error.starts_with("HTTP 503 Service Unavailable (server error): xxx"), "{error}");
    assert!(error.ends_with('…'), "{error}");
    assert!(error.len() < 600, "error is {} bytes", error.len());
}

#[tokio::test]
async fn test_429_honours_retry_after_seconds() {
    let server = TestServer::start(|_| Reply::status(429).header("retry-after", "2").body("slow down")).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (error, retry_after) = retryable(&outcome);
    assert!(error.starts_with("HTTP 429 Too Many Requests (client error)"), "{error}");
    assert_eq!(retry_after, Some(Duration::from_secs(2)));
}

#[tokio::test]
async fn test_503_honours_retry_after_http_date() {
    let at = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
    let server = TestServer::start(move |_| Reply::status(503).header("retry-after", at.clone())).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (_, retry_after) = retryable(&outcome);
    // HTTP-dates have one-second resolution and the clock moved on.
    let retry_after = retry_after.expect("retry-after parsed");
    assert!(retry_after > Duration::from_secs(115) && retry_after <= Duration::from_secs(120), "{retry_after:?}");
}

#[tokio::test]
async fn test_4xx_is_retryable_but_labelled_client_error() {
    let server = TestServer::start(|_| Reply::status(404).body("no such hook")).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (error, _) = retryable(&outcome);
    assert_eq!(error, "HTTP 404 Not Found (client error): no such hook");
}

#[tokio::test]
async fn test_error_text_never_contains_secret_values() {
    // A target that echoes the credential it rejected.
    let server =
        TestServer::start(|_| Reply::status(401).body(format!("token {TOKEN} is invalid; got tok-9f8e7d6c5b4a"))).await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (error, _) = retryable(&outcome);
    assert!(!error.contains("tok-9f8e7d6c5b4a"), "{error}");
    assert_eq!(error, "HTTP 401 Unauthorized (client error): token <redacted> is invalid; got <redacted>");
}

#[tokio::test]
async fn test_redirect_is_not_followed() {
    // A redirect to the same server, so a followed one would be recorded.
    let mut server = TestServer::start(|i| {
        if i == 0 {
            Reply::status(302).header("location", "/elsewhere")
        } else {
            Reply::status(200)
        }
    })
    .await;
    let outcome = deliver_once(server.url(), 5_000).await;
    let (error, _) = retryable(&outcome);
    assert_eq!(error, "HTTP 302 Found: redirect to /elsewhere not followed");
    // Exactly one request: the server records each before answering it.
    server.next_request().await;
    assert!(server.received.try_recv().is_err());
}

#[tokio::test]
async fn test_slow_server_times_out_as_retryable() {
    let mut server = TestServer::start(|_| Reply::status(200).delay(Duration::from_secs(30))).await;
    let started = Instant::now();
    let outcome = deliver_once(server.url(), 300).await;
    let elapsed = started.elapsed();
    let (error, retry_after) = retryable(&outcome);
    assert_eq!(error, "timed out (limit 300 ms)");
    assert_eq!(retry_after, None);
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    // The request did reach the server; only the answer was late.
    server.next_request().await;
}

#[tokio::test]
async fn test_connection_refused_is_retryable() {
    // A port that was just free: bind, note it, release it.
    let addr = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let outcome = deliver_once(format!("http://{addr}/hook"), 5_000).await;
    let (error, retry_after) = retryable(&outcome);
    assert!(error.starts_with("connection failed: tcp connect error: "), "{error}");
    assert!(error.to_lowercase().contains("refused"), "{error}");
    assert!(!error.contains(&addr.to_string()), "the URL is left out: {error}");
    assert_eq!(retry_after, None);
}

#[tokio::test]
async fn test_missing_secret_is_permanent_and_sends_nothing() {
    let mut server = TestServer::start(|_| Reply::status(200)).await;
    let client = WebhookClient::new(WebhookPolicy::default()).unwrap();
    let outcome = client
        .deliver(&target(server.url(), 5_000), &TriggerSecrets::default(), Payload::json(sample_body()), "wo-1")
        .await;
    assert_eq!(
        outcome,
        DeliveryOutcome::PermanentFailure { error: "secret webhook header `Authorization` has no stored value".into() }
    );
    assert!(server.received.try_recv().is_err());
}

#[tokio::test]
async fn test_one_client_serves_repeated_deliveries() {
    let mut server = TestServer::start(|i| if i == 0 { Reply::status(500) } else { Reply::status(200) }).await;
    let client = WebhookClient::new(WebhookPolicy::default()).unwrap();
    let (target, secrets) = (target(server.url(), 5_000), secrets());
    let first = client.deliver(&target, &secrets, Payload::json(sample_body()), "wo-9").await;
    assert!(matches!(first, DeliveryOutcome::RetryableFailure { .. }), "{first:?}");
    let second = client.deliver(&target, &secrets, Payload::json(sample_body()), "wo-9").await;
    assert_eq!(second, DeliveryOutcome::Succeeded);
    for _ in 0..2 {
        assert_eq!(server.next_request().await.headers["idempotency-key"], "wo-9");
    }
}

/// Pins issue #10 item 6: webhook targets were unrestricted, and the error
/// of a closed port differed from an open one's (a port scanner).
#[tokio::test]
async fn test_refused_targets_get_no_connection_and_one_error_listening_or_not() {
    let listening = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listening.set_nonblocking(true).unwrap();
    let open = listening.local_addr().unwrap().port();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = WebhookClient::new(WebhookPolicy::parse("127.0.0.0/8,::1/128", "").unwrap()).unwrap();
    for port in [open, closed] {
        // A name goes through the resolver; literals are checked before sending.
        for host in ["localhost", "127.0.0.1", "[::ffff:127.0.0.1]"] {
            let url = format!("http://{host}:{port}/hook");
            let outcome =
                client.deliver(&target(url.clone(), 5_000), &secrets(), Payload::json(sample_body()), "wo").await;
            let refused = DeliveryOutcome::RetryableFailure { error: REFUSED.into(), retry_after: None };
            assert_eq!(outcome, refused, "{url}");
        }
    }
    let accepted = listening.accept();
    assert_eq!(accepted.map(|_| ()).unwrap_err().kind(), std::io::ErrorKind::WouldBlock, "a connection was made");

    // Allowed, the same target is reached through the resolver.
    let mut server = TestServer::start(|_| Reply::status(200)).await;
    let allowing = WebhookClient::new(WebhookPolicy::parse("127.0.0.0/8", "127.0.0.1/32").unwrap()).unwrap();
    let url = server.url().replace("127.0.0.1", "localhost");
    let outcome = allowing.deliver(&target(url, 5_000), &secrets(), Payload::json(sample_body()), "wo").await;
    assert_eq!(outcome, DeliveryOutcome::Succeeded);
    assert_eq!(server.next_request().await.path, "/hooks/orders");
}
