//! One delivery attempt of a work order: a single HTTP POST to the trigger's
//! webhook, classified into a [`DeliveryOutcome`]. Whether and when to try
//! again is [`super::retry`]'s business, not this module's.
//!
//! Classification (DESIGN §3: "2xx → success; 202 → running until
//! CompleteWorkOrder; other status / timeout → retry … up to the trigger's
//! policy, then failed"):
//!
//! | answer                                  | outcome                        |
//! |-----------------------------------------|--------------------------------|
//! | 202                                     | `Accepted`                     |
//! | other 2xx                               | `Succeeded`                    |
//! | 3xx, 4xx, 5xx (incl. 408, 429)          | `RetryableFailure`             |
//! | timeout, connection or protocol error   | `RetryableFailure`             |
//! | target refused by the webhook target policy | `RetryableFailure` ([`REFUSED`]) |
//! | request cannot be built (missing secret, invalid header or URL) | `PermanentFailure` |
//!
//! Every 4xx is retryable on purpose: targets return 401/403/404 transiently
//! during deploys and credential rotations, and the design retries every
//! failed status up to the policy. The error text still says
//! "client error" or "server error" so an operator can tell them apart.
//! `PermanentFailure` is kept for what no retry with the same configuration
//! can fix; the worker should fail the work order at once.
//!
//! A target the node's webhook target policy refuses (an IP literal in a
//! denied range, or a name none of whose DNS answers is allowed; see
//! [`super::target_policy`]) gets no connection at all. It is retried like
//! any other connection failure rather than failed at once: DNS answers
//! change, and so does the policy when an operator widens it and restarts
//! the nodes; names and literals are treated alike, so the outcome does not
//! depend on how the target is spelled. Its error is always [`REFUSED`],
//! whether or not anything listens, so `last_error` tells nothing about a
//! denied range.
//!
//! Environment proxies (`HTTP_PROXY`, `HTTPS_PROXY`, `ALL_PROXY`, honouring
//! `NO_PROXY`) are used, as reqwest does by default: through one, the node
//! connects only to the proxy, so the resolver checks the proxy's address and
//! the proxy resolves the target's name; IP-literal targets are still
//! checked here before sending.
//!
//! Redirects are not followed: following one would turn the POST into a GET
//! (301/302/303) and send the secret headers to whatever host the target
//! names. A 3xx is a failure that names the `Location`.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use kt_common::trigger::{TriggerSecrets, WebhookTarget, DEFAULT_WEBHOOK_TIMEOUT_MS};
use kt_common::webhook_policy::WebhookPolicy;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use reqwest::StatusCode;
use tracing::debug;

use super::target_policy::{self, PolicyResolver, REFUSED};

/// Carries the idempotency key so a target can drop a repeated attempt.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Carries the same key under the name workflow platforms tend to log.
pub const WORK_ORDER_ID_HEADER: &str = "x-work-order-id";
/// How much of a failed response's body goes into the error text.
pub const ERROR_BODY_SNIPPET_BYTES: usize = 512;
/// How much of a successful response's body is read (and discarded) so the
/// connection can go back to the pool; bigger bodies cost a new connection
/// rather than unbounded reading.
const DRAIN_LIMIT_BYTES: usize = 64 * 1024;
/// Bound on the length of transport error descriptions.
const MAX_TRANSPORT_ERROR_CHARS: usize = 300;
const REDACTED: &str = "<redacted>";

/// The result of one delivery attempt.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryOutcome {
    /// A 2xx other than 202: the work order succeeded.
    Succeeded,
    /// 202: the target took the work order and reports the outcome later with
    /// `CompleteWorkOrder`; the work order stays running until then.
    Accepted,
    /// Worth trying again, subject to the trigger's retry policy.
    RetryableFailure {
        /// Short, single-line, free of secret values.
        error: String,
        /// The target's `Retry-After`, if it sent a valid one.
        retry_after: Option<Duration>,
    },
    /// Cannot succeed until the trigger's configuration changes.
    PermanentFailure {
        /// Short, single-line, free of secret values.
        error: String,
    },
}

