//! The live status page of the HTTP listener (`/status`): health,
//! version, uptime and throughput, the queues with sparklines of their
//! last hour, the workers, and a task lookup by id. The same data as JSON
//! for scripts (`Accept: application/json`), and as server-sent events
//! (`/status/events`) that keep the page current without a reload.
//!
//! The page is hand-written HTML, CSS and JavaScript embedded in the
//! binary (`page.html`, `app.css`, `app.js`): no build step, nothing
//! loaded from elsewhere, a Content-Security-Policy that allows only this
//! origin. Every URL it uses is under `--http-path-prefix`, so it works
//! behind a reverse proxy's path.
//!
//! Reading it needs a monitor or admin token (unless no tokens are
//! configured), presented as `Authorization: Bearer` or exchanged at the
//! sign-in for an HttpOnly, SameSite=Strict session cookie
//! (`session.rs`). A scrape of the page reads one snapshot and the
//! worker table: nothing proportional to the tasks held.
//!
//! May not touch: the engine beyond the [`Store`] calls that read, `rpc`,
//! `pb`, `http` (which mounts these routes).

mod history;
mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::time::Instant;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::server::HealthService;

use crate::auth::{Call, Tokens};
use crate::broker::{BrokerError, TaskId, TaskState};
use crate::store::Store;
pub use history::{DEFAULT_SAMPLE_EVERY, History};
pub use session::Sessions;
use session::{COOKIE, SESSION_TTL, cookie, form_field};

/// How often an open page gets fresh numbers.
const EVENT_EVERY: Duration = Duration::from_secs(1);

/// Most pages open at once (event streams); more are answered 503.
const MAX_EVENT_STREAMS: usize = 64;

/// Most workers listed, the most recently seen first.
const MAX_WORKERS_LISTED: usize = 200;

const PAGE: &str = include_str!("page.html");
const SIGN_IN: &str = include_str!("sign_in.html");
const SCRIPT: &str = include_str!("app.js");
const STYLE: &str = include_str!("app.css");

/// Only this origin's script, style and connections; no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self'; form-action 'self'; \
                   frame-ancestors 'none'; base-uri 'none'";

/// Everything the status page reads.
pub(crate) struct StatusSources<S> {
    pub store: S,
    pub tokens: Tokens,
    pub health: Arc<HealthService>,
    pub history: History,
    /// `--http-path-prefix`: empty, or `/` and a path without a trailing
    /// slash.
    pub prefix: String,
    pub started: Instant,
    pub sessions: Sessions,
    pub event_streams: Arc<AtomicUsize>,
}

/// The routes of the status page, under the prefix.
pub(crate) fn routes<S: Store>(sources: Arc<StatusSources<S>>) -> Router {
    Router::new()
        .route("/status", get(page::<S>))
        .route("/status/events", get(events::<S>))
        .route("/status/task/{id}", get(task::<S>))
        .route("/status/sign-in", post(sign_in::<S>))
        .route("/status/sign-out", post(sign_out::<S>))
        .route("/status/app.js", get(script))
        .route("/status/app.css", get(style))
        .with_state(sources)
}

/// Samples the history every interval until dropped (the caller aborts
/// it with the listener).
pub(crate) async fn sample<S: Store>(store: S, history: History) {
    let mut ticks = tokio::time::interval(history.every());
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match store.snapshot().await {
            Ok(snapshot) => history.record(&snapshot),
            Err(error) => tracing::debug!(%error, "status history: no sample"),
        }
    }
}

/// Why a request was refused.
enum Refusal {
    /// No token, or not a known one.
    SignIn(&'static str),
    /// A known token that may not read the page.
    Forbidden(String),
}

impl<S: Store> StatusSources<S> {
    /// Checks the session cookie or the bearer token of a request.
    fn authorize(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.tokens.is_empty() {
            return Ok(());
        }
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "))
            .map(<[u8]>::to_vec);
        let token = bearer.or_else(|| self.session(headers).and_then(|id| self.sessions.token(id)));
        let Some(token) = token else {
            return Err(Refusal::SignIn("sign in with a monitor or admin token"));
        };
        self.check(&token)
    }

