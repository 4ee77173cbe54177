//! The engine's vocabulary: validated names, ids, what goes in and out
//! with its limits, and the errors (each says what went wrong and what to
//! do; the gRPC layer maps each onto one status code).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use uuid::Uuid;

use super::TaskDurations;

/// The longest queue name accepted.
pub const MAX_QUEUE_NAME: usize = 128;
/// The name used when a request leaves the queue empty.
pub const DEFAULT_QUEUE: &str = "default";

/// A name a client chooses (a queue's, a worker's), shared by every
/// record that refers to it, with its hash worked out once. The engine
/// looks queues and workers up by name several times per task; SipHash
/// over the text each time showed in the stream bench's profile, while a
/// fast unkeyed hash of text a client chooses would let a client pick
/// names that collide. So the name is hashed once, when it is made, with
/// SipHash keyed at random per process (`RandomState`), and maps keyed by
/// names ([`NameMap`]) use that number as it is. One pointer wide, so
/// each task's record carries 8 bytes for its queue, not 16.
#[derive(Clone)]
struct Name(Arc<NameInner>);

struct NameInner {
    hash: u64,
    text: Box<str>,
}

impl Name {
    fn new(text: &str) -> Self {
        static KEY: std::sync::OnceLock<std::collections::hash_map::RandomState> =
            std::sync::OnceLock::new();
        let hash = std::hash::BuildHasher::hash_one(KEY.get_or_init(Default::default), text);
        Self(Arc::new(NameInner {
            hash,
            text: text.into(),
        }))
    }

    fn as_str(&self) -> &str {
        &self.0.text
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.hash == other.0.hash && self.0.text == other.0.text)
    }
}

impl Eq for Name {}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.0.hash);
    }
}

impl PartialOrd for Name {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Name {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.as_str().cmp(other.as_str())
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A map keyed by [`QueueName`] or [`WorkerId`]: their hash is worked out
/// once, keyed, when the name is made; [`IdHasher`] only spreads it.
pub(super) type NameMap<K, V> = IdMap<K, V>;

/// A validated queue name: 1 to 128 of `A-Z a-z 0-9 . _ -`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(Name);

impl QueueName {
    /// Parses a queue name; `""` means [`DEFAULT_QUEUE`].
    ///
    /// # Errors
    /// [`BrokerError::InvalidQueueName`] for anything longer than 128 bytes or
    /// containing a character outside `A-Z a-z 0-9 . _ -`.
    pub fn parse(name: &str) -> Result<Self, BrokerError> {
        if name.is_empty() {
            return Ok(Self(Name::new(DEFAULT_QUEUE)));
        }
        let valid = name.len() <= MAX_QUEUE_NAME
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if valid {
            Ok(Self(Name::new(name)))
        } else {
            Err(BrokerError::InvalidQueueName {
                name: name.chars().take(MAX_QUEUE_NAME + 8).collect(),
            })
        }
    }

    /// The name as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    /// Whether [`QueueName::parse`] makes this name from `text`.
    pub fn is_parsed_from(&self, text: &str) -> bool {
        let text = if text.is_empty() { DEFAULT_QUEUE } else { text };
        self.as_str() == text
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Makes task ids without a system call: UUIDv7 with the wall-clock
/// millisecond of creation, then a 64-bit counter that starts at a random
/// value drawn once per process and goes up by one per id, then 10 bits of
/// per-process salt. Ids never repeat within a process (the counter does
/// not), sort by creation (millisecond, then counter: the broker's wall
/// clock is derived from a monotonic one), and two processes start far
/// apart.
pub(crate) struct IdMaker {
    counter: u64,
    salt: u64,
}

impl IdMaker {
    /// A maker starting at fresh random bits.
    pub(crate) fn new() -> Self {
        let seed = Uuid::now_v7().as_u128();
        Self {
            // Below 2^63: the counter cannot wrap in any process's life.
            counter: (seed as u64) >> 1,
            salt: (seed >> 64) as u64 & 0x3FF,
        }
    }

    /// The next id, stamped with `unix_ms`.
    pub(crate) fn next(&mut self, unix_ms: u64) -> TaskId {
        self.counter += 1;
        let x = self.counter;
        let rand_a = u128::from(x >> 52); // 12 bits
        let rand_b = u128::from(((x & ((1 << 52) - 1)) << 10) | self.salt); // 62 bits
        let bits = (u128::from(unix_ms & ((1 << 48) - 1)) << 80)
            | (0x7 << 76)
            | (rand_a << 64)
            | (0b10 << 62)
            | rand_b;
        TaskId(Uuid::from_u128(bits))
    }
}

/// A task's id: a UUIDv7, unique and sortable by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TaskId(Uuid);

/// Two words rather than the derived length-prefixed byte slice: the
/// engine looks tasks up by id several times per task ([`IdHasher`]).
impl std::hash::Hash for TaskId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let (high, low) = self.0.as_u64_pair();
        state.write_u64(high);
        state.write_u64(low);
    }
}

/// A fast hasher for keys the broker makes itself (task ids, stream
/// numbers), never for names a client chooses: no client can pick keys
/// that collide, so the DoS resistance of the default SipHash buys nothing
/// there, while SipHash showed in the stream bench's profile. FxHash's
/// word step, then murmur3's finaliser so that every bit of the key
/// reaches the bits the table indexes by.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^ (h >> 33)
    }
}