/// What one attempt sends, in the trigger's format.
#[derive(Debug, Clone)]
pub struct Payload {
    /// `None` sends no `Content-Type` (a CloudEvent without data).
    pub content_type: Option<HeaderValue>,
    /// The format's own headers (CloudEvents attributes); they replace
    /// configured headers of the same name.
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Payload {
    /// A work-order body ([`super::build_body`]), as JSON.
    pub fn json(body: impl Into<Bytes>) -> Self {
        Self {
            content_type: Some(HeaderValue::from_static("application/json")),
            headers: HeaderMap::new(),
            body: body.into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookClientError {
    #[error("failed to build the webhook http client")]
    Build(#[source] reqwest::Error),
}

/// Delivers work orders. Cheap to clone; every clone shares one connection
/// pool, which is the point: one client per node, not per request.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    http: reqwest::Client,
    policy: Arc<WebhookPolicy>,
}

impl WebhookClient {
    /// A client that connects only to addresses `policy` allows.
    pub fn new(policy: WebhookPolicy) -> Result<Self, WebhookClientError> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            .dns_resolver(Arc::new(PolicyResolver::new(policy.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("kafka-triggers/", env!("CARGO_PKG_VERSION")))
            // Notice targets that vanished without closing pooled connections.
            .tcp_keepalive(Duration::from_secs(60))
            .build()
            .map_err(WebhookClientError::Build)?;
        Ok(Self { http, policy })
    }

    /// POSTs `payload` (a work-order body, or a CloudEvent) to `target` once.
    ///
    /// `idempotency_key` should be the work order's id: stable across
    /// attempts, so a target that saw an attempt whose answer was lost can
    /// recognise the next one. It is sent as `Idempotency-Key` and
    /// `X-Work-Order-Id`; those, `Content-Type` and the payload's headers
    /// override any configured header of the same name. The whole attempt,
    /// connecting and reading the answer included, is bounded by
    /// `target.timeout_ms`.
    pub async fn deliver(
        &self,
        target: &WebhookTarget,
        secrets: &TriggerSecrets,
        payload: Payload,
        idempotency_key: &str,
    ) -> DeliveryOutcome {
        let headers = match request_headers(target, secrets, idempotency_key, &payload) {
            Ok(headers) => headers,
            Err(error) => return DeliveryOutcome::PermanentFailure { error },
        };
        let timeout_ms = if target.timeout_ms == 0 { DEFAULT_WEBHOOK_TIMEOUT_MS } else { target.timeout_ms };
        let timeout = Duration::from_millis(u64::from(timeout_ms));

        if target_policy::refuses_literal(&self.policy, &target.url) {
            return DeliveryOutcome::RetryableFailure { error: REFUSED.to_owned(), retry_after: None };
        }

        let started = Instant::now();
        let sent = self.http.post(&target.url).headers(headers).timeout(timeout).body(payload.body).send().await;
        let outcome = match sent {
            Ok(response) => {
                let status = response.status();
                debug!(status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "webhook answered");
                classify_response(response).await
            }
            Err(e) => {
                debug!(elapsed_ms = started.elapsed().as_millis() as u64, "webhook request failed");
                transport_failure(e, timeout)
            }
        };
        redact_outcome(outcome, &secret_values(target, secrets))
    }
}

/// The configured headers plus ours. Errors name the header, never its value.
fn request_headers(
    target: &WebhookTarget,
    secrets: &TriggerSecrets,
    idempotency_key: &str,
    payload: &Payload,
) -> Result<HeaderMap, String> {
    let mut headers = HeaderMap::with_capacity(target.headers.len() + payload.headers.len() + 3);
    for h in &target.headers {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("webhook header `{}` has an invalid name", h.name))?;
        let value = if h.secret {
            let secret = secrets
                .headers
                .get(&h.name)
                .ok_or_else(|| format!("secret webhook header `{}` has no stored value", h.name))?;
            let mut value = HeaderValue::from_str(secret.expose())
                .map_err(|_| format!("secret webhook header `{}` has an invalid value", h.name))?;
            // Keeps it out of `Debug` output and HTTP/2 header compression tables.
            value.set_sensitive(true);
            value
        } else {
            HeaderValue::from_str(&h.value).map_err(|_| format!("webhook header `{}` has an invalid value", h.name))?
        };
        headers.append(name, value);
    }

    let key =
        HeaderValue::from_str(idempotency_key).map_err(|_| "idempotency key is not a valid header value".to_owned())?;
    match &payload.content_type {
        Some(content_type) => headers.insert(CONTENT_TYPE, content_type.clone()),
        None => headers.remove(CONTENT_TYPE),
    };
    for (name, value) in &payload.headers {
        headers.insert(name, value.clone());
    }
    headers.insert(HeaderName::from_static(IDEMPOTENCY_KEY_HEADER), key.clone());
    headers.insert(HeaderName::from_static(WORK_ORDER_ID_HEADER), key);
    Ok(headers)
}

async fn classify_response(mut response: reqwest::Response) -> DeliveryOutcome {
    let status = response.status();
    if status.is_success() {
        drain(&mut response).await;
        return if status == StatusCode::ACCEPTED { DeliveryOutcome::Accepted } else { DeliveryOutcome::Succeeded };
    }

    let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()));
    let kind = match status.as_u16() {
        300..=399 => {
            let location = response.headers().get(LOCATION).map(|v| sanitize(&String::from_utf8_lossy(v.as_bytes())));
            let error = match location {
                Some(location) => {
                    format!("{}: redirect to {} not followed", status_text(status), truncate(&location, 200))
                }
                None => format!("{}: redirect not followed", status_text(status)),
            };
            return DeliveryOutcome::RetryableFailure { error, retry_after };
        }
        400..=499 => "client error",
        500..=599 => "server error",
        _ => "unexpected status",
    };
    let (prefix, truncated) = read_prefix(&mut response, ERROR_BODY_SNIPPET_BYTES).await;
    let snippet = snippet(&prefix, truncated);
    let error = if snippet.is_empty() {
        format!("{} ({kind})", status_text(status))
    } else {
        format!("{} ({kind}): {snippet}", status_text(status))
    };
    DeliveryOutcome::RetryableFailure { error, retry_after }
}

fn status_text(status: StatusCode) -> String {
    match status.canonical_reason() {
        Some(reason) => format!("HTTP {} {reason}", status.as_u16()),
        None => format!("HTTP {}", status.as_u16()),
    }
}

/// Reads at most `limit` bytes of the body; the flag says whether more was
/// sent. A read error ends the prefix early: what arrived is still useful.
async fn read_prefix(response: &mut reqwest::Response, limit: usize) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    while let Ok(Some(chunk)) = response.chunk().await {
        let room = limit - buf.len();
        if chunk.len() > room {
            buf.extend_from_slice(&chunk[..room]);
            return (buf, true);
        }
        buf.extend_from_slice(&chunk);
    }
    (buf, false)
}

/// Reads a successful answer's body so the connection can be reused. The
/// status already decided the outcome, so a failure here changes nothing.
async fn drain(response: &mut reqwest::Response) {
    let mut seen = 0;
    while let Ok(Some(chunk)) = response.chunk().await {
        seen += chunk.len();
        if seen > DRAIN_LIMIT_BYTES {
            return;
        }
    }
}

/// The body prefix as one line of text, marked when cut short.
fn snippet(prefix: &[u8], truncated: bool) -> String {
    let mut text = sanitize(&String::from_utf8_lossy(prefix));
    if truncated {
        // The cut may have split a multi-byte character.
        while text.ends_with('\u{FFFD}') {
            text.pop();
        }
        text.push('…');
    }
    text
}

/// Control characters and runs of whitespace become single spaces, so an
/// error never spans log lines.
fn sanitize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_whitespace() || c.is_control() {
            if !out.ends_with(' ') {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
    out.trim().to_owned()
}

fn truncate(text: &str, max_chars: usize) -> Cow<'_, str> {
    match text.char_indices().nth(max_chars) {
        Some((cut, _)) => Cow::Owned(format!("{}…", &text[..cut])),
        None => Cow::Borrowed(text),
    }
}

fn transport_failure(e: reqwest::Error, timeout: Duration) -> DeliveryOutcome {
    if target_policy::is_refusal(&e) {
        return DeliveryOutcome::RetryableFailure { error: REFUSED.to_owned(), retry_after: None };
    }
    if e.is_builder() {
        return DeliveryOutcome::PermanentFailure { error: format!("invalid request: {}", describe(e)) };
    }
    let error = if e.is_timeout() {
        format!("timed out (limit {} ms)", timeout.as_millis())
    } else if e.is_connect() {
        format!("connection failed: {}", describe(e))
    } else {
        format!("request failed: {}", describe(e))
    };
    DeliveryOutcome::RetryableFailure { error, retry_after: None }
}

/// The error's cause chain, without the URL reqwest would print: it is long
/// and adds nothing the operator does not already have in the trigger.
fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut parts: Vec<String> = Vec::new();
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(&e);
    while let Some(err) = source {
        let text = err.to_string();
        // hyper-util wraps every cause in a generic "client error (Kind)",
        // and some layers repeat their inner error in their own message.
        let generic = text.starts_with("client error (") && err.source().is_some();
        if !generic && !parts.last().is_some_and(|last| last.contains(&text)) {
            parts.push(text);
        }
        source = err.source();
    }
    let text = if parts.is_empty() { e.to_string() } else { parts.join(": ") };
    truncate(&sanitize(&text), MAX_TRANSPORT_ERROR_CHARS).into_owned()
}

