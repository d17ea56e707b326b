//! Who a node is by its client certificate (mutual TLS, `--node-client-ca`):
//! the names the certificate was issued for, read by the auth layer from the
//! verified connection, and the check that binds a hello's node id to them,
//! so a node's certificate cannot be used to act as another node.

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;
use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};

/// The names of a node's verified client certificate: its subject CNs and
/// DNS subject alternative names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeIdentity {
    names: Vec<String>,
}

impl NodeIdentity {
    /// From the client certificate of the connection a request came on.
    /// The TLS layer has verified it against the node CA already (an
    /// invalid one fails the handshake); the error says why there is none.
    pub fn of_connection(extensions: &http::Extensions) -> Result<Self, String> {
        let certs = extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.peer_certs());
        let leaf = certs.as_ref().and_then(|certs| certs.first()).ok_or_else(|| {
            "the node protocol requires a client certificate signed by the control plane's node CA \
             (mutual TLS); none was presented"
                .to_owned()
        })?;
        Self::from_der(leaf.as_ref())
    }

    /// The names of a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<Self, String> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| format!("cannot read the client certificate: {e}"))?;
        let mut names: Vec<String> =
            cert.subject().iter_common_name().filter_map(|cn| cn.as_str().ok()).map(str::to_owned).collect();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::DNSName(dns) = name {
                    names.push((*dns).to_owned());
                }
            }
        }
        Ok(Self { names })
    }

    /// The identity the auth layer put on a node-protocol request; `None`
    /// when the control plane runs without `--node-client-ca`.
    pub fn of<T>(req: &tonic::Request<T>) -> Option<Self> {
        req.extensions().get::<Self>().cloned()
    }

    /// Admits the `node_id` a hello claims only if the certificate was
    /// issued for it (no certificate required: anything goes).
    pub fn admit(identity: Option<&Self>, node_id: &str) -> Result<(), Status> {
        let Some(identity) = identity else { return Ok(()) };
        if identity.names.iter().any(|name| name == node_id) {
            return Ok(());
        }
        let names = if identity.names.is_empty() { "none".to_owned() } else { identity.names.join(", ") };
        tracing::warn!(node_id, certificate_names = %names, "node refused: its node id is not its certificate's");
        Err(Status::permission_denied(format!(
            "node id `{node_id}` does not match the client certificate, which was issued for: {names} \
             (subject CN and DNS names)"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(names: &[&str]) -> NodeIdentity {
        NodeIdentity { names: names.iter().map(|n| (*n).to_owned()).collect() }
    }

    #[test]
    fn test_a_node_id_must_be_one_of_the_certificate_names() {
        let id = identity(&["node-a", "node-a.nodes.example"]);
        assert!(NodeIdentity::admit(Some(&id), "node-a").is_ok());
        assert!(NodeIdentity::admit(Some(&id), "node-a.nodes.example").is_ok());
        for other in ["node-b", "NODE-A", "node-a.", ""] {
            let status = NodeIdentity::admit(Some(&id), other).unwrap_err();
            assert_eq!(status.code(), tonic::Code::PermissionDenied, "{other}");
            assert!(status.message().contains(&format!("`{other}`")), "{}", status.message());
        }
        let status = NodeIdentity::admit(Some(&identity(&[])), "node-a").unwrap_err();
        assert!(status.message().contains("issued for: none"), "{}", status.message());
    }

    #[test]
    fn test_without_mutual_tls_any_node_id_is_admitted() {
        assert!(NodeIdentity::admit(None, "node-b").is_ok());
    }

    #[test]
    fn test_a_connection_without_a_certificate_has_no_identity() {
        let error = NodeIdentity::of_connection(&http::Extensions::new()).unwrap_err();
        assert!(error.contains("requires a client certificate"), "{error}");
        assert!(NodeIdentity::from_der(b"not a certificate").is_err());
    }
}
