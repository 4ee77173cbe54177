//! The one batch filler behind every batched message: tasks on a worker
//! stream (`tasks`), and results by queue or by task ids
//! (WatchResultBatches).
//!
//! Rules (the contract's, for StreamTasks with `max_batch` and
//! WatchResultBatches):
//! - A batch holds what is ready at this poll and never waits to fill: the
//!   filler waits only while it has nothing.
//! - A batch stays under [`BATCH_BYTES`] unless it holds one item. Items'
//!   size bounds are added up (each is checked before it is converted), so
//!   nothing is encoded twice to be measured.
//! - An item that does not fit is put back in its source before it is
//!   converted: it leads the next batch, or goes back with the rest if the
//!   stream ends first. An error that follows items is sent after them.

use std::task::{Context, Poll};

use tonic::Status;

/// Largest encoded batch, unless it holds one item (the contract:
/// StreamTasks, point 6). Well under any client's message limit.
pub const BATCH_BYTES: usize = 1 << 20;
/// Most items a batch reserves room for at once (it can grow past).
const MAX_RESERVED: usize = 1024;

/// Where a batch's items come from.
pub(super) trait BatchSource {
    /// An item as the source yields it.
    type Item;
    /// The item as it goes on the wire.
    type Wire;

    /// The next item ready now; `Pending` registers the wake-up.
    fn poll_item(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Self::Item, Status>>>;
    /// An item taken and not sent: the next one out.
    fn put_back(&mut self, item: Self::Item);
    /// An error taken after items: sent, as the next message, after them.
    fn hold(&mut self, status: Status);
    /// Items ready now (some may be skipped when taken): room to reserve.
    fn ready(&self) -> usize {
        0
    }
    /// An upper bound of the item's size inside a batch message.
    fn bound(item: &Self::Item) -> usize;
    /// The item as it goes on the wire.
    fn convert(item: Self::Item) -> Self::Wire;
}

/// The items ready now, up to `max_items` and [`BATCH_BYTES`]; pending only
/// while there is none, `None` once the source ended with nothing left.
pub(super) fn poll_batch<S: BatchSource>(
    source: &mut S,
    max_items: usize,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Vec<S::Wire>, Status>>> {
    let reserve = source.ready().clamp(1, max_items.min(MAX_RESERVED));
    let mut batch = Vec::with_capacity(reserve);
    let mut bytes = 0;
    while batch.len() < max_items {
        let item = match source.poll_item(cx) {
            Poll::Ready(Some(Ok(item))) => item,
            Poll::Ready(Some(Err(status))) if batch.is_empty() => {
                return Poll::Ready(Some(Err(status)));
            }
            Poll::Ready(Some(Err(status))) => {
                source.hold(status);
                break;
            }
            // Nothing to send: wait (the poll registered the wake-up), or
            // end.
            Poll::Ready(None) if batch.is_empty() => return Poll::Ready(None),
            Poll::Pending if batch.is_empty() => return Poll::Pending,
            Poll::Ready(None) | Poll::Pending => break,
        };
        let size = S::bound(&item);
        if !batch.is_empty() && bytes + size > BATCH_BYTES {
            source.put_back(item);
            break;
        }
        bytes += size;
        batch.push(S::convert(item));
    }
    Poll::Ready(Some(Ok(batch)))
}

/// The answer of each item of a batched request, in order: `refused`
/// holds, per item, the status it was refused with before it reached the
/// broker (or `None`), and `answers` the broker's answers to the others,
/// in order.
pub(super) fn in_place<T>(
    refused: impl IntoIterator<Item = Option<Status>>,
    answers: impl IntoIterator<Item = Result<T, crate::broker::BrokerError>>,
) -> impl Iterator<Item = Result<T, Status>> {
    let mut answers = answers.into_iter();
    refused.into_iter().map(move |refused| match refused {
        Some(status) => Err(status),
        None => answers
            .next()
            .expect("the broker answers every item it was given")
            .map_err(Status::from),
    })
}

/// An item's size inside a batch message (each batch's items are its
/// field 1): its encoding plus the field's key and length, so that the
/// batch's own size is the sum.
pub(super) fn in_batch_len(item: &impl prost::Message) -> usize {
    prost::encoding::message::encoded_len(1, item)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use prost::Message as _;

    use super::*;
    use crate::broker::{LeaseId, LeasedTask, QueueName, TaskId, TaskResult, TaskState, WorkerId};
    use crate::pb;
    use crate::rpc::convert;

    /// A source of ready byte strings, with an error at the end if asked.
    struct Ready {
        items: VecDeque<Vec<u8>>,
        end: Option<Status>,
        held: Option<Status>,
    }

    impl BatchSource for Ready {
        type Item = Vec<u8>;
        type Wire = Vec<u8>;

        fn poll_item(&mut self, _: &mut Context<'_>) -> Poll<Option<Result<Vec<u8>, Status>>> {
            if let Some(status) = self.held.take() {
                return Poll::Ready(Some(Err(status)));
            }
            match self.items.pop_front() {
                Some(item) => Poll::Ready(Some(Ok(item))),
                None => Poll::Ready(self.end.take().map(Err)),
            }
        }
        fn put_back(&mut self, item: Vec<u8>) {
            self.items.push_front(item);
        }
        fn hold(&mut self, status: Status) {
            self.held = Some(status);
        }
        fn bound(item: &Vec<u8>) -> usize {
            item.len()
        }
        fn convert(item: Vec<u8>) -> Vec<u8> {
            item
        }
    }

    fn poll(source: &mut Ready, max: usize) -> Option<Result<Vec<Vec<u8>>, Status>> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match poll_batch(source, max, &mut cx) {
            Poll::Ready(batch) => batch,
            Poll::Pending => panic!("a ready source never leaves the filler pending"),
        }
    }

    /// Items up to the count and the byte bound; the one that does not fit
    /// leads the next batch; a lone item past the bound still goes; an
    /// error after items comes next, then the end.
    #[test]
    fn batches_split_by_count_and_bytes_and_keep_the_error_last() {
        let half = BATCH_BYTES / 2 + 1;
        let mut source = Ready {
            items: [
                vec![1; 10],
                vec![2; 10],
                vec![3; half],
                vec![4; half],
                vec![5; 2 * BATCH_BYTES],
            ]
            .into(),
            end: Some(Status::unavailable("closing")),
            held: None,
        };
        let sizes = |batch: Vec<Vec<u8>>| batch.iter().map(|i| i[0]).collect::<Vec<_>>();
        assert_eq!(sizes(poll(&mut source, 2).unwrap().unwrap()), [1, 2]);
        assert_eq!(sizes(poll(&mut source, 8).unwrap().unwrap()), [3]);
        assert_eq!(sizes(poll(&mut source, 8).unwrap().unwrap()), [4]);
        assert_eq!(sizes(poll(&mut source, 8).unwrap().unwrap()), [5]);
        assert_eq!(
            poll(&mut source, 8).unwrap().unwrap_err().message(),
            "closing"
        );
        assert!(poll(&mut source, 8).is_none());
    }

    /// The 1 MiB bound of a batch holds only if the items' sizes add up to
    /// the batch's size, field keys and lengths included.
    #[test]
    fn batch_sizes_add_up() {
        let tasks: Vec<_> = [0, 1, 127, 128, 70_000]
            .iter()
            .map(|&n| pb::Task {
                id: "01890a5d-ac96-774b-bcce-b302099a8057".into(),
                payload: vec![b'x'; n].into(),
                attempt: 1,
                ..Default::default()
            })
            .collect();
        let sum: usize = tasks.iter().map(in_batch_len).sum();
        assert_eq!(sum, pb::TaskBatch { tasks }.encoded_len());
        let results: Vec<_> = [0, 300, 20_000]
            .iter()
            .map(|&n| pb::Result {
                task_id: "t".into(),
                output: vec![b'y'; n].into(),
                ..Default::default()
            })
            .collect();
        let sum: usize = results.iter().map(in_batch_len).sum();
        assert_eq!(sum, pb::ResultBatch { results }.encoded_len());
    }

    /// A batch checks the bound before converting: it must never be below
    /// the size the conversion gives, whatever the fields hold.
    #[test]
    fn size_bounds_cover_the_converted_size() {
        let id = TaskId::parse("01890a5d-ac96-774b-bcce-b302099a8057").unwrap();
        // The largest varints: a far future, the most nanoseconds, the
        // most attempts and lease numbers.
        let late = std::time::UNIX_EPOCH + std::time::Duration::new(1 << 40, 999_999_999);
        let queue = QueueName::parse(&"q".repeat(128)).unwrap();
        for (payload, headers) in [(0, 0), (1, 1), (300, 3), (70_000, 20)] {
            let task = LeasedTask {
                id,
                queue: queue.clone(),
                payload: vec![0; payload].into(),
                headers: (0..headers)
                    .map(|i| (format!("header-{i}"), "v".repeat(200)))
                    .collect(),
                attempt: u32::MAX,
                max_attempts: u32::MAX,
                lease_id: LeaseId {
                    task: id,
                    seq: u32::MAX,
                },
                lease_expires_at: late,
                lease_deadline: tokio::time::Instant::now(),
                created_at: late,
                expires_at: Some(late),
            };
            let bound = convert::task_len_bound(&task);
            assert!(in_batch_len(&convert::task(task)) <= bound);
        }
        for (output, error) in [(0, 0), (1, 0), (0, 500), (70_000, 70_000)] {
            let result = TaskResult {
                task_id: id,
                queue: queue.clone(),
                state: TaskState::Failed,
                output: vec![0; output].into(),
                error: "e".repeat(error),
                attempts: u32::MAX,
                worker: Some(WorkerId::new(&"w".repeat(WorkerId::MAX_LEN)).unwrap()),
                created_at: late,
                finished_at: late,
            };
            let bound = convert::result_len_bound(&result);
            assert!(in_batch_len(&convert::result(result)) <= bound);
        }
    }
}
