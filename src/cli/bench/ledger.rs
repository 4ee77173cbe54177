//! The books of one `taskq bench` run: every task it put and every result
//! it read, each result checked against them. A result counts as done only
//! when its task is one this run put and has not seen before, its state is
//! SUCCEEDED, and its output is what the bench's handler (`echo`) makes of
//! that task's payload. Everything else is counted apart, in [`Faults`].

use std::collections::hash_map::Entry;
use std::sync::Mutex;

use bytes::Bytes;
use hdrhistogram::Histogram;
use tokio::time::Instant;

use crate::broker::{IdMap, TaskId};
use crate::pb;

use FaultKind::{Duplicated, Failed, Lost, Wrong};

/// What [`Ledger::stamp`] gives: nanoseconds since the ledger was made.
pub(super) type Stamp = u64;

/// The value of a task whose result was seen, in place of its put stamp.
const SEEN: Stamp = Stamp::MAX;

/// The payloads of a run, and the check that an output is the echo of
/// one. Each payload is its put stamp (8 bytes, little-endian) followed by
/// `x`s: a result carries its put back, so an output that belongs to
/// another put (another batch) is told apart from the right one.
#[derive(Clone, Debug)]
pub(super) struct Payload {
    /// A whole payload's worth of `x`, at least 8 bytes.
    filler: Bytes,
}

impl Payload {
    /// Payloads of `size` bytes, or 8 (the stamp) if that is more.
    pub(super) fn new(size: usize) -> Self {
        Self {
            filler: Bytes::from(vec![b'x'; size.max(8)]),
        }
    }

    /// The payload of the tasks put at `stamp`.
    pub(super) fn at(&self, stamp: Stamp) -> Bytes {
        let mut payload = self.filler.to_vec();
        payload[..8].copy_from_slice(&stamp.to_le_bytes());
        Bytes::from(payload)
    }

    /// Whether `output` is the echo of the payload put at `stamp`: a
    /// comparison of bytes, nothing allocated.
    fn echoed_by(&self, output: &[u8], stamp: Stamp) -> bool {
        output.len() == self.filler.len()
            && output[..8] == stamp.to_le_bytes()
            && output[8..] == self.filler[8..]
    }
}

/// Results of one kind that did not check out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Fault {
    /// How many.
    pub(super) count: u64,
    /// The first one found: which task, and what was wrong with it.
    pub(super) first: Option<String>,
}

impl Fault {
    fn add(&mut self, id: impl std::fmt::Display, what: impl std::fmt::Display) {
        self.count += 1;
        if self.first.is_none() {
            self.first = Some(format!("task {id}: {what}"));
        }
    }
}

/// The kinds of result that do not check out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FaultKind {
    /// A task put whose result was not read by the end of the run.
    Lost,
    /// A result read for a task whose result had been read already.
    Duplicated,
    /// A SUCCEEDED result whose output is not the echo of its task's
    /// payload, or a result of a task this run did not put.
    Wrong,
    /// A result in any state other than SUCCEEDED.
    Failed,
}

impl FaultKind {
    /// Every kind, in the order they are reported.
    pub(super) const ALL: [Self; 4] = [Self::Lost, Self::Duplicated, Self::Wrong, Self::Failed];

    /// The kind's name in the output and the JSON keys.
    pub(super) fn name(self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Duplicated => "duplicated",
            Self::Wrong => "wrong",
            Self::Failed => "failed",
        }
    }
}

/// Results that did not check out, by kind. Any of them fails the run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Faults([Fault; 4]);

impl Faults {
    /// Each kind with its faults, in the order they are reported.
    pub(super) fn kinds(&self) -> impl Iterator<Item = (FaultKind, &Fault)> {
        FaultKind::ALL.into_iter().map(|kind| (kind, &self[kind]))
    }

    /// All faults of every kind.
    pub(super) fn total(&self) -> u64 {
        self.0.iter().map(|fault| fault.count).sum()
    }
}

impl std::ops::Index<FaultKind> for Faults {
    type Output = Fault;

    fn index(&self, kind: FaultKind) -> &Fault {
        &self.0[kind as usize]
    }
}

impl std::ops::IndexMut<FaultKind> for Faults {
    fn index_mut(&mut self, kind: FaultKind) -> &mut Fault {
        &mut self.0[kind as usize]
    }
}

/// How many items came in how many messages: the mean batch of one leg of
/// the round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct PerMessage {
    /// Messages seen.
    pub(super) messages: u64,
    /// Items (tasks or results) they carried.
    pub(super) items: u64,
}

