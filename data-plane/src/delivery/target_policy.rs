//! The webhook target policy at connect time: a DNS resolver for the webhook
//! client that drops the answers the policy refuses, and the check of
//! IP-literal URLs, which reqwest connects to without asking a resolver.
//! The control plane checked the URL when the trigger was saved; this check
//! runs on every connection, so a name whose DNS answers changed since
//! (DNS rebinding) is refused too.

use std::net::SocketAddr;
use std::sync::Arc;

use kt_common::webhook_policy::WebhookPolicy;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The error of every attempt the policy stops. Fixed on purpose: it names
/// neither the address nor the port, and reads the same whether or not
/// anything listens there, so `last_error` cannot probe a denied range.
pub const REFUSED: &str = "webhook target refused by the target policy (--webhook-deny-cidrs)";

/// No address the policy allows is left for the target.
#[derive(Debug, thiserror::Error)]
#[error("{REFUSED}")]
pub struct TargetRefused;

/// Resolves with the system resolver (as reqwest's default does), then keeps
/// only the answers the policy allows.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: Arc<WebhookPolicy>,
}

impl PolicyResolver {
    pub fn new(policy: Arc<WebhookPolicy>) -> Self {
        Self { policy }
    }
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let host = name.as_str();
            let answers: Vec<SocketAddr> = tokio::net::lookup_host((host, 0)).await?.collect();
            let allowed = allowed_answers(&policy, host, answers)?;
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The answers the policy allows; [`TargetRefused`] when there were some and
/// none is allowed.
fn allowed_answers(
    policy: &WebhookPolicy,
    host: &str,
    answers: Vec<SocketAddr>,
) -> Result<Vec<SocketAddr>, TargetRefused> {
    let total = answers.len();
    let allowed: Vec<SocketAddr> = answers
        .into_iter()
        .filter(|a| match policy.check(a.ip()) {
            Ok(()) => true,
            Err(refusal) => {
                tracing::debug!(host, %refusal, "webhook target address dropped");
                false
            }
        })
        .collect();
    if allowed.is_empty() && total > 0 {
        return Err(TargetRefused);
    }
    Ok(allowed)
}

/// Whether `error` (a failed request) was the resolver refusing the target.
pub fn is_refusal(error: &reqwest::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(err) = source {
        if err.is::<TargetRefused>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Whether the policy refuses the URL's host as an IP literal. A URL that
/// does not parse is left to reqwest, which reports it.
pub fn refuses_literal(policy: &WebhookPolicy, url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| policy.check_url_literal(&u).is_err())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|a| a.parse().unwrap()).collect()
    }

    #[test]
    fn test_refused_answers_are_dropped_and_none_left_is_refused() {
        let policy = WebhookPolicy::parse("127.0.0.0/8,10.0.0.0/8", "10.9.0.0/16").unwrap();
        let kept = allowed_answers(&policy, "h", addrs(&["127.0.0.1:0", "[::1]:0", "10.1.1.1:0", "10.9.1.1:0"]));
        assert_eq!(kept.unwrap(), addrs(&["[::1]:0", "10.9.1.1:0"]));
        assert!(allowed_answers(&policy, "h", addrs(&["127.0.0.1:0", "[::ffff:10.0.0.1]:0"])).is_err());
        assert!(allowed_answers(&policy, "h", addrs(&["0.0.0.0:0"])).is_err());
        // No answer at all is the resolver's own failure to report, not a refusal.
        assert_eq!(allowed_answers(&policy, "h", Vec::new()).unwrap(), Vec::<SocketAddr>::new());
    }

    #[test]
    fn test_literal_urls_are_checked() {
        let policy = WebhookPolicy::default();
        assert!(refuses_literal(&policy, "http://169.254.169.254/latest"));
        assert!(refuses_literal(&policy, "http://[::ffff:169.254.169.254]:80/"));
        assert!(refuses_literal(&policy, "http://0.0.0.0:8080/"));
        assert!(!refuses_literal(&policy, "http://127.0.0.1:8080/"));
        assert!(!refuses_literal(&policy, "http://metadata.example/"));
        assert!(!refuses_literal(&policy, "not a url"));
    }
}
