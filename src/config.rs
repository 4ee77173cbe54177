//! The server's configuration: the flags of `taskq serve` and the logging
//! flags, every one documented (the doc is `--help`), each with a `TASKQ_*`
//! environment twin and a named default, validated into a [`ServerConfig`]
//! before anything binds a port. A bad value exits 2 with a message naming
//! the flag. The command tree that holds these flags belongs to the
//! binary's command line (the `cli` module), which this module never
//! imports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::auth::Tokens;
use crate::broker::{
    BrokerConfig, DEFAULT_MAX_ATTEMPTS, DEFAULT_MAX_QUEUES, DEFAULT_MAX_RESULTS,
    DEFAULT_MAX_WAITERS, DEFAULT_QUEUE_CAPACITY, RetryBackoff,
};
use crate::server::{
    DEFAULT_MAX_BATCH, DEFAULT_MAX_CALLS, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_PENDING,
    DEFAULT_MAX_STREAMS_PER_CONNECTION, DEFAULT_METRICS_MAX_QUEUES, DEFAULT_POOL_SIZE,
    DEFAULT_SCHEMA, HttpConfig, PostgresConfig, ServerConfig, StoreConfig, TransportConfig,
};
use crate::tls::{Identity, ServerTls, read_certificates};
use crate::units::{parse_duration, parse_size, positive_count, positive_duration};

/// How logs are written (to stderr).
#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter in `RUST_LOG` syntax, e.g. `info` or `taskq=debug,warn`.
    /// Falls back to `RUST_LOG`, then `info`.
    #[arg(long = "log", env = "TASKQ_LOG", global = true, value_name = "FILTER")]
    pub filter: Option<String>,
    /// Log line format: `text` for people, `json` for log collectors.
    #[arg(
        long,
        env = "TASKQ_LOG_FORMAT",
        global = true,
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// Log line formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// One JSON object per event.
    Json,
}

/// Default of `--listen`: the loopback address clients try first.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";

/// Default of `--http-listen`: beside the gRPC port, on loopback.
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:50052";

/// The value of `--http-listen`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HttpListen(pub Option<SocketAddr>);

impl std::str::FromStr for HttpListen {
    type Err = std::net::AddrParseError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "off" => Ok(Self(None)),
            addr => addr.parse().map(|addr| Self(Some(addr))),
        }
    }
}

/// `taskq serve`: the server's flags.
#[derive(Debug, Args)]
#[command(after_help = "\
AUTHENTICATION AND ROLES:
  Tokens come from --token-file or from TASKQ_TOKENS (comma-separated, each
  with full access), never from a flag. Each line of the file is
      TOKEN [ROLE [QUEUE,...]]
  ROLE is producer (PutTask, PutTasks, GetResult, WatchResults), worker
  (GetTask, StreamTasks, ExtendLease, PutResult), monitor (GetStats and the
  HTTP /metrics) or admin (every call). QUEUE,... limits the token to those
  queues (a token with a queue list may not read /metrics). A
  line with only a token has full access; blank lines and # comments are
  skipped. A call outside its role or queues gets PERMISSION_DENIED.
  Clients send `authorization: Bearer <token>`. grpc.health.v1.Health needs
  no token, nor do /healthz and /readyz. Without tokens the server only
  listens (gRPC and HTTP) on a loopback address, unless
  --allow-unauthenticated is given.

SIGNALS:
  SIGHUP: the token file is read again; if it does not parse, the error is
  logged and the tokens in force stay.
  SIGTERM or Ctrl-C: health turns NOT_SERVING, waiting calls are answered at
  once, new calls are refused, calls in progress get --shutdown-grace, then
  the process exits 0. Tasks and results are held in memory only and are
  dropped at exit.")]
pub struct ServeArgs {
    /// Address to listen on. Non-loopback addresses need tokens (or
    /// --allow-unauthenticated).
    #[arg(long, env = "TASKQ_LISTEN", default_value = DEFAULT_LISTEN)]
    pub listen: SocketAddr,

    /// File of accepted bearer tokens: `TOKEN [ROLE [QUEUE,...]]` per line
    /// (see AUTHENTICATION AND ROLES below); re-read on SIGHUP.
    #[arg(long, env = "TASKQ_TOKEN_FILE", value_name = "PATH")]
    pub token_file: Option<PathBuf>,