impl PerMessage {
    /// Counts a message that carried `items` items.
    pub(super) fn add(&mut self, items: u64) {
        self.messages += 1;
        self.items += items;
    }

    /// Items per message; `None` before any message.
    pub(super) fn mean(self) -> Option<f64> {
        (self.messages > 0).then(|| self.items as f64 / self.messages as f64)
    }
}

impl std::ops::Add for PerMessage {
    type Output = Self;

    fn add(self, other: Self) -> Self {
        Self {
            messages: self.messages + other.messages,
            items: self.items + other.items,
        }
    }
}

/// What a run's books hold at its end.
#[derive(Debug)]
pub(super) struct Tally {
    /// From put to result read, in microseconds, of each result that
    /// checked out.
    pub(super) latency: Histogram<u64>,
    /// Tasks that could not be put (the put failed or was refused).
    pub(super) refused: u64,
    /// Results that did not check out.
    pub(super) faults: Faults,
    /// The results read (checked out or not), and the messages they came
    /// in.
    pub(super) results_read: PerMessage,
}

/// The books of a run, shared by its producers and result readers. Each
/// call takes the lock once for a batch put or a message read, so the
/// checks cost a hash lookup and a comparison of bytes per task.
#[derive(Debug)]
pub(super) struct Ledger {
    epoch: Instant,
    payload: Payload,
    /// A std mutex: no critical section awaits.
    books: Mutex<Books>,
}

#[derive(Debug)]
struct Books {
    /// Every task put this run, by id, with its put stamp until its
    /// result is read, then [`SEEN`]: 24 bytes an entry, made room for at
    /// the start (so the map never grows and rehashes mid-run). Seen tasks
    /// stay, so that a second result for one is a duplicate, not a
    /// stranger.
    tasks: IdMap<TaskId, Stamp>,
    /// Results read before their put was recorded (a result can reach a
    /// reader before the put's answer reaches its producer), with the
    /// stamp they were read at; checked when the put is recorded.
    early: IdMap<TaskId, (pb::Result, Stamp)>,
    /// Tasks put whose result has not been read.
    outstanding: u64,
    refused: u64,
    latency: Histogram<u64>,
    faults: Faults,
    results_read: PerMessage,
}

/// Latency histograms: 1 µs to 10 minutes, 3 significant digits.
pub(super) fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

impl Ledger {
    /// Empty books for up to `tasks` tasks with payloads of
    /// `payload_bytes`.
    pub(super) fn new(tasks: u64, payload_bytes: usize) -> Self {
        Self {
            epoch: Instant::now(),
            payload: Payload::new(payload_bytes),
            books: Mutex::new(Books {
                tasks: IdMap::with_capacity_and_hasher(tasks as usize, Default::default()),
                early: IdMap::default(),
                outstanding: 0,
                refused: 0,
                latency: histogram(),
                faults: Faults::default(),
                results_read: PerMessage::default(),
            }),
        }
    }

    /// Now, as a stamp.
    pub(super) fn stamp(&self) -> Stamp {
        self.epoch.elapsed().as_nanos() as Stamp
    }

    /// The payload of tasks put at `stamp`.
    pub(super) fn payload(&self, stamp: Stamp) -> Bytes {
        self.payload.at(stamp)
    }

    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        // A panic elsewhere leaves the books whole: every change is one
        // synchronous step.
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records `n` tasks that could not be put.
    pub(super) fn refused(&self, n: u64) {
        if n > 0 {
            self.books().refused += n;
        }
    }

