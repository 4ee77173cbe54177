"""The seed's pattern as a baseline: multiprocessing.managers.BaseManager
exposing a task queue and a result queue over the network with an auth
key; one master, two worker processes, no sleep. Written here from the
seed's description (../shared/seed/distributed-queue.txt).

    python3 bench/seed_baseline.py --tasks 20000

Prints one JSON line: tasks/s and the round-trip latency percentiles
(put by the master -> result read by the master).
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

    latencies = []
    started = time.perf_counter()
    for n in range(args.tasks):
        tasks.put((time.perf_counter(), n))
    for _ in range(args.tasks):
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
        "tasks_per_second": args.tasks / elapsed,
        "p50_ms": pick(0.50),
        "p99_ms": pick(0.99),
    }))


if __name__ == "__main__":
    main()
