//! The node's connection to the control plane, one for the session and the
//! work stream alike: which replica an attempt goes to, the channel (TLS for
//! an `https://` URL, connect timeout, HTTP/2 keepalive) and the node token
//! on every request. Certificates and the token are read and checked once,
//! at start-up.

use std::path::PathBuf;
use std::time::Duration;

use kt_common::secret::Secret;
use kt_common::tls::{read_certificates, read_private_key, PemError};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// How the node verifies the control plane and proves itself to it over
/// TLS: `--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-domain`.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// PEM CA certificates to trust; none: the system's roots.
    pub ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with `key`).
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// The name the server certificate must be issued for, when it is not
    /// the URL's host.
    pub domain: Option<String>,
}

impl ClientTls {
    fn configured(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some() || self.domain.is_some()
    }

    fn load(&self) -> Result<ClientTlsConfig, ControlPlaneError> {
        let mut config = match &self.ca {
            Some(ca) => {
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read_certificates("--tls-ca", ca)?))
            }
            None => ClientTlsConfig::new().with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                let identity =
                    Identity::from_pem(read_certificates("--tls-cert", cert)?, read_private_key("--tls-key", key)?);
                config = config.identity(identity);
            }
            (None, None) => {}
            _ => return Err(ControlPlaneError::HalfIdentity),
        }
        if let Some(domain) = &self.domain {
            config = config.domain_name(domain.clone());
        }
        Ok(config)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("the node token contains characters not allowed in a header")]
    BadToken,
    #[error("invalid control plane URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("the --tls-* options need https:// control plane URLs, not `{0}`")]
    TlsNeedsHttps(String),
    #[error("--tls-cert and --tls-key go together")]
    HalfIdentity,
    #[error(transparent)]
    Pem(#[from] PemError),
    #[error("invalid TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot connect to the control plane at {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// The control plane as the node reaches it.
#[derive(Clone)]
pub struct ControlPlane {
    /// `--control-plane-url`: one or more replicas, comma-separated.
    urls: String,
    /// For the `https://` URLs.
    tls: ClientTlsConfig,
    /// `authorization: Bearer <node token>`, marked sensitive.
    authorization: Option<MetadataValue<Ascii>>,
    connect_timeout: Duration,
    keepalive_interval: Duration,
    keepalive_timeout: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("urls", &self.urls)
            .field("node_token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Checks the URLs and the token and reads the TLS files: every
    /// mistake here is a start-up error.
    pub fn new(urls: &str, node_token: Option<&Secret>, tls: &ClientTls) -> Result<Self, ControlPlaneError> {
        let authorization = node_token
            .map(|t| {
                let mut value: MetadataValue<Ascii> =
                    format!("Bearer {}", t.expose()).parse().map_err(|_| ControlPlaneError::BadToken)?;
                value.set_sensitive(true);
                Ok::<_, ControlPlaneError>(value)
            })
            .transpose()?;
        let mut https = false;
        for url in replicas(urls) {
            match url.split_once("://").map(|(scheme, _)| scheme) {
                Some("https") => https = true,
                Some("http") if tls.configured() => return Err(ControlPlaneError::TlsNeedsHttps(url.to_owned())),
                Some("http") => {}
                _ => {
                    let reason = "must start with http:// or https://".to_owned();
                    return Err(ControlPlaneError::BadUrl { url: url.to_owned(), reason });
                }
            }
            Endpoint::from_shared(url.to_owned())
                .map_err(|e| ControlPlaneError::BadUrl { url: url.to_owned(), reason: e.to_string() })?;
        }
        let tls = if https { tls.load()? } else { ClientTlsConfig::new() };
        if https {
            // Builds the connector once, as every connection will: a
            // certificate or key rustls refuses fails start-up.
            Endpoint::from_static("https://localhost").tls_config(tls.clone()).map_err(ControlPlaneError::Tls)?;
        }
        Ok(Self {
            urls: urls.to_owned(),
            tls,
            authorization,
            connect_timeout: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(5),
            keepalive_timeout: Duration::from_secs(30),
        })
    }

    /// Transport-level liveness, independent of the session's heartbeats:
    /// an HTTP/2 ping every `interval`, the connection dropped when one is
    /// not answered within `timeout`.
    pub fn with_keepalive(self, interval: Duration, timeout: Duration) -> Self {
        Self { keepalive_interval: interval, keepalive_timeout: timeout, ..self }
    }

    /// The URL of connection attempt `attempt` ([`crate::control_plane_url`]).
    pub fn url(&self, attempt: usize) -> String {
        crate::control_plane_url(&self.urls, attempt)
    }

    /// All the URLs, as configured (for logs).
    pub fn urls(&self) -> &str {
        &self.urls
    }

    /// A channel to `url` (one of [`Self::url`]'s).
    pub async fn connect(&self, url: &str) -> Result<Channel, ControlPlaneError> {
        let mut endpoint = Endpoint::from_shared(url.to_owned())
            .map_err(|e| ControlPlaneError::BadUrl { url: url.to_owned(), reason: e.to_string() })?
            .connect_timeout(self.connect_timeout)
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.keepalive_timeout)
            .keep_alive_while_idle(true);
        if url.starts_with("https://") {
            endpoint = endpoint.tls_config(self.tls.clone()).map_err(ControlPlaneError::Tls)?;
        }
        endpoint.connect().await.map_err(|source| ControlPlaneError::Connect { url: url.to_owned(), source })
    }

    /// A request carrying the node token.
    pub fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(authorization) = &self.authorization {
            request.metadata_mut().insert("authorization", authorization.clone());
        }
        request
    }
}

fn replicas(urls: &str) -> impl Iterator<Item = &str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_urls_and_tls_options_are_checked_at_start() {
        let none = ClientTls::default();
        assert!(ControlPlane::new("http://a:1,http://b:2", None, &none).is_ok());
        assert!(matches!(ControlPlane::new("a:1", None, &none), Err(ControlPlaneError::BadUrl { .. })));
        let with_ca = ClientTls { ca: Some("/nonexistent/ca.pem".into()), ..ClientTls::default() };
        // The token would cross in clear to a plaintext replica.
        assert!(matches!(
            ControlPlane::new("https://a:1,http://b:2", None, &with_ca),
            Err(ControlPlaneError::TlsNeedsHttps(url)) if url == "http://b:2"
        ));
        let error = ControlPlane::new("https://a:1", None, &with_ca).unwrap_err().to_string();
        assert!(error.starts_with("--tls-ca /nonexistent/ca.pem: "), "{error}");
        let half = ClientTls { cert: Some("c.pem".into()), ..ClientTls::default() };
        assert!(matches!(ControlPlane::new("https://a:1", None, &half), Err(ControlPlaneError::HalfIdentity)));
        let bad = Secret::new("a\nb");
        assert!(matches!(ControlPlane::new("http://a:1", Some(&bad), &none), Err(ControlPlaneError::BadToken)));
    }

    #[test]
    fn test_every_request_carries_the_token_and_debug_hides_it() {
        let token = Secret::new("s3cret");
        let cp = ControlPlane::new("http://a:1", Some(&token), &ClientTls::default()).unwrap();
        let request = cp.request(());
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer s3cret");
        assert!(!format!("{cp:?}").contains("s3cret"));
        let anonymous = ControlPlane::new("http://a:1", None, &ClientTls::default()).unwrap();
        assert!(anonymous.request(()).metadata().get("authorization").is_none());
    }
}
