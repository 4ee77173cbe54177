//! The `requests` fuzz target's harness: raw bytes decoded as a sequence of
//! requests and run through the real handlers against one broker. No input
//! may panic, come back INTERNAL, or leave the broker inconsistent.
//! Compiled only for tests and the `fuzzing` feature.
//!
//! Input format, repeated: one byte naming the call, one byte of length
//! `n`, then `n` bytes decoded as that call's request message.

use std::time::Duration;

use prost::Message;
use tonic::{Code, Request, Status};

use super::TaskQueueService;
use crate::auth::Access;
use crate::broker::{Broker, BrokerConfig};
use crate::pb::{self, task_queue_server::TaskQueue};

/// Runs the requests `data` encodes; panics on a broken promise.
pub fn run(data: &[u8]) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a current-thread runtime");
    runtime.block_on(async {
        let broker = Broker::new(BrokerConfig {
            max_payload: 64,
            max_result: 64,
            queue_capacity: 8,
            max_queues: 4,
            ..BrokerConfig::default()
        });
        let service = TaskQueueService::new(broker.clone(), Duration::ZERO).with_max_batch(4);
        let mut rest = data;
        while let [call, len, tail @ ..] = rest {
            let (body, tail) = tail.split_at(usize::from(*len).min(tail.len()));
            rest = tail;
            if let Err(status) = call_once(&service, *call, body).await
                && status.code() == Code::Internal
            {
                panic!("INTERNAL for call {call}: {status:?}");
            }
            broker.check();
            // Let timers and spawned watchers run.
            tokio::time::sleep(Duration::from_millis(u64::from(*len) * 10)).await;
        }
    });
}

fn request<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.extensions_mut().insert(Access::full());
    request
}

async fn call_once(service: &TaskQueueService, call: u8, body: &[u8]) -> Result<(), Status> {
    let undecodable = |_| Status::invalid_argument("undecodable");
    match call % 9 {
        0 => {
            let m = pb::PutTaskRequest::decode(body).map_err(undecodable)?;
            service.put_task(request(m)).await.map(drop)
        }
        1 => {
            let m = pb::GetTaskRequest::decode(body).map_err(undecodable)?;
            service.get_task(request(m)).await.map(drop)
        }
        2 => {
            let m = pb::ExtendLeaseRequest::decode(body).map_err(undecodable)?;
            service.extend_lease(request(m)).await.map(drop)
        }
        3 => {
            let m = pb::PutResultRequest::decode(body).map_err(undecodable)?;
            service.put_result(request(m)).await.map(drop)
        }
        4 => {
            let m = pb::GetResultRequest::decode(body).map_err(undecodable)?;
            service.get_result(request(m)).await.map(drop)
        }
        5 => {
            let m = pb::GetStatsRequest::decode(body).map_err(undecodable)?;
            service.get_stats(request(m)).await.map(drop)
        }
        6 => {
            let m = pb::PutTasksRequest::decode(body).map_err(undecodable)?;
            service.put_tasks(request(m)).await.map(drop)
        }
        7 => {
            let m = pb::WatchResultsRequest::decode(body).map_err(undecodable)?;
            service.watch_results(request(m)).await.map(drop)
        }
        _ => {
            let m = pb::WatchResultsRequest::decode(body).map_err(undecodable)?;
            service.watch_result_batches(request(m)).await.map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    /// Replays every input the fuzzer kept (`fuzz/corpus/requests`),
    /// regressions included.
    #[test]
    fn the_fuzz_corpus_replays_cleanly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/requests");
        let mut replayed = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/requests exists") {
            let path = entry.unwrap().path();
            // The committed inputs; the fuzzer's local corpus is not replayed.
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("seed-") || name.starts_with("regression-") {
                super::run(&std::fs::read(&path).unwrap());
                replayed += 1;
            }
        }
        assert!(replayed > 0, "no inputs in {}", dir.display());
    }
}
