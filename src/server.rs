//! Runs the server on a bound listener until a shutdown signal, then
//! drains: health NOT_SERVING, waiting calls answered, new calls refused,
//! calls in progress given a grace period.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::auth::TokenAuth;
use crate::broker::Broker;
use crate::grpc_metrics::GrpcMetricsLayer;
use crate::http::Sources;
use crate::limits::{Connections, GuardLayer};
use crate::pb::task_queue_server::{SERVICE_NAME, TaskQueueServer};
use crate::rpc::TaskQueueService;
use crate::store::Store;
use crate::store::postgres::PgStore;

pub use crate::auth::{TokenError, Tokens};
pub use crate::broker::{BrokerConfig, RetryBackoff};
pub use crate::http::{DEFAULT_METRICS_MAX_QUEUES, HttpConfig};
pub use crate::store::postgres::{
    DEFAULT_MAX_PENDING, DEFAULT_POOL_SIZE, DEFAULT_SCHEMA, DEFAULT_STATEMENT_TIMEOUT, PgError,
    PostgresConfig, migrate,
};
pub use crate::tls::{Identity, ServerTls, TlsError, read_certificates};

/// Everything the server needs, validated.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Limits and defaults of the queue engine.
    pub broker: BrokerConfig,
    /// Accepted bearer tokens; empty means no authentication.
    pub tokens: Tokens,
    /// Longest wait of a blocking call without a deadline.
    pub max_wait: Duration,
    /// How long calls in progress may take after a shutdown signal.
    pub shutdown_grace: Duration,
    /// TLS, when the server speaks it.
    pub tls: Option<ServerTls>,
    /// Most tasks in one PutTasks (and ids in one WatchResults).
    pub max_batch: usize,
    /// Caps and timers of connections and calls.
    pub transport: TransportConfig,
    /// The HTTP listener (metrics, probes).
    pub http: HttpConfig,
    /// Where tasks and results live.
    pub store: StoreConfig,
}

/// Where the server keeps tasks and results (`--store`).
#[derive(Clone, Debug, Default)]
pub enum StoreConfig {
    /// In this process's memory: the fastest, lost on restart, one server.
    #[default]
    Memory,
    /// In PostgreSQL: durable once acknowledged, shared by servers.
    Postgres(PostgresConfig),
}

/// What bounds connections and calls, in front of the engine's own caps.
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// Most connections open at once; more are closed on accept.
    pub max_connections: usize,
    /// How long a new connection may take to send the first 24 bytes of
    /// its handshake before it is closed.
    pub handshake_timeout: Duration,
    /// Most calls in progress across all connections (waiting calls
    /// included); more are shed with RESOURCE_EXHAUSTED. Health is exempt.
    pub max_calls: usize,
    /// Most concurrent HTTP/2 streams (calls) on one connection; a client
    /// queues the rest on its side.
    pub max_streams_per_connection: u32,
    /// How often an idle connection is pinged.
    pub keepalive_interval: Duration,
    /// How long a ping may go unanswered before the connection is dropped
    /// and what its calls held goes back.
    pub keepalive_timeout: Duration,
    /// Age after which a connection is asked to go away (GOAWAY): new calls
    /// move to a fresh connection, calls in progress finish. `None`: never.
    pub max_connection_age: Option<Duration>,
}

/// Default of [`TransportConfig::max_connections`] (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default of [`TransportConfig::handshake_timeout`] (`--handshake-timeout`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`TransportConfig::max_calls`] (`--max-calls`).
pub const DEFAULT_MAX_CALLS: usize = 20_000;
/// Default of [`TransportConfig::max_streams_per_connection`]
/// (`--max-streams-per-connection`).
pub const DEFAULT_MAX_STREAMS_PER_CONNECTION: u32 = 1_000;
/// Default of [`TransportConfig::keepalive_interval`] (`--keepalive-interval`).
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// Default of [`TransportConfig::keepalive_timeout`] (`--keepalive-timeout`).
pub const DEFAULT_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default of [`TransportConfig::max_connection_age`]
/// (`--max-connection-age`): an hour.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(3600);

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_calls: DEFAULT_MAX_CALLS,
            max_streams_per_connection: DEFAULT_MAX_STREAMS_PER_CONNECTION,
            keepalive_interval: DEFAULT_KEEPALIVE_INTERVAL,
            keepalive_timeout: DEFAULT_KEEPALIVE_TIMEOUT,
            max_connection_age: Some(DEFAULT_MAX_CONNECTION_AGE),
        }
    }
}

