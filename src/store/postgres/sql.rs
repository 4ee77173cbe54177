//! The store's statements, one place to read every query.

/// The store's statements, with the schema filled in once.
pub(crate) struct Sql {
    pub(crate) ensure_queues: String,
    pub(crate) lock_queue_list: String,
    pub(crate) existing_queues: String,
    pub(crate) queue_total: String,
    pub(crate) lock_queues: String,
    pub(crate) put_tasks: String,
    pub(crate) put_one_queue: String,
    pub(crate) waiting_queues: String,
    pub(crate) pause: String,
    pub(crate) resume: String,
    pub(crate) paused: String,
    pub(crate) purge: String,
    pub(crate) find_keys: String,
    pub(crate) count_unfinished: String,
    pub(crate) subtract_unfinished: String,
    pub(crate) notify_each: String,
    pub(crate) notify: String,
    pub(crate) claim: String,
    pub(crate) lose_leases: String,
    pub(crate) live_leases: String,
    pub(crate) extend: String,
    pub(crate) complete_ok: String,
    pub(crate) complete_failed: String,
    pub(crate) report_view: String,
    pub(crate) result_of: String,
    pub(crate) results_of: String,
    pub(crate) claim_results: String,
    pub(crate) unclaim_results: String,
    pub(crate) task_queue: String,
    pub(crate) describe: String,
    pub(crate) cancel: String,
    pub(crate) recent_failures: String,
    pub(crate) stats: String,
    pub(crate) snapshot_unfinished: String,
    pub(crate) snapshot_leased_delayed: String,
    pub(crate) snapshot_oldest: String,
    pub(crate) in_flight: String,
    pub(crate) sweep_leases: String,
    pub(crate) sweep_ttl: String,
    pub(crate) sweep_delayed: String,
    pub(crate) drop_old: String,
    pub(crate) drop_over: String,
}

/// How long the task's last lease ran (NULL when it never was leased) and
/// how long since its put, in seconds: after the columns a statement that
/// finishes tasks returns (see `counters`).
const DURATION_COLUMNS: &str = "extract(epoch FROM now() - t.leased_at)::float8, \
     extract(epoch FROM now() - t.created_at)::float8";

/// Whether a failure reported with `r.retry` goes back for another
/// attempt: attempts and ttl allow it.
const RETRY_AGAIN: &str = "(r.retry AND t.attempt < t.max_attempts \
     AND (t.expires_at IS NULL OR t.expires_at > now()))";

/// A lease lost (it ran out, or its worker stream ended): back to
/// pending for another attempt, or FAILED on the last one with the memory
/// store's message.
const LEASE_LOST: &str = "state = CASE WHEN t.attempt >= t.max_attempts THEN 3 ELSE 0 END,
    finished_at = CASE WHEN t.attempt >= t.max_attempts THEN now() END,
    error = CASE WHEN t.attempt >= t.max_attempts
                 THEN 'lease expired on attempt ' || t.attempt || ' of ' || t.max_attempts
                      || ': worker ' || coalesce(t.worker, '?') || ' reported no result in time'
                 ELSE t.error END,
    by_lease = CASE WHEN t.attempt >= t.max_attempts THEN t.lease_seq ELSE t.by_lease END,
    ready_at = CASE WHEN t.attempt >= t.max_attempts THEN t.ready_at ELSE now() END,
    requeued = t.requeued + CASE WHEN t.attempt >= t.max_attempts THEN 0 ELSE 1 END,
    lease_until = NULL";

/// The columns a result is read from, in `result_row`'s order.
const RESULT_COLUMNS: &str =
    "id, queue, state, output, error, attempt, worker, created_at, finished_at";

