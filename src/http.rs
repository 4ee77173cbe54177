//! The HTTP listener beside gRPC (`--http-listen`): `/metrics` for
//! Prometheus, `/healthz` and `/readyz` for probes that speak only HTTP,
//! and the live status page (`/status`, in `status`). Every route is
//! under `--http-path-prefix`.
//!
//! It reads, never changes: the engine through [`Broker::snapshot`], the
//! health the gRPC health service reports, the transport's counters. It
//! checks the same tokens as gRPC (`/metrics` needs a monitor or admin
//! token unless `--metrics-open`); the probes need none.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

use crate::auth::{Call, Tokens};
use crate::grpc_metrics::GrpcMetricsLayer;
use crate::limits::{Connections, GuardLayer};
pub use crate::metrics::DEFAULT_METRICS_MAX_QUEUES;
use crate::metrics::{Format, QueueLabels, TransportNumbers, render};
pub use crate::status::DEFAULT_SAMPLE_EVERY;
use crate::status::{History, Sessions, StatusSources};
use crate::store::Store;

/// Where the HTTP listener listens and how `/metrics` is guarded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpConfig {
    /// The address [`server::run`](crate::server::run) binds for it;
    /// `None`: no HTTP listener. `taskq serve` defaults to
    /// `127.0.0.1:50052`; the library binds nothing unless asked (tests
    /// pass a listener of their own to
    /// [`server::run_with_http`](crate::server::run_with_http)).
    pub listen: Option<SocketAddr>,
    /// `/metrics` without a token even when tokens are configured.
    pub metrics_open: bool,
    /// Most queues with their own `queue` label; the others are summed
    /// under `queue="_other"`. The status page's history keeps as many.
    pub metrics_max_queues: usize,
    /// The path every route is under (`--http-path-prefix`): empty, or a
    /// path starting with `/` and not ending with one.
    pub path_prefix: String,
    /// How often the status page's history samples the queues' counters
    /// (it keeps an hour).
    pub status_sample_every: Duration,
}

impl Default for HttpConfig {
    /// No listener, `/metrics` guarded, [`DEFAULT_METRICS_MAX_QUEUES`], no
    /// prefix, `DEFAULT_SAMPLE_EVERY` (10 s).
    fn default() -> Self {
        Self {
            listen: None,
            metrics_open: false,
            metrics_max_queues: DEFAULT_METRICS_MAX_QUEUES,
            path_prefix: String::new(),
            status_sample_every: DEFAULT_SAMPLE_EVERY,
        }
    }
}

/// Everything the handlers read.
pub(crate) struct Sources<S> {
    pub store: S,
    pub tokens: Tokens,
    pub health: Arc<HealthService>,
    pub connections: Connections,
    pub guard: GuardLayer,
    pub calls: GrpcMetricsLayer,
    pub metrics_open: bool,
    pub labels: QueueLabels,
    /// `--http-path-prefix`.
    pub prefix: String,
    /// The status page's history.
    pub history: History,
}

/// Serves the HTTP endpoints on `listener` until `shutdown` resolves.
///
/// # Errors
/// When the listener fails.
pub(crate) async fn serve<S: Store>(
    listener: TcpListener,
    sources: Sources<S>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let status = Arc::new(StatusSources {
        store: sources.store.clone(),
        tokens: sources.tokens.clone(),
        health: sources.health.clone(),
        history: sources.history.clone(),
        prefix: sources.prefix.clone(),
        started: tokio::time::Instant::now(),
        sessions: Sessions::default(),
        event_streams: Arc::default(),
    });
    let prefix = sources.prefix.clone();
    // The history's sampler lives as long as the listener.
    let sampler = tokio::spawn(crate::status::sample(
        sources.store.clone(),
        sources.history.clone(),
    ));
    let _sampler = AbortOnDrop(sampler);
    let routes = Router::new()
        .route("/metrics", get(metrics::<S>))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<S>))
        .with_state(Arc::new(sources))
        .merge(crate::status::routes(status));
    let router = if prefix.is_empty() {
        routes
    } else {
        Router::new().nest(&prefix, routes)
    };
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why `/metrics` was refused: the status and what to do.
struct Refusal(StatusCode, String);

/// The answer to a refused `/metrics`.
fn refuse(Refusal(status, message): Refusal) -> Response {
    let mut response = (status, format!("{message}\n")).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, "Bearer".parse().expect("valid"));
    }
    response
}

/// Checks the bearer token of a `/metrics` request.
fn authorize<S>(sources: &Sources<S>, headers: &HeaderMap) -> Result<(), Refusal> {
    if sources.metrics_open || sources.tokens.is_empty() {
        return Ok(());
    }
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    let Some(access) = presented.and_then(|token| sources.tokens.access(token)) else {
        return Err(Refusal(
            StatusCode::UNAUTHORIZED,
            "send `Authorization: Bearer <token>` with a monitor or admin token".into(),
        ));
    };
    if let Err(status) = access.permit(Call::ReadMetrics) {
        return Err(Refusal(StatusCode::FORBIDDEN, status.message().into()));
    }
    if access.limits_queues() {
        return Err(Refusal(
            StatusCode::FORBIDDEN,
            "/metrics covers every queue: use a token without a queue list".into(),
        ));
    }
    Ok(())
}

async fn metrics<S: Store>(State(sources): State<Arc<Sources<S>>>, headers: HeaderMap) -> Response {
    if let Err(refusal) = authorize(&sources, &headers) {
        return refuse(refusal);
    }
    let format = Format::from_accept(
        headers
            .get(header::ACCEPT)
            .and_then(|value| value.to_str().ok()),
    );
    let transport = TransportNumbers {
        connections: sources.connections.open() as u64,
        calls_shed: sources.guard.shed(),
    };
    let snapshot = match sources.store.snapshot().await {
        Ok(snapshot) => snapshot,
        Err(error) => {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")).into_response();
        }
    };
    let calls = sources.calls.numbers();
    let body = render(&snapshot, transport, calls, &sources.labels, format);
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

/// 200 while the process serves HTTP at all.
async fn healthz() -> &'static str {
    "ok\n"
}

/// 200 while the gRPC health service reports SERVING, 503 otherwise (from
/// the start of a drain): the same truth as `grpc.health.v1`.
async fn readyz<S: Store>(State(sources): State<Arc<Sources<S>>>) -> (StatusCode, &'static str) {
    let request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    let serving = match sources.health.check(request).await {
        Ok(answer) => answer.into_inner().status() == ServingStatus::Serving,
        Err(_) => false,
    };
    if serving {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: draining\n")
    }
}