    fn check(&self, token: &[u8]) -> Result<(), Refusal> {
        let Some(access) = self.tokens.access(token) else {
            return Err(Refusal::SignIn(
                "that token is not known here: use a monitor or admin token from the token file",
            ));
        };
        access
            .permit(Call::ReadMetrics)
            .map_err(|status| Refusal::Forbidden(status.message().to_string()))?;
        if access.limits_queues() {
            return Err(Refusal::Forbidden(
                "the status page covers every queue: use a token without a queue list".into(),
            ));
        }
        Ok(())
    }

    fn session<'h>(&self, headers: &'h HeaderMap) -> Option<&'h str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(|value| cookie(value, COOKIE))
    }

    /// The path of the status page.
    fn page_path(&self) -> String {
        format!("{}/status", self.prefix)
    }

    async fn serving(&self) -> bool {
        let request = tonic::Request::new(HealthCheckRequest {
            service: String::new(),
        });
        match self.health.check(request).await {
            Ok(answer) => answer.into_inner().status() == ServingStatus::Serving,
            Err(_) => false,
        }
    }

    /// The page's data: one snapshot, the worker table, the history.
    async fn report(&self) -> Result<Value, BrokerError> {
        let snapshot = self.store.snapshot().await?;
        let mut workers = self.store.workers().await?;
        let serving = self.serving().await;
        let every = self.history.every().as_secs_f64();
        let mut finished_per_second = 0.0;
        let mut enqueued_per_second = 0.0;
        let queues: Vec<Value> = snapshot
            .queues
            .iter()
            .map(|q| {
                let history = self.history.of(&q.queue);
                let last = |rates: &[f64]| rates.last().copied().unwrap_or(0.0);
                enqueued_per_second += last(&history.enqueued_per_second);
                finished_per_second += last(&history.finished_per_second);
                json!({
                    "queue": q.queue,
                    "ready": q.pending,
                    "delayed": q.delayed,
                    "leased": q.leased,
                    "oldest_ready_age_seconds": q.oldest_pending_age.as_secs_f64(),
                    "enqueued": q.enqueued,
                    "succeeded": q.succeeded,
                    "failed": q.failed.saturating_sub(q.expired),
                    "expired": q.expired,
                    "cancelled": q.cancelled,
                    "retried": q.retried_after_error + q.retried_after_lease_expiry,
                    "worker_streams": q.worker_streams,
                    "paused": q.paused,
                    "enqueued_per_second": last(&history.enqueued_per_second),
                    "finished_per_second": last(&history.finished_per_second),
                    "failure_ratio": history.failure_ratio,
                    "history": {
                        "enqueued_per_second": history.enqueued_per_second,
                        "finished_per_second": history.finished_per_second,
                    },
                })
            })
            .collect();
        let now = SystemTime::now();
        workers.sort_by_key(|w| std::cmp::Reverse(w.last_seen));
        let listed: Vec<Value> = workers
            .iter()
            .take(MAX_WORKERS_LISTED)
            .map(|w| {
                json!({
                    "worker": w.worker.as_str(),
                    "queue": w.queue.as_ref().map(|q| q.as_str()),
                    "in_flight": w.in_flight,
                    "last_seen_seconds_ago": now
                        .duration_since(w.last_seen)
                        .unwrap_or_default()
                        .as_secs_f64(),
                    "alive": w.alive,
                    "leases": w.leases.iter().map(|(task, until)| json!({
                        "task_id": task.to_string(),
                        "expires_in_seconds": until
                            .duration_since(now)
                            .unwrap_or_default()
                            .as_secs_f64(),
                    })).collect::<Vec<Value>>(),
                })
            })
            .collect();
        let failures: Vec<Value> = snapshot
            .recent_failures
            .iter()
            .map(|f| {
                json!({
                    "task_id": f.task_id.to_string(),
                    "queue": f.queue.as_str(),
                    "error": f.error,
                    "attempts": f.attempts,
                    "worker": f.worker.as_ref().map(|w| w.as_str()),
                    "finished_at_unix": unix(f.finished_at),
                    "seconds_ago": now.duration_since(f.finished_at).unwrap_or_default().as_secs_f64(),
                })
            })
            .collect();
        Ok(json!({
            "version": env!("CARGO_PKG_VERSION"),
            "health": if serving { "serving" } else { "draining" },
            "store": self.store.kind(),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "held_bytes": snapshot.held_bytes,
            "held_bytes_limit": snapshot.held_bytes_limit,
            "workers_alive": snapshot.workers_alive,
            "enqueued_per_second": enqueued_per_second,
            "finished_per_second": finished_per_second,
            "history_interval_seconds": every,
            "queues": queues,
            "workers": listed,
            "workers_known": workers.len(),
            "recent_failures": failures,
        }))
    }
}

