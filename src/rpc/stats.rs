//! GetStats: counters of one queue or all, and the workers seen. A token
//! limited to some queues sees only those: a queue outside its list is
//! PERMISSION_DENIED, and "all queues" means all of its queues.

use tonic::Status;

use super::convert;
use crate::auth::Access;
use crate::pb;
use crate::store::Store;

/// GetStats of `request.queue`, or of every queue `access` may see when it
/// is empty.
pub(super) async fn get_stats<S: Store>(
    broker: &S,
    access: &Access,
    request: pb::GetStatsRequest,
) -> Result<pb::GetStatsResponse, Status> {
    let stats = if request.queue.is_empty() {
        broker.stats(access.queues()).await?
    } else {
        let queue = convert::queue(&request.queue)?;
        access.permit_queue(&queue)?;
        broker.stats(Some(std::slice::from_ref(&queue))).await?
    };
    Ok(convert::stats(stats))
}
