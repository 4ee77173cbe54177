//! The schema: versioned migrations embedded in the binary, applied in
//! order under an advisory lock, so that servers starting together apply
//! each once. `taskq migrate --store URL` runs the same code ahead of a
//! deploy.

use tokio_postgres::Client;

use super::PgError;

/// Key of the advisory lock held while migrating (any fixed number that
/// other applications on the database are unlikely to use: "taskq" in
/// ASCII).
const MIGRATION_LOCK: i64 = 0x0074_6173_6b71;

/// The migrations, in order; `{s}` stands for the schema. Never edit one
/// that has shipped: add the next.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, V1),
    (2, V2),
    (3, V3),
    (4, V4),
    (5, V5),
    (6, V6),
    (7, V7),
];

/// Version 1: tasks, results and per-queue counters.
const V1: &str = r"
-- One row per task, from its put until retention drops its result.
-- state: 0 pending, 1 leased, 2 succeeded, 3 failed (4 cancelled and -1
-- delayed came with later versions).
-- fillfactor below 100 leaves room in each page, so that the many updates
-- of a task's life (lease, result) stay heap-only (HOT) and skip the
-- indexes that do not change.
CREATE TABLE {s}.tasks (
    id uuid PRIMARY KEY,                -- UUIDv7: time-ordered, the FIFO order
    queue text NOT NULL,
    state smallint NOT NULL DEFAULT 0,
    payload bytea NOT NULL,
    headers text,                        -- JSON object; NULL when none
    idempotency_key text,
    attempt integer NOT NULL DEFAULT 0,  -- deliveries so far
    max_attempts integer NOT NULL,
    lease_seq integer NOT NULL DEFAULT 0, -- the current (last issued) lease
    lease_until timestamptz,             -- set while leased: the fence's clock
    worker text,                         -- holder of the current lease
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,              -- ttl, from the put
    by_lease integer,                    -- lease that reported the result (or last retry)
    output bytea,
    error text,                          -- failure message (or last retried one)
    finished_at timestamptz,
    claimed boolean NOT NULL DEFAULT false -- handed out by queue (GetResult(queue), WatchResults)
) WITH (fillfactor = 80);

-- Claims: a queue's pending tasks in id order. Partial, so the index holds
-- only what waits, however many results are kept.
CREATE INDEX tasks_ready ON {s}.tasks (queue, id) WHERE state = 0;

-- The lease sweep: leased tasks by expiry.
CREATE INDEX tasks_leases ON {s}.tasks (lease_until) WHERE state = 1;

-- The ttl sweep: unfinished tasks that have a ttl, by expiry.
CREATE INDEX tasks_ttl ON {s}.tasks (expires_at)
    WHERE state < 2 AND expires_at IS NOT NULL;

-- Results by queue, handed out once, in completion order.
CREATE INDEX tasks_unclaimed ON {s}.tasks (queue, finished_at, id)
    WHERE state >= 2 AND NOT claimed;

-- Retention: finished rows by age.
CREATE INDEX tasks_finished ON {s}.tasks (finished_at) WHERE state >= 2;