/// A JSON answer (axum's `json` feature would bring serde's derive for
/// this alone).
struct Json(Value);

impl IntoResponse for Json {
    fn into_response(self) -> Response {
        (
            [(header::CONTENT_TYPE, "application/json")],
            self.0.to_string(),
        )
            .into_response()
    }
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|accept| accept.contains("application/json"))
}

/// An HTML answer with the page's security headers.
fn html(status: StatusCode, body: String) -> Response {
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn sign_in_page<S>(sources: &StatusSources<S>, status: StatusCode, message: &str) -> Response {
    let body = SIGN_IN
        .replace(
            "{{action}}",
            &escape(&format!("{}/status/sign-in", sources.prefix)),
        )
        .replace("{{message}}", &escape(message));
    html(status, body)
}

fn refuse<S: Store>(sources: &StatusSources<S>, refusal: Refusal, json: bool) -> Response {
    let (status, message) = match refusal {
        Refusal::SignIn(message) => (StatusCode::UNAUTHORIZED, message.to_string()),
        Refusal::Forbidden(message) => (StatusCode::FORBIDDEN, message),
    };
    if json {
        return (status, Json(json!({ "error": message }))).into_response();
    }
    sign_in_page(sources, status, &message)
}

fn unavailable(error: &BrokerError) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({ "error": error.to_string() })),
    )
        .into_response()
}

async fn page<S: Store>(
    State(sources): State<Arc<StatusSources<S>>>,
    headers: HeaderMap,
) -> Response {
    let json = wants_json(&headers);
    if let Err(refusal) = sources.authorize(&headers) {
        return refuse(&sources, refusal, json);
    }
    if json {
        return match sources.report().await {
            Ok(report) => Json(report).into_response(),
            Err(error) => unavailable(&error),
        };
    }
    let signed_in = !sources.tokens.is_empty();
    let body = PAGE
        .replace("{{prefix}}", &escape(&sources.prefix))
        .replace("{{version}}", env!("CARGO_PKG_VERSION"))
        .replace("{{sign_out}}", if signed_in { "" } else { "hidden" });
    html(StatusCode::OK, body)
}

/// Counts an open event stream; given back when the stream ends.
struct EventSlot(Arc<AtomicUsize>);

