#!/usr/bin/env bash
# One run, one machine, side by side: the seed's pattern, taskq unary,
# taskq stream, and the transport ceiling (a bench-only tonic echo service,
# unary and bidi). Prints a table with the ratios taskq/seed and
# taskq/ceiling. Every load is bounded by its task count.
#
#   bench/compare.sh [TASKS]        # default 100000 (the seed and unary runs use 20000)
set -euo pipefail
cd "$(dirname "$0")/.."
tasks=${1:-100000}
small=$(( tasks < 20000 ? tasks : 20000 ))

cargo build --release --quiet --bin taskq --example echo_ceiling
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F)" >&2
echo "running: seed pattern ($small tasks)..." >&2
python3 bench/seed_baseline.py --tasks "$small" > "$out/seed.json"
echo "running: transport ceiling ($tasks messages)..." >&2
target/release/examples/echo_ceiling "$tasks" 16 1024 > "$out/ceiling.json"
echo "running: taskq unary ($small tasks)..." >&2
target/release/taskq bench --mode unary --tasks "$small" --fill 0 --json > "$out/unary.json"
# 1,024 tasks in flight either way: 4 producers x 256 (fewer connections,
# more messages per write) or the earlier sessions' 16 x 64.
stream=(--mode stream --tasks "$tasks" --workers 4 --concurrency 256 --payload-bytes 8 --fill 0 --json)
echo "running: taskq stream ($tasks tasks, 8-byte payloads, 4 producers x 256)..." >&2
target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 > "$out/stream.json"
# The same with one task, result or ack per message, as clients written
# before batches (Subscribe.max_batch unset, WatchResults).
echo "running: taskq stream, one per message..." >&2
target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --batches false > "$out/single_messages.json"
echo "running: taskq stream, results read by task ids..." >&2
target/release/taskq bench "${stream[@]}" --producers 4 --batch 256 --results ids > "$out/by_ids.json"
echo "running: taskq stream, 16 producers x 64..." >&2
target/release/taskq bench "${stream[@]}" --producers 16 --batch 64 > "$out/sixteen.json"
echo "running: taskq stream, one task in flight..." >&2
target/release/taskq bench --mode stream --tasks 5000 --producers 1 --batch 1 --workers 1 --concurrency 1 --payload-bytes 8 --fill 0 --json > "$out/single.json"

python3 - "$out" <<'PY'
import json, sys, os
d = sys.argv[1]
load = lambda n: json.load(open(os.path.join(d, n + ".json")))
seed, ceiling, unary, stream, single_messages, by_ids, sixteen, single = (load(n) for n in ("seed", "ceiling", "unary", "stream", "single_messages", "by_ids", "sixteen", "single"))
rt = lambda r: (r["round_trip"]["tasks_per_second"], r["round_trip"]["latency_ms"]["p50"], r["round_trip"]["latency_ms"]["p99"])
rows = [
    ("seed pattern (BaseManager, 2 workers)", seed["tasks_per_second"], seed["p50_ms"], seed["p99_ms"], None),
    ("taskq unary (4 calls per task)", *rt(unary), ceiling["unary_calls_per_second"] / 4),
    ("taskq stream (PutTasks/StreamTasks/WatchResults)", *rt(stream), ceiling["bidi_messages_per_second"] / 2),
    ("taskq stream, one task/result/ack per message", *rt(single_messages), ceiling["bidi_messages_per_second"] / 2),
    ("taskq stream, results by task ids", *rt(by_ids), ceiling["bidi_messages_per_second"] / 2),
    ("taskq stream, 16 producers x 64", *rt(sixteen), ceiling["bidi_messages_per_second"] / 2),
    ("taskq stream, 1 task in flight", *rt(single), None),
    ("ceiling: tonic unary echo, calls/s", ceiling["unary_calls_per_second"], ceiling["unary_p50_ms"], ceiling["unary_p99_ms"], None),
    ("ceiling: tonic bidi echo, messages/s", ceiling["bidi_messages_per_second"], None, None, None),
]
fmt = lambda v, p=2: "-" if v is None else f"{v:,.{p}f}"
print(f"{'run':<50} {'per second':>12} {'p50 ms':>9} {'p99 ms':>9} {'x seed':>7} {'of ceiling':>11}")
for name, rate, p50, p99, ceil in rows:
    vs_seed = rate / seed["tasks_per_second"] if name.startswith("taskq") else None
    share = f"{100 * rate / ceil:.0f}%" if ceil else "-"
    print(f"{name:<50} {fmt(rate, 0):>12} {fmt(p50):>9} {fmt(p99):>9} {fmt(vs_seed, 1):>7} {share:>11}")
print("ceiling for unary = unary echo calls/s / 4; for stream = bidi echo messages/s / 2 (a task makes two echo-like trips)")
print("stream rows: 4 producers x 256 unless named; several tasks, results and acks per message (StreamTasks batches, WatchResultBatches) unless named")
PY
