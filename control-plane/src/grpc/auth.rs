//! Bearer-token authentication as a tower layer in front of every service:
//! the public API (`kafka_triggers.v1.*`) takes the API token, the node
//! protocol (`kafka_triggers.internal.v1.*`) the node token and, with mutual
//! TLS, a verified client certificate, whose names the layer hands on to the
//! node handlers ([`NodeIdentity`]). Reflection and health stay open so
//! probes and `grpcurl list` work.

use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use kt_common::secret::Secret;
use tonic::body::BoxBody;
use tower::{Layer, Service};

use super::peer::NodeIdentity;

const PUBLIC_PREFIX: &str = "/kafka_triggers.v1.";
const NODE_PREFIX: &str = "/kafka_triggers.internal.v1.";

#[derive(Clone, Default)]
pub struct AuthLayer {
    api_token: Option<Arc<Secret>>,
    node_token: Option<Arc<Secret>>,
    /// Nodes must present a client certificate (`--node-client-ca`).
    node_certificate: bool,
}

impl AuthLayer {
    pub fn new(api_token: Option<Secret>, node_token: Option<Secret>, node_certificate: bool) -> Self {
        Self { api_token: api_token.map(Arc::new), node_token: node_token.map(Arc::new), node_certificate }
    }

    /// The token a path requires, if any.
    fn required(&self, path: &str) -> Option<(&Secret, &'static str)> {
        if path.starts_with(PUBLIC_PREFIX) {
            self.api_token.as_deref().map(|t| (t, "API"))
        } else if path.starts_with(NODE_PREFIX) {
            self.node_token.as_deref().map(|t| (t, "node"))
        } else {
            None
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Auth { inner, tokens: self.clone() }
    }
}

#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: AuthLayer,
}

impl<S, B> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<BoxBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        if let Some((expected, which)) = self.tokens.required(req.uri().path()) {
            let given = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")));
            let ok = given.is_some_and(|g| constant_time_eq(g.as_bytes(), expected.expose().as_bytes()));
            if !ok {
                let message = match given {
                    None => format!("missing `authorization: Bearer <token>` metadata ({which} token required)"),
                    Some(_) => format!("invalid {which} token"),
                };
                return unauthenticated(message);
            }
        }
        if self.tokens.node_certificate && req.uri().path().starts_with(NODE_PREFIX) {
            match NodeIdentity::of_connection(req.extensions()) {
                Ok(identity) => {
                    req.extensions_mut().insert(identity);
                }
                Err(message) => {
                    tracing::warn!(path = req.uri().path(), "node refused: {message}");
                    return unauthenticated(message);
                }
            }
        }
        // The service we cloned is the one that was polled ready.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(inner.call(req))
    }
}

fn unauthenticated<E: 'static>(message: String) -> BoxFuture<'static, Result<http::Response<BoxBody>, E>> {
    let response = tonic::Status::unauthenticated(message).into_http();
    Box::pin(async move { Ok(response) })
}

/// Compares the SHA-256 digests of both, without an early exit: the time
/// taken reveals neither how much of a guessed token was right nor how long
/// the real one is (the digests always have the same length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use sha2::{Digest as _, Sha256};
    let (a, b) = (Sha256::digest(a), Sha256::digest(b));
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_token_requirements_by_path() {
        let layer = AuthLayer::new(Some(Secret::new("api")), None, false);
        assert!(layer.required("/kafka_triggers.v1.TriggerService/GetTrigger").is_some());
        assert!(layer.required("/kafka_triggers.internal.v1.NodeService/Session").is_none());
        assert!(layer.required("/grpc.health.v1.Health/Check").is_none());
        assert!(layer.required("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo").is_none());
    }

    #[tokio::test]
    async fn test_with_mutual_tls_the_node_protocol_needs_a_client_certificate() {
        let inner = tower::service_fn(|req: http::Request<()>| async move {
            // What the handlers would read.
            let identity = req.extensions().get::<NodeIdentity>().is_some();
            let mut response = http::Response::new(tonic::body::empty_body());
            response.headers_mut().insert("x-identity", identity.to_string().parse().unwrap());
            Ok::<_, std::convert::Infallible>(response)
        });
        let call = |layer: AuthLayer, path: &'static str| {
            let mut service = layer.layer(inner);
            async move {
                let request = http::Request::builder().uri(path).body(()).unwrap();
                let response = service.call(request).await.unwrap();
                let header = |name: &str| response.headers().get(name).map(|v| v.to_str().unwrap().to_owned());
                (header("grpc-status"), header("x-identity"))
            }
        };
        let session = "/kafka_triggers.internal.v1.NodeService/Session";
        let mutual = AuthLayer::new(None, None, true);
        // No TLS connection info: no certificate.
        assert_eq!(call(mutual.clone(), session).await, (Some("16".into()), None));
        assert_eq!(call(mutual, "/kafka_triggers.v1.TriggerService/ListTriggers").await, (None, Some("false".into())));
        assert_eq!(call(AuthLayer::new(None, None, false), session).await, (None, Some("false".into())));
    }

    #[test]
    fn test_constant_time_eq() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"abc"));
        assert!(constant_time_eq(b"", b""));
    }
}