/// A map keyed by something the broker made: see [`IdHasher`]. (`taskq
/// bench` keeps its books of task ids in one too.)
pub(crate) type IdMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<IdHasher>>;
/// A set of things the broker made: see [`IdHasher`].
pub(super) type IdSet<K> = std::collections::HashSet<K, std::hash::BuildHasherDefault<IdHasher>>;

impl TaskId {
    /// Makes a new id with the `uuid` crate's generator (a system call for
    /// random bits each time); the broker uses [`IdMaker`] instead.
    #[cfg(test)]
    pub(crate) fn generate() -> Self {
        Self(Uuid::now_v7())
    }

    /// The id as a UUID, for stores that keep it as one.
    pub(crate) fn as_uuid(self) -> Uuid {
        self.0
    }

    /// The id a store kept as a UUID.
    pub(crate) fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    /// Parses the text form; `None` when it is not a task id.
    pub fn parse(text: &str) -> Option<Self> {
        Uuid::try_parse(text).ok().map(Self)
    }

    /// The id as `to_string` writes it, without the formatting machinery:
    /// one is written for every task and result sent.
    pub fn to_text(self) -> String {
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.0.hyphenated().encode_lower(&mut text).to_owned()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

/// Names one lease of one task. The sequence number grows with every
/// delivery of the task, so a lease id never repeats and an old holder is
/// told apart from the current one (a fencing token).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId {
    /// The task leased.
    pub task: TaskId,
    /// Which lease of the task, from 1.
    pub seq: u32,
}

impl LeaseId {
    /// Parses the text form `"<task id>/<seq>"`; `None` when malformed.
    pub fn parse(text: &str) -> Option<Self> {
        let (task, seq) = text.rsplit_once('/')?;
        let seq: u32 = seq.parse().ok()?;
        (seq > 0).then_some(())?;
        Some(Self {
            task: TaskId::parse(task)?,
            seq,
        })
    }

    /// The lease as `to_string` writes it (`task/seq`), without the
    /// formatting machinery (tests; the server writes it with
    /// [`LeaseId::to_text_after`]).
    #[cfg(test)]
    pub fn to_text(self) -> String {
        let mut id = [0u8; uuid::fmt::Hyphenated::LENGTH];
        self.to_text_after(self.task.0.hyphenated().encode_lower(&mut id))
    }

    /// [`LeaseId::to_text`] from its task's id already written (by
    /// [`TaskId::to_text`]): a delivery writes both, and the id once.
    pub fn to_text_after(self, task_text: &str) -> String {
        debug_assert!(TaskId::parse(task_text) == Some(self.task));
        let mut text = String::with_capacity(task_text.len() + 11);
        text.push_str(task_text);
        text.push('/');
        let mut digits = [0u8; 10];
        let mut rest = self.seq;
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        text.extend(digits[start..].iter().map(|&d| char::from(d)));
        text
    }
}

impl fmt::Display for LeaseId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.task, self.seq)
    }
}

