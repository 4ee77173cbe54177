//! Long-lived handler programs (`taskq worker --pipe`): one program per
//! concurrency slot, started once and fed task after task over its stdin
//! and stdout, so a Python or Node handler pays its start-up once rather
//! than per task.
//!
//! # The protocol
//! One JSON object per line (UTF-8, `\n`-terminated) each way, one task at
//! a time: the worker writes a task, the program writes its answer, and
//! only then does the next task come.
//!
//! A task, on the program's stdin:
//! ```text
//! {"id": "…", "queue": "…", "attempt": 1, "max_attempts": 3, "payload": "…"}
//! ```
//! - `payload` is the payload as text when it is valid UTF-8; otherwise
//!   the line has `payload_base64` (standard alphabet, padded) instead.
//! - `headers` (an object of strings) when the task has headers;
//!   `expires_at` (RFC 3339, UTC) when it has a ttl.
//! - More fields may come in later versions: ignore the ones you do not
//!   know.
//!
//! An answer, on the program's stdout, one line:
//! ```text
//! {"id": "…", "output": "…"}                      success, output as text
//! {"id": "…", "output_base64": "…"}               success, output as base64
//! {"id": "…", "error": "…", "retry": true|false}  failure
//! ```
//! `id` is the task's. Exactly one of `output`, `output_base64` and
//! `error`; a `null` field counts as absent; `retry` defaults to true
//! (another attempt, while attempts remain); other fields are ignored.
//! Flush stdout after each answer. Anything else the program has to say
//! goes to stderr, which the worker logs line by line with the slot and
//! the program's pid. Stdin closing means no more tasks: exit.
//!
//! # When a program breaks
//! - It exits, or closes its stdout, with a task in hand: the task fails as
//!   retryable, with a message naming the program and its exit status.
//! - It answers for another id, or writes a line that is not an answer:
//!   the error is logged (the line cut to 200 characters), the task fails
//!   as retryable and the program is killed.
//! - An answer line over [`MAX_ANSWER_LINE`] bytes: the task fails for
//!   good (no attempt makes it shorter) and the program is killed.
//! - `--task-timeout` (counted from when the task is written, so for a
//!   program's first task it includes its start-up) or the task's expiry:
//!   the program is killed and the task fails as a program per task
//!   would: retryable after a timeout, for good once expired.
//! - A lost lease or the end of the shutdown grace drops the task's
//!   handler, which kills the program, as a program per task is killed.
//!
//! A broken program is started again for the slot's next task, after the
//! worker's reconnect backoff (100 ms doubling to 5 s, reset by each
//! answer); one that exits between tasks is restarted the same way,
//! without failing a task. On shutdown, once the worker has stopped,
//! [`PipeHandler::close`] closes every program's stdin and waits a moment
//! for them to exit before killing them. Each program runs in a process
//! group of its own, so Ctrl-C at a terminal reaches the worker only,
//! which lets running tasks finish before it closes their stdin.
//!
//! One task per program at a time is a simplification: it keeps answers
//! in order without ids to match, and a broken program costs one task.
//!
//! Parts: `protocol.rs` (the lines), `program.rs` (one process and its
//! pipes), `slot.rs` (a slot's program through its restarts); here the
//! pool of slots.

mod program;
mod protocol;
mod slot;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Semaphore, SemaphorePermit};
use tokio::time::Instant;

pub use self::program::MAX_ANSWER_LINE;
use self::slot::Slot;
use crate::pb;
use crate::worker::command::CommandLine;
use crate::worker::handler::{HandlerResult, TaskFailure};

/// Default of the wait in [`PipeHandler::close`]: how long programs get to
/// exit once their stdin is closed.
pub const DEFAULT_EXIT_WAIT: Duration = Duration::from_secs(5);

/// Long-lived programs, one per slot, that take tasks over a line
/// protocol (see the module docs). A cheap-clone handle.
///
/// # Examples
///
/// ```no_run
/// use std::time::Duration;
/// use taskq::client::{Client, ClientOptions};
/// use taskq::worker::Worker;
/// use taskq::worker::command::CommandLine;
/// use taskq::worker::pipe::{DEFAULT_EXIT_WAIT, PipeHandler};
///
/// # async fn example() -> Result<(), Box<dyn std::error::Error>> {
/// let client = Client::connect_lazy("http://127.0.0.1:50051", ClientOptions::default())?;
/// let pipe = PipeHandler::new(CommandLine::parse("python3 handler.py")?, 4, None);
/// let handler = pipe.clone();
/// Worker::builder(client)
///     .queue("squares")
///     .concurrency(4)
///     .run(move |task| {
///         let pipe = handler.clone();
///         async move { pipe.run(task).await }
///     })
///     .await?;
/// pipe.close(DEFAULT_EXIT_WAIT).await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct PipeHandler {
    pool: Arc<Pool>,
}

#[derive(Debug)]
struct Pool {
    command: CommandLine,
    timeout: Option<Duration>,
    /// One permit per idle slot; closed by [`PipeHandler::close`].
    free: Semaphore,
    /// The slots not running a task. A std mutex: held to push or pop
    /// only, never across an await.
    idle: Mutex<Vec<Slot>>,
}

