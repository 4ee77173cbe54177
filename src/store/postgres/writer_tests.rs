//! The writers' transactions (`writer.rs`) against a real PostgreSQL.

use std::time::Duration;

use bytes::Bytes;
use tokio::sync::oneshot;

use super::harness::TestDatabase;
use super::jobs::Job;
use super::writer::write;
use super::{PgStore, PostgresConfig};
use crate::broker::{
    BrokerConfig, BrokerError, LeaseRequest, NewTask, Outcome, PutOutcome, QueueName, TaskState,
    WorkerId,
};
use crate::store::Store;

fn task(queue: &QueueName, payload: &'static str) -> NewTask {
    NewTask {
        queue: Some(queue.clone()),
        payload: Bytes::from_static(payload.as_bytes()),
        ..NewTask::default()
    }
}

/// Leases the task waiting on `queue` (there must be one).
async fn lease_one(store: &PgStore, queue: &QueueName) -> crate::broker::LeasedTask {
    let request = LeaseRequest {
        queue: queue.clone(),
        worker: WorkerId::new("w").unwrap(),
        lease_duration: None,
    };
    store
        .lease(request, Duration::ZERO)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("a task waits on {queue}"))
}

/// Reports and puts that arrive together share one transaction,
/// reports first: the room a report makes is there for the puts after
/// it. Puts that then do not fit as assumed (two for one place) go
/// again in a transaction of their own, after reading the counts; the
/// reports before them are kept either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_go_first_and_stay_when_the_puts_after_them_do_not_fit() {
    let database = TestDatabase::start().await;
    let broker = BrokerConfig {
        queue_capacity: 1,
        ..BrokerConfig::default()
    };
    let store = PgStore::connect(&PostgresConfig::new(database.url()), broker)
        .await
        .unwrap_or_else(|error| panic!("the store opens on {}: {error}", database.url()));
    let queue = QueueName::parse("one-place").unwrap();
    let mut leases = Vec::new();
    let mut put_answers = Vec::new();
    for puts in [1, 2] {
        store
            .put(task(&queue, "held"), Duration::ZERO)
            .await
            .unwrap();
        let leased = lease_one(&store, &queue).await;
        // The queue is full: only the report in the same batch makes
        // room.
        let (done_tx, done_rx) = oneshot::channel();
        let (put_tx, put_rx) = oneshot::channel();
        let tasks = (0..puts)
            .map(|_| store.prepare(task(&queue, "new")).unwrap())
            .collect();
        let batch = vec![
            Job::Complete {
                results: vec![(leased.lease_id, Outcome::Success(Bytes::from_static(b"ok")))],
                answer: done_tx,
            },
            Job::Put {
                tasks,
                answer: put_tx,
            },
        ];
        write(&store.inner, batch, Box::new(())).await;
        assert_eq!(
            done_rx.await.unwrap(),
            [Ok(TaskState::Succeeded)],
            "{puts} put(s) after the report"
        );
        leases.push(leased.lease_id);
        put_answers.push(put_rx.await.unwrap());
        if puts == 1 {
            // The next round starts from an empty queue.
            let leased = lease_one(&store, &queue).await;
            store
                .complete(leased.lease_id, Outcome::Success(Bytes::new()))
                .await
                .unwrap();
        }
    }
    // One put in the place the report made; of two, the first fits
    // (read again after the counts) and the second finds the queue full.
    assert!(matches!(
        put_answers[0][..],
        [Ok(PutOutcome {
            duplicate: false,
            ..
        })]
    ));
    assert!(
        matches!(
            put_answers[1][..],
            [
                Ok(PutOutcome {
                    duplicate: false,
                    ..
                }),
                Err(BrokerError::QueueFull { .. })
            ]
        ),
        "{:?}",
        put_answers[1]
    );
    for lease in leases {
        let result = store.result(lease.task, Duration::ZERO).await.unwrap();
        assert_eq!(
            result.map(|r| r.state),
            Some(TaskState::Succeeded),
            "the report was kept"
        );
    }
    store.close();
}
