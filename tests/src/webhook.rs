//! A real HTTP webhook target on 127.0.0.1: it records every delivery and
//! answers what a test scripts (by default 200 at once). Used by the
//! whole-system tests, the benchmark and the stack demo.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One delivery as the target saw it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The body as JSON; `Null` when it is not JSON.
    pub body: Value,
    /// The body as sent (a CloudEvent's value need not be JSON).
    pub raw: Bytes,
    pub headers: hyper::HeaderMap,
    pub work_order_id: String,
    pub received_at: std::time::Instant,
    pub status: u16,
}

impl Delivery {
    /// Whether the target answered it as a finished success (2xx, not 202).
    pub fn succeeded(&self) -> bool {
        succeeded(self.status)
    }

    /// `request.key` of the body (a string, or null for unkeyed messages).
    pub fn key(&self) -> Option<&str> {
        self.body["request"]["key"].as_str()
    }

    pub fn offset(&self) -> i64 {
        self.body["request"]["offset"].as_i64().unwrap_or(-1)
    }

    pub fn partition(&self) -> i32 {
        self.body["request"]["partition"].as_i64().unwrap_or(-1) as i32
    }

    /// A header as text, `None` when absent or not text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What to answer: status, optional Retry-After seconds, optional delay.
#[derive(Debug, Clone, Copy)]
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<u32>,
    pub delay: Option<Duration>,
}

impl Reply {
    pub const OK: Reply = Reply { status: 200, retry_after: None, delay: None };

    pub fn status(status: u16) -> Self {
        Reply { status, ..Reply::OK }
    }
}

type Script = dyn Fn(&Value) -> Reply + Send + Sync;

/// Keys the target answers 500 for, switched over HTTP: `PUT /failing/KEY`
/// adds one, `DELETE /failing/KEY` removes it (the stack demo's "make one
/// fail"). Consulted before the script.
type Failing = Mutex<std::collections::HashSet<String>>;

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    deliveries: Arc<Mutex<Vec<Delivery>>>,
    count: watch::Receiver<usize>,
    counts: Arc<Counts>,
    script: Arc<Mutex<Arc<Script>>>,
    failing: Arc<Failing>,
    shutdown: CancellationToken,
}

impl WebhookReceiver {
    /// Starts on `addr` (port 0 for a free one), answering 200.
    pub async fn start(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let deliveries = Arc::new(Mutex::new(Vec::new()));
        let (all, count) = watch::channel(0usize);
        let counts = Arc::new(Counts { all, succeeded: AtomicUsize::new(0) });
        let script: Arc<Mutex<Arc<Script>>> = Arc::new(Mutex::new(Arc::new(|_: &Value| Reply::OK)));
        let shutdown = CancellationToken::new();
        let failing: Arc<Failing> = Arc::default();
        let (d, s, stop, fail, c) =
            (deliveries.clone(), script.clone(), shutdown.clone(), failing.clone(), counts.clone());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(_) => continue,
                    },
                };
                let (d, s, fail, c) = (d.clone(), s.clone(), fail.clone(), c.clone());
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (d, s, fail, c) = (d.clone(), s.clone(), fail.clone(), c.clone());
                        async move { Ok::<_, Infallible>(handle(req, &d, &s, &fail, &c).await) }
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
                });
            }
        });
        Ok(Self { addr, deliveries, count, counts, script, failing, shutdown })
    }

    pub fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// Replaces what the target answers.
    pub fn script(&self, f: impl Fn(&Value) -> Reply + Send + Sync + 'static) {
        *self.script.lock().unwrap() = Arc::new(f);
    }

    /// Watches the number of deliveries received.
    pub fn counter(&self) -> watch::Receiver<usize> {
        self.count.clone()
    }

    /// Makes the target answer 500 for `key` (or stop doing so).
    pub fn set_failing(&self, key: &str, failing: bool) {
        let mut keys = self.failing.lock().unwrap();
        if failing {
            keys.insert(key.to_owned());
        } else {
            keys.remove(key);
        }
    }

    pub fn deliveries(&self) -> Vec<Delivery> {
        self.deliveries.lock().unwrap().clone()
    }

    /// Deliveries the target answered with 2xx (not 202).
    pub fn successes(&self) -> Vec<Delivery> {
        self.deliveries().into_iter().filter(Delivery::succeeded).collect()
    }

    /// How many [`WebhookReceiver::successes`] there are, without copying them.
    pub fn success_count(&self) -> usize {
        self.counts.succeeded.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` deliveries arrived.
    pub async fn wait_for_deliveries(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let mut count = self.count.clone();
        tokio::time::timeout(timeout, count.wait_for(|c| *c >= n))
            .await
            .map_err(|_| anyhow::anyhow!("timed out waiting for {n} deliveries (got {})", self.deliveries().len()))??;
        Ok(())
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The counters a delivery bumps once it is recorded: every delivery (to
/// wait on), and those answered with [`Delivery::succeeded`] (read without
/// the deliveries' lock).
struct Counts {
    all: watch::Sender<usize>,
    succeeded: AtomicUsize,
}

fn succeeded(status: u16) -> bool {
    (200..300).contains(&status) && status != 202
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    deliveries: &Mutex<Vec<Delivery>>,
    script: &Mutex<Arc<Script>>,
    failing: &Failing,
    counts: &Counts,
) -> Response<Full<Bytes>> {
    if let Some(key) = req.uri().path().strip_prefix("/failing/") {
        let key = key.to_owned();
        let status = match *req.method() {
            hyper::Method::PUT => {
                failing.lock().unwrap().insert(key);
                StatusCode::NO_CONTENT
            }
            hyper::Method::DELETE => {
                failing.lock().unwrap().remove(&key);
                StatusCode::NO_CONTENT
            }
            _ => StatusCode::METHOD_NOT_ALLOWED,
        };
        let mut resp = Response::new(Full::new(Bytes::new()));
        *resp.status_mut() = status;
        return resp;
    }
    let work_order_id =
        req.headers().get("x-work-order-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let (parts, body) = req.into_parts();
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let key_fails = body["request"]["key"].as_str().is_some_and(|k| failing.lock().unwrap().contains(k));
    let reply = if key_fails {
        Reply::status(500)
    } else {
        let f = script.lock().unwrap().clone();
        f(&body)
    };
    if let Some(delay) = reply.delay {
        tokio::time::sleep(delay).await;
    }
    deliveries.lock().unwrap().push(Delivery {
        body,
        raw: bytes,
        headers: parts.headers,
        work_order_id,
        received_at: std::time::Instant::now(),
        status: reply.status,
    });
    if succeeded(reply.status) {
        counts.succeeded.fetch_add(1, Ordering::Relaxed);
    }
    counts.all.send_modify(|c| *c += 1);
    let mut resp = Response::new(Full::new(Bytes::from_static(b"{}")));
    *resp.status_mut() = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if let Some(secs) = reply.retry_after {
        resp.headers_mut().insert("retry-after", secs.into());
    }
    resp
}