impl PipeHandler {
    /// `slots` programs (at least 1) running `command`, each started when
    /// its slot first gets a task; `timeout` bounds each task (see the
    /// module docs). Give the worker as much concurrency as slots.
    pub fn new(command: CommandLine, slots: usize, timeout: Option<Duration>) -> Self {
        let slots = slots.max(1);
        Self {
            pool: Arc::new(Pool {
                command,
                timeout,
                free: Semaphore::new(slots),
                // Popped from the end: slot 0 is used first.
                idle: Mutex::new((0..slots).rev().map(Slot::new).collect()),
            }),
        }
    }

    /// Runs `task` on a free slot's program, waiting for a slot when all
    /// are busy.
    ///
    /// # Errors
    /// The program's failure of the task, or a failure (retryable, unless
    /// said otherwise in the module docs) when the program broke.
    pub async fn run(&self, task: pb::Task) -> HandlerResult {
        let Ok(permit) = self.pool.free.acquire().await else {
            return Err(TaskFailure::interrupted("the worker is stopping"));
        };
        let slot = lock(&self.pool.idle)
            .pop()
            .expect("each permit stands for an idle slot");
        let mut lent = Lent {
            pool: &self.pool,
            slot: Some(slot),
            _permit: permit,
        };
        let slot = lent.slot.as_mut().expect("lent until dropped");
        slot.run(&self.pool.command, self.pool.timeout, task).await
    }

    /// Stops the programs: takes no more tasks, closes the stdin of every
    /// idle program and waits up to `wait` for them to exit, then kills
    /// the rest; returns how many had to be killed. Call it once the
    /// worker has returned: a program still running a task is left to its
    /// handler (and killed when the last handle is dropped).
    pub async fn close(&self, wait: Duration) -> usize {
        self.pool.free.close();
        let idle = std::mem::take(&mut *lock(&self.pool.idle));
        let mut programs: Vec<_> = idle.into_iter().filter_map(Slot::into_program).collect();
        for program in &mut programs {
            program.close_stdin();
        }
        let until = Instant::now() + wait;
        let running = programs.len();
        let mut killed = 0;
        for program in programs {
            if !program.exit_by(until).await {
                killed += 1;
            }
        }
        if killed > 0 {
            tracing::warn!(killed, wait = ?wait, "handler programs did not exit when their stdin closed; killed");
        }
        if running > 0 {
            tracing::info!(programs = running, "handler programs stopped");
        }
        killed
    }
}

/// A slot lent to one task; given back when dropped, whether the task
/// finished or its handler was dropped (then the slot has no program: it
/// went down with the handler, and the next task starts another).
struct Lent<'a> {
    pool: &'a Pool,
    slot: Option<Slot>,
    /// Released after the slot is back (fields drop after `drop`).
    _permit: SemaphorePermit<'a>,
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            lock(&self.pool.idle).push(slot);
        }
    }
}

/// The idle slots, even if a panic poisoned the lock (the list stays
/// whole: it is only pushed to and popped from).
fn lock(idle: &Mutex<Vec<Slot>>) -> MutexGuard<'_, Vec<Slot>> {
    idle.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// A handler program in Python that answers with the payload reversed,
    /// and does on some payloads what its name says: `hang`, `leave`
    /// (answers, then exits), `stay` (stays a minute after its stdin
    /// closes), `die` (exits with the task in hand),
    /// `garble`, `stranger` (answers for another id), `binary` (answers
    /// with bytes that are not UTF-8), `shout` (a line on stderr).
    const PROGRAM: &str = r#"
import base64, json, sys, time
stay = False
for line in sys.stdin:
    task = json.loads(line)
    p = task.get("payload")
    if p is None:
        p = base64.b64decode(task["payload_base64"]).hex()
    if p == "hang": time.sleep(60)
    if p == "die": sys.exit(3)
    if p == "garble": print("not json", flush=True); continue
    if p == "shout": print("shouting", file=sys.stderr, flush=True)
    tid = "someone-else" if p == "stranger" else task["id"]
    if p == "binary":
        answer = {"id": tid, "output_base64": base64.b64encode(b"\xff\x00").decode()}
    else:
        answer = {"id": tid, "output": p[::-1], "attempt": task["attempt"]}
    print(json.dumps(answer), flush=True)
    if p == "leave": sys.exit(0)
    stay = p == "stay"