    /// Serve without tokens on a non-loopback address. Anyone who can reach
    /// the port can then read and write every queue.
    #[arg(long, env = "TASKQ_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,

    /// Most unfinished (pending and leased) tasks per queue. A full queue
    /// makes PutTask wait for room until its deadline, then
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "TASKQ_QUEUE_CAPACITY", default_value_t = DEFAULT_QUEUE_CAPACITY, value_parser = positive_count)]
    pub queue_capacity: usize,

    /// Largest task payload; larger is INVALID_ARGUMENT. E.g. `4MiB`, `512KB`.
    #[arg(long, env = "TASKQ_MAX_PAYLOAD", default_value = "4MiB", value_parser = parse_size)]
    pub max_payload: u64,

    /// Largest result output (larger is INVALID_ARGUMENT); longer failure
    /// messages are cut to it.
    #[arg(long, env = "TASKQ_MAX_RESULT", default_value = "4MiB", value_parser = parse_size)]
    pub max_result: u64,

    /// Lease length when GetTask gives none.
    #[arg(long, env = "TASKQ_DEFAULT_LEASE", default_value = "30s", value_parser = positive_duration)]
    pub default_lease: Duration,

    /// Longest lease or extension granted; longer requests are clamped.
    #[arg(long, env = "TASKQ_MAX_LEASE", default_value = "1h", value_parser = positive_duration)]
    pub max_lease: Duration,

    /// Deliveries allowed for a task that asks for 0 (`max_attempts`).
    #[arg(long, env = "TASKQ_DEFAULT_MAX_ATTEMPTS", default_value_t = DEFAULT_MAX_ATTEMPTS,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub default_max_attempts: u32,

    /// Wait before the first retry of a failed task (a worker's failure with
    /// retry). Each further failure of the task doubles it, up to
    /// --retry-backoff-max, and the wait is drawn at random from the upper
    /// half of that step, so that tasks failing together do not come back
    /// together. A worker's `retry_after` replaces it. `0s`: retry at once.
    /// Tasks whose lease ran out (their worker died) go back at once.
    #[arg(long, env = "TASKQ_RETRY_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub retry_backoff: Duration,

    /// Longest wait between retries of a failed task (see
    /// --retry-backoff).
    #[arg(long, env = "TASKQ_RETRY_BACKOFF_MAX", default_value = "5m", value_parser = parse_duration)]
    pub retry_backoff_max: Duration,

    /// Longest wait of GetTask, GetResult and PutTask (for room) when the
    /// call has no gRPC deadline.
    #[arg(long, env = "TASKQ_MAX_WAIT", default_value = "20s", value_parser = parse_duration)]
    pub max_wait: Duration,

    /// How long finished results are held.
    #[arg(long, env = "TASKQ_RESULT_TTL", default_value = "1h", value_parser = positive_duration)]
    pub result_ttl: Duration,

    /// Most finished results held. At the bound the oldest result is dropped
    /// (GetResult for it is then NOT_FOUND) and counted in the queue's
    /// `results_evicted`.
    #[arg(long, env = "TASKQ_MAX_RESULTS", default_value_t = DEFAULT_MAX_RESULTS, value_parser = positive_count)]
    pub max_results: usize,

    /// Silence after which a worker is reported not alive.
    #[arg(long, env = "TASKQ_WORKER_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub worker_timeout: Duration,

    /// Most queues; a new queue past it is RESOURCE_EXHAUSTED.
    #[arg(long, env = "TASKQ_MAX_QUEUES", default_value_t = DEFAULT_MAX_QUEUES, value_parser = positive_count)]
    pub max_queues: usize,

    /// Most calls waiting at once (GetTask and GetResult); more is
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "TASKQ_MAX_WAITERS", default_value_t = DEFAULT_MAX_WAITERS, value_parser = positive_count)]
    pub max_waiters: usize,

    /// Most bytes of payloads (of unfinished tasks) and result outputs held
    /// in all queues; a put past it is RESOURCE_EXHAUSTED. Keep it, with
    /// about 300 bytes per task, under the memory the server may use.
    #[arg(long, env = "TASKQ_MAX_HELD_BYTES", default_value = "1GiB", value_parser = parse_size)]
    pub max_held_bytes: u64,

    /// Where tasks and results live: `memory` (this process only: fastest,
    /// lost on restart, one server) or a PostgreSQL URL
    /// `postgres://USER[:PASSWORD]@HOST[:PORT]/DB` (durable once
    /// acknowledged; several servers may share it). Migrations are applied
    /// at start (or ahead, with `taskq migrate`). TLS to the database as
    /// libpq reads the URL: `?sslmode=verify-full&sslrootcert=CA.pem`
    /// (or `verify-ca`, `require`, `disable`; `sslrootcert=system`).
    #[arg(long, env = "TASKQ_STORE", default_value = "memory", value_parser = parse_store)]
    pub store: StoreChoice,

    /// The PostgreSQL schema holding taskq's tables (with --store postgres://…).
    #[arg(long, env = "TASKQ_STORE_SCHEMA", default_value = DEFAULT_SCHEMA)]
    pub store_schema: String,

    /// Connections to PostgreSQL per server (with --store postgres://…),
    /// besides the one that listens for notifications.
    #[arg(long, env = "TASKQ_STORE_POOL", default_value_t = DEFAULT_POOL_SIZE, value_parser = positive_count)]
    pub store_pool: usize,

    /// Longest a PostgreSQL statement may run before it is cancelled and
    /// the call answered UNAVAILABLE.
    #[arg(long, env = "TASKQ_STORE_STATEMENT_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub store_statement_timeout: Duration,

    /// Most puts and results waiting for their PostgreSQL transaction;
    /// more wait for room, so a slow database cannot grow the server's
    /// memory without limit.
    #[arg(long, env = "TASKQ_STORE_MAX_PENDING", default_value_t = DEFAULT_MAX_PENDING, value_parser = positive_count)]
    pub store_max_pending: usize,

    /// Most tasks in one PutTasks call (and task ids in one WatchResults).
    #[arg(long, env = "TASKQ_MAX_BATCH", default_value_t = DEFAULT_MAX_BATCH, value_parser = positive_count)]
    pub max_batch: usize,

    /// Most connections open at once. A connection past it is closed as
    /// soon as it is accepted (logged, rate-limited).
    #[arg(long, env = "TASKQ_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = positive_count)]
    pub max_connections: usize,

    /// How long a new connection may take to send the start of its
    /// handshake (24 bytes) before it is closed, so idle or trickling
    /// sockets cannot hold connection slots.
    #[arg(long, env = "TASKQ_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub handshake_timeout: Duration,

    /// Most calls in progress across all connections, waiting calls
    /// included; past it a call is shed at once with RESOURCE_EXHAUSTED.
    /// Health checks are never shed.
    #[arg(long, env = "TASKQ_MAX_CALLS", default_value_t = DEFAULT_MAX_CALLS, value_parser = positive_count)]
    pub max_calls: usize,

    /// Most calls at once on one connection (HTTP/2 max concurrent
    /// streams); a client queues the rest on its side.
    #[arg(long, env = "TASKQ_MAX_STREAMS_PER_CONNECTION", default_value_t = DEFAULT_MAX_STREAMS_PER_CONNECTION,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_streams_per_connection: u32,

    /// How often an idle connection is pinged (HTTP/2 keepalive), to find
    /// peers that vanished without closing.
    #[arg(long, env = "TASKQ_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = positive_duration)]
    pub keepalive_interval: Duration,

    /// How long a keepalive ping may go unanswered before the connection is
    /// dropped; the tasks its calls held go back to their queues.
    #[arg(long, env = "TASKQ_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub keepalive_timeout: Duration,

    /// Age after which a connection is asked to go away (HTTP/2 GOAWAY):
    /// its new calls move to a fresh connection (spreading clients over
    /// servers behind a load balancer); calls in progress, worker streams
    /// included, finish undisturbed. `0s`: never.
    #[arg(long, env = "TASKQ_MAX_CONNECTION_AGE", default_value = "1h", value_parser = parse_duration)]
    pub max_connection_age: Duration,

    /// On SIGTERM, how long calls in progress may take before the server
    /// stops anyway.
    #[arg(long, env = "TASKQ_SHUTDOWN_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Address of the HTTP listener: `/metrics` (Prometheus), `/healthz`
    /// and `/readyz` (probes). `off`: none. Non-loopback addresses need
    /// tokens (or --allow-unauthenticated). Plain HTTP, even with TLS on
    /// gRPC.
    #[arg(long, env = "TASKQ_HTTP_LISTEN", default_value = DEFAULT_HTTP_LISTEN, value_name = "ADDR|off")]
    pub http_listen: HttpListen,

    /// Serve `/metrics` without a token even when tokens are configured
    /// (otherwise it needs a monitor or admin token).
    #[arg(long, env = "TASKQ_METRICS_OPEN")]
    pub metrics_open: bool,

    /// Most queues with their own `queue` label in `/metrics`: the first
    /// ones seen keep theirs; the others are summed under
    /// `queue="_other"` and counted in `taskq_metrics_queues_folded`.
    #[arg(long, env = "TASKQ_METRICS_MAX_QUEUES", default_value_t = DEFAULT_METRICS_MAX_QUEUES, value_parser = positive_count)]
    pub metrics_max_queues: usize,

    /// Path every HTTP route is under (`/status`, `/metrics`, the probes),
    /// for a reverse proxy that forwards e.g. `/taskq/` here: `/taskq`
    /// serves `/taskq/status`. Empty: the root.
    #[arg(long, env = "TASKQ_HTTP_PATH_PREFIX", default_value = "", value_name = "PATH", value_parser = path_prefix)]
    pub http_path_prefix: String,

    /// PEM certificate chain (leaf first): serve TLS. Needs --tls-key.
    #[arg(long, env = "TASKQ_TLS_CERT", value_name = "PATH")]
    #[arg(requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(long, env = "TASKQ_TLS_KEY", value_name = "PATH")]
    #[arg(requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// PEM CA certificates: require clients to present a certificate that
    /// chains to one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "TASKQ_TLS_CLIENT_CA", value_name = "PATH")]
    #[arg(requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

