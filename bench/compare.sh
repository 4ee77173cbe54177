#!/usr/bin/env bash
# One command, one machine, side by side: the seed's pattern, taskq unary,
# taskq stream (on the memory store, and on the PostgreSQL store when
# PostgreSQL's server binaries are here), and the transport ceiling (a
# bench-only tonic echo service, unary and bidi). Prints a table with the ratios taskq/seed and
# taskq/ceiling. Every load is bounded by its task count.
#
#   bench/compare.sh [TASKS] [RUNS]   # default 100000 tasks (the seed and unary
#                                     # runs use 20000), 3 runs of each row
#
# Like with like (bench/README.md, "How compare.sh compares"):
# - Each batched stream row is held against an echo that carries as many
#   items per message as that run of taskq did (its `items_per_message`,
#   rounded), in items/s; the one-per-message row against the echo of one
#   item per message.
# - Every row says how many tasks were in flight when its latency was
#   measured, and the seed is measured at taskq's bounds too: 1,024 in
#   flight (the stream rows) and 1, a closed loop (the one-in-flight row).
#
# This machine's speed drifts by 10-20% within minutes, so each row is run
# RUNS times, the rows taking turns; the table gives each row's median run
# (its rate, p50 and p99) and the range of its rates. Ratios are of medians.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-100000}
runs=${2:-3}
small=$(( tasks < 20000 ? tasks : 20000 ))
closed=5000

cargo build --release --quiet --bin taskq --example echo_ceiling
out=$(mktemp -d)
# The PostgreSQL store's rows need PostgreSQL's server binaries (Debian's
# postgresql package): a throwaway cluster and one taskq server on it
# (bench/pg_server.sh), for the whole run. Without them the rows say so.
. bench/pg_server.sh
trap 'rm -rf "$out"; pg_server_stop' EXIT
if pg_available; then
  pg_server_start target/release/taskq
fi

# The mean items per message a taskq run's stream path carried (tasks to
# workers and results to producers together), rounded, at least 1.
batch_of() {
  python3 -c 'import json, sys
m = json.load(open(sys.argv[1]))["round_trip"]["items_per_message"] or 1
print(max(1, int(m + 0.5)))' "$1"
}
# The echo ceiling at the batch taskq's run NAME.RUN carried: as many
# messages as the one-per-message ceiling sends, so each carries N items.
ceiling_like() {
  local n
  n=$(batch_of "$out/$1.$2.json")
  target/release/examples/echo_ceiling $(( tasks * n )) 16 1024 "$n" > "$out/ceiling_$1.$2.json"
}

# 1,024 tasks in flight either way: 4 producers x 256 (fewer connections,
# more messages per write) or the earlier sessions' 16 x 64.
stream=(--mode stream --tasks "$tasks" --workers 4 --concurrency 256 --payload-bytes 8 --fill 0 --json)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)" >&2
for run in $(seq "$runs"); do
  echo "run $run of $runs: seed pattern ($small tasks: all put first; then 1,024 in flight)..." >&2
  python3 bench/seed_baseline.py --tasks "$small" > "$out/seed_all.$run.json"
  python3 bench/seed_baseline.py --tasks "$small" --in-flight 1024 > "$out/seed.$run.json"
  echo "run $run of $runs: seed pattern, one task in flight ($closed tasks)..." >&2
  python3 bench/seed_baseline.py --tasks "$closed" --in-flight 1 > "$out/seed_single.$run.json"
  echo "run $run of $runs: transport ceiling, one item per message ($tasks messages)..." >&2
  target/release/examples/echo_ceiling "$tasks" 16 1024 > "$out/ceiling.$run.json"
  echo "run $run of $runs: taskq unary ($small tasks)..." >&2
  target/release/taskq bench --mode unary --tasks "$small" --fill 0 --json > "$out/unary.$run.json"
  echo "run $run of $runs: taskq stream ($tasks tasks, 8-byte payloads, 4 producers x 256), and the ceiling at its batch..." >&2
  target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 > "$out/stream.$run.json"
  ceiling_like stream "$run"
  # The same with one task, result or ack per message, as clients written
  # before batches (Subscribe.max_batch unset, WatchResults).
  echo "run $run of $runs: taskq stream, one per message..." >&2
  target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --batches false > "$out/single_messages.$run.json"
  echo "run $run of $runs: taskq stream, results read by task ids, and the ceiling at its batch..." >&2
  target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --results ids > "$out/by_ids.$run.json"
  ceiling_like by_ids "$run"
  echo "run $run of $runs: taskq stream, 16 producers x 64, and the ceiling at its batch..." >&2
  target/release/taskq bench "${stream[@]}" --producers 16 --batch 64 > "$out/sixteen.$run.json"
  ceiling_like sixteen "$run"
  echo "run $run of $runs: taskq stream, one task in flight..." >&2
  target/release/taskq bench --mode stream --tasks "$closed" --producers 1 --batch 1 --workers 1 --concurrency 1 --payload-bytes 8 --fill 0 --json > "$out/single.$run.json"
  if [ -n "${pg_grpc:-}" ]; then
    # The GetStats baseline is skipped: on this store it reads the
    # database, which is not what the rows measure.
    echo "run $run of $runs: taskq stream on the PostgreSQL store, then one task in flight..." >&2
    target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --baseline-calls 0 \
      --server "http://127.0.0.1:$pg_grpc" > "$out/pg_stream.$run.json"
    target/release/taskq bench --mode stream --tasks "$closed" --producers 1 --batch 1 --workers 1 --concurrency 1 \
      --payload-bytes 8 --fill 0 --baseline-calls 0 --json --server "http://127.0.0.1:$pg_grpc" > "$out/pg_single.$run.json"
  fi
