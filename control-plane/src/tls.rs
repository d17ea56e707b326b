//! TLS of the gRPC listener: the server's certificate and key and, for
//! mutual TLS with data-plane nodes, the CA that signs node certificates.
//! The files are read and checked at start-up (each error names its flag).

use std::path::PathBuf;

use anyhow::Context as _;
use kt_common::tls::{read_certificates, read_private_key};
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// `--tls-cert`, `--tls-key` and `--node-client-ca`.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// PEM certificate chain of the listener, leaf first.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    /// PEM CA certificates of node client certificates. When set, nodes
    /// authenticate with a client certificate whose subject CN or a DNS name
    /// is their node id; API callers still need none.
    pub node_client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Whether nodes must present a client certificate.
    pub fn mutual(&self) -> bool {
        self.node_client_ca.is_some()
    }

    /// Reads the files into tonic's configuration, checked the way the
    /// server will use it (a key that does not fit the certificate fails
    /// here, not at the first handshake).
    pub fn load(&self) -> anyhow::Result<ServerTlsConfig> {
        let cert = read_certificates("--tls-cert", &self.cert)?;
        let key = read_private_key("--tls-key", &self.key)?;
        let mut config = ServerTlsConfig::new().identity(Identity::from_pem(cert, key));
        if let Some(ca) = &self.node_client_ca {
            // The listener also serves the public API, whose callers have
            // no certificate: the handshake accepts a missing one, and the
            // node protocol refuses it (see `grpc::auth`). A certificate
            // that is presented must verify against the CA.
            config = config
                .client_ca_root(Certificate::from_pem(read_certificates("--node-client-ca", ca)?))
                .client_auth_optional(true);
        }
        tonic::transport::Server::builder().tls_config(config.clone()).with_context(|| {
            format!(
                "invalid TLS configuration (--tls-cert {}, --tls-key {}{})",
                self.cert.display(),
                self.key.display(),
                self.node_client_ca
                    .as_ref()
                    .map(|ca| format!(", --node-client-ca {}", ca.display()))
                    .unwrap_or_default()
            )
        })?;
        Ok(config)
    }
}