/// Who took a task: the `worker_id` a worker gives.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(Name);

impl WorkerId {
    /// The longest worker id accepted, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Wraps a worker id.
    ///
    /// # Errors
    /// [`BrokerError::InvalidArgument`] when it is longer than
    /// [`WorkerId::MAX_LEN`] bytes.
    pub fn new(id: &str) -> Result<Self, BrokerError> {
        if id.len() > Self::MAX_LEN {
            return Err(BrokerError::InvalidArgument(format!(
                "worker_id is {} bytes; the limit is {} bytes",
                id.len(),
                Self::MAX_LEN
            )));
        }
        Ok(Self(Name::new(id)))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A task as a producer submits it.
#[derive(Clone, Debug, Default)]
pub struct NewTask {
    /// Where it goes.
    pub queue: Option<QueueName>,
    /// Opaque input for the worker.
    pub payload: Bytes,
    /// Deduplicates repeated submissions while the first task is held.
    pub idempotency_key: Option<String>,
    /// Deliveries allowed; 0 means the broker's default.
    pub max_attempts: u32,
    /// Metadata handed to the worker.
    pub headers: HashMap<String, String>,
    /// Time to live from creation.
    pub ttl: Option<Duration>,
    /// Hand-out order: higher first; within one priority, oldest first.
    pub priority: i32,
    /// Not handed out before this long after the put.
    pub delay: Option<Duration>,
}

/// Most headers a task may carry.
pub const MAX_HEADERS: usize = 64;
/// Most bytes of header keys and values a task may carry.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY: usize = 256;
/// Most deliveries a task may ask for.
pub const MAX_ATTEMPTS_LIMIT: u32 = 1000;
/// Longest ttl accepted: a year. Keeps deadline arithmetic far from overflow.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

impl NewTask {
    /// Checks the task against the limits above and `max_payload`.
    ///
    /// # Errors
    /// [`BrokerError::PayloadTooLarge`], or [`BrokerError::InvalidArgument`]
    /// naming the field and its limit.
    pub(crate) fn validate(&self, max_payload: usize) -> Result<(), BrokerError> {
        if self.payload.len() > max_payload {
            return Err(BrokerError::PayloadTooLarge {
                size: self.payload.len(),
                limit: max_payload,
            });
        }
        if self.max_attempts > MAX_ATTEMPTS_LIMIT {
            return Err(BrokerError::InvalidArgument(format!(
                "max_attempts is {}; the limit is {MAX_ATTEMPTS_LIMIT} (0 means the server default)",
                self.max_attempts
            )));
        }
        if self.headers.len() > MAX_HEADERS {
            return Err(BrokerError::InvalidArgument(format!(
                "{} headers; the limit is {MAX_HEADERS}",
                self.headers.len()
            )));
        }
        let header_bytes: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if header_bytes > MAX_HEADER_BYTES {
            return Err(BrokerError::InvalidArgument(format!(
                "headers are {header_bytes} bytes; the limit is {MAX_HEADER_BYTES} bytes"
            )));
        }
        if let Some(key) = &self.idempotency_key {
            if key.len() > MAX_IDEMPOTENCY_KEY {
                return Err(BrokerError::InvalidArgument(format!(
                    "idempotency_key is {} bytes; the limit is {MAX_IDEMPOTENCY_KEY} bytes",
                    key.len()
                )));
            }
        }
        if self.ttl.is_some_and(|ttl| ttl.is_zero() || ttl > MAX_TTL) {
            return Err(BrokerError::InvalidArgument(
                "ttl must be positive and at most 366 days; leave it unset for no ttl".into(),
            ));
        }
        if self.delay.is_some_and(|delay| delay > MAX_TTL) {
            return Err(BrokerError::InvalidArgument(
                "delay must be at most 366 days".into(),
            ));
        }
        if let (Some(delay), Some(ttl)) = (self.delay, self.ttl)
            && delay >= ttl
        {
            return Err(BrokerError::InvalidArgument(format!(
                "delay ({}) is not shorter than ttl ({}): the task would expire before it \
                 could be handed out; shorten the delay or lengthen the ttl",
                humantime::format_duration(delay),
                humantime::format_duration(ttl)
            )));
        }
        Ok(())
    }
}

/// What [`Broker::put`](super::Broker::put) did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PutOutcome {
    /// The stored task's id, or the first task's id when `duplicate`.
    pub task_id: TaskId,
    /// True when the idempotency key matched a task already held.
    pub duplicate: bool,
}

/// A request for work.
#[derive(Clone, Debug)]
pub struct LeaseRequest {
    /// The queue to take from.
    pub queue: QueueName,
    /// Who asks.
    pub worker: WorkerId,
    /// How long the lease lasts (the wire's `lease` field); `None` uses
    /// the broker's default. Clamped to the maximum.
    pub lease_duration: Option<Duration>,
}

/// A task handed to a worker under a lease.
#[derive(Clone, Debug, PartialEq)]
pub struct LeasedTask {
    /// The task.
    pub id: TaskId,
    /// Its queue.
    pub queue: QueueName,
    /// Its input.
    pub payload: Bytes,
    /// Its metadata.
    pub headers: HashMap<String, String>,
    /// Which delivery this is, from 1.
    pub attempt: u32,
    /// Deliveries allowed.
    pub max_attempts: u32,
    /// The lease the worker holds.
    pub lease_id: LeaseId,
    /// When the lease runs out.
    pub lease_expires_at: SystemTime,
    /// The same instant on the monotonic clock the broker times leases by.
    pub lease_deadline: tokio::time::Instant,
    /// When the task was stored.
    pub created_at: SystemTime,
    /// When the task's ttl runs out, if it has one.
    pub expires_at: Option<SystemTime>,
}

/// How a worker's run of a task ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It worked; the output goes to the result.
    Success(Bytes),
    /// It failed.
    Failure {
        /// What went wrong.
        message: String,
        /// Whether to try again while attempts remain.
        retry: bool,
        /// With `retry`: the wait before the next attempt, instead of the
        /// broker's backoff.
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    /// The outcome within `limit` bytes of output or message.
    ///
    /// A failure message is diagnosis, not data: one too long is cut to the
    /// limit rather than refused, so that a failure can always be reported
    /// (a refused one would leave the task to expire).
    ///
    /// # Errors
    /// [`BrokerError::ResultTooLarge`] for an output past the limit.
    pub(crate) fn within(self, limit: usize) -> Result<Self, BrokerError> {
        match self {
            Self::Success(output) if output.len() > limit => Err(BrokerError::ResultTooLarge {
                size: output.len(),
                limit,
            }),
            Self::Failure {
                retry_after: Some(after),
                ..
            } if after > MAX_TTL => Err(BrokerError::InvalidArgument(
                "retry_after must be at most 366 days".into(),
            )),
            Self::Failure {
                message,
                retry,
                retry_after,
            } if message.len() > limit => Ok(Self::Failure {
                message: truncate(message, limit),
                retry,
                retry_after,
            }),
            outcome => Ok(outcome),
        }
    }
}

/// `text` cut to at most `limit` bytes, at a character boundary.
fn truncate(mut text: String, limit: usize) -> String {
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    text
}

/// Where a task is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskState {
    /// Waiting to be handed out.
    Pending,
    /// Handed out under a lease.
    Leased,
    /// Finished with an output.
    Succeeded,
    /// Finished with an error.
    Failed,
    /// Taken back before it finished ([`Broker::cancel`](super::Broker::cancel)).
    Cancelled,
}

