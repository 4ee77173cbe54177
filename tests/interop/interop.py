"""taskq from Python, written only from proto/: the interop test.

Stubs are generated from proto/ by grpcio-tools at test time (nothing
generated is committed). Against the real release binary it runs the
seed's scenario (a master process and two worker processes), every status
code of the contract, auth, roles (PERMISSION_DENIED outside a
token's role or queues), deadlines, lease expiry and redelivery, health
without a token, and reflection's service list; then the seed's scenario
again over TLS.

    python tests/interop/interop.py --taskq target/release/taskq

Prints one line per check and "N passed, M failed"; exits 1 on any failure.
"""

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback


def check(condition, message="check failed"):
    """An assertion that `python -O` cannot strip: the checks are the test."""
    if not condition:
        raise AssertionError(message)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Worker processes inherit the master's token through the environment.
TOKEN = os.environ.setdefault("TASKQ_INTEROP_TOKEN", "interop-token-" + os.urandom(8).hex())
# Role tokens: a producer, and a worker limited to queue "jobs".
PRODUCER_TOKEN = "interop-producer-" + os.urandom(8).hex()
WORKER_TOKEN = "interop-worker-" + os.urandom(8).hex()


def generate_stubs(out_dir):
    """Compiles proto/ into Python modules in out_dir and imports them."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main([
        "grpc_tools.protoc",
        "-I" + os.path.join(ROOT, "proto"),
        "-I" + well_known,
        "--python_out=" + out_dir,
        "--grpc_python_out=" + out_dir,
        os.path.join(ROOT, "proto", "taskq", "v1", "taskq.proto"),
    ])
    if code != 0:
        raise RuntimeError("protoc failed with %d" % code)
    sys.path.insert(0, out_dir)


class Server:
    """A taskq server process on a free loopback port."""

    def __init__(self, taskq, workdir, extra=()):
        tokens = os.path.join(workdir, "tokens")
        with open(tokens, "w") as f:
            f.write("# interop\n%s\n%s producer\n%s worker jobs\n" % (TOKEN, PRODUCER_TOKEN, WORKER_TOKEN))
        env = dict(os.environ)
        env.pop("TASKQ_TOKENS", None)
        env["TASKQ_HTTP_LISTEN"] = "127.0.0.1:0"  # a free port: not the default's
        self.proc = subprocess.Popen(
            [taskq, "serve", "--listen", "127.0.0.1:0", "--token-file", tokens, *extra],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env, text=True,
        )
        deadline = time.time() + 30
        self.addr = None
        while time.time() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            match = re.search(r"addr=(\S+)", line)
            if "taskq serving" in line and match:
                self.addr = match.group(1)
                break
        if self.addr is None:
            self.proc.kill()
            raise RuntimeError("the server did not start")

    def stop(self):
        """SIGTERM; returns the exit code."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def channel(addr, tls_ca=None):
    import grpc

    if tls_ca is None:
        return grpc.insecure_channel(addr)
    with open(tls_ca, "rb") as f:
        creds = grpc.ssl_channel_credentials(root_certificates=f.read())
    return grpc.secure_channel(addr, creds, options=[("grpc.ssl_target_name_override", "localhost")])


AUTH = (("authorization", "Bearer " + TOKEN),)


def stub(addr, tls_ca=None):
    import taskq.v1.taskq_pb2_grpc as rpc

    return rpc.TaskQueueStub(channel(addr, tls_ca))


def duration(seconds):
    from google.protobuf import duration_pb2

    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


# ---- the seed's scenario: master and workers as separate processes ----

def worker_main(addr, name, tls_ca):
    """A worker process: take tasks, square them, put results back, until
    the queue stays empty for two polls."""
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr, tls_ca)
    idle = 0
    done = 0
    while idle < 2:
        reply = s.GetTask(pb.GetTaskRequest(queue="squares", worker_id=name, lease=duration(30)),
                          timeout=1.0, metadata=AUTH)
        if not reply.HasField("task"):
            idle += 1
            continue
        idle = 0
        n = int(reply.task.payload.decode())
        s.PutResult(pb.PutResultRequest(task_id=reply.task.id, lease_id=reply.task.lease_id,
                                        output=str(n * n).encode()), timeout=10, metadata=AUTH)
        done += 1
    print("worker %s exit: %d tasks" % (name, done))