    /// Records the tasks the server stored, by the ids it gave them, put
    /// at `stamp`. Returns how many of them are settled at once: their
    /// result was read already, or the id cannot be tracked.
    pub(super) fn put<'a>(&self, ids: impl IntoIterator<Item = &'a str>, stamp: Stamp) -> u64 {
        let mut books = self.books();
        let books = &mut *books;
        let mut settled = 0;
        for id in ids {
            let Some(key) = TaskId::parse(id) else {
                books.faults[Wrong].add(id, "the server gave the task an id that is not a UUID");
                settled += 1;
                continue;
            };
            match books.tasks.entry(key) {
                Entry::Occupied(_) => {
                    // The server gave one id to two tasks: the second one
                    // cannot be told apart, so it is settled as a fault.
                    books.faults[Duplicated].add(id, "the server gave the id to two tasks");
                    settled += 1;
                }
                Entry::Vacant(slot) => {
                    // Results read early are rare: the map is empty most
                    // of the time, and then not looked into.
                    let early = match books.early.is_empty() {
                        true => None,
                        false => books.early.remove(&key),
                    };
                    match early {
                        Some((result, read_at)) => {
                            slot.insert(SEEN);
                            settled += 1;
                            books.judge(&self.payload, &result, stamp, read_at);
                        }
                        None => {
                            slot.insert(stamp);
                            books.outstanding += 1;
                        }
                    }
                }
            }
        }
        settled
    }

    /// Checks the results of one message just read. Returns how many
    /// tasks they settle: tasks put by this run whose result is read for
    /// the first time.
    pub(super) fn read(&self, results: impl IntoIterator<Item = pb::Result>) -> u64 {
        let read_at = self.stamp();
        let mut books = self.books();
        let books = &mut *books;
        let mut settled = 0;
        let mut count = 0;
        for result in results {
            count += 1;
            let Some(key) = TaskId::parse(&result.task_id) else {
                books.faults[Wrong].add(&result.task_id, "a result for an id that is not a UUID");
                continue;
            };
            match books.tasks.get_mut(&key) {
                Some(stamp) if *stamp == SEEN => {
                    books.faults[Duplicated].add(&result.task_id, "its result was read twice");
                }
                Some(stamp) => {
                    let put_at = std::mem::replace(stamp, SEEN);
                    books.outstanding -= 1;
                    settled += 1;
                    books.judge(&self.payload, &result, put_at, read_at);
                }
                None => match books.early.entry(key) {
                    Entry::Occupied(_) => {
                        books.faults[Duplicated].add(&result.task_id, "its result was read twice");
                    }
                    Entry::Vacant(slot) => {
                        slot.insert((result, read_at));
                    }
                },
            }
        }
        books.results_read.add(count);
        settled
    }

    /// The books at the end of the run: tasks still outstanding are lost,
    /// results still waiting for their put are strangers (wrong). Takes
    /// the latencies out; the books keep the tasks, so that their memory
    /// is not handed to what runs next (the bench's memory phase).
    pub(super) fn tally(&self) -> Tally {
        let mut books = self.books();
        let books = &mut *books;
        let mut faults = books.faults.clone();
        if books.outstanding > 0 {
            let lost = books.tasks.iter().find(|(_, stamp)| **stamp != SEEN);
            if let Some((key, _)) = lost {
                faults[Lost].add(key, "put, but no result was read");
            }
            // The books counted them all along.
            faults[Lost].count = books.outstanding;
        }
        for (result, _) in books.early.values() {
            faults[Wrong].add(&result.task_id, "a result for a task this run did not put");
        }
        Tally {
            latency: std::mem::replace(&mut books.latency, histogram()),
            refused: books.refused,
            faults,
            results_read: books.results_read,
        }
    }
}

