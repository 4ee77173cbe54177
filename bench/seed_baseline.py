"""The seed's pattern as a baseline: multiprocessing.managers.BaseManager
exposing a task queue and a result queue over the network with an auth
key; one master, two worker processes, no sleep. Written here from the
seed's description (../shared/seed/distributed-queue.txt).

    python3 bench/seed_baseline.py --tasks 20000                  # all put, then all read
    python3 bench/seed_baseline.py --tasks 20000 --in-flight 1024
    python3 bench/seed_baseline.py --tasks 5000 --in-flight 1     # closed loop

Prints one JSON line: tasks/s and the round-trip latency percentiles
(put by the master -> result read by the master), with the bound on tasks
in flight they were measured under.

Without --in-flight the master puts every task before it reads any
result, as the seed does: the latency then includes waiting behind the
whole run's backlog (up to --tasks in flight), not the cost of one task.
With --in-flight N the master puts while fewer than N tasks are
unfinished and reads a result when N are, the same bound taskq's bench
keeps (producers x batch); N = 1 is a closed loop, one task at a time.
"""

import argparse
import json
import multiprocessing
import queue
import time
from multiprocessing.managers import BaseManager

task_queue = queue.Queue()
result_queue = queue.Queue()


def get_task_queue():
    return task_queue


def get_result_queue():
    return result_queue


class QueueManager(BaseManager):
    pass


AUTHKEY = b"abc"


def worker(port):
    QueueManager.register("get_task_queue")
    QueueManager.register("get_result_queue")
    m = QueueManager(address=("127.0.0.1", port), authkey=AUTHKEY)
    m.connect()
    tasks, results = m.get_task_queue(), m.get_result_queue()
    while True:
        item = tasks.get()
        if item is None:
            return
        sent_at, n = item
        results.put((sent_at, n * n))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=20000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--in-flight", type=int, default=0,
                        help="most tasks put and not yet read back (0: all of them)")
    args = parser.parse_args()

    QueueManager.register("get_task_queue", callable=get_task_queue)
    QueueManager.register("get_result_queue", callable=get_result_queue)
    manager = QueueManager(address=("127.0.0.1", 0), authkey=AUTHKEY)
    manager.start()
    port = manager.address[1]
    tasks, results = manager.get_task_queue(), manager.get_result_queue()
    procs = [multiprocessing.Process(target=worker, args=(port,)) for _ in range(args.workers)]
    for p in procs:
        p.start()

    in_flight = args.in_flight if args.in_flight > 0 else args.tasks
    latencies = []
    put = 0
    started = time.perf_counter()
    while len(latencies) < args.tasks:
        while put < args.tasks and put - len(latencies) < in_flight:
            tasks.put((time.perf_counter(), put))
            put += 1
        sent_at, _ = results.get(timeout=60)
        latencies.append(time.perf_counter() - sent_at)
    elapsed = time.perf_counter() - started
    for _ in procs:
        tasks.put(None)
    for p in procs:
        p.join(timeout=30)
    manager.shutdown()

    latencies.sort()
    pick = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000
    print(json.dumps({
        "tasks": args.tasks,
        "in_flight": in_flight,
        "tasks_per_second": args.tasks / elapsed,
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
    }))


if __name__ == "__main__":
    main()