/// A configuration problem, naming the flag to fix.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag}: {message}")]
pub struct ConfigError {
    /// The flag (and its environment twin).
    pub flag: &'static str,
    /// What is wrong and what to do.
    pub message: String,
}

impl ConfigError {
    fn new(flag: &'static str, message: impl Into<String>) -> Self {
        Self {
            flag,
            message: message.into(),
        }
    }
}

/// Longest retry backoff accepted: the engine's limit for any wait.
const MAX_RETRY_WAIT: Duration = Duration::from_secs(366 * 24 * 3600);

/// Largest payload or result limit accepted: far above any sane value,
/// below what a gRPC message can carry.
const MAX_MESSAGE_LIMIT: u64 = 1 << 30;

impl ServeArgs {
    /// Checks the flags together and loads the tokens.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the flag at fault.
    pub fn into_config(self) -> Result<ServerConfig, ConfigError> {
        if self.default_lease > self.max_lease {
            return Err(ConfigError::new(
                "--default-lease (TASKQ_DEFAULT_LEASE)",
                format!(
                    "{} is longer than --max-lease {}",
                    humantime::format_duration(self.default_lease),
                    humantime::format_duration(self.max_lease)
                ),
            ));
        }
        if self.retry_backoff > self.retry_backoff_max {
            return Err(ConfigError::new(
                "--retry-backoff (TASKQ_RETRY_BACKOFF)",
                format!(
                    "{} is longer than --retry-backoff-max {}; raise the maximum or lower the \
                     first wait",
                    humantime::format_duration(self.retry_backoff),
                    humantime::format_duration(self.retry_backoff_max)
                ),
            ));
        }
        if self.retry_backoff_max > MAX_RETRY_WAIT {
            return Err(ConfigError::new(
                "--retry-backoff-max (TASKQ_RETRY_BACKOFF_MAX)",
                "must be at most 366 days",
            ));
        }
        for (flag, value) in [
            ("--max-payload (TASKQ_MAX_PAYLOAD)", self.max_payload),
            ("--max-result (TASKQ_MAX_RESULT)", self.max_result),
        ] {
            if value == 0 || value > MAX_MESSAGE_LIMIT {
                return Err(ConfigError::new(flag, "must be between 1 byte and 1GiB"));
            }
        }
        let tokens = self.load_tokens()?;
        self.check_exposed("--listen (TASKQ_LISTEN)", self.listen, &tokens)?;
        if let HttpListen(Some(http)) = self.http_listen {
            self.check_exposed("--http-listen (TASKQ_HTTP_LISTEN)", http, &tokens)?;
        }
        Ok(ServerConfig {
            broker: BrokerConfig {
                queue_capacity: self.queue_capacity,
                max_payload: self.max_payload as usize,
                max_result: self.max_result as usize,
                default_lease: self.default_lease,
                max_lease: self.max_lease,
                default_max_attempts: self.default_max_attempts,
                result_ttl: self.result_ttl,
                max_results: self.max_results,
                worker_timeout: self.worker_timeout,
                max_queues: self.max_queues,
                max_waiters: self.max_waiters,
                max_held_bytes: usize::try_from(self.max_held_bytes).unwrap_or(usize::MAX),
                retry_backoff: RetryBackoff {
                    base: self.retry_backoff,
                    max: self.retry_backoff_max,
                },
                ..BrokerConfig::default()
            },
            tokens,
            max_wait: self.max_wait,
            shutdown_grace: self.shutdown_grace,
            tls: self.load_tls()?,
            max_batch: self.max_batch,
            transport: TransportConfig {
                max_connections: self.max_connections,
                handshake_timeout: self.handshake_timeout,
                max_calls: self.max_calls,
                max_streams_per_connection: self.max_streams_per_connection,
                keepalive_interval: self.keepalive_interval,
                keepalive_timeout: self.keepalive_timeout,
                max_connection_age: Some(self.max_connection_age).filter(|age| !age.is_zero()),
            },
            http: HttpConfig {
                listen: self.http_listen.0,
                metrics_open: self.metrics_open,
                metrics_max_queues: self.metrics_max_queues,
                path_prefix: self.http_path_prefix.clone(),
                status_sample_every: crate::http::DEFAULT_SAMPLE_EVERY,
            },
            store: self.store_config()?,
        })
    }