/// A statement that finishes tasks (`complete_ok`, `complete_failed`:
/// rows in `result_row`'s order, the durations, then `claimed`), with
/// what its transaction must do for the tasks it finished, in the same
/// statement: count them out of their queues in finish shard `$first`,
/// tell the waiters of their results on channel `$first+1` (payloads as
/// `notify::finished_payloads` makes them), and wake the claimers of
/// queues that got a task back on channel `$first+2`. Its rows gain the
/// number of notifications sent, a last column.
fn told(finishing: &str, first: u32) -> String {
    let (shard, results, tasks) = (first, first + 1, first + 2);
    format!(
        "WITH done AS ({finishing}),
        counted AS (INSERT INTO {{s}}.queue_counts AS c (queue, shard, unfinished)
            SELECT queue, ${shard}::int2, -count(*) FROM done WHERE state >= 2 GROUP BY queue ORDER BY queue
            ON CONFLICT (queue, shard) DO UPDATE SET unfinished = c.unfinished + EXCLUDED.unfinished),
        told AS (SELECT count(pg_notify(channel, payload)) AS n FROM (
            SELECT ${results}::text AS channel,
                   CASE WHEN claimed THEN '!' ELSE '' END || queue || E'\\n' || string_agg(id::text, ',') AS payload
            FROM (SELECT id, queue, claimed,
                         (row_number() OVER (PARTITION BY queue, claimed ORDER BY id) - 1) / 150 AS chunk
                  FROM done WHERE state >= 2) f
            GROUP BY queue, claimed, chunk
            UNION ALL
            SELECT ${tasks}::text, queue FROM done WHERE state = 0 GROUP BY queue) p)
        SELECT done.*, (SELECT n FROM told) FROM done"
    )
}

