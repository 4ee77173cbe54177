//! A typed client for the `taskq.v1.TaskQueue` service.
//!
//! Every call carries a gRPC deadline: the call timeout for quick calls, the
//! wait itself for blocking ones (the server answers a little before it).
//! Errors keep the gRPC status code, so callers can tell "retry later"
//! (UNAVAILABLE) from "fix the request" (INVALID_ARGUMENT).
//!
//! This module does not depend on the engine or the server.

use std::time::Duration;

use bytes::Bytes;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::pb::{self, get_result_request::Target, task_queue_client::TaskQueueClient};

pub use crate::tls::{ClientTls, Identity, TlsError, read_certificates};

/// The server address used when none is given.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// Default of [`ClientOptions::connect_timeout`].
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default of [`ClientOptions::call_timeout`].
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach the server.
#[derive(Clone, Debug)]
pub struct ClientOptions {
    /// Bearer token sent with every call, if the server needs one.
    pub token: Option<String>,
    /// Longest time to set up a connection.
    pub connect_timeout: Duration,
    /// Deadline of calls that do not block (and of PutTask's wait for room).
    pub call_timeout: Duration,
    /// TLS: when set, the connection uses `https` and checks the server's
    /// certificate against the given CA.
    pub tls: Option<ClientTls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            call_timeout: DEFAULT_CALL_TIMEOUT,
            tls: None,
        }
    }
}

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server address does not parse.
    #[error("invalid server address {address:?}: {reason}; write it like http://127.0.0.1:50051")]
    InvalidAddress {
        /// The address given.
        address: String,
        /// Why it is invalid.
        reason: String,
    },
    /// The TLS settings cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// The token cannot be sent in a header.
    #[error("the token has characters that cannot be sent in a gRPC header")]
    InvalidToken,
    /// No connection could be made.
    #[error(
        "cannot connect to {address}: {}; is the server running and reachable?",
        with_causes(.source)
    )]
    Connect {
        /// The address.
        address: String,
        /// Why.
        source: tonic::transport::Error,
    },
    /// The server (or the transport) answered with an error status.
    #[error("{}: {}", code_name(*.code), .message)]
    Rpc {
        /// The gRPC status code.
        code: Code,
        /// The status message.
        message: String,
    },
}

fn code_name(code: Code) -> String {
    format!("{code:?}")
        .chars()
        .enumerate()
        .flat_map(|(i, c)| {
            let sep = (i > 0 && c.is_uppercase()).then_some('_');
            sep.into_iter()
                .chain(std::iter::once(c.to_ascii_uppercase()))
        })
        .collect()
}

impl From<Status> for ClientError {
    /// The status's message, followed by the causes the transport gave for
    /// it (a refused certificate, a reset connection), which the message
    /// alone ("transport error") does not say.
    fn from(status: Status) -> Self {
        Self::Rpc {
            code: status.code(),
            message: with_causes(&status),
        }
    }
}

/// An error's text followed by its causes' (a transport error's refused
/// certificate or reset connection), each once.
fn with_causes(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = match error.downcast_ref::<Status>() {
        Some(status) => status.message().to_string(),
        None => error.to_string(),
    };
    let mut cause = error.source();
    while let Some(error) = cause {
        let more = error.to_string();
        if !text.contains(&more) {
            text = format!("{text}: {more}");
        }
        cause = error.source();
    }
    text
}

impl ClientError {
    /// The gRPC status code, for errors the server or transport returned.
    pub fn code(&self) -> Option<Code> {
        match self {
            Self::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// What the error tells the caller to do next.
    pub fn class(&self) -> StatusClass {
        match self {
            Self::Connect { .. } => StatusClass::Transient,
            Self::Rpc { code, .. } => StatusClass::of(*code),
            Self::InvalidAddress { .. } | Self::Tls(_) | Self::InvalidToken => StatusClass::Refused,
        }
    }

    /// True when retrying later may work: the server is unreachable,
    /// restarting or overloaded.
    pub fn is_transient(&self) -> bool {
        self.class() == StatusClass::Transient
    }
}

/// What a gRPC status code tells a client to do next. The one reading of
/// codes in the crate: [`ClientError`] and the worker's streams both go by
/// it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusClass {
    /// Retry later: the server is unreachable, restarting or overloaded.
    Transient,
    /// The server refuses the caller or the request as such (a wrong
    /// token, a role or queue not allowed, an invalid argument, a call it
    /// does not serve): retrying will not help, fixing the set-up will.
    Refused,
    /// This call failed on its own terms (the task's state, a lost lease,
    /// a server error): the caller decides whether to go on.
    Failed,
}

impl StatusClass {
    /// The class of a status code.
    pub fn of(code: Code) -> Self {
        match code {
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Unknown => Self::Transient,
            Code::Unauthenticated
            | Code::PermissionDenied
            | Code::InvalidArgument
            | Code::Unimplemented => Self::Refused,
            _ => Self::Failed,
        }
    }
}

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone, Debug)]
pub struct BearerToken(Option<MetadataValue<Ascii>>);