done

python3 - "$out" "$runs" "$small" <<'PY'
import json, sys, os
d, runs, small = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
load = lambda n: [json.load(open(os.path.join(d, f"{n}.{i}.json"))) for i in range(1, runs + 1)]
# Each run's figures: (rate, p50, p99, items per message).
taskq = lambda r: (r["round_trip"]["tasks_per_second"], r["round_trip"]["latency_ms"]["p50"],
                   r["round_trip"]["latency_ms"]["p99"], r["round_trip"]["items_per_message"])
seed_fig = lambda r: (r["tasks_per_second"], r["p50_ms"], r["p99_ms"], 1)
unary_echo = lambda r: (r["unary_calls_per_second"], r["unary_p50_ms"], r["unary_p99_ms"], 1)
bidi_echo = lambda r: (r["bidi_items_per_second"], None, None, r["items_per_message"])

def median(name, figures):
    """The median run by rate (the lower middle one for an even count), and
    the lowest and highest rates."""
    runs = sorted((figures(r) for r in load(name)), key=lambda f: f[0])
    return runs[(len(runs) - 1) // 2], runs[0][0], runs[-1][0]

seed = median("seed", seed_fig)
seed_single = median("seed_single", seed_fig)
unary_ceiling = median("ceiling", unary_echo)
bidi_ceiling = median("ceiling", bidi_echo)
like = {name: median(f"ceiling_{name}", bidi_echo) for name in ("stream", "by_ids", "sixteen")}
# (name, in flight, figures, the seed row it is held against, the ceiling)
rows = [
    ("seed pattern, all put before any is read", f"{small:,}", median("seed_all", seed_fig), None, None),
    ("seed pattern (BaseManager, 2 workers)", "1,024", seed, None, None),
    ("seed pattern, 1 task in flight", "1", seed_single, None, None),
    ("taskq unary (4 calls per task)", "16", median("unary", taskq), seed, unary_ceiling[0][0] / 4),
    ("taskq stream (PutTasks/StreamTasks/WatchResults)", "1,024", median("stream", taskq), seed, like["stream"][0][0] / 2),
    ("taskq stream, one task/result/ack per message", "1,024", median("single_messages", taskq), seed, bidi_ceiling[0][0] / 2),
    ("taskq stream, results by task ids", "1,024", median("by_ids", taskq), seed, like["by_ids"][0][0] / 2),
    ("taskq stream, 16 producers x 64", "1,024", median("sixteen", taskq), seed, like["sixteen"][0][0] / 2),
    ("taskq stream, 1 task in flight", "1", median("single", taskq), seed_single, None),
]
# The PostgreSQL store (durable, several servers), when PostgreSQL is here.
if os.path.exists(os.path.join(d, "pg_stream.1.json")):
    rows += [
        ("taskq stream, PostgreSQL store", "1,024", median("pg_stream", taskq), seed, like["stream"][0][0] / 2),
        ("taskq stream, PostgreSQL store, 1 task in flight", "1", median("pg_single", taskq), seed_single, None),
    ]
else:
    print("(no PostgreSQL server binaries here: the PostgreSQL store's rows are left out)")
rows += [
    ("ceiling: tonic unary echo, calls/s", "16", unary_ceiling, None, None),
    ("ceiling: bidi echo, 1 item per message", "16 x 1,024", bidi_ceiling, None, None),
    ("ceiling: bidi echo at the stream row's batch", "16 x 1,024", like["stream"], None, None),
    ("ceiling: bidi echo at the by-ids row's batch", "16 x 1,024", like["by_ids"], None, None),
    ("ceiling: bidi echo at the 16 x 64 row's batch", "16 x 1,024", like["sixteen"], None, None),
]
fmt = lambda v, p=2: "-" if v is None else f"{v:,.{p}f}"
per_message = lambda v: "-" if v is None else (f"{v:.0f}" if float(v).is_integer() else f"{v:.1f}")
print(f"{'run':<50} {'in flight':>10} {'items/msg':>9} {'per second':>12} {'range of rates':>21} {'p50 ms':>9} {'p99 ms':>9} {'x seed':>7} {'of ceiling':>10}")
for name, in_flight, ((rate, p50, p99, batch), low, high), vs, ceil in rows:
    vs_seed = rate / vs[0][0] if vs else None
    share = f"{100 * rate / ceil:.0f}%" if ceil else "-"
    spread = f"{low:,.0f}-{high:,.0f}"
    print(f"{name:<50} {in_flight:>10} {per_message(batch):>9} {fmt(rate, 0):>12} {spread:>21} {fmt(p50):>9} {fmt(p99):>9} {fmt(vs_seed, 1):>7} {share:>10}")
print(f"per second, p50, p99, items/msg: the median run of {runs} by rate; range: the lowest and highest rate of the runs")
print("in flight: tasks (or echo items) put and not yet read back while the row's latency was measured; p50 and p99 compare only between rows with the same figure")
print("items/msg: taskq's mean tasks per message to workers and results per message to producers, together; the echo's items per message")
print("x seed: against the seed pattern at 1,024 in flight; the 1-in-flight row against the seed's 1 in flight")
print("of ceiling: unary = unary echo calls/s / 4; stream = bidi echo items/s / 2 (a task makes two echo-like trips), the echo carrying the row's")
print("  items per message (each run of the row its own echo run); the one-per-message row against the echo of 1 item per message")
PY