/// A finished task's result.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskResult {
    /// The task.
    pub task_id: TaskId,
    /// Its queue.
    pub queue: QueueName,
    /// [`TaskState::Succeeded`] or [`TaskState::Failed`].
    pub state: TaskState,
    /// The output, when it succeeded.
    pub output: Bytes,
    /// The error, when it failed.
    pub error: String,
    /// How many times the task was handed out.
    pub attempts: u32,
    /// The worker whose lease produced the result; `None` if never handed out.
    pub worker: Option<WorkerId>,
    /// When the task was stored.
    pub created_at: SystemTime,
    /// When it finished.
    pub finished_at: SystemTime,
}

/// An unfinished task as an operator looks it up (the status page's
/// lookup): where it is, how far along, and who holds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskView {
    /// Its queue.
    pub queue: QueueName,
    /// [`TaskState::Pending`] or [`TaskState::Leased`].
    pub state: TaskState,
    /// Deliveries so far (the current one included).
    pub attempts: u32,
    /// Its cap on deliveries.
    pub max_attempts: u32,
    /// When it was stored.
    pub created_at: SystemTime,
    /// When its ttl runs out, if it has one.
    pub expires_at: Option<SystemTime>,
    /// The payload's size.
    pub payload_bytes: u64,
    /// Its current lease, while leased.
    pub lease: Option<LeaseView>,
}