def seed_scenario(addr, workdir, tls_ca=None):
    import taskq.v1.taskq_pb2 as pb

    script = os.path.abspath(__file__)
    argv = [sys.executable, script, "worker", "--addr", addr, "--stubs", workdir]
    if tls_ca:
        argv += ["--tls-ca", tls_ca]
    workers = [subprocess.Popen(argv + ["--name", "py-worker-%d" % i]) for i in (1, 2)]
    try:
        s = stub(addr, tls_ca)
        numbers = {}
        for _ in range(10):
            n = random.randint(0, 10000)
            reply = s.PutTask(pb.PutTaskRequest(queue="squares", payload=str(n).encode()),
                              timeout=10, metadata=AUTH)
            numbers[reply.task_id] = n
        results = {}
        for _ in range(10):
            reply = s.GetResult(pb.GetResultRequest(queue="squares"), timeout=15, metadata=AUTH)
            check(reply.HasField("result"), "a result within 15s")
            results[reply.result.task_id] = reply.result
        for task_id, n in numbers.items():
            result = results[task_id]
            check(result.state == pb.TASK_STATE_SUCCEEDED, result)
            check(result.output == str(n * n).encode(), (n, result.output))
            check(result.worker_id in ("py-worker-1", "py-worker-2"), result.worker_id)
    finally:
        for w in workers:
            w.wait(timeout=30)
    check(all(w.returncode == 0 for w in workers), [w.returncode for w in workers])


# ---- the other checks ----

def check_status_codes(addr):
    import grpc
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr)

    def code_of(call, request, **kw):
        try:
            call(request, timeout=5, metadata=AUTH, **kw)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    C = grpc.StatusCode
    check(code_of(s.PutTask, pb.PutTaskRequest(queue="no spaces")) == C.INVALID_ARGUMENT)
    check(code_of(s.GetResult, pb.GetResultRequest()) == C.INVALID_ARGUMENT)
    unknown = "01890a5d-ac96-774b-bcce-b302099a8057"
    check(code_of(s.GetResult, pb.GetResultRequest(task_id=unknown)) == C.NOT_FOUND)
    check(code_of(s.ExtendLease, pb.ExtendLeaseRequest(task_id=unknown, lease_id=unknown + "/1")) == C.NOT_FOUND)

    put = s.PutTask(pb.PutTaskRequest(queue="codes", payload=b"x"), timeout=5, metadata=AUTH)
    first = s.GetTask(pb.GetTaskRequest(queue="codes", lease=duration(0.3)), timeout=5, metadata=AUTH).task
    second = s.GetTask(pb.GetTaskRequest(queue="codes", lease=duration(30)), timeout=10, metadata=AUTH).task
    check(second.id == put.task_id and second.attempt == 2, second)
    stale = pb.PutResultRequest(task_id=first.id, lease_id=first.lease_id,
                                failure=pb.Failure(message="late", retry=False))
    check(code_of(s.PutResult, stale) == C.ABORTED)
    ok = pb.PutResultRequest(task_id=second.id, lease_id=second.lease_id, output=b"42")
    check(code_of(s.PutResult, ok) == C.OK)
    check(code_of(s.PutResult, ok) == C.OK, "the same result repeated is OK")
    other = pb.PutResultRequest(task_id=second.id, lease_id=second.lease_id, output=b"43")
    check(code_of(s.PutResult, other) == C.ALREADY_EXISTS)
    finished = pb.ExtendLeaseRequest(task_id=second.id, lease_id=second.lease_id)
    check(code_of(s.ExtendLease, finished) == C.FAILED_PRECONDITION)

    for i in range(20):  # the server runs with --queue-capacity 20
        s.PutTask(pb.PutTaskRequest(queue="full", payload=b"%d" % i), timeout=5, metadata=AUTH)
    check(code_of(s.PutTask, pb.PutTaskRequest(queue="full")) == C.RESOURCE_EXHAUSTED)