/// `Retry-After` as delay-seconds or an HTTP-date (RFC 9110 §10.2.3). A date
/// in the past means "now"; anything unparsable is ignored.
fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The secret values of the target's headers, plus the token after an auth
/// scheme (`Bearer abc` → `abc`), which targets like to echo on a 401.
fn secret_values<'a>(target: &WebhookTarget, secrets: &'a TriggerSecrets) -> Vec<&'a str> {
    let mut values = Vec::new();
    for h in target.headers.iter().filter(|h| h.secret) {
        let Some(secret) = secrets.headers.get(&h.name) else { continue };
        let value = secret.expose().trim();
        if value.is_empty() {
            continue;
        }
        values.push(value);
        if let Some((_, token)) = value.rsplit_once(' ') {
            if token.len() >= 8 {
                values.push(token);
            }
        }
    }
    // Longest first, so a value is replaced whole before a part of it.
    values.sort_by_key(|v| std::cmp::Reverse(v.len()));
    values
}

fn redact_outcome(outcome: DeliveryOutcome, secrets: &[&str]) -> DeliveryOutcome {
    match outcome {
        DeliveryOutcome::RetryableFailure { error, retry_after } => {
            DeliveryOutcome::RetryableFailure { error: redact(error, secrets), retry_after }
        }
        DeliveryOutcome::PermanentFailure { error } => {
            DeliveryOutcome::PermanentFailure { error: redact(error, secrets) }
        }
        done => done,
    }
}

