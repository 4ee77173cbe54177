#!/usr/bin/env bash
# One command, one machine, side by side: the seed's pattern, taskq unary,
# taskq stream, and the transport ceiling (a bench-only tonic echo service,
# unary and bidi). Prints a table with the ratios taskq/seed and
# taskq/ceiling. Every load is bounded by its task count.
#
#   bench/compare.sh [TASKS] [RUNS]   # default 100000 tasks (the seed and unary
#                                     # runs use 20000), 3 runs of each row
#
# This machine's speed drifts by 10-20% within minutes, so each row is run
# RUNS times, the rows taking turns; the table gives each row's median run
# (its rate, p50 and p99) and the range of its rates. Ratios are of medians.
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-100000}
runs=${2:-3}
small=$(( tasks < 20000 ? tasks : 20000 ))

cargo build --release --quiet --bin taskq --example echo_ceiling
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

# 1,024 tasks in flight either way: 4 producers x 256 (fewer connections,
# more messages per write) or the earlier sessions' 16 x 64.
stream=(--mode stream --tasks "$tasks" --workers 4 --concurrency 256 --payload-bytes 8 --fill 0 --json)
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)" >&2
for run in $(seq "$runs"); do
  echo "run $run of $runs: seed pattern ($small tasks)..." >&2
  python3 bench/seed_baseline.py --tasks "$small" > "$out/seed.$run.json"
  echo "run $run of $runs: transport ceiling ($tasks messages)..." >&2
  target/release/examples/echo_ceiling "$tasks" 16 1024 > "$out/ceiling.$run.json"
  echo "run $run of $runs: taskq unary ($small tasks)..." >&2
  target/release/taskq bench --mode unary --tasks "$small" --fill 0 --json > "$out/unary.$run.json"
  echo "run $run of $runs: taskq stream ($tasks tasks, 8-byte payloads, 4 producers x 256)..." >&2
  target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 > "$out/stream.$run.json"
  # The same with one task, result or ack per message, as clients written
  # before batches (Subscribe.max_batch unset, WatchResults).
  echo "run $run of $runs: taskq stream, one per message..." >&2
  target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --batches false > "$out/single_messages.$run.json"
  echo "run $run of $runs: taskq stream, results read by task ids..." >&2
  target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --results ids > "$out/by_ids.$run.json"
  echo "run $run of $runs: taskq stream, 16 producers x 64..." >&2
  target/release/taskq bench "${stream[@]}" --producers 16 --batch 64 > "$out/sixteen.$run.json"
  echo "run $run of $runs: taskq stream, one task in flight..." >&2
  target/release/taskq bench --mode stream --tasks 5000 --producers 1 --batch 1 --workers 1 --concurrency 1 --payload-bytes 8 --fill 0 --json > "$out/single.$run.json"
done

python3 - "$out" "$runs" <<'PY'
import json, sys, os
d, runs = sys.argv[1], int(sys.argv[2])
load = lambda n: [json.load(open(os.path.join(d, f"{n}.{i}.json"))) for i in range(1, runs + 1)]
taskq = lambda r: (r["round_trip"]["tasks_per_second"], r["round_trip"]["latency_ms"]["p50"], r["round_trip"]["latency_ms"]["p99"])
seed_fig = lambda r: (r["tasks_per_second"], r["p50_ms"], r["p99_ms"])
unary_echo = lambda r: (r["unary_calls_per_second"], r["unary_p50_ms"], r["unary_p99_ms"])
bidi_echo = lambda r: (r["bidi_messages_per_second"], None, None)

def median(name, figures):
    """The median run by rate (the lower middle one for an even count), and
    the lowest and highest rates."""
    runs = sorted((figures(r) for r in load(name)), key=lambda f: f[0])
    return runs[(len(runs) - 1) // 2], runs[0][0], runs[-1][0]

seed = median("seed", seed_fig)
unary_ceiling = median("ceiling", unary_echo)
bidi_ceiling = median("ceiling", bidi_echo)
rows = [
    ("seed pattern (BaseManager, 2 workers)", seed, None),
    ("taskq unary (4 calls per task)", median("unary", taskq), unary_ceiling[0][0] / 4),
    ("taskq stream (PutTasks/StreamTasks/WatchResults)", median("stream", taskq), bidi_ceiling[0][0] / 2),
    ("taskq stream, one task/result/ack per message", median("single_messages", taskq), bidi_ceiling[0][0] / 2),
    ("taskq stream, results by task ids", median("by_ids", taskq), bidi_ceiling[0][0] / 2),
    ("taskq stream, 16 producers x 64", median("sixteen", taskq), bidi_ceiling[0][0] / 2),
    ("taskq stream, 1 task in flight", median("single", taskq), None),
    ("ceiling: tonic unary echo, calls/s", unary_ceiling, None),
    ("ceiling: tonic bidi echo, messages/s", bidi_ceiling, None),
]
fmt = lambda v, p=2: "-" if v is None else f"{v:,.{p}f}"
print(f"{'run':<50} {'per second':>12} {'range of rates':>19} {'p50 ms':>9} {'p99 ms':>9} {'x seed':>7} {'of ceiling':>11}")
for name, ((rate, p50, p99), low, high), ceil in rows:
    vs_seed = rate / seed[0][0] if name.startswith("taskq") else None
    share = f"{100 * rate / ceil:.0f}%" if ceil else "-"
    spread = f"{low:,.0f}-{high:,.0f}"
    print(f"{name:<50} {fmt(rate, 0):>12} {spread:>19} {fmt(p50):>9} {fmt(p99):>9} {fmt(vs_seed, 1):>7} {share:>11}")
print(f"per second, p50, p99: the median of {runs} runs by rate; range: the lowest and highest rate of the runs")
print("ceiling for unary = unary echo calls/s / 4; for stream = bidi echo messages/s / 2 (a task makes two echo-like trips); both medians")
print("stream rows: 4 producers x 256 unless named; several tasks, results and acks per message (StreamTasks batches, WatchResultBatches) unless named")
PY
