//! GetStats: counters of one queue or all, and the workers seen.

use tonic::Status;

use super::convert;
use crate::broker::Broker;
use crate::pb;

/// GetStats of `request.queue`, or of every queue when it is empty.
pub(super) fn get_stats(
    broker: &Broker,
    request: pb::GetStatsRequest,
) -> Result<pb::GetStatsResponse, Status> {
    let queue = if request.queue.is_empty() {
        None
    } else {
        Some(convert::queue(&request.queue)?)
    };
    Ok(convert::stats(broker.stats(queue.as_ref())))
}