    /// The store the flags name, checked.
    fn store_config(&self) -> Result<StoreConfig, ConfigError> {
        match &self.store {
            StoreChoice::Memory => Ok(StoreConfig::Memory),
            StoreChoice::Postgres(url) => {
                let config = PostgresConfig {
                    url: url.clone(),
                    schema: self.store_schema.clone(),
                    pool_size: self.store_pool,
                    statement_timeout: self.store_statement_timeout,
                    max_pending: self.store_max_pending,
                };
                config
                    .validate()
                    .map_err(|problem| ConfigError::new("--store (TASKQ_STORE)", &problem))?;
                Ok(StoreConfig::Postgres(config))
            }
        }
    }

    /// Protected mode: a listener on a non-loopback `addr` needs tokens,
    /// unless --allow-unauthenticated.
    fn check_exposed(
        &self,
        flag: &'static str,
        addr: SocketAddr,
        tokens: &Tokens,
    ) -> Result<(), ConfigError> {
        if tokens.is_empty() && !addr.ip().is_loopback() && !self.allow_unauthenticated {
            return Err(ConfigError::new(
                flag,
                format!(
                    "{addr} is not a loopback address and no tokens are configured: set \
                     --token-file or TASKQ_TOKENS, listen on 127.0.0.1, or pass \
                     --allow-unauthenticated to accept anyone who can reach the port"
                ),
            ));
        }
        Ok(())
    }