impl Interceptor for BearerToken {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// Largest message a client accepts: well above any task or result a
/// server may send (its limits are 4 MiB by default, 1 GiB at most), so a
/// big but valid task never breaks a stream.
const MAX_DECODE: usize = 1 << 30;

/// The sending half of a worker stream. Sends never wait: what a worker
/// sends is bounded by the tasks it holds, and a sender that waited while
/// the server waited for it to read would deadlock both.
#[derive(Clone, Debug)]
pub struct WorkerSender(tokio::sync::mpsc::UnboundedSender<pb::WorkerMessage>);

impl WorkerSender {
    /// Sends one message; `false` when the stream has ended.
    pub fn send(&self, msg: pb::worker_message::Msg) -> bool {
        self.0.send(pb::WorkerMessage { msg: Some(msg) }).is_ok()
    }
}

/// A connection to a taskq server. Cheap to clone; clones share the
/// connection, which reconnects by itself after the server comes back.
///
/// # Examples
///
/// Put a task and wait for its result (here a server and a worker run in
/// the same program, on a free port):
///
/// ```
/// use std::time::Duration;
/// use taskq::client::{Client, ClientOptions};
/// # use taskq::server::{self, ServerConfig};
/// # use taskq::worker::{Worker, builtin};
///
/// # #[tokio::main]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// # let address = format!("http://{}", listener.local_addr()?);
/// # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # let server = tokio::spawn(server::run(ServerConfig::default(), listener, async {
/// #     let _ = stopped.await;
/// # }));
/// # let worker_client = Client::connect_lazy(&address, ClientOptions::default())?;
/// # let worker = Worker::builder(worker_client).queue("squares");
/// # let (stop_worker, worker_stopped) = tokio::sync::oneshot::channel::<()>();
/// # let square = |task: taskq::pb::Task| async move { builtin::square(&task.payload) };
/// # let worker = tokio::spawn(worker.run_until(square, async {
/// #     let _ = worker_stopped.await;
/// # }));
/// let client = Client::connect(&address, ClientOptions::default()).await?;
/// let put = client.put("squares", b"12".to_vec()).await?;
/// let result = client.result(&put.task_id, Duration::from_secs(10)).await?;
/// assert_eq!(result.expect("done within 10s").output, "144".as_bytes());
/// # let _ = stop_worker.send(());
/// # worker.await??;
/// # let _ = stop.send(());
/// # server.await??;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Client {
    queue: TaskQueueClient<InterceptedService<Channel, BearerToken>>,
    health: HealthClient<Channel>,
    call_timeout: Duration,
}

