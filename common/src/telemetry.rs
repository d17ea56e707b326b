//! Logging (tracing, text or JSON, filtered by `RUST_LOG`), Sentry when
//! `SENTRY_DSN` is set, and the process shutdown signal.

use std::str::FromStr;

use tokio_util::sync::CancellationToken;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" => Ok(Self::Text),
            "json" => Ok(Self::Json),
            other => Err(format!("unknown log format `{other}` (expected text or json)")),
        }
    }
}

/// Keeps Sentry flushing until dropped at the end of `main`.
pub struct TelemetryGuard {
    _sentry: Option<sentry::ClientInitGuard>,
}

/// Installs the global subscriber. Call once, from `main`.
pub fn init(service: &'static str, format: LogFormat, sentry_dsn: Option<&str>) -> TelemetryGuard {
    let sentry = sentry_dsn.filter(|d| !d.is_empty()).map(|dsn| {
        sentry::init((
            dsn,
            sentry::ClientOptions {
                release: sentry::release_name!(),
                server_name: Some(service.into()),
                // Never attach request data or local variables: they may hold secrets.
                send_default_pii: false,
                ..Default::default()
            },
        ))
    });
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt_layer = match format {
        LogFormat::Text => fmt::layer().with_target(true).boxed(),
        LogFormat::Json => fmt::layer().json().flatten_event(true).with_current_span(true).boxed(),
    };
    let sentry_layer = sentry.as_ref().map(|_| sentry_tracing::layer());
    tracing_subscriber::registry().with(filter).with(fmt_layer).with(sentry_layer).init();
    TelemetryGuard { _sentry: sentry }
}

/// A token cancelled on the first SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("failed to install SIGTERM handler");
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        cancel.cancel();
    });
    token
}

/// Serves Prometheus text at `http://<addr>/metrics` for the `metrics` macros.
pub fn install_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new().with_http_listener(addr).install()?;
    tracing::info!(%addr, "metrics endpoint listening");
    Ok(())
}
