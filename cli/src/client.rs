//! The connection to the control plane: the generated clients over one lazy
//! channel for requests (with a deadline) and one for streams (without),
//! TLS when asked for, and the bearer token on every call.

use std::future::Future;
use std::time::Duration;

use kt_proto::v1::event_service_client::EventServiceClient;
use kt_proto::v1::message_set_service_client::MessageSetServiceClient;
use kt_proto::v1::trigger_service_client::TriggerServiceClient;
use kt_proto::v1::work_order_service_client::WorkOrderServiceClient;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::Status;

use crate::args::Global;
use crate::error::{CliError, Result};

/// How long to wait for the TCP (and TLS) connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

pub type Svc = InterceptedService<Channel, Bearer>;

/// Adds `authorization: Bearer <token>` to every call when a token is set.
#[derive(Clone)]
pub struct Bearer(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            req.metadata_mut().insert("authorization", value.clone());
        }
        Ok(req)
    }
}

#[derive(Clone)]
pub struct Api {
    server: String,
    unary: Svc,
    stream: Svc,
}

impl Api {
    pub fn connect(global: &Global) -> Result<Self> {
        let token = match global.token.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(t) => Some(
                format!("Bearer {t}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| CliError::usage("the API token must be printable ASCII"))?,
            ),
        };
        let endpoint = endpoint(global)?;
        let unary = endpoint.clone().timeout(Duration::from_secs(global.timeout.max(1))).connect_lazy();
        let stream = endpoint.connect_lazy();
        Ok(Self {
            server: global.server.clone(),
            unary: InterceptedService::new(unary, Bearer(token.clone())),
            stream: InterceptedService::new(stream, Bearer(token)),
        })
    }

    pub fn triggers(&self) -> TriggerServiceClient<Svc> {
        TriggerServiceClient::new(self.unary.clone())
    }

    pub fn sets(&self) -> MessageSetServiceClient<Svc> {
        MessageSetServiceClient::new(self.unary.clone())
    }

    pub fn work_orders(&self) -> WorkOrderServiceClient<Svc> {
        WorkOrderServiceClient::new(self.unary.clone())
    }

    /// For `StreamEvents`: no deadline on the channel.
    pub fn events(&self) -> EventServiceClient<Svc> {
        EventServiceClient::new(self.stream.clone())
    }

    /// Awaits one call and turns its error into a [`CliError`].
    pub async fn call<T>(&self, call: impl Future<Output = Result<tonic::Response<T>, Status>>) -> Result<T> {
        call.await.map(tonic::Response::into_inner).map_err(|s| self.error(s))
    }

    pub fn error(&self, status: Status) -> CliError {
        CliError::Status { status, server: self.server.clone() }
    }

    pub fn server(&self) -> &str {
        &self.server
    }
}

fn endpoint(global: &Global) -> Result<Endpoint> {
    let url = global.server.trim();
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|e| CliError::usage(format!("--server `{url}` is not a URL: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true);
    let https = url.starts_with("https://");
    let wants_tls =
        global.tls_ca.is_some() || global.tls_cert.is_some() || global.tls_key.is_some() || global.tls_domain.is_some();
    if !https {
        if wants_tls {
            return Err(CliError::usage(format!("the --tls-* options need an https:// --server, not `{url}`")));
        }
        if !url.starts_with("http://") {
            return Err(CliError::usage(format!("--server `{url}` must start with http:// or https://")));
        }
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new();
    match &global.tls_ca {
        Some(path) => tls = tls.ca_certificate(Certificate::from_pem(read(path, "--tls-ca")?)),
        None => tls = tls.with_native_roots(),
    }
    match (&global.tls_cert, &global.tls_key) {
        (Some(cert), Some(key)) => {
            tls = tls.identity(Identity::from_pem(read(cert, "--tls-cert")?, read(key, "--tls-key")?));
        }
        (None, None) => {}
        _ => return Err(CliError::usage("--tls-cert and --tls-key go together")),
    }
    if let Some(domain) = &global.tls_domain {
        tls = tls.domain_name(domain.clone());
    }
    endpoint.tls_config(tls).map_err(|e| CliError::usage(format!("invalid TLS configuration: {e}")))
}

fn read(path: &std::path::Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| CliError::usage(format!("{flag} {}: {e}", path.display())))
}