/// Default of [`ServerConfig::max_wait`] (`--max-wait`).
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(20);
/// Default of [`ServerConfig::shutdown_grace`] (`--shutdown-grace`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// Default of [`ServerConfig::max_batch`] (`--max-batch`): the gRPC
/// layer's own, named here with the server's other defaults.
pub const DEFAULT_MAX_BATCH: usize = crate::rpc::service::DEFAULT_MAX_BATCH;

impl Default for ServerConfig {
    /// The engine's defaults, no tokens, no TLS.
    fn default() -> Self {
        Self::new(BrokerConfig::default())
    }
}

impl ServerConfig {
    /// A configuration with the given engine settings, the server's
    /// defaults and no tokens.
    pub fn new(broker: BrokerConfig) -> Self {
        Self {
            broker,
            tokens: Tokens::none(),
            max_wait: DEFAULT_MAX_WAIT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            tls: None,
            max_batch: DEFAULT_MAX_BATCH,
            transport: TransportConfig::default(),
            http: HttpConfig::default(),
            store: StoreConfig::Memory,
        }
    }

    /// The gRPC decode limit: above the payload limit plus room for the
    /// other fields, so an oversized payload gets the clear
    /// INVALID_ARGUMENT of the broker, not a transport error.
    fn decode_limit(&self) -> usize {
        self.broker.max_payload.max(self.broker.max_result) + 1024 * 1024
    }
}

/// The drain's first steps, in this order: health turns NOT_SERVING (so
/// probes and balancers stop sending work here), and only then does the
/// broker close, answering the calls that wait. A worker whose long-poll
/// comes back empty and asks again is thus never routed back here.
async fn begin_drain(health: &tonic_health::server::HealthReporter, broker: &impl Store) {
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    broker.close();
}

/// The listening socket as the server's stream of connections, closed
/// when the drain starts. The transport stops accepting then but keeps its
/// stream (and so the socket) until every connection is done; closing the
/// socket itself makes the kernel refuse new connections at once.
#[derive(Clone)]
struct Listening(Arc<Mutex<Option<TcpListener>>>);

impl Listening {
    fn new(listener: TcpListener) -> Self {
        Self(Arc::new(Mutex::new(Some(listener))))
    }

    /// Closes the socket: new connections are refused.
    fn close(&self) {
        drop(self.0.lock().unwrap_or_else(PoisonError::into_inner).take());
    }
}

impl Stream for Listening {
    type Item = std::io::Result<tokio::net::TcpStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let listener = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        match listener.as_ref() {
            Some(listener) => listener
                .poll_accept(cx)
                .map(|accepted| Some(accepted.map(|(stream, _)| stream))),
            None => Poll::Ready(None),
        }
    }
}

/// The HTTP listener's task, aborted if the server returns before it has
/// stopped it.
struct HttpServing(Option<tokio::task::JoinHandle<std::io::Result<()>>>);

impl HttpServing {
    /// Waits up to `grace` for the HTTP listener to finish its requests
    /// after its shutdown signal; a failure is logged, not returned: gRPC
    /// served regardless.
    async fn stop(mut self, grace: Duration) {
        let Some(task) = self.0.as_mut() else {
            return;
        };
        match tokio::time::timeout(grace, task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::error!(%error, "HTTP listener failed"),
            Ok(Err(error)) => tracing::error!(%error, "HTTP listener task ended abnormally"),
            Err(_) => tracing::warn!("HTTP requests still running after the grace period"),
        }
    }
}

