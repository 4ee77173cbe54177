//! taskq: a task queue over gRPC, with leases, deadlines, token auth and
//! health checks.
//!
//! The crate's parts, from the inside out:
//! - [`broker`]: the queue engine. Plain Rust, no transport types.
//! - [`pb`]: the generated `taskq.v1` messages and stubs.
//! - [`rpc`]: the gRPC service, a thin layer from the wire onto the broker.
//! - [`auth`]: bearer tokens, checked by an interceptor in constant time.
//! - [`server`]: `run(config, listener, shutdown)`: health, drain, logging.
//! - [`config`]: the command line and `TASKQ_*` environment, validated.
//! - [`telemetry`]: the tracing subscriber, installed only by the binary.
//! - [`tls`]: certificates and keys, loaded and checked before start.
//! - [`client`]: a typed client with deadlines on every call.
//! - [`worker`]: the worker runtime: leases kept alive, reconnects, drain.
//! - [`cli`]: the subcommands of the `taskq` binary.
#![forbid(unsafe_code)]

pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod codec;
pub mod config;
pub mod limits;
pub mod pb;
pub mod rpc;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod units;
pub mod worker;