/// The current lease of a leased task, in a [`TaskView`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseView {
    /// Who holds it.
    pub worker: WorkerId,
    /// When it runs out unless extended or reported.
    pub expires_at: SystemTime,
}

/// How many of the latest failures a [`Snapshot`] carries.
pub const RECENT_FAILURES: usize = 20;

/// Longest error message kept in [`Snapshot::recent_failures`]; longer
/// ones are cut at a character boundary (the whole message stays in the
/// task's result).
pub const FAILURE_NOTE_BYTES: usize = 1024;

impl TaskResult {
    /// This result as [`Snapshot::recent_failures`] keeps it: without its
    /// output, its error cut to [`FAILURE_NOTE_BYTES`] at a character
    /// boundary.
    pub fn as_failure_note(&self) -> TaskResult {
        let mut cut = self.error.len().min(FAILURE_NOTE_BYTES);
        while !self.error.is_char_boundary(cut) {
            cut -= 1;
        }
        TaskResult {
            output: Bytes::new(),
            error: self.error[..cut].to_string(),
            ..self.clone()
        }
    }
}

/// Counters of one queue.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// The queue.
    pub queue: String,
    /// Tasks waiting to be handed out.
    pub pending: u64,
    /// Tasks waiting out a delay or a retry's backoff before they join
    /// `pending`.
    pub delayed: u64,
    /// Tasks handed out and not finished.
    pub leased: u64,
    /// Tasks finished with success since start.
    pub succeeded: u64,
    /// Tasks finished with failure since start.
    pub failed: u64,
    /// Tasks cancelled since start.
    pub cancelled: u64,
    /// Times a task went back to the queue for another attempt.
    pub redelivered: u64,
    /// How long the longest-waiting pending task has waited.
    pub oldest_pending_age: Duration,
    /// Results not yet handed out by queue.
    pub results_unclaimed: u64,
    /// Results dropped by retention before anyone read them by queue.
    pub results_evicted: u64,
    /// GetTask calls waiting on this queue.
    pub waiting_workers: u64,
    /// Tasks stored since start.
    pub enqueued: u64,
    /// Hand-outs since start, redeliveries included.
    pub delivered: u64,
    /// Failures because the task's ttl ran out (also counted in `failed`).
    pub expired: u64,
    /// Leased tasks that failed with retry and went back for another
    /// attempt (part of `redelivered`).
    pub retried_after_error: u64,
    /// Leased tasks whose lease ran out and went back for another attempt
    /// (part of `redelivered`).
    pub retried_after_lease_expiry: u64,
    /// Worker streams open on this queue.
    pub worker_streams: u64,
    /// How long its tasks waited, ran, and took in all, since start.
    pub durations: TaskDurations,
    /// PauseQueue holds its hand-outs.
    pub paused: bool,
}

/// The engine's numbers for monitoring, taken under one lock: every
/// queue's counters and the broker-wide ones. Built from counters kept as
/// tasks move; taking it scans no task.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// One entry per queue, sorted by name.
    pub queues: Vec<QueueStats>,
    /// Bytes of payloads and result outputs held.
    pub held_bytes: u64,
    /// `--max-held-bytes`.
    pub held_bytes_limit: u64,
    /// Workers seen within `--worker-timeout`.
    pub workers_alive: u64,
    /// The latest tasks that finished FAILED, newest first, at most
    /// [`RECENT_FAILURES`], without outputs and with their errors cut to
    /// [`FAILURE_NOTE_BYTES`].
    pub recent_failures: Vec<TaskResult>,
}

