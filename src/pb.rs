//! The generated `taskq.v1` protobuf messages and gRPC stubs, and the
//! encoded descriptor set that server reflection serves. Nothing else.
//!
//! # Examples
//!
//! The raw generated client, as any gRPC client in any language would use
//! the contract (here against a server on a free port):
//!
//! ```
//! use taskq::pb::{self, task_queue_client::TaskQueueClient};
//! # use taskq::server::{self, ServerConfig};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! # let address = format!("http://{}", listener.local_addr()?);
//! # let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
//! # let server = tokio::spawn(server::run(ServerConfig::default(), listener, async {
//! #     let _ = stopped.await;
//! # }));
//! let mut client = TaskQueueClient::connect(address).await?;
//! let put = client
//!     .put_task(pb::PutTaskRequest {
//!         queue: "squares".into(),
//!         payload: b"12".to_vec().into(),
//!         ..Default::default()
//!     })
//!     .await?
//!     .into_inner();
//! let leased = client
//!     .get_task(pb::GetTaskRequest {
//!         queue: "squares".into(),
//!         ..Default::default()
//!     })
//!     .await?
//!     .into_inner()
//!     .task
//!     .expect("the task just put");
//! assert_eq!(leased.id, put.task_id);
//! # let _ = stop.send(());
//! # server.await??;
//! # Ok(())
//! # }
//! ```
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("taskq.v1");

/// The encoded `FileDescriptorSet` of `proto/taskq/v1/taskq.proto` (with
/// its imports), for `grpc.reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/taskq_v1_descriptor.bin"));