-- Idempotency keys are unique per queue while the task is held.
CREATE UNIQUE INDEX tasks_idempotency ON {s}.tasks (queue, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Unfinished tasks per queue, kept in the transactions that put and finish
-- them, spread over a few rows per queue: the count is their sum. Puts add
-- in shard 0, which they lock first, so no two puts pass the capacity check
-- together, on any server. Transactions that finish tasks subtract in
-- another shard picked at random, so they seldom wait on each other or on
-- puts (one hot row would make every transaction of a queue wait its turn,
-- commit included).
CREATE TABLE {s}.queue_counts (
    queue text NOT NULL,
    shard smallint NOT NULL,
    unfinished bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
);
";

/// Version 2: the status page's latest failures, newest first. Partial,
/// so it holds failed tasks only and a success never touches it.
const V2: &str = r"
CREATE INDEX tasks_failed ON {s}.tasks (finished_at DESC) WHERE state = 3;
";

/// Version 3: the times the task durations of `/metrics` are measured
/// from. `leased_at`: when the current (last) lease began. `ready_at`: when
/// the task last went back to pending after a lease (NULL: pending since
/// its put). Both without a default, so adding them rewrites no row.
const V3: &str = r"
ALTER TABLE {s}.tasks ADD COLUMN leased_at timestamptz, ADD COLUMN ready_at timestamptz;
";

/// Version 4: the paused queues (PauseQueue), for every server. Claims
/// and hand-overs look a queue up here by its key.
const V4: &str = r"
CREATE TABLE {s}.paused_queues (queue text PRIMARY KEY);
";

/// Version 5: priorities and delays. `priority`: higher is claimed first
/// (a constant default, so adding it rewrites no row). A delayed task (a
/// put's delay, or a retry's backoff) has state -1 and `ready_at` set to
/// when it is due; the sweep makes it pending then. Claims read the
/// pending tasks in (priority, id) order, so that index replaces the one
/// in id order.
const V5: &str = r"
ALTER TABLE {s}.tasks ADD COLUMN priority integer NOT NULL DEFAULT 0;
CREATE INDEX tasks_ready_by_priority ON {s}.tasks (queue, priority DESC, id) WHERE state = 0;
DROP INDEX {s}.tasks_ready;
CREATE INDEX tasks_delayed ON {s}.tasks (ready_at) WHERE state = -1;
";

/// Version 6: `requeued`, how many times the task went back to its queue
/// for another attempt (a lease lost, a failure retried): GetStats'
/// `redelivered`, as the memory store counts it. `retry_seq` and
/// `retry_error`: the lease and message of the last failure retried, so
/// that a repeat of that report is answered with the task's state even
/// after a later lease finished it (as on the memory store). A constant
/// default or none: adding them rewrites no row.
const V6: &str = r"
ALTER TABLE {s}.tasks ADD COLUMN requeued integer NOT NULL DEFAULT 0,
    ADD COLUMN retry_seq integer, ADD COLUMN retry_error text;
";

/// Version 7: a batch of puts in one statement, `put_tasks`, so that a
/// put alone is one round trip and one answer from the database, with no
/// BEGIN or COMMIT of its own. Each statement of a PL/pgSQL function sees
/// what was committed before it started, so the insert, run after the
/// lock, sees every put committed before the lock was granted (one
/// statement doing both would read from before the lock).
///
/// Its arguments: the new tasks' columns, one array each ($1 to $11: id,
/// queue, payload, headers, key, max attempts, ttl, lease, worker,
/// priority, delay); the capacity of a queue ($12); the queues whose new
/// tasks are handed over in the insert ($13); whether to check that the
/// batch fits ($14); the queues to lock, in name order ($15); the channel
/// ($16) and payloads ($17) of the notification that tasks are ready.
///
/// 1. Locks the put shard of each queue (`lock_queues`), in name order,
///    so that no two puts pass the capacity check together.
/// 2. Inserts the tasks (leased at once, attempt 1, when they have a
///    lease: handed to a worker stream of this server; state -1 until
///    `ready_at` when they have a delay) and counts them into their
///    queues' put shards. When asked to check, it inserts only if the
///    batch fits: every queue has room for its tasks and its put shard
///    exists, no key is held, and no older task waits (nor is the queue
///    paused) where tasks are handed over. Otherwise it inserts nothing,
///    and the writer reads the counts, keys and waiting tasks first.
/// 3. Notifies, when it inserted anything.
const V7: &str = r"
CREATE FUNCTION {s}.put_tasks(uuid[], text[], bytea[], text[], text[], int4[], float8[],
                              float8[], text[], int4[], float8[], int8, text[], boolean,
                              text[], text, text[])
RETURNS TABLE (id uuid, lease_until timestamptz, created_at timestamptz,
               expires_at timestamptz, lease_left float8)
LANGUAGE plpgsql AS $fn$
#variable_conflict use_column
BEGIN
    PERFORM 1 FROM {s}.queue_counts WHERE queue = ANY($15) AND shard = 0 ORDER BY queue FOR UPDATE;
    RETURN QUERY
    WITH fits AS (SELECT NOT $14 OR (
            NOT EXISTS (
                SELECT 1 FROM (SELECT q, count(*) AS n FROM unnest($2) AS q GROUP BY q) d
                WHERE d.n + coalesce((SELECT sum(c.unfinished) FROM {s}.queue_counts c
                                      WHERE c.queue = d.q), 0) > $12)
            AND NOT EXISTS (
                SELECT 1 FROM unnest($2) AS q
                WHERE NOT EXISTS (SELECT 1 FROM {s}.queue_counts c WHERE c.queue = q AND c.shard = 0))
            AND NOT EXISTS (
                SELECT 1 FROM {s}.tasks t JOIN unnest($2, $5) AS k(queue, key)
                  ON t.queue = k.queue AND t.idempotency_key = k.key)
            AND NOT EXISTS (
                SELECT 1 FROM unnest($13) AS h(q)
                WHERE EXISTS (SELECT 1 FROM {s}.tasks WHERE queue = h.q AND state = 0)
                   OR EXISTS (SELECT 1 FROM {s}.paused_queues WHERE queue = h.q))) AS ok),
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
        FROM unnest($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
             AS t(id, queue, payload, headers, key, max_attempts, ttl, lease, worker, priority, delay)
        WHERE (SELECT ok FROM fits)
        ORDER BY id
        ON CONFLICT (queue, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
        RETURNING id, lease_until, created_at, expires_at,
                  coalesce(extract(epoch FROM lease_until - now()), 0)::float8 AS lease_left, queue),
    added AS (UPDATE {s}.queue_counts c SET unfinished = c.unfinished + d.n
        FROM (SELECT queue, count(*) AS n FROM inserted GROUP BY queue) d
        WHERE c.queue = d.queue AND c.shard = 0)
    SELECT i.id, i.lease_until, i.created_at, i.expires_at, i.lease_left FROM inserted i;
    IF FOUND THEN
        PERFORM pg_notify($16, p) FROM unnest($17) WITH ORDINALITY AS n(p, i) ORDER BY i;
    END IF;
END
$fn$;
";

/// Applies every migration the database lacks, under the advisory lock.
/// Returns the versions applied now.
///
/// # Errors
/// [`PgError`] when the database refuses a statement.
pub(crate) async fn migrate(client: &mut Client, schema: &str) -> Result<Vec<i32>, PgError> {
    let transaction = client.transaction().await?;
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    transaction
        .batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {schema};
             CREATE TABLE IF NOT EXISTS {schema}.migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await?;
    let applied: Vec<i32> = transaction
        .query(&format!("SELECT version FROM {schema}.migrations"), &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let mut now = Vec::new();
    for (version, sql) in MIGRATIONS {
        if applied.contains(version) {
            continue;
        }
        transaction
            .batch_execute(&sql.replace("{s}", schema))
            .await?;
        transaction
            .execute(
                &format!("INSERT INTO {schema}.migrations (version) VALUES ($1)"),
                &[version],
            )
            .await?;
        now.push(*version);
    }
    if let Some(newest) = applied.iter().max() {
        let known = MIGRATIONS.last().map_or(0, |(v, _)| *v);
        if *newest > known {
            return Err(PgError::Schema(format!(
                "the database's schema {schema} is at version {newest}, newer than this \
                 binary knows ({known}): run a newer taskq"
            )));
        }
    }
    transaction.commit().await?;
    Ok(now)
}