    fn load_tls(&self) -> Result<Option<ServerTls>, ConfigError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let identity = Identity::load(cert, key).map_err(|e| {
            ConfigError::new(
                "--tls-cert/--tls-key (TASKQ_TLS_CERT/TASKQ_TLS_KEY)",
                e.to_string(),
            )
        })?;
        let client_ca = self
            .tls_client_ca
            .as_deref()
            .map(read_certificates)
            .transpose()
            .map_err(|e| {
                ConfigError::new("--tls-client-ca (TASKQ_TLS_CLIENT_CA)", e.to_string())
            })?;
        Ok(Some(ServerTls {
            identity,
            client_ca,
        }))
    }

    fn load_tokens(&self) -> Result<Tokens, ConfigError> {
        let from_env = std::env::var("TASKQ_TOKENS")
            .ok()
            .filter(|v| !v.trim().is_empty());
        match (&self.token_file, from_env) {
            (Some(_), Some(_)) => Err(ConfigError::new(
                "--token-file (TASKQ_TOKEN_FILE)",
                "both a token file and TASKQ_TOKENS are set; use one",
            )),
            (Some(path), None) => Tokens::from_file(path)
                .map_err(|e| ConfigError::new("--token-file (TASKQ_TOKEN_FILE)", e.to_string())),
            (None, Some(list)) => Tokens::from_list(&list, "TASKQ_TOKENS")
                .map_err(|e| ConfigError::new("TASKQ_TOKENS", e.to_string())),
            (None, None) => Ok(Tokens::none()),
        }
    }
}

