//! taskq: a task queue over gRPC, with leases, deadlines, token auth and
//! health checks.
//!
//! The library's public API:
//! - [`client`]: [`Client`](client::Client), a typed client with a deadline
//!   on every call, for producers and for tools.
//! - [`worker`]: [`Worker`](worker::Worker), the worker runtime: runs a
//!   handler per task, keeps leases alive, reconnects, drains.
//! - [`server`]: [`run`](server::run) serves taskq on a listener you bound,
//!   until a shutdown future resolves; [`ServerConfig`](server::ServerConfig)
//!   says how.
//! - [`pb`]: the generated `taskq.v1` messages and stubs, for any other use
//!   of the contract.
//!
//! Inside (see ARCHITECTURE.md), from the inside out: `broker` (the queue
//! engine, no transport types), `rpc` (the gRPC layer onto it), `auth`
//! (tokens, roles, the interceptor), `limits` (caps in front of the
//! services), `http`, `metrics`, `grpc_metrics` and `status` (the HTTP
//! listener: Prometheus metrics, gRPC call metrics, probes and the live
//! status page), `tls`, `config` and `units` (the server's flags and the
//! values they take), `codec` (the wire codec the generated code uses),
//! `shutdown`, `telemetry` and `cli` (the `taskq` binary's commands).
#![forbid(unsafe_code)]

pub(crate) mod auth;
pub(crate) mod broker;
#[doc(hidden)]
pub mod cli;
pub mod client;
/// The wire codec of the generated clients and servers (the bench's echo
/// service uses it too). Not part of the library's API.
#[doc(hidden)]
pub mod codec;
pub(crate) mod config;
pub(crate) mod grpc_metrics;
pub(crate) mod http;
pub(crate) mod limits;
pub(crate) mod metrics;
pub mod pb;
pub(crate) mod rpc;
pub mod server;
pub(crate) mod shutdown;
pub(crate) mod status;
pub(crate) mod store;
#[doc(hidden)]
pub mod telemetry;
pub(crate) mod tls;
pub(crate) mod units;
pub mod worker;

/// The entry points of the fuzz targets in `fuzz/` (the `fuzzing` feature
/// only; never in the product).
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::broker::model::replay as engine_ops;
    pub use crate::rpc::fuzz::run as requests;
}