def check_batches(addr):
    """StreamTasks with batches and WatchResultBatches from another language:
    tasks come in `tasks` messages within the window, a `results` message is
    answered by one `result_acks`, and every result reads back."""
    import queue
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr)
    tasks = [pb.PutTaskRequest(queue="batches", payload=b"%d" % i) for i in range(12)]
    reply = s.PutTasks(pb.PutTasksRequest(tasks=tasks), timeout=10, metadata=AUTH)
    ids = [o.ok.task_id for o in reply.outcomes]
    check(len(ids) == 12 and all(ids), reply)

    outbox = queue.Queue()

    def messages():
        while True:
            message = outbox.get()
            if message is None:
                return
            yield message

    outbox.put(pb.WorkerMessage(subscribe=pb.Subscribe(
        queue="batches", worker_id="py-batches", lease=duration(30), max_in_flight=8, max_batch=5)))
    replies = s.StreamTasks(messages(), timeout=30, metadata=AUTH)
    # Each `tasks` message is answered at once by one `results` message. A
    # freed slot may be refilled before its ack is sent, so tasks and acks
    # may interleave; the window still bounds tasks received minus results
    # sent (the server has accepted at most what was sent).
    received, sent, acked = 0, 0, 0
    unacked = []
    try:
        while acked < 12:
            message = next(replies)
            kind = message.WhichOneof("msg")
            if kind == "tasks":
                batch = message.tasks.tasks
                check(1 <= len(batch) <= 5, len(batch))
                received += len(batch)
                check(received - sent <= 8, "never more than the window")
                results = [pb.PutResultRequest(task_id=t.id, lease_id=t.lease_id, output=t.payload + b"!")
                           for t in batch]
                outbox.put(pb.WorkerMessage(results=pb.PutResultBatch(results=results)))
                sent += len(batch)
                unacked.append([t.id for t in batch])
            else:
                check(kind == "result_acks", message)
                acks = message.result_acks.acks
                check([a.task_id for a in acks] == unacked.pop(0), "one ack per result, in order")
                check(all(not a.HasField("error") and a.state == pb.TASK_STATE_SUCCEEDED for a in acks))
                acked += len(acks)
    finally:
        outbox.put(None)
    check(received == 12)

    watch = pb.WatchResultsRequest(task_ids=pb.TaskIds(ids=ids))
    outputs = {}
    for batch in s.WatchResultBatches(watch, timeout=10, metadata=AUTH):
        for result in batch.results:
            outputs[result.task_id] = result.output
    check(outputs == {i: b"%d!" % n for n, i in enumerate(ids)}, outputs)


def check_auth(addr):
    import grpc
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr)
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        try:
            s.GetStats(pb.GetStatsRequest(), timeout=5, metadata=metadata)
            raise AssertionError("a call without the right token got in")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code())
            check(TOKEN not in e.details())
    s.GetStats(pb.GetStatsRequest(), timeout=5, metadata=AUTH)


def check_roles(addr):
    import grpc
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr)
    producer = (("authorization", "Bearer " + PRODUCER_TOKEN),)
    worker = (("authorization", "Bearer " + WORKER_TOKEN),)

    def code_of(call, request, metadata):
        try:
            call(request, timeout=5, metadata=metadata)
        except grpc.RpcError as e:
            return e.code()
        return grpc.StatusCode.OK

    C = grpc.StatusCode
    now = pb.GetTaskRequest(queue="jobs", max_wait=duration(0))
    check(code_of(s.PutTask, pb.PutTaskRequest(queue="jobs", payload=b"x"), producer) == C.OK)
    check(code_of(s.GetTask, now, producer) == C.PERMISSION_DENIED)
    check(code_of(s.GetStats, pb.GetStatsRequest(), producer) == C.PERMISSION_DENIED)
    check(code_of(s.PutTask, pb.PutTaskRequest(queue="jobs"), worker) == C.PERMISSION_DENIED)
    other = pb.GetTaskRequest(queue="elsewhere", max_wait=duration(0))
    check(code_of(s.GetTask, other, worker) == C.PERMISSION_DENIED)
    task = s.GetTask(now, timeout=5, metadata=worker).task
    check(task.queue == "jobs", task)
    done = pb.PutResultRequest(task_id=task.id, lease_id=task.lease_id, output=b"ok")
    check(code_of(s.PutResult, done, worker) == C.OK)


def check_deadlines(addr):
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr)
    started = time.time()
    reply = s.GetTask(pb.GetTaskRequest(queue="idle"), timeout=0.5, metadata=AUTH)
    took = time.time() - started
    check(not reply.HasField("task"))
    check(took < 0.5, "answered before the deadline, not after: %.3fs" % took)
    reply = s.GetResult(pb.GetResultRequest(queue="idle"), timeout=0.5, metadata=AUTH)
    check(not reply.HasField("result"))


