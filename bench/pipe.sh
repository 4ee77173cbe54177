#!/usr/bin/env bash
# A Python handler started per task (`taskq worker --exec`) beside the
# same logic in long-lived programs (`taskq worker --pipe`), in one run on
# this machine, against one release `taskq serve`:
#
#   bench/pipe.sh [EXEC_TASKS] [PIPE_TASKS] [RUNS]   # default 200, 10000, 1
#
# Each row puts its tasks (the numbers 0..N-1) on a queue of its own
# first, then starts `taskq worker --concurrency 4` and times it from its
# start until the queue's last task is finished (polling `taskq stats`
# every 20 ms), so the figure includes the worker's start and, for
# --pipe, its four Python start-ups. Every result is then read back and
# checked (SUCCEEDED, the square of its task's number); any that is
# missing or wrong exits 1. Prints tasks/s for each row (the median of
# RUNS, rows taking turns, and the range) and the ratio of the medians.
#
# The handlers: `--exec` runs
#   python3 -c 'import sys; print(int(sys.stdin.read()) ** 2, end="")'
# per task; `--pipe` runs examples/pipe_square.py (the README's handler)
# once per slot. Needs python3.
set -euo pipefail
cd "$(dirname "$0")/.."
exec_tasks=${1:-200}
pipe_tasks=${2:-10000}
runs=${3:-1}

cargo build --release --quiet --bin taskq
taskq=${CARGO_TARGET_DIR:-$PWD/target}/release/taskq
dir=$(mktemp -d /tmp/taskq-bench-pipe.XXXXXX)
cleanup() {
  [ -n "${server:-}" ] && kill "$server" 2>/dev/null || true
  rm -rf "$dir"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
"$taskq" serve --listen "127.0.0.1:$port" --http-listen off > "$dir/serve.log" 2>&1 &
server=$!
for _ in $(seq 100); do "$taskq" health --server "$url" >/dev/null 2>&1 && break; sleep 0.1; done
"$taskq" health --server "$url" >/dev/null || { cat "$dir/serve.log" >&2; exit 1; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(date -u +%F); $(python3 --version)" >&2
python3 - "$taskq" "$url" "$exec_tasks" "$pipe_tasks" "$runs" "$dir" <<'PY'
import json, statistics, subprocess, sys, time

taskq, url, exec_tasks, pipe_tasks, runs, folder = sys.argv[1:]
exec_tasks, pipe_tasks, runs = int(exec_tasks), int(pipe_tasks), int(runs)
CONCURRENCY = 4
TIMEOUT = 600  # seconds: a row that takes longer is a failure, not a figure
ONE_SHOT = 'import sys; print(int(sys.stdin.read()) ** 2, end="")'
ROWS = {
    "exec": (exec_tasks, ["--", "python3", "-c", ONE_SHOT]),
    "pipe": (pipe_tasks, ["--pipe", "--", "python3", "examples/pipe_square.py"]),
}

def taskq_out(*args, stdin=None):
    return subprocess.run([taskq, *args, "--server", url], input=stdin,
                          capture_output=True, text=True, check=True).stdout

def finished(queue):
    stats = json.loads(taskq_out("stats", "--queue", queue, "--json"))["queues"]
    return sum(q["succeeded"] + q["failed"] for q in stats if q["queue"] == queue)

def row(name, run):
    tasks, handler = ROWS[name]
    queue = f"{name}-{run}"
    numbers = "".join(f"{n}\n" for n in range(tasks))
    ids = taskq_out("put", "--queue", queue, "--lines", stdin=numbers).split()
    assert len(ids) == tasks, f"{queue}: {len(ids)} of {tasks} put"
    with open(f"{folder}/{queue}.log", "w") as log:
        started = time.monotonic()
        worker = subprocess.Popen(
            [taskq, "worker", "--server", url, "--queue", queue,
             "--concurrency", str(CONCURRENCY), *handler],
            stdout=subprocess.DEVNULL, stderr=log)
        while finished(queue) < tasks:
            if time.monotonic() - started > TIMEOUT:
                worker.kill()
                sys.exit(f"{queue}: not finished within {TIMEOUT}s")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        worker.terminate()
        worker.wait(timeout=60)
    results = {}
    for line in taskq_out("results", "--queue", queue, "--count", str(tasks),
                          "--wait", "10s", "--json").splitlines():
        result = json.loads(line)
        results[result["task_id"]] = result
    wrong = [n for n, id in enumerate(ids)
             if results.get(id, {}).get("state") != "SUCCEEDED"
             or results[id]["output"] != str(n * n)]
    if wrong:
        sys.exit(f"{queue}: {len(wrong)} results missing or wrong, first for task {wrong[0]}")
    print(f"  {queue}: {tasks} tasks in {elapsed:.2f} s, {tasks / elapsed:.1f} tasks/s, all checked",
          file=sys.stderr)
    return tasks / elapsed

rates = {"exec": [], "pipe": []}
for run in range(1, runs + 1):
    for name in rates:
        rates[name].append(row(name, run))
exec_rate = statistics.median(rates["exec"])
pipe_rate = statistics.median(rates["pipe"])
print(f"concurrency {CONCURRENCY}, median of {runs} run(s) (range of the runs); results checked")
print(f"{'row':<8}{'tasks':>8}{'tasks/s':>12}  range")
for name, tasks, rate in [("exec", exec_tasks, exec_rate), ("pipe", pipe_tasks, pipe_rate)]:
    low, high = min(rates[name]), max(rates[name])
    print(f"{'--' + name:<8}{tasks:>8}{rate:>12.1f}  {low:.1f}-{high:.1f}")
print(f"--pipe / --exec: {pipe_rate / exec_rate:.0f}x")
PY