/// A `--http-path-prefix`: empty, or `/` then path segments of letters,
/// digits and `-._~`; a trailing `/` is dropped.
fn path_prefix(text: &str) -> Result<String, String> {
    let prefix = text.trim_end_matches('/');
    if prefix.is_empty() {
        return Ok(String::new());
    }
    let valid = prefix.starts_with('/')
        && prefix[1..].split('/').all(|segment| {
            !segment.is_empty()
                && segment
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        });
    if valid {
        Ok(prefix.to_string())
    } else {
        Err("use a path like /taskq or /ops/taskq (letters, digits, -._~ between slashes)".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// `taskq serve` on its own: the command tree that holds it is the
    /// binary's, which this module does not import.
    #[derive(Debug, Parser)]
    #[command(name = "taskq serve")]
    struct Cli {
        #[command(flatten)]
        serve: ServeArgs,
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["taskq serve"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).unwrap().serve
    }

    #[test]
    fn defaults_match_the_contract() {
        let config = serve(&[]).into_config().unwrap();
        assert_eq!(config.broker, BrokerConfig::default());
        assert_eq!(config.max_wait, Duration::from_secs(20));
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert!(config.tokens.is_empty());
    }

    /// The defaults `taskq serve --help` shows (and a run without flags
    /// gets) are the ones the library builds: [`BrokerConfig::default`],
    /// [`ServerConfig::default`] and [`TransportConfig::default`], each
    /// written once as a named constant. Every field is named, so a new
    /// one fails to compile here until it is compared too.
    #[test]
    fn serve_without_flags_gets_the_library_defaults() {
        let ServerConfig {
            broker,
            tokens,
            max_wait,
            shutdown_grace,
            tls,
            max_batch,
            transport,
            http,
            store,
        } = serve(&[]).into_config().unwrap();
        assert!(matches!(store, StoreConfig::Memory));
        let server = ServerConfig::default();
        assert_eq!(broker, server.broker);
        assert_eq!(broker, BrokerConfig::default());
        assert_eq!(tokens.is_empty(), server.tokens.is_empty());
        assert_eq!(max_wait, server.max_wait);
        assert_eq!(shutdown_grace, server.shutdown_grace);
        assert_eq!(tls.is_none(), server.tls.is_none());
        assert_eq!(max_batch, server.max_batch);

        let TransportConfig {
            max_connections,
            handshake_timeout,
            max_calls,
            max_streams_per_connection,
            keepalive_interval,
            keepalive_timeout,
            max_connection_age,
        } = transport;
        let transport = TransportConfig::default();
        assert_eq!(max_connections, transport.max_connections);
        assert_eq!(handshake_timeout, transport.handshake_timeout);
        assert_eq!(max_calls, transport.max_calls);
        assert_eq!(
            max_streams_per_connection,
            transport.max_streams_per_connection
        );
        assert_eq!(keepalive_interval, transport.keepalive_interval);
        assert_eq!(keepalive_timeout, transport.keepalive_timeout);
        assert_eq!(max_connection_age, transport.max_connection_age);

        assert_eq!(serve(&[]).listen.to_string(), DEFAULT_LISTEN);

        // The library binds no HTTP listener unless asked; the binary's
        // default is DEFAULT_HTTP_LISTEN. The rest is the library's.
        let library = HttpConfig::default();
        assert_eq!(library.listen, None);
        assert_eq!(http.listen, Some(DEFAULT_HTTP_LISTEN.parse().unwrap()));
        assert_eq!(
            HttpConfig {
                listen: None,
                ..http
            },
            library
        );
    }

    /// `--store` takes `memory` or a PostgreSQL URL, and the store flags
    /// reach the store's configuration; anything else is refused naming
    /// the flag.
    #[test]
    fn the_store_flag_picks_the_store() {
        let config = serve(&[
            "--store",
            "postgresql://taskq@db:5432/jobs",
            "--store-schema",
            "q2",
            "--store-pool",
            "3",
        ])
        .into_config()
        .unwrap();
        let StoreConfig::Postgres(store) = config.store else {
            panic!("a postgres store");
        };
        assert_eq!(
            (store.url.as_str(), store.schema.as_str(), store.pool_size),
            ("postgresql://taskq@db:5432/jobs", "q2", 3)
        );
        let cli = |args: &[&str]| {
            let mut argv = vec!["taskq serve"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|cli| cli.serve.into_config())
        };
        assert!(cli(&["--store", "redis://x"]).is_err());
        let bad_schema = cli(&["--store", "postgres://u@h/d", "--store-schema", "Bad-Name"])
            .unwrap()
            .unwrap_err();
        assert!(bad_schema.to_string().contains("--store"), "{bad_schema}");
    }

    #[test]
    fn the_http_path_prefix_is_a_clean_path() {
        let prefix = |value: &str| serve(&["--http-path-prefix", value]).into_config();
        assert_eq!(
            prefix("/ops/taskq/").unwrap().http.path_prefix,
            "/ops/taskq"
        );
        assert_eq!(prefix("/").unwrap().http.path_prefix, "");
        for bad in ["taskq", "/a//b", "/a b", "/a\"b"] {
            let err = Cli::try_parse_from(["taskq serve", "--http-path-prefix", bad]).unwrap_err();
            assert!(
                err.to_string().contains("--http-path-prefix"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn the_http_listener_can_be_off_and_is_protected_like_grpc() {
        let config = serve(&["--http-listen", "off"]).into_config().unwrap();
        assert_eq!(config.http.listen, None);
        let err = serve(&["--http-listen", "0.0.0.0:50052"])
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("--http-listen"), "{err}");
        assert!(
            serve(&["--http-listen", "0.0.0.0:50052", "--allow-unauthenticated"])
                .into_config()
                .is_ok()
        );
        let err = Cli::try_parse_from(["taskq serve", "--http-listen", "nowhere"]).unwrap_err();
        assert!(err.to_string().contains("--http-listen"), "{err}");
    }

    #[test]
    fn bad_values_name_their_flag() {
        let err = Cli::try_parse_from(["taskq serve", "--default-lease", "soon"]).unwrap_err();
        assert!(err.to_string().contains("--default-lease"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let err = serve(&["--default-lease", "2h"]).into_config().unwrap_err();
        assert!(err.to_string().contains("--default-lease"), "{err}");
        let err = Cli::try_parse_from(["taskq serve", "--queue-capacity", "0"]).unwrap_err();
        assert!(err.to_string().contains("--queue-capacity"), "{err}");
    }

    #[test]
    fn a_public_address_needs_tokens() {
        let err = serve(&["--listen", "0.0.0.0:50051"])
            .into_config()
            .unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        assert!(
            serve(&["--listen", "0.0.0.0:50051", "--allow-unauthenticated"])
                .into_config()
                .is_ok()
        );
        assert!(serve(&["--listen", "[::1]:50051"]).into_config().is_ok());
    }
}

/// `--store`: memory, or a PostgreSQL URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreChoice {
    /// In this process.
    Memory,
    /// PostgreSQL at this URL.
    Postgres(String),
}

fn parse_store(text: &str) -> Result<StoreChoice, String> {
    if text == "memory" {
        Ok(StoreChoice::Memory)
    } else if PostgresConfig::is_url(text) {
        Ok(StoreChoice::Postgres(text.to_owned()))
    } else {
        Err("use `memory` or a URL postgres://USER@HOST:PORT/DB (postgresql:// too)".into())
    }
}