impl Sql {
    pub(crate) fn new(schema: &str) -> Self {
        let s = |text: &str| {
            text.replace("{again}", RETRY_AGAIN)
                .replace("{s}", schema)
                .replace("{r}", RESULT_COLUMNS)
                .replace("{d}", DURATION_COLUMNS)
                .replace("{lost}", LEASE_LOST)
        };
        // A result whose report has a place reserved in a result stream
        // of this server ($4) is handed to it in the update that
        // finishes it: claimed at once.
        let complete_ok_update = s("UPDATE {s}.tasks t
                SET state = 2, output = r.output, error = NULL, finished_at = now(),
                    by_lease = r.seq, lease_until = NULL, claimed = r.claim
                FROM unnest($1::uuid[], $2::int4[], $3::bytea[], $4::bool[]) AS r(id, seq, output, claim)
                WHERE t.id = r.id AND t.state < 2 AND r.seq >= 1 AND r.seq <= t.lease_seq
                RETURNING t.id, t.queue, t.state, t.output, t.error, t.attempt, t.worker,
                          t.created_at, t.finished_at, {d}, t.claimed");
        // A retried failure waits `after` ($5, the worker's
        // retry_after) or else the backoff: `$6 * 2^(attempt - 1)` at
        // most $7, at a random point of its upper half (as
        // `RetryBackoff::delay`), as a delayed task (-1) when it
        // waits at all.
        let complete_failed_update = s("UPDATE {s}.tasks t
                SET state = CASE WHEN NOT {again} THEN 3
                                 WHEN coalesce(r.after, $6::float8) > 0 THEN -1 ELSE 0 END,
                    finished_at = CASE WHEN {again} THEN NULL ELSE now() END,
                    ready_at = CASE WHEN {again} THEN now() + make_interval(secs => coalesce(r.after,
                                   least($7::float8, $6::float8 * power(2, least(t.attempt - 1, 30)))
                                   * (0.5 + random() * 0.5)))
                               ELSE t.ready_at END,
                    requeued = t.requeued + CASE WHEN {again} THEN 1 ELSE 0 END,
                    retry_seq = CASE WHEN {again} THEN r.seq ELSE t.retry_seq END,
                    retry_error = CASE WHEN {again} THEN r.error ELSE t.retry_error END,
                    error = r.error, by_lease = r.seq, lease_until = NULL
                FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::bool[], $5::float8[])
                     AS r(id, seq, error, retry, after)
                WHERE t.id = r.id AND t.state = 1 AND t.lease_seq = r.seq AND t.lease_until > now()
                RETURNING t.id, t.queue, t.state, t.output, t.error, t.attempt, t.worker,
                          t.created_at, t.finished_at, {d}, t.claimed");
        Self {
            complete_ok: s(&told(&complete_ok_update, 5)),
            complete_failed: s(&told(&complete_failed_update, 8)),
            ensure_queues: s("INSERT INTO {s}.queue_counts (queue, shard)
                SELECT unnest($1::text[]), 0 ON CONFLICT DO NOTHING"),
            // A new queue is made under this lock, so that servers making
            // queues at once count each other's (`--max-queues`).
            lock_queue_list: s("SELECT pg_advisory_xact_lock(hashtextextended('{s}.queue_counts', 0))"),
            existing_queues: s("SELECT queue FROM {s}.queue_counts WHERE shard = 0 AND queue = ANY($1)"),
            queue_total: s("SELECT count(*) FROM {s}.queue_counts WHERE shard = 0"),
            count_unfinished: s("SELECT queue, sum(unfinished)::int8 FROM {s}.queue_counts
                WHERE queue = ANY($1) GROUP BY queue"),
            subtract_unfinished: s("INSERT INTO {s}.queue_counts AS c (queue, shard, unfinished)
                SELECT q, $3, -n FROM unnest($1::text[], $2::int8[]) AS d(q, n) ORDER BY q
                ON CONFLICT (queue, shard) DO UPDATE SET unfinished = c.unfinished + EXCLUDED.unfinished"),
            lock_queues: s("SELECT queue FROM {s}.queue_counts WHERE queue = ANY($1) AND shard = 0
                ORDER BY queue FOR UPDATE"),
            // A batch of puts (migration 7's `put_tasks`, whose comment
            // says what each argument is): lock, insert, count, notify.
            put_tasks: s("SELECT * FROM {s}.put_tasks($1, $2, $3, $4, $5, $6, $7, $8, $9, $10,
                $11, $12, $13, $14, $15, $16, $17)"),
            // A batch of puts to one queue that is assumed to fit, as one
            // plain statement (no function call, which costs more than
            // the insert): the update of the queue's put shard both locks
            // it and counts the tasks in, and the insert runs only when
            // that update did. Its checks read the statement's snapshot,
            // taken before the put shard's lock was granted; the update's
            // own row is read again after the wait (PostgreSQL re-checks
            // a row another transaction changed meanwhile), so the count
            // is exact, and the other shards (counted out by finishes)
            // can only be older, which errs towards "full". The arguments
            // are put_tasks' ($1 to $13), then the queue ($14), the
            // channel ($15) and payloads ($16) of the notification that
            // tasks are ready. A key taken meanwhile by another put (of
            // any server) makes the insert fail (unique_violation, retried).
            put_one_queue: s("WITH fits AS (SELECT
                    NOT EXISTS (SELECT 1 FROM {s}.tasks t JOIN unnest($2::text[], $5::text[]) AS k(queue, key)
                                ON t.queue = k.queue AND t.idempotency_key = k.key)
                    AND NOT EXISTS (SELECT 1 FROM unnest($13::text[]) AS h(q)
                                    WHERE EXISTS (SELECT 1 FROM {s}.tasks WHERE queue = h.q AND state = 0)
                                       OR EXISTS (SELECT 1 FROM {s}.paused_queues WHERE queue = h.q)) AS ok),
                counted AS (UPDATE {s}.queue_counts c SET unfinished = c.unfinished + cardinality($1::uuid[])
                    WHERE c.queue = $14::text AND c.shard = 0 AND (SELECT ok FROM fits)
                      AND c.unfinished + cardinality($1::uuid[]) + (SELECT coalesce(sum(o.unfinished), 0)
                          FROM {s}.queue_counts o WHERE o.queue = $14::text AND o.shard <> 0) <= $12::int8
                    RETURNING 1),
                inserted AS (INSERT INTO {s}.tasks (id, queue, payload, headers, idempotency_key, max_attempts,
                        expires_at, state, attempt, lease_seq, lease_until, worker, leased_at, priority, ready_at)
                    SELECT id, queue, payload, headers, key, max_attempts,
                           CASE WHEN ttl IS NULL THEN NULL ELSE now() + make_interval(secs => ttl) END,
                           CASE WHEN delay IS NOT NULL THEN -1 WHEN lease IS NULL THEN 0 ELSE 1 END,
                           CASE WHEN lease IS NULL THEN 0 ELSE 1 END,
                           CASE WHEN lease IS NULL THEN 0 ELSE 1 END,
                           CASE WHEN lease IS NULL THEN NULL ELSE now() + make_interval(secs => lease) END,
                           worker,
                           CASE WHEN lease IS NULL THEN NULL ELSE now() END,
                           priority,
                           CASE WHEN delay IS NULL THEN NULL ELSE now() + make_interval(secs => delay) END
                    FROM unnest($1::uuid[], $2::text[], $3::bytea[], $4::text[], $5::text[], $6::int4[],
                                $7::float8[], $8::float8[], $9::text[], $10::int4[], $11::float8[])
                         AS t(id, queue, payload, headers, key, max_attempts, ttl, lease, worker, priority, delay)
                    WHERE EXISTS (SELECT 1 FROM counted)
                    ORDER BY id
                    RETURNING id, lease_until, created_at, expires_at,
                              coalesce(extract(epoch FROM lease_until - now()), 0)::float8 AS lease_left),
                told AS (SELECT count(pg_notify($15::text, p)) AS n FROM unnest($16::text[]) AS p)
                SELECT i.*, (SELECT n FROM told) FROM inserted i"),
            // Of these queues, those where a new task must wait for a claim
            // rather than be handed over in its insert: older tasks wait,
            // or the queue is paused.
            waiting_queues: s("SELECT q FROM unnest($1::text[]) AS q
                WHERE EXISTS (SELECT 1 FROM {s}.tasks WHERE queue = q AND state = 0)
                   OR EXISTS (SELECT 1 FROM {s}.paused_queues WHERE queue = q)"),
            // One row affected: the queue was not paused before.
            pause: s("INSERT INTO {s}.paused_queues (queue) VALUES ($1) ON CONFLICT DO NOTHING"),
            // A row back: it was paused; its claimers everywhere are woken.
            resume: s("WITH gone AS (DELETE FROM {s}.paused_queues WHERE queue = $1 RETURNING queue)
                SELECT pg_notify($2, queue) FROM gone"),
            paused: s("SELECT queue FROM {s}.paused_queues"),
            purge: s("UPDATE {s}.tasks t
                SET state = 4, finished_at = now(), lease_until = NULL,
                    error = 'purged by PurgeQueue before it was handed out'
                WHERE t.queue = $1 AND t.state IN (0, -1)
                RETURNING t.id, {d}"),
            find_keys: s("SELECT t.queue, t.idempotency_key, t.id FROM {s}.tasks t
                JOIN unnest($1::text[], $2::text[]) AS k(queue, key)
                  ON t.queue = k.queue AND t.idempotency_key = k.key"),
            // One notification per payload, in order, on channel $1.
            notify_each: s("SELECT pg_notify($1, p) FROM unnest($2::text[]) WITH ORDINALITY AS n(p, i) ORDER BY i"),
            notify: s("SELECT pg_notify($1, $2)"),
            // Row n (in id order) goes to slot n: its worker and lease.
            claim: s("WITH locked AS (
                    SELECT id, priority FROM {s}.tasks
                    WHERE queue = $1 AND state = 0 AND (expires_at IS NULL OR expires_at > now())
                      AND NOT EXISTS (SELECT 1 FROM {s}.paused_queues WHERE queue = $1)
                    ORDER BY priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED),
                numbered AS (SELECT id, row_number() OVER (ORDER BY priority DESC, id) AS n FROM locked)
                UPDATE {s}.tasks t
                SET state = 1, attempt = t.attempt + 1, lease_seq = t.lease_seq + 1,
                    lease_until = now() + make_interval(secs => ($3::float8[])[c.n]),
                    worker = ($4::text[])[c.n], leased_at = now()
                FROM numbered c
                WHERE t.id = c.id
                RETURNING t.id, t.payload, t.headers, t.attempt, t.max_attempts, t.lease_seq,
                          t.lease_until, t.created_at, t.expires_at,
                          extract(epoch FROM t.lease_until - now())::float8, c.n,
                          extract(epoch FROM now() - coalesce(t.ready_at, t.created_at))::float8"),
            // A worker stream's leases, given back when it ends.
            lose_leases: s("UPDATE {s}.tasks t SET {lost}
                FROM unnest($1::uuid[], $2::int4[]) AS r(id, seq)
                WHERE t.id = r.id AND t.state = 1 AND t.lease_seq = r.seq
                RETURNING t.id, t.queue, t.state, {d}"),
            // Which of these leases still hold (leased under that sequence),
            // or were cancelled (the cancel notification frees their places
            // and tells their streams).
            live_leases: s("SELECT t.id FROM unnest($1::uuid[], $2::int4[]) AS h(id, seq)
                JOIN {s}.tasks t ON t.id = h.id AND t.lease_seq = h.seq
                WHERE t.state IN (1, 4)"),
            extend: s("UPDATE {s}.tasks SET lease_until = now() + make_interval(secs => $3)
                WHERE id = $1 AND state = 1 AND lease_seq = $2 AND lease_until > now()
                RETURNING lease_until"),
            report_view: s("SELECT id, state, lease_seq, by_lease, output, error, retry_seq, retry_error
                FROM {s}.tasks WHERE id = ANY($1)"),
            result_of: s("SELECT {r} FROM {s}.tasks WHERE id = $1"),
            results_of: s("SELECT {r} FROM {s}.tasks WHERE id = ANY($1) AND state >= 2"),
            claim_results: s("UPDATE {s}.tasks t SET claimed = true
                FROM (SELECT id FROM {s}.tasks WHERE queue = $1 AND state >= 2 AND NOT claimed
                      ORDER BY finished_at, priority DESC, id LIMIT $2 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.id, t.queue, t.state, t.output, t.error, t.attempt, t.worker,
                          t.created_at, t.finished_at"),
            unclaim_results: s("WITH back AS (
                    UPDATE {s}.tasks SET claimed = false WHERE id = ANY($1) RETURNING id)
                SELECT pg_notify($2, $3) WHERE EXISTS (SELECT 1 FROM back)"),
            task_queue: s("SELECT queue FROM {s}.tasks WHERE id = $1"),
            // An unfinished task ends CANCELLED (state 4); the row as it was
            // tells whether a lease was revoked.
            cancel: s("UPDATE {s}.tasks t
                SET state = 4, finished_at = now(), lease_until = NULL, by_lease = NULL,
                    error = 'cancelled by CancelTask before it finished'
                FROM (SELECT id, state AS was, lease_seq FROM {s}.tasks
                      WHERE id = $1 AND state < 2 FOR UPDATE) c
                WHERE t.id = c.id
                RETURNING t.queue, c.was, c.lease_seq, {d}"),
            // In `rows::task_view`'s order; unfinished tasks only.
            describe: s("SELECT queue, state, attempt, max_attempts, created_at, expires_at,
                    octet_length(payload)::int8, worker, lease_until
                FROM {s}.tasks WHERE id = $1 AND state < 2"),
            // Through the partial index tasks_failed.
            recent_failures: s("SELECT {r} FROM {s}.tasks WHERE state = 3
                ORDER BY finished_at DESC LIMIT $1"),
            // Each worker's leases: how many, and the 8 that run out first.
            in_flight: s("SELECT worker, count(*),
                    (array_agg(id ORDER BY lease_until))[1:8],
                    (array_agg(lease_until ORDER BY lease_until))[1:8]
                FROM {s}.tasks
                WHERE state = 1 AND worker = ANY($1) GROUP BY worker"),
            // A scrape's numbers, none proportional to the tasks held: the
            // unfinished counts from their shards, the leased and delayed
            // rows through the partial indexes tasks_leases and
            // tasks_delayed, and each queue's head through
            // tasks_ready_by_priority.
            snapshot_unfinished: s("SELECT queue, sum(unfinished)::int8 FROM {s}.queue_counts
                GROUP BY queue ORDER BY queue"),
            snapshot_leased_delayed: s("SELECT queue, count(*) FILTER (WHERE state = 1),
                    count(*) FILTER (WHERE state = -1)
                FROM {s}.tasks WHERE state = 1 OR state = -1 GROUP BY queue"),
            // The oldest of the first 64 in hand-out order: the oldest of
            // all when the queue uses one priority.
            snapshot_oldest: s("SELECT q, coalesce(extract(epoch FROM now() - (
                    SELECT min(created_at) FROM (SELECT created_at FROM {s}.tasks
                        WHERE queue = q AND state = 0 ORDER BY priority DESC, id LIMIT 64) h)), 0)::float8
                FROM unnest($1::text[]) AS q"),
            stats: s("SELECT queue,
                    count(*) FILTER (WHERE state = 0),
                    count(*) FILTER (WHERE state = 1),
                    count(*) FILTER (WHERE state = 2),
                    count(*) FILTER (WHERE state = 3),
                    coalesce(sum(requeued), 0)::int8,
                    coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE state = 0)), 0)::float8,
                    count(*) FILTER (WHERE state >= 2 AND NOT claimed),
                    count(*) FILTER (WHERE state = 3 AND error LIKE 'task expired:%'),
                    count(*) FILTER (WHERE state = -1),
                    count(*) FILTER (WHERE state = 4)
                FROM {s}.tasks WHERE $1::text[] IS NULL OR queue = ANY($1) GROUP BY queue"),
            sweep_leases: s("UPDATE {s}.tasks t SET {lost}
                FROM (SELECT id FROM {s}.tasks WHERE state = 1 AND lease_until <= now()
                      ORDER BY lease_until LIMIT 500 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.id, t.queue, t.state, {d}"),
            // Delayed tasks that are due join the pending ones.
            sweep_delayed: s("UPDATE {s}.tasks t SET state = 0
                FROM (SELECT id FROM {s}.tasks WHERE state = -1 AND ready_at <= now()
                      ORDER BY ready_at LIMIT 500 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.queue"),
            sweep_ttl: s("UPDATE {s}.tasks t
                SET state = 3, finished_at = now(), lease_until = NULL,
                    error = 'task expired: its ttl ran out before it finished'
                FROM (SELECT id, state = 1 AS leased FROM {s}.tasks WHERE state < 2 AND expires_at <= now()
                      ORDER BY expires_at LIMIT 500 FOR UPDATE SKIP LOCKED) c
                WHERE t.id = c.id
                RETURNING t.id, t.queue, t.state,
                          CASE WHEN c.leased THEN extract(epoch FROM now() - t.leased_at)::float8 END,
                          extract(epoch FROM now() - t.created_at)::float8"),
            drop_old: s("DELETE FROM {s}.tasks WHERE id IN (
                SELECT id FROM {s}.tasks WHERE state >= 2 AND finished_at < now() - make_interval(secs => $1)
                ORDER BY finished_at LIMIT 1000 FOR UPDATE SKIP LOCKED)"),
            drop_over: s("DELETE FROM {s}.tasks WHERE id IN (
                SELECT id FROM {s}.tasks WHERE state >= 2
                ORDER BY finished_at DESC OFFSET $1 LIMIT 1000 FOR UPDATE SKIP LOCKED)"),
        }
    }
}