/// What the broker knows of one worker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerInfo {
    /// The worker.
    pub worker: WorkerId,
    /// The queue it last asked for work on.
    pub queue: Option<QueueName>,
    /// When it last called.
    pub last_seen: SystemTime,
    /// Tasks currently leased to it.
    pub in_flight: u32,
    /// False once silent for the worker timeout.
    pub alive: bool,
    /// Some of the tasks it holds (at most 8) with their lease deadlines,
    /// for the status page.
    pub leases: Vec<(TaskId, SystemTime)>,
}

/// A snapshot of queues and workers.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// One entry per queue, sorted by name.
    pub queues: Vec<QueueStats>,
    /// One entry per known worker, sorted by id.
    pub workers: Vec<WorkerInfo>,
}

/// How much the broker holds, for the shutdown log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Holdings {
    /// Unfinished tasks (pending and leased).
    pub tasks: usize,
    /// Finished results still held.
    pub results: usize,
}

/// Why the broker refused a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BrokerError {
    /// The queue name is not 1 to 128 of `A-Z a-z 0-9 . _ -`.
    #[error("invalid queue name {name:?}: use 1 to 128 characters of A-Z a-z 0-9 . _ -")]
    InvalidQueueName {
        /// The name given (shortened).
        name: String,
    },
    /// The payload is over the limit.
    #[error(
        "payload is {size} bytes; the limit is {limit} bytes (server flag --max-payload): \
         store large inputs elsewhere and send a reference"
    )]
    PayloadTooLarge {
        /// The payload's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The result output or failure message is over the limit.
    #[error("result is {size} bytes; the limit is {limit} bytes (server flag --max-result)")]
    ResultTooLarge {
        /// The result's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Some other field of the request is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The queue holds its capacity of unfinished tasks.
    #[error(
        "queue {queue} is full ({capacity} unfinished tasks): retry later, add workers, \
         or raise the server's --queue-capacity"
    )]
    QueueFull {
        /// The queue.
        queue: QueueName,
        /// Its capacity.
        capacity: usize,
    },
    /// A server-wide limit is reached.
    #[error("server limit reached: {0}")]
    LimitReached(String),
    /// No such task is held.
    #[error("no task {0}: it was never stored, or its result is no longer held")]
    TaskNotFound(String),
    /// The lease named is not the task's current lease.
    #[error(
        "lease {lease} is not the current lease of task {task}: it expired or was released, \
         and the task may be running elsewhere; drop this report"
    )]
    StaleLease {
        /// The task.
        task: TaskId,
        /// The lease given.
        lease: String,
    },
    /// The task already has its result.
    #[error("task {0} is already finished")]
    TaskFinished(TaskId),
    /// The task was cancelled: no lease of it counts any more.
    #[error(
        "task {0} was cancelled (CancelTask): stop working on it; no result or extension is \
         accepted"
    )]
    Cancelled(TaskId),
    /// The task already has a different result.
    #[error("task {0} already has a different result; results are write-once")]
    ResultConflict(TaskId),
    /// The broker is draining for shutdown.
    #[error("the server is shutting down: retry against another instance or after restart")]
    ShuttingDown,
    /// The store behind the server cannot be reached or failed (the
    /// message names it); nothing was changed unless the answer says so.
    #[error("the {store} store is unavailable: {reason}; retry shortly")]
    StoreUnavailable {
        /// Which store: `postgres`.
        store: &'static str,
        /// What failed, for the operator.
        reason: String,
    },
}

impl BrokerError {
    /// `limit` calls and streams wait already (`--max-waiters`).
    pub(crate) fn waiters_full(limit: usize) -> Self {
        Self::LimitReached(format!(
            "{limit} calls are already waiting (server flag --max-waiters); retry later"
        ))
    }

    /// `limit` queues exist already (`--max-queues`).
    pub(crate) fn queues_full(limit: usize) -> Self {
        Self::LimitReached(format!(
            "{limit} queues exist (server flag --max-queues); reuse an existing queue name"
        ))
    }

    pub(crate) fn stale(lease: LeaseId) -> Self {
        Self::StaleLease {
            task: lease.task,
            // Sequence 0 is never issued: it stands for a lease id that was
            // malformed or named another task.
            lease: if lease.seq == 0 {
                "given".into()
            } else {
                lease.to_string()
            },
        }
    }
}
