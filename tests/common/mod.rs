//! A real server on 127.0.0.1:0 for integration tests, with clients; a
//! real PostgreSQL in `postgres`, a faulty network in `proxy`, the history
//! check of the load tests with faults in `history`.
#![allow(dead_code)]

pub mod history;
pub mod pki;
pub mod postgres;
pub mod proxy;

use std::net::SocketAddr;
use std::time::Duration;

use taskq::pb::task_queue_client::TaskQueueClient;
use taskq::server::BrokerConfig;
use taskq::server::{self, PostgresConfig, ServerConfig, ServerError, StoreConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

pub type Client = TaskQueueClient<Channel>;
type AddToken = Box<dyn FnMut(Request<()>) -> Result<Request<()>, Status> + Send + Sync>;
pub type AuthClient = TaskQueueClient<InterceptedService<Channel, AddToken>>;

pub struct TestServer {
    pub addr: SocketAddr,
    /// The database of a server on the PostgreSQL store.
    pub database: Option<postgres::TestDatabase>,
    /// The HTTP listener's address, for servers started `with_http`.
    pub http: Option<SocketAddr>,
    stop: Option<oneshot::Sender<()>>,
    handle: JoinHandle<Result<(), ServerError>>,
}

impl TestServer {
    pub async fn spawn() -> Self {
        Self::with_config(ServerConfig::new(BrokerConfig::default())).await
    }

    pub async fn with_broker(broker: BrokerConfig) -> Self {
        Self::with_config(ServerConfig::new(broker)).await
    }

    pub async fn with_config(config: ServerConfig) -> Self {
        Self::at("127.0.0.1:0".parse().unwrap(), config).await
    }

    /// A server on a given address: used to restart one where it was.
    pub async fn at(addr: SocketAddr, mut config: ServerConfig) -> Self {
        let database = use_store_under_test(&mut config).await;
        // A plaintext health check: not for a server that speaks TLS.
        let postgres = matches!(config.store, StoreConfig::Postgres(_)) && config.tls.is_none();
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::run(config, listener, async {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            database,
            http: None,
            stop: Some(stop),
            handle,
        };
        server.until_serving(postgres).await;
        server
    }

    /// Waits until the server answers health checks. A server on the
    /// memory store serves at once; one on PostgreSQL first connects to
    /// its database, and a test's first call should not pay for that
    /// within its deadline.
    async fn until_serving(&self, postgres: bool) {
        if !postgres {
            return;
        }
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel().await);
        tokio::time::timeout(
            Duration::from_secs(30),
            health.check(tonic_health::pb::HealthCheckRequest::default()),
        )
        .await
        .expect("the server serves within 30s")
        .expect("health answers");
    }

    /// A server with its HTTP listener (metrics, probes), both on free
    /// loopback ports.
    pub async fn with_http(mut config: ServerConfig) -> Self {
        let database = use_store_under_test(&mut config).await;
        // A plaintext health check: not for a server that speaks TLS.
        let postgres = matches!(config.store, StoreConfig::Postgres(_)) && config.tls.is_none();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (addr, http_addr) = (listener.local_addr().unwrap(), http.local_addr().unwrap());
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(server::run_with_http(config, listener, Some(http), async {
            let _ = stopped.await;
        }));
        let server = Self {
            addr,
            database,
            http: Some(http_addr),
            stop: Some(stop),
            handle,
        };
        server.until_serving(postgres).await;
        server
    }

    /// `GET path` on the HTTP listener with an optional bearer token and
    /// `Accept`: the status and the body.
    pub async fn http_get(
        &self,
        path: &str,
        token: Option<&str>,
        accept: Option<&str>,
    ) -> (u16, String) {
        http_get(self.http.expect("started with_http"), path, token, accept).await
    }

    pub async fn channel(&self) -> Channel {
        Endpoint::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    pub async fn client(&self) -> Client {
        TaskQueueClient::new(self.channel().await)
    }

    pub async fn client_with_token(&self, token: &str) -> AuthClient {
        let value: tonic::metadata::MetadataValue<_> = format!("Bearer {token}").parse().unwrap();
        let add_token: AddToken = Box::new(move |mut request: Request<()>| {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
            Ok(request)
        });
        TaskQueueClient::with_interceptor(self.channel().await, add_token)
    }

    /// Sends the shutdown signal without waiting for the server to stop.
    pub fn signal_shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Stops the server and joins it, so its errors and panics fail the test.
    pub async fn shutdown(mut self) {
        self.signal_shutdown();
        tokio::time::timeout(Duration::from_secs(30), self.handle)
            .await
            .expect("server stops within 30s")
            .expect("server task did not panic")
            .expect("server ran without error");
    }

    /// The library client (`taskq::client`) for this server.
    pub async fn taskq_client(&self) -> taskq::client::Client {
        taskq::client::Client::connect(
            &format!("http://{}", self.addr),
            taskq::client::ClientOptions::default(),
        )
        .await
        .unwrap()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The store the tests run against: `TASKQ_TEST_STORE=postgres` runs
/// every server of the test binary on the PostgreSQL store, each on a
/// fresh database ([`postgres::TestDatabase`]); unset or `memory`, the
/// memory store.
pub fn store_under_test() -> &'static str {
    match std::env::var("TASKQ_TEST_STORE").as_deref() {
        Ok("postgres") => "postgres",
        Ok("memory") | Err(_) => "memory",
        Ok(other) => panic!("TASKQ_TEST_STORE={other}: use memory or postgres"),
    }
}

/// Puts a server configured for the memory store on the store under test;
/// the database (when there is one) lives as long as the server.
async fn use_store_under_test(config: &mut ServerConfig) -> Option<postgres::TestDatabase> {
    if store_under_test() != "postgres" || !matches!(config.store, StoreConfig::Memory) {
        return None;
    }
    let database = postgres::TestDatabase::start().await;
    let store = PostgresConfig::new(database.url());
    // Migrated ahead, as a deploy would, so that the server serves at
    // once: the first call's deadline should not pay for the schema.
    server::migrate(&store).await.expect("migrations apply");
    config.store = StoreConfig::Postgres(store);
    Some(database)
}

/// Polls `check` until it holds. Bounded: at most 2,000 tries, 5 ms apart
/// (10 s), for conditions that only a real process or socket can bring
/// about.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..2000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A request with a gRPC deadline.
pub fn with_deadline<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(timeout);
    request
}

/// A worker stream's first message: subscribe to `queue` with a window.
pub fn subscribe(queue: &str, max_in_flight: u32) -> taskq::pb::WorkerMessage {
    use taskq::pb;
    pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Subscribe(pb::Subscribe {
            queue: queue.into(),
            max_in_flight,
            ..Default::default()
        })),
    }
}

/// A worker stream's report of `task` succeeded with `output`.
pub fn succeeded(task: &taskq::pb::Task, output: &[u8]) -> taskq::pb::WorkerMessage {
    use taskq::pb;
    pb::WorkerMessage {
        msg: Some(pb::worker_message::Msg::Result(pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(pb::put_result_request::Outcome::Output(
                output.to_vec().into(),
            )),
        })),
    }
}

/// `GET path` on `addr` over HTTP/1.1 (hyper's client on one connection):
/// the status and the body. Bounded to 10 s.
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    accept: Option<&str>,
) -> (u16, String) {
    use http_body_util::{BodyExt, Empty};
    let fetch = async {
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        let mut request = http::Request::get(path).header("host", addr.to_string());
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(accept) = accept {
            request = request.header("accept", accept);
        }
        let response = sender
            .send_request(request.body(Empty::<bytes::Bytes>::new()).unwrap())
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8(body.to_vec()).unwrap())
    };
    tokio::time::timeout(Duration::from_secs(10), fetch)
        .await
        .expect("HTTP answer within 10s")
}

/// A token file in a fresh temporary directory, one `TOKEN ROLE` a line.
pub fn token_file(name: &str, lines: &[&str]) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("taskq-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokens");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}
