#!/usr/bin/env bash
# The PostgreSQL store beside the memory store, in one run on this machine:
# a throwaway PostgreSQL (initdb into a temporary folder, stock durable
# settings: fsync and synchronous_commit on), one `taskq serve --store
# postgres://...`, and `taskq bench` on the stream path against it and
# against an embedded memory server, rows taking turns. Every result is
# checked by the bench (it exits 1 if any is lost, duplicated or wrong).
# Also prints what each task cost the database: commits, rows written and
# WAL per task (pg_stat_database, pg_stat_wal), and the statements that
# took the most time (pg_stat_statements).
#
#   bench/postgres.sh [TASKS] [RUNS]   # default 20000 tasks, 3 runs
#
# Runs as root (PostgreSQL then runs as the `postgres` user) or as any
# user that may run initdb. Needs Debian's postgresql package.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-20000}
runs=${2:-3}
closed=2000

. bench/pg_server.sh
pg_available || { echo "bench/postgres.sh: needs PostgreSQL (Debian: apt-get install postgresql)" >&2; exit 1; }
# TASKQ_BIN=PATH runs another build (an older one, to compare) instead.
if [ -z "${TASKQ_BIN:-}" ]; then
  cargo build --release --quiet --bin taskq
fi
taskq=${TASKQ_BIN:-$PWD/target/release/taskq}

trap pg_server_stop EXIT
pg_server_start "$taskq"
dir=$pg_dir
grpc=$pg_grpc
bin=$pg_bin

stream=(bench --mode stream --tasks "$tasks" --workers 4 --concurrency 256 --payload-bytes 8 --fill 0 --baseline-calls 0 --json)
single=(bench --mode stream --tasks "$closed" --producers 1 --workers 1 --concurrency 1 --batch 1 --payload-bytes 8 --fill 0 --baseline-calls 0 --json)
counters() {
  psql "SELECT (SELECT sum(xact_commit) FROM pg_stat_database), (SELECT sum(tup_inserted + tup_updated + tup_deleted) FROM pg_stat_database), (SELECT wal_bytes FROM pg_stat_wal), (SELECT sum(calls) FROM pg_stat_statements)"
}
echo "machine: $(nproc) cores, $(date -u +%F); PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on the same machine, stock durable settings" >&2
for run in $(seq "$runs"); do
  echo "run $run of $runs: memory store (embedded server), stream path, $tasks tasks..." >&2
  "$taskq" "${stream[@]}" > "$dir/memory.$run.json"
  echo "run $run of $runs: postgres store, stream path, $tasks tasks..." >&2
  before=$(counters)
  "$taskq" "${stream[@]}" --server "http://127.0.0.1:$grpc" > "$dir/postgres.$run.json"
  after=$(counters)
  printf '%s\n%s\n' "$before" "$after" > "$dir/counts.$run"
  echo "run $run of $runs: one task in flight ($closed tasks), memory then postgres..." >&2
  "$taskq" "${single[@]}" > "$dir/memory_single.$run.json"
  "$taskq" "${single[@]}" --server "http://127.0.0.1:$grpc" > "$dir/postgres_single.$run.json"
done

python3 - "$dir" "$runs" "$tasks" <<'EOF'
import json, statistics, sys
d, runs, tasks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def row(name):
    rs = [json.load(open(f"{d}/{name}.{r}.json"))["round_trip"] for r in range(1, runs + 1)]
    rs.sort(key=lambda r: r["tasks_per_second"])
    return rs[len(rs) // 2], rs[0]["tasks_per_second"], rs[-1]["tasks_per_second"]
print(f"{'row':44} {'tasks/s':>9} {'range':>17} {'p50':>9} {'p99':>9}")
for name, label in [("memory", "memory store, stream (1,024 in flight)"),
                    ("postgres", "postgres store, stream (1,024 in flight)"),
                    ("memory_single", "memory store, one task in flight"),
                    ("postgres_single", "postgres store, one task in flight")]:
    m, lo, hi = row(name)
    print(f"{label:44} {m['tasks_per_second']:9.0f} {lo:8.0f}-{hi:<8.0f} {m['latency_ms']['p50']:7.2f}ms {m['latency_ms']['p99']:7.2f}ms")
# The runs skip the GetStats baseline (--baseline-calls 0): every commit and
# statement counted is the stream path's.
per = []
for r in range(1, runs + 1):
    b, a = open(f"{d}/counts.{r}").read().strip().split("\n")
    b = [float(x or 0) for x in b.split("|")]; a = [float(x or 0) for x in a.split("|")]
    per.append(((a[0] - b[0]) / tasks, (a[1] - b[1]) / tasks, (a[2] - b[2]) / tasks, (a[3] - b[3]) / tasks))
c, w, wal, s = (statistics.median(x) for x in zip(*per))
print(f"postgres per task (medians): {c:.2f} commits, {s:.2f} statements, {w:.2f} rows written, {wal:.0f} WAL bytes")
EOF
echo "statements by total time (all runs):"
psql "SELECT calls, round(total_exec_time::numeric) || ' ms', rows, left(regexp_replace(query, '\s+', ' ', 'g'), 70) FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 8"
