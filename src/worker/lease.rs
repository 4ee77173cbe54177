//! The lease keeper: while a handler runs, its task's lease is extended at
//! a third of the length the server granted. One keeper for both modes;
//! each says how to ask for an extension (a unary ExtendLease call, or a
//! message on the stream).

use std::future::Future;
use std::time::{Duration, SystemTime};

/// Shortest pause between two extensions.
const MIN_PAUSE: Duration = Duration::from_millis(10);

/// How asking for one extension went.
pub(crate) enum Extension<E> {
    /// Asked for: granted (unary), or sent (stream; a refusal comes back
    /// as an ack the stream loop handles).
    Asked,
    /// Not asked for, but the lease may still be there: ask again sooner.
    Retry,
    /// The lease is gone: another worker has the task.
    Lost(E),
}

/// The lease the server granted at delivery (it may have clamped the one
/// asked for; extensions are clamped the same way).
pub(crate) fn granted(expires: Option<prost_types::Timestamp>, asked: Duration) -> Duration {
    expires
        .and_then(|at| SystemTime::try_from(at).ok())
        .and_then(|at| at.duration_since(SystemTime::now()).ok())
        .unwrap_or(asked)
        .min(asked)
}

/// Asks for an extension with `extend` at a third of `granted`, for as
/// long as it is polled; after a [`Extension::Retry`], at half the last
/// pause. Returns only when the lease is lost.
pub(crate) async fn keep<E, F, Fut>(granted: Duration, mut extend: F) -> E
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Extension<E>>,
{
    // A third of what the server granted at delivery (it clamps extensions
    // the same way), not of what was asked for.
    let period = (granted / 3).max(MIN_PAUSE);
    let mut pause = period;
    loop {
        tokio::time::sleep(pause).await;
        pause = match extend().await {
            Extension::Asked => period,
            Extension::Retry => (pause / 2).max(MIN_PAUSE),
            Extension::Lost(error) => return error,
        };
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;

    use super::*;

    /// Runs a keeper whose answers are `answers` in turn, and returns when
    /// each extension was asked for, from the start.
    async fn asked_at(granted: Duration, answers: Vec<Extension<&'static str>>) -> Vec<Duration> {
        let start = Instant::now();
        let times = Arc::new(Mutex::new(Vec::new()));
        let mut answers = answers.into_iter();
        let lost = keep(granted, || {
            times.lock().unwrap().push(start.elapsed());
            let answer = answers.next().unwrap_or(Extension::Lost("out of answers"));
            async move { answer }
        })
        .await;
        assert_eq!(lost, "lost");
        Arc::try_unwrap(times).unwrap().into_inner().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn extensions_come_at_a_third_of_the_grant_until_the_lease_is_lost() {
        let times = asked_at(
            Duration::from_secs(30),
            vec![Extension::Asked, Extension::Asked, Extension::Lost("lost")],
        )
        .await;
        let secs: Vec<u64> = times.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [10, 20, 30]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_extension_is_retried_sooner() {
        let times = asked_at(
            Duration::from_secs(30),
            vec![
                Extension::Retry,
                Extension::Retry,
                Extension::Asked,
                Extension::Lost("lost"),
            ],
        )
        .await;
        let millis: Vec<u128> = times.iter().map(Duration::as_millis).collect();
        assert_eq!(millis, [10_000, 15_000, 17_500, 27_500]);
    }

    #[test]
    fn the_grant_is_what_the_server_gave_never_more_than_asked() {
        let asked = Duration::from_secs(30);
        assert_eq!(granted(None, asked), asked);
        let soon = SystemTime::now() + Duration::from_secs(10);
        let granted_now = granted(Some(soon.into()), asked);
        assert!(granted_now <= Duration::from_secs(10) && granted_now > Duration::from_secs(9));
        let late = SystemTime::now() + Duration::from_secs(90);
        assert_eq!(granted(Some(late.into()), asked), asked);
        let past = SystemTime::now() - Duration::from_secs(5);
        assert_eq!(granted(Some(past.into()), asked), asked);
    }
}