if stay: time.sleep(60)
"#;

    fn pipe(slots: usize, timeout: Option<Duration>) -> PipeHandler {
        let words = vec!["python3".to_string(), "-c".into(), PROGRAM.into()];
        PipeHandler::new(CommandLine::from_words(words).unwrap(), slots, timeout)
    }

    fn task(id: &str, payload: &[u8]) -> pb::Task {
        pb::Task {
            id: id.into(),
            queue: "q".into(),
            payload: Bytes::copy_from_slice(payload),
            attempt: 1,
            max_attempts: 3,
            ..Default::default()
        }
    }

    async fn output(pipe: &PipeHandler, id: &str, payload: &[u8]) -> Bytes {
        pipe.run(task(id, payload)).await.unwrap()
    }

    /// The pid of the program in slot 0, which is idle.
    fn pid(pipe: &PipeHandler) -> Option<u32> {
        let idle = lock(&pipe.pool.idle);
        idle.iter().find(|s| s.index() == 0)?.pid()
    }

    #[tokio::test]
    async fn one_program_answers_task_after_task() {
        let pipe = pipe(1, None);
        assert_eq!(output(&pipe, "a", b"abc").await, "cba");
        let started = pid(&pipe);
        assert!(started.is_some());
        assert_eq!(output(&pipe, "b", "é\n\"x\"".as_bytes()).await, "\"x\"\né");
        // Not UTF-8 in: base64 in; base64 out.
        assert_eq!(output(&pipe, "c", b"\x01\xfe").await, "ef10");
        assert_eq!(output(&pipe, "d", b"binary").await, &b"\xff\x00"[..]);
        assert_eq!(pid(&pipe), started, "the same program all along");
        pipe.close(DEFAULT_EXIT_WAIT).await;
    }

    #[tokio::test]
    async fn a_program_that_breaks_fails_its_task_and_is_restarted() {
        let pipe = pipe(1, None);
        for (payload, says) in [
            (&b"die"[..], "exit status: 3"),
            (b"garble", "not an answer"),
            (b"stranger", "answered for task \"someone-else\""),
        ] {
            output(&pipe, "before", b"ok").await;
            let first = pid(&pipe);
            let failure = pipe.run(task("t", payload)).await.unwrap_err();
            assert!(failure.retry, "{failure:?}");
            assert!(
                failure.message.contains(says) && failure.message.contains("python3 (slot 0)"),
                "{}",
                failure.message
            );
            assert_eq!(pid(&pipe), None, "{payload:?}: the program is gone");
            assert_eq!(output(&pipe, "after", b"ok").await, "ko");
            assert_ne!(pid(&pipe), first, "{payload:?}: another program");
        }
        pipe.close(DEFAULT_EXIT_WAIT).await;
    }

    #[tokio::test]
    async fn a_program_that_exits_between_tasks_costs_no_task() {
        let pipe = pipe(1, None);
        assert_eq!(output(&pipe, "a", b"leave").await, "evael");
        let left = pid(&pipe);
        // Once it has gone (a program that exits just as the next task is
        // written cannot be told from one that died on it).
        for _ in 0..2000 {
            let exited = lock(&pipe.pool.idle)
                .iter_mut()
                .all(|slot| slot.program_exited());
            if exited {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(output(&pipe, "b", b"next").await, "txen");
        assert_ne!(pid(&pipe), left);
    }

    #[tokio::test]
    async fn a_program_over_the_timeout_is_killed_and_replaced() {
        let pipe = pipe(1, Some(Duration::from_secs(3)));
        output(&pipe, "warm", b"up").await;
        let failure = pipe.run(task("t", b"hang")).await.unwrap_err();
        assert!(
            failure.retry && failure.message.contains("timed out"),
            "{failure:?}"
        );
        assert_eq!(pid(&pipe), None);
        assert_eq!(output(&pipe, "next", b"ok").await, "ko");
    }

    #[tokio::test]
    async fn a_dropped_task_takes_its_program_down() {
        let pipe = pipe(1, None);
        output(&pipe, "warm", b"up").await;
        let started = pid(&pipe).unwrap();
        let run = pipe.run(task("t", b"hang"));
        // The lease is lost (or the grace is over) while it hangs.
        assert!(
            tokio::time::timeout(Duration::from_millis(300), run)
                .await
                .is_err()
        );
        assert_eq!(pid(&pipe), None);
        assert_eq!(output(&pipe, "next", b"ok").await, "ko");
        assert_ne!(pid(&pipe), Some(started));
    }

    #[tokio::test]
    async fn slots_run_their_own_programs_at_once() {
        let pipe = pipe(3, None);
        let runs: Vec<_> = (0..3)
            .map(|i| {
                let pipe = pipe.clone();
                tokio::spawn(async move {
                    pipe.run(task(&i.to_string(), format!("{i}x").as_bytes()))
                        .await
                })
            })
            .collect();
        for (i, run) in runs.into_iter().enumerate() {
            assert_eq!(run.await.unwrap().unwrap(), format!("x{i}"));
        }
        pipe.close(DEFAULT_EXIT_WAIT).await;
        let failure = pipe.run(task("late", b"x")).await.unwrap_err();
        assert!(failure.message.contains("stopping"), "{failure:?}");
    }

    #[tokio::test]
    async fn close_lets_programs_exit_at_the_end_of_their_input_or_kills_them() {
        let pipe = pipe(2, None);
        let (first, second) = tokio::join!(output(&pipe, "a", b"bye"), output(&pipe, "b", b"stay"));
        assert_eq!((&first[..], &second[..]), (&b"eyb"[..], &b"yats"[..]));
        assert_eq!(pipe.close(Duration::from_secs(2)).await, 1, "one stayed");
        let pipe = self::pipe(1, None);
        output(&pipe, "a", b"bye").await;
        assert_eq!(pipe.close(Duration::from_secs(30)).await, 0);
    }
}