impl Books {
    /// Judges the first result read for a task put at `put_at`.
    fn judge(&mut self, payload: &Payload, result: &pb::Result, put_at: Stamp, read_at: Stamp) {
        if result.state != pb::TaskState::Succeeded as i32 {
            let state = pb::TaskState::try_from(result.state).map_or_else(
                |_| result.state.to_string(),
                |s| s.as_str_name().to_string(),
            );
            self.faults[Failed].add(&result.task_id, format!("{state}: {}", result.error));
        } else if !payload.echoed_by(&result.output, put_at) {
            self.faults[Wrong].add(
                &result.task_id,
                format!(
                    "SUCCEEDED with {} bytes of output that are not the echo of its {}-byte payload",
                    result.output.len(),
                    payload.filler.len()
                ),
            );
        } else {
            let micros = read_at.saturating_sub(put_at) / 1_000;
            let _ = self.latency.record(micros.max(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn id(n: u128) -> String {
        Uuid::from_u128(n).hyphenated().to_string()
    }

    fn result(ledger: &Ledger, n: u128, stamp: Stamp) -> pb::Result {
        pb::Result {
            task_id: id(n),
            state: pb::TaskState::Succeeded as i32,
            output: ledger.payload(stamp),
            ..Default::default()
        }
    }

    /// Puts tasks 1..=n at `stamp`.
    fn put(ledger: &Ledger, n: u128, stamp: Stamp) -> u64 {
        let ids: Vec<String> = (1..=n).map(id).collect();
        ledger.put(ids.iter().map(String::as_str), stamp)
    }

    #[test]
    fn echoed_results_of_tasks_put_check_out() {
        let ledger = Ledger::new(10, 64);
        assert_eq!(put(&ledger, 3, 7), 0);
        let settled = ledger.read((1..=3).map(|n| result(&ledger, n, 7)));
        assert_eq!(settled, 3);
        let tally = ledger.tally();
        assert_eq!(tally.faults, Faults::default());
        assert_eq!(tally.latency.len(), 3);
        assert_eq!(tally.refused, 0);
    }

    #[test]
    fn results_are_counted_with_the_messages_they_came_in() {
        let ledger = Ledger::new(10, 8);
        put(&ledger, 5, 7);
        ledger.read((1..=3).map(|n| result(&ledger, n, 7)));
        ledger.read([result(&ledger, 4, 7)]);
        // A duplicate and a stranger are read too, so they count.
        ledger.read([result(&ledger, 4, 7), result(&ledger, 99, 7)]);
        let read = ledger.tally().results_read;
        assert_eq!((read.messages, read.items), (3, 6));
        assert_eq!(read.mean(), Some(2.0));
        assert_eq!(PerMessage::default().mean(), None);
    }

    #[test]
    fn each_kind_of_fault_is_counted_apart() {
        let ledger = Ledger::new(10, 16);
        ledger.refused(2);
        put(&ledger, 5, 100);
        let mut failed = result(&ledger, 2, 100);
        failed.state = pb::TaskState::Failed as i32;
        failed.error = "no".into();
        let mut wrong = result(&ledger, 3, 100);
        wrong.output = Bytes::from_static(b"not the payload!");
        let settled = ledger.read([
            result(&ledger, 1, 100),
            failed,
            wrong,
            // Task 4's payload as it was put at another time.
            result(&ledger, 4, 101),
            // Task 1 again.
            result(&ledger, 1, 100),
            // Never put.
            result(&ledger, 99, 100),
        ]);
        assert_eq!(settled, 4, "tasks 1 to 4 each settled once");
        let tally = ledger.tally();
        assert_eq!(tally.refused, 2);
        assert_eq!(tally.latency.len(), 1, "only task 1 checked out");
        let counts: Vec<u64> = tally.faults.kinds().map(|(_, fault)| fault.count).collect();
        assert_eq!(counts, [1, 1, 3, 1], "lost, duplicated, wrong, failed");
        let first = |fault: &Fault| fault.first.clone().unwrap();
        assert_eq!(
            first(&tally.faults[Failed]),
            format!("task {}: TASK_STATE_FAILED: no", id(2))
        );
        assert_eq!(
            first(&tally.faults[Lost]),
            format!("task {}: put, but no result was read", id(5))
        );
        assert!(first(&tally.faults[Wrong]).starts_with(&format!("task {}: ", id(3))));
    }

    /// A result can reach one producer's reader before the put's answer
    /// reaches another producer: it is checked when the put is recorded.
    #[test]
    fn a_result_read_before_its_put_is_recorded_is_checked_then() {
        let ledger = Ledger::new(10, 8);
        assert_eq!(ledger.read([result(&ledger, 1, 5)]), 0);
        let mut wrong = result(&ledger, 2, 5);
        wrong.output = Bytes::from_static(b"12345678");
        assert_eq!(ledger.read([wrong]), 0);
        assert_eq!(put(&ledger, 2, 5), 2, "both settle when put");
        assert_eq!(ledger.read([result(&ledger, 1, 5)]), 0);
        let tally = ledger.tally();
        assert_eq!(tally.latency.len(), 1);
        let counts: Vec<u64> = tally.faults.kinds().map(|(_, fault)| fault.count).collect();
        assert_eq!(counts, [0, 1, 1, 0], "lost, duplicated, wrong, failed");
    }

    #[test]
    fn results_never_matched_by_a_put_are_wrong_and_ids_not_uuids_too() {
        let ledger = Ledger::new(10, 8);
        ledger.read([result(&ledger, 1, 5)]);
        let mut odd = result(&ledger, 2, 5);
        odd.task_id = "not-an-id".into();
        ledger.read([odd]);
        assert_eq!(ledger.put(["also-not-an-id"], 5), 1);
        let faults = ledger.tally().faults;
        assert_eq!((faults[Wrong].count, faults[Lost].count), (3, 0));
    }

    #[test]
    fn a_payload_is_its_stamp_then_filler() {
        let payload = Payload::new(3);
        let bytes = payload.at(0x0102);
        assert_eq!(&bytes[..], &[2, 1, 0, 0, 0, 0, 0, 0]);
        assert!(payload.echoed_by(&bytes, 0x0102));
        assert!(!payload.echoed_by(&bytes, 0x0103));
        assert!(!payload.echoed_by(&bytes[..7], 0x0102));
        let long = Payload::new(12);
        let mut bytes = long.at(9).to_vec();
        assert!(long.echoed_by(&bytes, 9));
        bytes[11] = b'y';
        assert!(!long.echoed_by(&bytes, 9));
    }
}