fn endpoint(address: &str, options: &ClientOptions) -> Result<Endpoint, ClientError> {
    let scheme = if options.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let url = match address.split_once("://") {
        Some((_, rest)) => format!("{scheme}://{rest}"),
        None => format!("{scheme}://{address}"),
    };
    let invalid = |reason: String| ClientError::InvalidAddress {
        address: address.to_string(),
        reason,
    };
    let mut endpoint = Endpoint::from_shared(url)
        .map_err(|e| invalid(e.to_string()))?
        .connect_timeout(options.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10));
    if let Some(tls) = &options.tls {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &tls.ca {
            config = config.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some(domain) = &tls.domain {
            config = config.domain_name(domain.clone());
        }
        if let Some(identity) = &tls.identity {
            config = config.identity(tonic::transport::Identity::from_pem(
                &identity.cert,
                &identity.key,
            ));
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    Ok(endpoint)
}

impl Client {
    /// Connects to `address` (`http://host:port`, or `host:port`) now, so
    /// that a wrong address or a stopped server is reported at once.
    ///
    /// # Errors
    /// [`ClientError::InvalidAddress`], [`ClientError::InvalidToken`], or
    /// [`ClientError::Connect`] when the server cannot be reached.
    pub async fn connect(address: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let channel = endpoint(address, &options)?
            .connect()
            .await
            .map_err(|source| ClientError::Connect {
                address: address.to_string(),
                source,
            })?;
        Self::with_channel(channel, &options)
    }

    /// Makes a client that connects on its first call, and again after each
    /// lost connection: for workers that start before the server or outlive
    /// its restarts.
    ///
    /// # Errors
    /// [`ClientError::InvalidAddress`] or [`ClientError::InvalidToken`].
    pub fn connect_lazy(address: &str, options: ClientOptions) -> Result<Self, ClientError> {
        let channel = endpoint(address, &options)?.connect_lazy();
        Self::with_channel(channel, &options)
    }

    fn with_channel(channel: Channel, options: &ClientOptions) -> Result<Self, ClientError> {
        let token = options
            .token
            .as_ref()
            .map(|t| format!("Bearer {t}").parse::<MetadataValue<Ascii>>())
            .transpose()
            .map_err(|_| ClientError::InvalidToken)?;
        Ok(Self {
            queue: TaskQueueClient::with_interceptor(channel.clone(), BearerToken(token))
                .max_decoding_message_size(MAX_DECODE),
            health: HealthClient::new(channel),
            call_timeout: options.call_timeout,
        })
    }

    fn request<T>(&self, message: T, timeout: Duration) -> Request<T> {
        let mut request = Request::new(message);
        request.set_timeout(timeout);
        request
    }

    /// The deadline of a call that waits up to `wait` (capped by its
    /// `max_wait` field): the wait plus the call timeout for the answer to
    /// travel.
    fn waiting_request<T>(&self, message: T, wait: Duration) -> Request<T> {
        self.request(message, wait.saturating_add(self.call_timeout))
    }

    /// Stores a task with every field of the request; waits for room in a
    /// full queue until the call timeout.
    ///
    /// # Errors
    /// The server's status, e.g. INVALID_ARGUMENT or RESOURCE_EXHAUSTED.
    pub async fn put_task(
        &self,
        request: pb::PutTaskRequest,
    ) -> Result<pb::PutTaskResponse, ClientError> {
        let request = self.request(request, self.call_timeout);
        Ok(self.queue.clone().put_task(request).await?.into_inner())
    }

    /// Stores a task with just a queue and a payload.
    ///
    /// # Errors
    /// As [`Client::put_task`].
    pub async fn put(
        &self,
        queue: &str,
        payload: impl Into<Bytes>,
    ) -> Result<pb::PutTaskResponse, ClientError> {
        self.put_task(pb::PutTaskRequest {
            queue: queue.into(),
            payload: payload.into(),
            ..Default::default()
        })
        .await
    }

    /// Takes back a task that has not finished; returns the state it had
    /// (pending or leased). It ends CANCELLED, and a worker holding it
    /// loses its lease.
    ///
    /// # Errors
    /// FAILED_PRECONDITION when the task already finished, NOT_FOUND for an
    /// unknown id, PERMISSION_DENIED for a task of a queue the token may
    /// not touch.
    pub async fn cancel_task(&self, task_id: &str) -> Result<pb::TaskState, ClientError> {
        let message = pb::CancelTaskRequest {
            task_id: task_id.into(),
        };
        let request = self.request(message, self.call_timeout);
        let response = self.queue.clone().cancel_task(request).await?.into_inner();
        Ok(response.previous_state())
    }

    /// Stops (`paused`) or restarts the hand-outs of a queue (an admin
    /// token's call); returns whether it was paused before.
    ///
    /// # Errors
    /// PERMISSION_DENIED without an admin token; INVALID_ARGUMENT for a bad
    /// queue name.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<bool, ClientError> {
        let request = self.request(
            pb::QueueRequest {
                queue: queue.into(),
            },
            self.call_timeout,
        );
        let mut client = self.queue.clone();
        let state = if paused {
            client.pause_queue(request).await?
        } else {
            client.resume_queue(request).await?
        };
        Ok(state.into_inner().was_paused)
    }

    /// Drops every pending task of a queue (each ends CANCELLED; an admin
    /// token's call); returns how many.
    ///
    /// # Errors
    /// As [`Client::set_paused`].
    pub async fn purge_queue(&self, queue: &str) -> Result<u64, ClientError> {
        let request = self.request(
            pb::QueueRequest {
                queue: queue.into(),
            },
            self.call_timeout,
        );
        Ok(self
            .queue
            .clone()
            .purge_queue(request)
            .await?
            .into_inner()
            .purged)
    }

    /// Leases the next task of a queue, waiting up to `wait`; `None` when
    /// none came.
    ///
    /// # Errors
    /// The server's status.
    pub async fn get_task(
        &self,
        mut request: pb::GetTaskRequest,
        wait: Duration,
    ) -> Result<Option<pb::Task>, ClientError> {
        request.max_wait = prost_types::Duration::try_from(wait).ok();
        let request = self.waiting_request(request, wait);
        Ok(self
            .queue
            .clone()
            .get_task(request)
            .await?
            .into_inner()
            .task)
    }

    /// Moves the lease's expiry to now + `extend_by`.
    ///
    /// # Errors
    /// ABORTED when the lease is no longer current, FAILED_PRECONDITION
    /// when the task is finished, NOT_FOUND for an unknown task.
    pub async fn extend_lease(
        &self,
        task: &pb::Task,
        extend_by: Duration,
    ) -> Result<pb::ExtendLeaseResponse, ClientError> {
        let message = pb::ExtendLeaseRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            extend_by: prost_types::Duration::try_from(extend_by).ok(),
        };
        let request = self.request(message, self.call_timeout);
        Ok(self.queue.clone().extend_lease(request).await?.into_inner())
    }

    /// Reports a task's outcome; returns the task's state afterwards.
    ///
    /// # Errors
    /// ABORTED (failure from a lease no longer current), ALREADY_EXISTS (a
    /// different result exists), NOT_FOUND, INVALID_ARGUMENT.
    pub async fn put_result(
        &self,
        task: &pb::Task,
        outcome: pb::put_result_request::Outcome,
    ) -> Result<pb::TaskState, ClientError> {
        let message = pb::PutResultRequest {
            task_id: task.id.clone(),
            lease_id: task.lease_id.clone(),
            outcome: Some(outcome),
        };
        let request = self.request(message, self.call_timeout);
        let response = self.queue.clone().put_result(request).await?.into_inner();
        Ok(response.state())
    }

    /// A task's result, waiting up to `wait` for it; `None` when it is not
    /// finished by then.
    ///
    /// # Errors
    /// NOT_FOUND for an unknown task.
    pub async fn result(
        &self,
        task_id: &str,
        wait: Duration,
    ) -> Result<Option<pb::Result>, ClientError> {
        self.get_result(Target::TaskId(task_id.into()), wait).await
    }

    /// The next result of a queue in completion order (each handed out
    /// once), waiting up to `wait`.
    ///
    /// # Errors
    /// The server's status.
    pub async fn next_result(
        &self,
        queue: &str,
        wait: Duration,
    ) -> Result<Option<pb::Result>, ClientError> {
        self.get_result(Target::Queue(queue.into()), wait).await
    }

    async fn get_result(
        &self,
        target: Target,
        wait: Duration,
    ) -> Result<Option<pb::Result>, ClientError> {
        let message = pb::GetResultRequest {
            target: Some(target),
            max_wait: prost_types::Duration::try_from(wait).ok(),
        };
        let request = self.waiting_request(message, wait);
        Ok(self
            .queue
            .clone()
            .get_result(request)
            .await?
            .into_inner()
            .result)
    }

    /// Stores many tasks in one call; one outcome per task, in order.
    ///
    /// # Errors
    /// INVALID_ARGUMENT for a batch over the server's `--max-batch`; errors
    /// of single tasks are in their outcomes.
    pub async fn put_tasks(
        &self,
        tasks: Vec<pb::PutTaskRequest>,
    ) -> Result<Vec<pb::PutTaskOutcome>, ClientError> {
        let request = self.request(pb::PutTasksRequest { tasks }, self.call_timeout);
        Ok(self
            .queue
            .clone()
            .put_tasks(request)
            .await?
            .into_inner()
            .outcomes)
    }

    /// Opens a worker stream (StreamTasks) with its subscribe message.
    /// Send results, extensions and windows on the returned sender; read
    /// tasks and acks from the returned stream. Dropping the sender ends
    /// the stream, and the server gives back every task still leased
    /// through it.
    ///
    /// # Errors
    /// The server's status for the subscribe message.
    pub async fn stream_tasks(
        &self,
        subscribe: pb::Subscribe,
    ) -> Result<(WorkerSender, tonic::Streaming<pb::ServerMessage>), ClientError> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let first = pb::WorkerMessage {
            msg: Some(pb::worker_message::Msg::Subscribe(subscribe)),
        };
        tx.send(first).expect("the receiver is held just below");
        let inbound = self
            .queue
            .clone()
            .stream_tasks(tokio_stream::wrappers::UnboundedReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok((WorkerSender(tx), inbound))
    }

    /// Results as a stream: a queue's as they finish (each handed out
    /// once), or the listed tasks' as each exists (the stream ends after
    /// the last).
    ///
    /// # Errors
    /// NOT_FOUND for an unknown task id, before any result.
    pub async fn watch_results(
        &self,
        target: pb::watch_results_request::Target,
    ) -> Result<tonic::Streaming<pb::Result>, ClientError> {
        let request = pb::WatchResultsRequest {
            target: Some(target),
        };
        Ok(self
            .queue
            .clone()
            .watch_results(request)
            .await?
            .into_inner())
    }

    /// [`Client::watch_results`] with the results ready at once in one
    /// message (WatchResultBatches): less work per result when they come
    /// fast, the same results in the same order.
    ///
    /// # Errors
    /// As [`Client::watch_results`].
    pub async fn watch_result_batches(
        &self,
        target: pb::watch_results_request::Target,
    ) -> Result<tonic::Streaming<pb::ResultBatch>, ClientError> {
        let request = pb::WatchResultsRequest {
            target: Some(target),
        };
        Ok(self
            .queue
            .clone()
            .watch_result_batches(request)
            .await?
            .into_inner())
    }

    /// Queue counters and workers; `queue` `""` means all queues.
    ///
    /// # Errors
    /// The server's status.
    pub async fn stats(&self, queue: &str) -> Result<pb::GetStatsResponse, ClientError> {
        let message = pb::GetStatsRequest {
            queue: queue.into(),
        };
        let request = self.request(message, self.call_timeout);
        Ok(self.queue.clone().get_stats(request).await?.into_inner())
    }

    /// The server's health for `service` (`""`: the server as a whole).
    /// Needs no token.
    ///
    /// # Errors
    /// NOT_FOUND for a service the server does not know; transport errors.
    pub async fn health(&self, service: &str) -> Result<ServingStatus, ClientError> {
        let message = tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        };
        let request = self.request(message, self.call_timeout);
        let response = self.health.clone().check(request).await?.into_inner();
        Ok(response.status())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_read_like_the_grpc_names() {
        assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
        assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
        let error = ClientError::from(Status::not_found("no task x"));
        assert_eq!(error.to_string(), "NOT_FOUND: no task x");
        assert_eq!(error.code(), Some(Code::NotFound));
        assert!(!error.is_transient());
        assert!(ClientError::from(Status::unavailable("down")).is_transient());
    }

    #[test]
    fn every_code_has_one_class() {
        let transient = [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::ResourceExhausted,
            Code::Unknown,
        ];
        let refused = [
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::Unimplemented,
        ];
        for code in (0..=16).map(Code::from) {
            let expected = if transient.contains(&code) {
                StatusClass::Transient
            } else if refused.contains(&code) {
                StatusClass::Refused
            } else {
                StatusClass::Failed
            };
            assert_eq!(StatusClass::of(code), expected, "{code:?}");
            let error = ClientError::from(Status::new(code, "x"));
            assert_eq!(error.is_transient(), expected == StatusClass::Transient);
        }
        assert_eq!(ClientError::InvalidToken.class(), StatusClass::Refused);
    }

    #[test]
    fn addresses_without_a_scheme_get_http() {
        let options = ClientOptions::default();
        assert_eq!(
            endpoint("127.0.0.1:1", &options)
                .unwrap()
                .uri()
                .scheme_str(),
            Some("http")
        );
        assert!(matches!(
            endpoint("http://[bad", &options),
            Err(ClientError::InvalidAddress { .. })
        ));
    }
}