impl Drop for EventSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn events<S: Store>(
    State(sources): State<Arc<StatusSources<S>>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = sources.authorize(&headers) {
        return refuse(&sources, refusal, true);
    }
    let taken = sources
        .event_streams
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < MAX_EVENT_STREAMS).then_some(n + 1)
        });
    if taken.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many status pages open; close one or reload later\n",
        )
            .into_response();
    }
    let slot = EventSlot(sources.event_streams.clone());
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, std::convert::Infallible>>(1);
    // One task per open page, ended by the page leaving (the send fails),
    // its session or token going away, or the drain.
    tokio::spawn(async move {
        let _slot = slot;
        let closed = sources.store.closed();
        tokio::pin!(closed);
        let mut ticks = tokio::time::interval(EVENT_EVERY);
        loop {
            tokio::select! {
                () = &mut closed => return,
                _ = ticks.tick() => {}
            }
            if sources.authorize(&headers).is_err() {
                return;
            }
            let event = match sources.report().await {
                Ok(report) => Event::default().event("status").data(report.to_string()),
                Err(error) => Event::default()
                    .event("unavailable")
                    .data(error.to_string()),
            };
            if tx.send(Ok(event)).await.is_err() {
                return;
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::default())
        .into_response()
}

async fn task<S: Store>(
    State(sources): State<Arc<StatusSources<S>>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = sources.authorize(&headers) {
        return refuse(&sources, refusal, true);
    }
    let Some(task) = TaskId::parse(&id) else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({ "error": "not a task id: ids look like 0190c0de-…" })),
        )
            .into_response();
    };
    match sources.store.result(task, Duration::ZERO).await {
        Ok(Some(result)) => {
            let state = match result.state {
                TaskState::Succeeded => "succeeded",
                TaskState::Failed => "failed",
                TaskState::Cancelled => "cancelled",
                TaskState::Pending => "pending",
                TaskState::Leased => "leased",
            };
            Json(json!({
                "task_id": id,
                "queue": result.queue.as_str(),
                "state": state,
                "attempts": result.attempts,
                "worker": result.worker.as_ref().map(|w| w.as_str()),
                "created_at_unix": unix(result.created_at),
                "finished_at_unix": unix(result.finished_at),
                "result_bytes": result.output.len(),
                "error": result.error,
            }))
            .into_response()
        }
        Ok(None) => match sources.store.describe(task).await {
            Ok(view) => Json(json!({
                "task_id": id,
                "queue": view.queue.as_str(),
                "state": if view.state == TaskState::Leased { "leased" } else { "pending" },
                "attempts": view.attempts,
                "max_attempts": view.max_attempts,
                "worker": view.lease.as_ref().map(|l| l.worker.as_str()),
                "lease_expires_at_unix": view.lease.as_ref().map(|l| unix(l.expires_at)),
                "created_at_unix": unix(view.created_at),
                "expires_at_unix": view.expires_at.map(unix),
                "payload_bytes": view.payload_bytes,
            }))
            .into_response(),
            Err(error) => not_found(&id, &error),
        },
        Err(error) => not_found(&id, &error),
    }
}

/// Seconds since the Unix epoch, as the page's script reads times.
fn unix(time: SystemTime) -> f64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

fn not_found(id: &str, error: &BrokerError) -> Response {
    match error {
        BrokerError::StoreUnavailable { .. } => unavailable(error),
        _ => (
            StatusCode::NOT_FOUND,
            Json(json!({
                "error": format!("no task {id} here: never stored, or its result is no longer held"),
            })),
        )
            .into_response(),
    }
}

/// Checks that a form came from this origin's page: a browser sends
/// `Origin` with every POST; it must name the host the request went to.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        // Not a browser (curl, a script): nothing to forge.
        return true;
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    origin_host.is_some() && origin_host == host
}

async fn sign_in<S: Store>(
    State(sources): State<Arc<StatusSources<S>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return sign_in_page(
            &sources,
            StatusCode::FORBIDDEN,
            "sign in from the status page itself",
        );
    }
    let token = form_field(&body, "token").unwrap_or_default();
    if token.is_empty() {
        return sign_in_page(&sources, StatusCode::UNAUTHORIZED, "enter a token");
    }
    if let Err(refusal) = sources.check(&token) {
        return refuse(&sources, refusal, false);
    }
    let id = sources.sessions.open(&token);
    let cookie = format!(
        "{COOKIE}={id}; Path={}/status; Max-Age={}; HttpOnly; SameSite=Strict",
        sources.prefix,
        SESSION_TTL.as_secs()
    );
    redirect(&sources, cookie)
}

async fn sign_out<S: Store>(
    State(sources): State<Arc<StatusSources<S>>>,
    headers: HeaderMap,
) -> Response {
    if !same_origin(&headers) {
        return StatusCode::FORBIDDEN.into_response();
    }
    if let Some(id) = sources.session(&headers) {
        sources.sessions.close(id);
    }
    let cookie = format!(
        "{COOKIE}=; Path={}/status; Max-Age=0; HttpOnly; SameSite=Strict",
        sources.prefix
    );
    redirect(&sources, cookie)
}

/// 303 to the page, setting `cookie`.
fn redirect<S: Store>(sources: &StatusSources<S>, cookie: String) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&sources.page_path()) {
        headers.insert(header::LOCATION, location);
    }
    if let Ok(cookie) = HeaderValue::from_str(&cookie) {
        headers.insert(header::SET_COOKIE, cookie);
    }
    response
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        SCRIPT,
    )
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        STYLE,
    )
}