impl Drop for HttpServing {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The transport failed.
    #[error("transport error: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection service could not be built from the descriptors.
    #[error("reflection: {0}")]
    Reflection(tonic_reflection::server::Error),
    /// The listener could not report its address.
    #[error("listener error: {0}")]
    Io(#[from] std::io::Error),
    /// The server task panicked or was cancelled.
    #[error("server task ended abnormally: {0}")]
    Join(#[from] tokio::task::JoinError),
    /// The store could not be opened at start.
    #[error("the postgres store cannot be opened: {0}; check --store and that the database is up")]
    Store(#[from] PgError),
}

/// Serves `taskq.v1.TaskQueue` and `grpc.health.v1.Health` on `listener`
/// until `shutdown` resolves, then drains and returns. With
/// [`HttpConfig::listen`] set, it binds that address too and serves the
/// HTTP endpoints there ([`run_with_http`] takes a bound one instead).
///
/// # Errors
/// A [`ServerError`] when the transport fails or the HTTP address cannot
/// be bound.
///
/// # Examples
///
/// A server on a free loopback port, stopped by a oneshot (a program would
/// pass its signal handler instead):
///
/// ```
/// use taskq::server::{self, ServerConfig};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let address = listener.local_addr()?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// let server = tokio::spawn(server::run(ServerConfig::default(), listener, async {
///     let _ = stopped.await;
/// }));
/// let client = taskq::client::Client::connect(
///     &format!("http://{address}"),
///     taskq::client::ClientOptions::default(),
/// )
/// .await?;
/// assert_eq!(client.stats("").await?.queues.len(), 0);
/// let _ = stop.send(());
/// server.await??; // drained and stopped
/// # Ok(())
/// # }
/// ```
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let http = match config.http.listen {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    run_with_http(config, listener, http, shutdown).await
}

/// [`run`], with the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`)
/// on `http` when it is given, whatever [`HttpConfig::listen`] says. The
/// HTTP listener drains with gRPC: `/readyz` turns 503 when the drain
/// starts, and the listener closes when gRPC has stopped.
///
/// # Errors
/// A [`ServerError`] when the transport fails.
pub async fn run_with_http(
    config: ServerConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    match &config.store {
        StoreConfig::Memory => {
            let broker = Broker::new(config.broker.clone());
            serve(broker, config, listener, http, shutdown).await
        }
        StoreConfig::Postgres(store) => {
            let store = PgStore::connect(store, config.broker.clone()).await?;
            serve(store, config, listener, http, shutdown).await
        }
    }
}

/// Serves `broker` (the store chosen) until `shutdown`, then drains.
async fn serve<S: Store>(
    broker: S,
    config: ServerConfig,
    listener: TcpListener,
    http: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let health_probe = tonic_health::server::HealthService::from_health_reporter(health.clone());
    let queue_service = TaskQueueServer::new(
        TaskQueueService::new(broker.clone(), config.max_wait).with_max_batch(config.max_batch),
    )
    .max_decoding_message_size(config.decode_limit());
    let auth = TokenAuth::new(config.tokens.clone());
    let queue_service = InterceptedService::new(queue_service, auth.clone());
    // Reflection lets grpcurl, Postman and evans list and call the service
    // without the proto file; like the queue, it needs a token.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1().map_err(ServerError::Reflection)?;
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(ServerError::Reflection)?;

    let addr = listener.local_addr()?;
    let transport = &config.transport;
    let connections = Connections::new(transport.max_connections, transport.handshake_timeout);
    let guard = GuardLayer::new(transport.max_calls);
    let calls = GrpcMetricsLayer::new();
    let sources = Sources {
        store: broker.clone(),
        tokens: config.tokens.clone(),
        health: Arc::new(health_probe),
        connections: connections.clone(),
        guard: guard.clone(),
        calls: calls.clone(),
        metrics_open: config.http.metrics_open,
        labels: crate::metrics::QueueLabels::new(config.http.metrics_max_queues),
        prefix: config.http.path_prefix.clone(),
        history: crate::status::History::new(
            config.http.status_sample_every,
            config.http.metrics_max_queues,
        ),
    };
    let listening = Listening::new(listener);
    let incoming = listening.clone().filter_map(move |stream| {
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => return Some(Err(error)),
        };
        // Small request/answer messages: do not wait to fill a segment.
        if let Err(error) = stream.set_nodelay(true) {
            return Some(Err(error));
        }
        connections.admit(stream).map(Ok::<_, std::io::Error>)
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        let mut tls_config = ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(
            &tls.identity.cert,
            &tls.identity.key,
        ));
        if let Some(ca) = &tls.client_ca {
            tls_config = tls_config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder.tls_config(tls_config)?;
    }
    // HTTP/2 keepalive finds peers that vanished without closing (a
    // partitioned worker holding a long-poll), so their calls are dropped
    // and what they held goes back.
    builder = builder
        .http2_keepalive_interval(Some(transport.keepalive_interval))
        .http2_keepalive_timeout(Some(transport.keepalive_timeout))
        .max_concurrent_streams(transport.max_streams_per_connection);
    if let Some(age) = transport.max_connection_age {
        builder = builder.max_connection_age(age);
    }
    let serve = builder
        // Outermost, so that shed calls and panics answered INTERNAL are
        // counted too.
        .layer(tower::ServiceBuilder::new().layer(calls).layer(guard))
        .add_service(health_service)
        .add_service(queue_service)
        .add_service(InterceptedService::new(reflection_v1, auth.clone()))
        .add_service(InterceptedService::new(reflection_v1alpha, auth))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stopped.await;
        });
    // Ready before the first connection is accepted: a probe never sees
    // the service as unknown.
    health
        .set_service_status(SERVICE_NAME, ServingStatus::Serving)
        .await;
    let mut serving = tokio::spawn(serve);
    let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_serving = http.map(|http| {
        tokio::spawn(crate::http::serve(http, sources, async {
            let _ = http_stopped.await;
        }))
    });
    let http_serving = HttpServing(http_serving);
    tracing::info!(
        %addr,
        http = %http_addr.map_or_else(
            || "off".to_string(),
            |a| format!("http://{a}{}/status", config.http.path_prefix),
        ),
        auth = if config.tokens.is_empty() { "none" } else { "bearer tokens" },
        tls = match &config.tls {
            None => "off",
            Some(ServerTls { client_ca: None, .. }) => "on",
            Some(_) => "mutual",
        },
        tokens = config.tokens.len(),
        store = broker.kind(),
        "taskq serving"
    );

    tokio::select! {
        () = shutdown => {}
        ended = &mut serving => {
            tracing::error!("server stopped before a shutdown signal");
            return ended?.map_err(ServerError::from);
        }
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutdown signal: draining");
    begin_drain(&health, &broker).await;
    // New connections are refused from now on (clients go elsewhere at
    // once, rather than wait in the listen queue until the server stops).
    listening.close();
    let _ = stop.send(());
    let result = match tokio::time::timeout(config.shutdown_grace, &mut serving).await {
        Ok(ended) => ended?.map_err(ServerError::from),
        Err(_) => {
            tracing::warn!(
                grace = ?config.shutdown_grace,
                "calls still running after the grace period; stopping anyway"
            );
            serving.abort();
            Ok(())
        }
    };
    // Worker streams cut by the stop give their tasks back now, as a
    // stream that breaks does (those that ended in the grace already did).
    broker.release_streams().await;
    let _ = http_stop.send(());
    http_serving.stop(config.shutdown_grace).await;
    let held = broker.holdings();
    if broker.kind() == "memory" {
        tracing::info!(
            tasks = held.tasks,
            results = held.results,
            "taskq stopped; held tasks and results were in memory only and are dropped"
        );
    } else {
        tracing::info!(
            store = broker.kind(),
            "taskq stopped; tasks and results stay in the store"
        );
    }
    result
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use tokio_stream::StreamExt;
    use tonic_health::ServingStatus;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_check_response::ServingStatus as Status;
    use tonic_health::pb::health_server::Health;
    use tonic_health::server::{HealthReporter, HealthService};

    use super::{BrokerConfig, SERVICE_NAME, begin_drain};
    use crate::broker::{Broker, LeaseRequest, QueueName, WorkerId};

    /// Health turns NOT_SERVING before any waiting call is answered. Each
    /// side records when it wakes; on this single-threaded runtime woken
    /// tasks run in the order they were woken, so the record is the order
    /// in which the drain did the two things.
    #[tokio::test(flavor = "current_thread")]
    async fn health_turns_before_any_waiting_call_is_answered() {
        let health = HealthReporter::new();
        let service = HealthService::from_health_reporter(health.clone());
        health
            .set_service_status(SERVICE_NAME, ServingStatus::Serving)
            .await;
        let broker = Broker::new(BrokerConfig::default());
        let order = Arc::new(Mutex::new(Vec::new()));

        let request = tonic::Request::new(HealthCheckRequest {
            service: SERVICE_NAME.into(),
        });
        let mut watch = service.watch(request).await.unwrap().into_inner();
        let first = watch.next().await.unwrap().unwrap();
        assert_eq!(first.status(), Status::Serving);
        let watcher = tokio::spawn({
            let order = order.clone();
            async move {
                while let Some(Ok(answer)) = watch.next().await {
                    if answer.status() == Status::NotServing {
                        order.lock().unwrap().push("health");
                        return;
                    }
                }
            }
        });
        let waiter = tokio::spawn({
            let (broker, order) = (broker.clone(), order.clone());
            async move {
                let request = LeaseRequest {
                    queue: QueueName::parse("q").unwrap(),
                    worker: WorkerId::new("w").unwrap(),
                    lease_duration: None,
                };
                let task = broker.lease(request, Duration::from_secs(600)).await;
                order.lock().unwrap().push("waiting call");
                assert!(task.unwrap().is_none(), "answered empty by the drain");
            }
        });
        // Both wait now.
        tokio::task::yield_now().await;
        assert!(order.lock().unwrap().is_empty());

        begin_drain(&health, &broker).await;
        // Bounded, so that a drain that does not turn health fails here
        // rather than hanging the test run.
        tokio::time::timeout(Duration::from_secs(5), watcher)
            .await
            .expect("health turns NOT_SERVING when the drain begins")
            .unwrap();
        waiter.await.unwrap();
        assert_eq!(*order.lock().unwrap(), ["health", "waiting call"]);
    }
}