/// Replaces every secret value in `text`, and a secret's beginning left
/// dangling where the text was cut short (`…`).
fn redact(mut text: String, secrets: &[&str]) -> String {
    for secret in secrets {
        if text.contains(secret) {
            text = text.replace(secret, REDACTED);
        }
    }
    if let Some(body) = text.strip_suffix('…') {
        for secret in secrets {
            let dangling = secret
                .char_indices()
                .rev()
                .map(|(i, _)| &secret[..i])
                .find(|prefix| prefix.len() >= 3 && body.ends_with(prefix));
            if let Some(prefix) = dangling {
                text = format!("{}{REDACTED}…", &body[..body.len() - prefix.len()]);
                break;
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    use kt_common::secret::Secret;
    use kt_common::trigger::WebhookHeader;

    fn target_with(headers: Vec<WebhookHeader>) -> WebhookTarget {
        WebhookTarget { url: "http://127.0.0.1:9/hook".into(), headers, timeout_ms: 1000, format: Default::default() }
    }

    fn header(name: &str, value: &str, secret: bool) -> WebhookHeader {
        WebhookHeader { name: name.into(), value: value.into(), secret }
    }

    fn secrets(pairs: &[(&str, &str)]) -> TriggerSecrets {
        TriggerSecrets {
            headers: pairs.iter().map(|(k, v)| ((*k).to_owned(), Secret::new(*v))).collect(),
            ..TriggerSecrets::default()
        }
    }

    #[test]
    fn test_headers_resolve_secrets_and_ours_win() {
        let target = target_with(vec![
            header("X-Plain", "p", false),
            header("Authorization", "", true),
            header("Idempotency-Key", "mine", false),
        ]);
        let h = request_headers(&target, &secrets(&[("Authorization", "Bearer s3cr3t")]), "wo-1", &Payload::json(""))
            .unwrap();
        assert_eq!(h["x-plain"], "p");
        assert_eq!(h["authorization"], "Bearer s3cr3t");
        assert!(h["authorization"].is_sensitive());
        assert_eq!(h["content-type"], "application/json");
        assert_eq!(h.get_all("idempotency-key").iter().collect::<Vec<_>>(), ["wo-1"]);
        assert_eq!(h["x-work-order-id"], "wo-1");
    }

    #[test]
    fn test_payload_headers_replace_configured_ones() {
        let target = target_with(vec![header("ce-type", "mine", false), header("ce-extra", "kept", false)]);
        let mut payload = Payload::json("");
        payload.content_type = None;
        payload.headers.insert("ce-type", HeaderValue::from_static("dev.kafka-triggers.message"));
        let h = request_headers(&target, &TriggerSecrets::default(), "wo-1", &payload).unwrap();
        assert_eq!(h.get_all("ce-type").iter().collect::<Vec<_>>(), ["dev.kafka-triggers.message"]);
        assert_eq!(h["ce-extra"], "kept");
        assert!(h.get("content-type").is_none());
        assert_eq!(h["idempotency-key"], "wo-1");
    }

    #[test]
    fn test_missing_or_invalid_secret_is_named_not_shown() {
        let target = target_with(vec![header("X-Token", "", true)]);
        let json = Payload::json("");
        let err = request_headers(&target, &TriggerSecrets::default(), "wo", &json).unwrap_err();
        assert_eq!(err, "secret webhook header `X-Token` has no stored value");
        let err = request_headers(&target, &secrets(&[("X-Token", "bad\nvalue")]), "wo", &json).unwrap_err();
        assert!(!err.contains("bad"), "{err}");
    }

    #[test]
    fn test_retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(parse_retry_after(&v("2"), now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(&v(" 0 "), now), Some(Duration::ZERO));
        let in_90s = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&HeaderValue::from_str(&in_90s).unwrap(), now), Some(Duration::from_secs(90)));
        let past = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&HeaderValue::from_str(&past).unwrap(), now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after(&v("-1"), now), None);
        assert_eq!(parse_retry_after(&v("soon"), now), None);
    }

    #[test]
    fn test_snippet_is_one_line_and_cut_cleanly() {
        assert_eq!(snippet(b"  line one\r\n\tline two  ", false), "line one line two");
        let cut = &"ééé".as_bytes()[..5];
        assert_eq!(snippet(cut, true), "éé…");
    }

    #[test]
    fn test_redact_replaces_whole_and_dangling_secrets() {
        let s = ["Bearer abcdefgh123", "abcdefgh123"];
        assert_eq!(redact("HTTP 401: bad token abcdefgh123".into(), &s), "HTTP 401: bad token <redacted>");
        assert_eq!(redact("HTTP 401: got Bearer abcdefgh123!".into(), &s), "HTTP 401: got <redacted>!");
        assert_eq!(redact("HTTP 401: token abcde…".into(), &s), "HTTP 401: token <redacted>…");
        assert_eq!(redact("HTTP 500: nothing here…".into(), &s), "HTTP 500: nothing here…");
    }

    #[test]
    fn test_secret_values_include_scheme_token() {
        let target = target_with(vec![header("Authorization", "", true), header("X-Plain", "p", false)]);
        let sec = secrets(&[("Authorization", "Bearer abcdefgh123"), ("X-Plain", "unused")]);
        assert_eq!(secret_values(&target, &sec), ["Bearer abcdefgh123", "abcdefgh123"]);
    }

    #[test]
    fn test_truncate_counts_chars() {
        assert_eq!(truncate("abc", 3), "abc");
        assert_eq!(truncate("abcd", 3), "abc…");
        assert_eq!(truncate("éééé", 2), "éé…");
    }
}