def check_lease_expiry(addr):
    import taskq.v1.taskq_pb2 as pb

    s = stub(addr)
    put = s.PutTask(pb.PutTaskRequest(queue="expiry", payload=b"x", max_attempts=2), timeout=5, metadata=AUTH)
    first = s.GetTask(pb.GetTaskRequest(queue="expiry", lease=duration(0.2)), timeout=5, metadata=AUTH).task
    check(first.attempt == 1)
    again = s.GetTask(pb.GetTaskRequest(queue="expiry", lease=duration(0.2)), timeout=5, metadata=AUTH).task
    check(again.id == put.task_id and again.attempt == 2)
    result = s.GetResult(pb.GetResultRequest(task_id=put.task_id), timeout=5, metadata=AUTH)
    check(result.result.state == pb.TASK_STATE_FAILED and "lease expired" in result.result.error, result)
    stats = s.GetStats(pb.GetStatsRequest(queue="expiry"), timeout=5, metadata=AUTH)
    check(stats.queues[0].redelivered == 1 and stats.queues[0].failed == 1, stats)


def check_health(addr):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    h = health_pb2_grpc.HealthStub(channel(addr))
    for service in ("", "taskq.v1.TaskQueue"):
        reply = h.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        check(reply.status == health_pb2.HealthCheckResponse.SERVING, (service, reply))


def check_reflection(addr):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    r = reflection_pb2_grpc.ServerReflectionStub(channel(addr))
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    replies = list(r.ServerReflectionInfo(iter([request]), timeout=5, metadata=AUTH))
    names = {s.name for s in replies[0].list_services_response.service}
    check("taskq.v1.TaskQueue" in names and "grpc.health.v1.Health" in names, names)
    try:
        list(r.ServerReflectionInfo(iter([request]), timeout=5))
        raise AssertionError("reflection without a token got in")
    except grpc.RpcError as e:
        check(e.code() == grpc.StatusCode.UNAUTHENTICATED, e.code())


def make_certs(workdir):
    """A CA and a server certificate for localhost, with openssl."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    ca_key, ca, key, csr, cert = (os.path.join(workdir, n) for n in
                                  ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = os.path.join(workdir, "san.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=DNS:localhost\n")
    run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", ca_key, "-out", ca, "-subj", "/CN=taskq interop CA", "-days", "1")
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", key, "-out", csr, "-subj", "/CN=localhost")
    run("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
        "-out", cert, "-days", "1", "-extfile", ext)
    return ca, cert, key


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", nargs="?", default="test")
    parser.add_argument("--taskq", default=os.path.join(ROOT, "target", "release", "taskq"))
    parser.add_argument("--addr")
    parser.add_argument("--name")
    parser.add_argument("--stubs")
    parser.add_argument("--tls-ca")
    args = parser.parse_args()

    if args.mode == "worker":
        sys.path.insert(0, args.stubs)
        worker_main(args.addr, args.name, args.tls_ca)
        return 0

    if not os.access(args.taskq, os.X_OK):
        print("interop: %s is not an executable; build it with cargo build --release" % args.taskq)
        return 1
    workdir = tempfile.mkdtemp(prefix="taskq-interop-")
    passed, failed = 0, 0
    try:
        generate_stubs(workdir)
        server = Server(args.taskq, workdir, ["--queue-capacity", "20"])
        checks = [
            ("seed scenario: master and two worker processes", lambda: seed_scenario(server.addr, workdir)),
            ("status codes of the contract", lambda: check_status_codes(server.addr)),
            ("batches: StreamTasks and WatchResultBatches", lambda: check_batches(server.addr)),
            ("auth: none, wrong and right token", lambda: check_auth(server.addr)),
            ("roles: producer and queue-limited worker tokens", lambda: check_roles(server.addr)),
            ("deadlines: empty answers before the deadline", lambda: check_deadlines(server.addr)),
            ("lease expiry, redelivery and max attempts", lambda: check_lease_expiry(server.addr)),
            ("health without a token", lambda: check_health(server.addr)),
            ("reflection lists the services, with a token", lambda: check_reflection(server.addr)),
        ]
        for name, check in checks:
            try:
                check()
                passed += 1
                print("ok      %s" % name)
            except Exception:
                failed += 1
                print("FAILED  %s" % name)
                traceback.print_exc()
        code = server.stop()
        if code == 0:
            passed += 1
            print("ok      SIGTERM: the server exits 0")
        else:
            failed += 1
            print("FAILED  SIGTERM: the server exited %s" % code)

        ca, cert, key = make_certs(workdir)
        tls_server = Server(args.taskq, workdir, ["--tls-cert", cert, "--tls-key", key])
        try:
            seed_scenario(tls_server.addr, workdir, tls_ca=ca)
            passed += 1
            print("ok      seed scenario over TLS")
        except Exception:
            failed += 1
            print("FAILED  seed scenario over TLS")
            traceback.print_exc()
        finally:
            tls_server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print("interop: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
