"""Deploys taskq as a user would, with podman, and checks what they would see.

With deploy/Dockerfile and deploy/compose.yaml as they are:
1. the base image the Dockerfile names, `debian:bookworm-slim`, when
   podman does not have it: made with `debootstrap --variant=minbase` and
   imported, so the test pulls no image; the root filesystem is cached as
   a tarball under target/deploy/ between runs;
2. a container runs at all (the test fails, with podman's message, when
   this machine cannot run one);
3. `podman build --format docker --target runtime-prebuilt` packages
   target/release-image/taskq; the image keeps its HEALTHCHECK and non-root
   user, and adds under 30 MB to the base (its size is printed);
4. the compose stack (server, two workers, the demo master) runs through
   Debian's docker-compose against podman's Docker-compatible API socket
   (`podman system service`); the master prints the ten squares;
5. a long task whose worker container is killed (kill -9) finishes on the
   other worker with attempt 2, and the killed container is restarted;
6. `docker-compose stop`: the server logs its drain, every container exits 0;
7. the image runs with a read-only root filesystem, as uid 10001, and its
   `taskq health` check turns it healthy;
8. the PostgreSQL image (deploy/postgres/) builds on the same local base,
   Debian's postgresql from the mirror; the image is cached as an archive
   under target/deploy/, named by a hash of deploy/postgres/, so a warm
   run loads it rather than building it;
9. the compose profile `postgres` (PostgreSQL, server-a and server-b on it,
   a worker on each) comes up health-gated on a fresh volume; tasks put
   through server-a are counted by server-b's stats; the demo master puts
   through server-a and reads the ten squares through server-b;
10. with long tasks finished, running and waiting, server-b is killed
   (SIGKILL) and server-a stopped (drain), both at once; PostgreSQL stays
   up; started again, every task finishes and every result is readable
   through either server; `docker-compose stop` then stops PostgreSQL and
   both servers with exit 0.

docker-compose rather than podman-compose: it is the client users run
against Docker, it already validates compose.yaml in check_deploy.py, and
Debian's podman-compose (1.0.3) reads `depends_on` as a plain list (it
does not wait for `condition: service_healthy`) and has no `profiles`.

Podman runs health checks from systemd timers; where there is no systemd
(containers, CI sandboxes) a check never runs and a container stays
"starting" for ever. The test stands in for the timer: it runs
`podman healthcheck run` on its own containers every second.

The test's inputs that are not project files: a token file, the store's
URL with a random password, and ports (a compose override file under
target/deploy/ points the `taskq_tokens` and `taskq_store` secrets at
them), and for steps 5 and 10 overrides that give the workers `--builtin
sleep` on the queue `naps`, since a square finishes too fast to be caught
running. It tags the images `taskq:latest` and `taskq-postgres:latest`,
the names compose.yaml uses; the volume of its PostgreSQL is removed at
the start and the end.

Needs root, podman, debootstrap, docker-compose and target/release-image/taskq
(`cargo build --profile release-image`). Every wait is bounded. Prints one
line per step; exits 1 at the first failure, after printing the
containers' logs.
"""

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORK = os.path.join(ROOT, "target", "deploy")
BINARY = os.path.join(ROOT, "target", "release-image", "taskq")
COMPOSE_FILE = os.path.join(ROOT, "deploy", "compose.yaml")
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"
BASE_TARBALL = os.path.join(WORK, "debian-bookworm-slim.tar")
MIRROR = os.environ.get("TASKQ_DEBIAN_MIRROR", "http://deb.debian.org/debian")
IMAGE = "taskq:latest"
PG_IMAGE = "taskq-postgres:latest"
PG_CONTEXT = os.path.join(ROOT, "deploy", "postgres")
# The label that ties an image (and its cached archive) to the files it was
# built from.
PG_SOURCE_LABEL = "taskq.deploy-test.source"
PROJECT = "taskq-deploy-test"
READ_ONLY = PROJECT + "-readonly"
SOCKET = os.path.join(WORK, "podman.sock")
# The image's added layers: room for the stripped binary, too little for
# the build with line tables (target/release/taskq).
MAX_ADDED_BYTES = 30 * 1000 * 1000
# The long task: long enough to be seen running and killed, short enough
# to wait for twice.
NAP = "10s"
# The restart: tasks long enough to be running when the servers go down,
# more of them than the workers' eight slots, so some are still waiting.
PG_NAP = "4s"
PG_NAPS = 20
# The sleep workers' lease: a task whose worker lost its server comes back
# this soon after the servers do.
PG_LEASE = "5s"
PG_SERVICES = ["postgres", "server-a", "server-b", "worker-a", "worker-b"]


class Failure(Exception):
    """A step that did not do what a user expects."""


def check(condition, message="check failed"):
    """An assertion that `python -O` cannot strip: the checks are the test."""
    if not condition:
        raise Failure(message)


def run(args, timeout, env=None, expect_ok=True):
    """Runs a command with a bound on its time; returns the CompletedProcess."""
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise Failure("%s did not finish within %ds" % (" ".join(args), timeout))
    except FileNotFoundError:
        raise Failure("%s: command not found" % args[0])
    if expect_ok and done.returncode != 0:
        raise Failure("%s exited %d:\n%s%s" % (" ".join(args), done.returncode,
                                                done.stdout[-2000:], done.stderr[-2000:]))
    return done


def wait_for(what, timeout, probe, interval=0.5):
    """Calls probe() until it returns something truthy; fails after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(interval)
    raise Failure("%s: not within %ds" % (what, timeout))


def inspect(container):
    return json.loads(run(["podman", "inspect", container], 30).stdout)[0]


def health_status(container):
    state = inspect(container)["State"]
    health = state.get("Health") or state.get("Healthcheck") or {}
    return health.get("Status", "")


def ours(name):
    return name.startswith(PROJECT)


def our_containers(running_only=False):
    args = ["podman", "ps", "--format", "json"] + ([] if running_only else ["-a"])
    listed = json.loads(run(args, 30).stdout or "[]")
    return sorted(n for c in listed for n in c["Names"] if ours(n))


class HealthTicker:
    """Runs `podman healthcheck run` on this test's running containers every
    second: the systemd timer podman would use, absent in a sandbox."""

    def __init__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.tick, daemon=True)

    def tick(self):
        while not self.stop.wait(1.0):
            try:
                for name in our_containers(running_only=True):
                    # Exit 1 is unhealthy, 125 no health check: both are
                    # states for the runtime to record, not errors here.
                    run(["podman", "healthcheck", "run", name], 10, expect_ok=False)
            except Failure:
                pass

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(15)


class Stack:
    """docker-compose on deploy/compose.yaml through podman's API socket."""

    def __init__(self, port, overrides, port_a, port_b):
        self.env = dict(os.environ, DOCKER_HOST="unix://" + SOCKET, TASKQ_PORT=str(port),
                        TASKQ_PORT_A=str(port_a), TASKQ_PORT_B=str(port_b),
                        COMPOSE_HTTP_TIMEOUT="120")
        self.files = ["-f", COMPOSE_FILE] + [a for o in overrides for a in ("-f", o)]

    def compose(self, args, timeout, extra=(), expect_ok=True):
        files = self.files + [a for o in extra for a in ("-f", o)]
        return run(["docker-compose"] + files + ["-p", PROJECT] + args, timeout,
                   env=self.env, expect_ok=expect_ok)


class Client:
    """The stripped binary as a user's client, through the published port."""

    def __init__(self, port, tokens):
        self.port = port
        self.env = dict(os.environ, TASKQ_SERVER="http://127.0.0.1:%d" % port,
                        TASKQ_TOKEN_FILE=tokens)

    def __call__(self, args, timeout=30):
        return run([BINARY] + args, timeout, env=self.env).stdout

    def workers(self):
        return json.loads(self(["stats", "--json"]))["workers"]

    def queue(self, name):
        """The queue's row of GetStats, or {} when the server has none."""
        for q in json.loads(self(["stats", "--json"]))["queues"]:
            if q["queue"] == name:
                return q
        return {}


# ---- steps -------------------------------------------------------------

def make_base_image():
    """debian:bookworm-slim, from the cached tarball or from debootstrap."""
    if run(["podman", "image", "exists", BASE_IMAGE], 30, expect_ok=False).returncode == 0:
        return "present in podman's storage"
    made = "from the cache " + os.path.relpath(BASE_TARBALL, ROOT)
    if not os.path.exists(BASE_TARBALL):
        check(shutil.which("debootstrap"), "debootstrap is missing: apt-get install debootstrap")
        rootfs = os.path.join(WORK, "debian-rootfs")
        if os.path.exists(rootfs):
            raise Failure("%s is left from a debootstrap that did not finish: check that nothing "
                          "is mounted under it (grep %s /proc/mounts), remove it, run again"
                          % (rootfs, rootfs))
        run(["debootstrap", "--variant=minbase", "bookworm", rootfs, MIRROR], 900)
        # What the published slim image also leaves out: downloaded packages
        # and package lists.
        for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
            folder = os.path.join(rootfs, sub)
            for name in os.listdir(folder):
                path = os.path.join(folder, name)
                if os.path.isfile(path):
                    os.remove(path)
        partial = BASE_TARBALL + ".partial"
        run(["tar", "--numeric-owner", "-C", rootfs, "-cf", partial, "."], 300)
        os.replace(partial, BASE_TARBALL)
        with open("/proc/mounts") as f:
            check(rootfs not in f.read(), "debootstrap left a mount under " + rootfs)
        shutil.rmtree(rootfs)
        made = "with debootstrap from " + MIRROR
    run(["podman", "import", BASE_TARBALL, BASE_IMAGE], 300)
    return "imported " + made


def check_runtime(ulimits):
    """A container runs at all; otherwise fail with podman's own words."""
    done = run(["podman", "run", "--rm"] + ulimits + [BASE_IMAGE, "true"], 120, expect_ok=False)
    if done.returncode != 0:
        hint = ""
        if "rlimit" in done.stderr:
            hint = ("\n(podman's default ulimits exceed this machine's hard limits, "
                    "`ulimit -Hn` and `ulimit -Hu`: compose.yaml's ulimits must lower them)")
        raise Failure("this machine cannot run a container with podman, so the deploy test "
                      "cannot run (podman run --rm %s true exited %d):\n%s%s"
                      % (BASE_IMAGE, done.returncode, done.stderr.strip(), hint))


def image_id(name):
    done = run(["podman", "image", "inspect", "--format", "{{.Id}}", name], 30, expect_ok=False)
    return done.stdout.strip() if done.returncode == 0 else None


def build_image():
    previous = image_id(IMAGE)
    run(["podman", "build", "--format", "docker", "--pull=never", "-f", "deploy/Dockerfile",
         "--target", "runtime-prebuilt", "-t", IMAGE, "."], 300)
    image = json.loads(run(["podman", "image", "inspect", IMAGE], 30).stdout)[0]
    if previous and previous != image["Id"]:
        # The last run's image, untagged now: not left to pile up.
        run(["podman", "rmi", previous], 60, expect_ok=False)
    base = json.loads(run(["podman", "image", "inspect", BASE_IMAGE], 30).stdout)[0]
    health = (image.get("Healthcheck") or {}).get("Test")
    check(health == ["CMD", "taskq", "health"], "HEALTHCHECK lost (built as OCI?): %r" % health)
    check(image["User"] == "10001:10001", "image user %r, not 10001" % image["User"])
    added = image["Size"] - base["Size"]
    print("        image %s: %.1f MB above %s (target: under %d MB); binary %.1f MB"
          % (IMAGE, added / 1e6, BASE_IMAGE, MAX_ADDED_BYTES / 1e6,
             os.path.getsize(BINARY) / 1e6))
    check(added < MAX_ADDED_BYTES, "the image adds %d bytes to its base" % added)
    return "%.1f MB added" % (added / 1e6)


def run_demo(stack):
    # `up` returns once the server is healthy and the workers started
    # (depends_on: service_healthy).
    stack.compose(["up", "-d", "--no-build"], 180)
    names = our_containers(running_only=True)
    workers = [n for n in names if "_worker_" in n]
    check(len(workers) == 2 and any("_server_" in n for n in names), names)
    check(health_status(PROJECT + "_server_1") == "healthy", "server not healthy after up")
    out = stack.compose(["--profile", "demo", "run", "--rm", "master"], 120).stdout
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    ids = [line for line in out.splitlines() if line and "\t" not in line]
    check(len(ids) == 10 and len(rows) == 10, out)
    check(all(state == "SUCCEEDED" for _, state, _ in rows), out)
    check(sorted(int(v) for _, _, v in rows) == [n * n for n in range(1, 11)], out)
    check({t for t, _, _ in rows} == set(ids), "results for other tasks than the ones put:\n" + out)
    return "10 squares"


def hostname(container):
    return inspect(container)["Config"]["Hostname"]


def holder_of_nap(client, hosts):
    """The worker container whose worker holds a task of `naps`, if any."""
    for w in client.workers():
        host = w["worker_id"].rsplit("-", 1)[0]
        if w["queue"] == "naps" and w["in_flight"] > 0 and host in hosts:
            return hosts[host]
    return None


def fail_over(stack, client, sleepers):
    # Recreate the two workers as sleepers; the server keeps running.
    stack.compose(["up", "-d", "--no-build", "worker"], 180, extra=[sleepers])
    workers = [n for n in our_containers(running_only=True) if "_worker_" in n]
    check(len(workers) == 2, workers)
    hosts = {hostname(w): w for w in workers}

    def both_connected():
        seen = {w["worker_id"].rsplit("-", 1)[0] for w in client.workers()
                if w["queue"] == "naps" and w["alive"]}
        return set(hosts) <= seen
    wait_for("both sleep workers connected", 30, both_connected)

    task = client(["put", "--queue", "naps", "--data", NAP, "--max-attempts", "3"]).strip()
    victim = wait_for("a worker holding the task", 15, lambda: holder_of_nap(client, hosts))
    (survivor,) = [w for w in workers if w != victim]
    pid = inspect(victim)["State"]["Pid"]
    check(pid > 0, "%s has no process" % victim)
    os.kill(pid, 9)
    result = json.loads(client(["result", task, "--wait", "60s", "--json"], timeout=90))
    check(result["state"] == "SUCCEEDED" and result["output"] == NAP, result)
    check(result["attempts"] == 2, "attempt %d, not 2: %r" % (result["attempts"], result))
    check(result["worker_id"].rsplit("-", 1)[0] == hostname(survivor),
          "finished by %s, not by the other worker %s" % (result["worker_id"], survivor))
    # restart: unless-stopped brings the killed worker back.
    def restarted():
        state = inspect(victim)
        return state["State"]["Status"] == "running" and state.get("RestartCount", 0) >= 1
    wait_for(victim + " restarted", 30, restarted)
    return "killed %s; attempt 2 finished on %s" % (victim, survivor)


def stop_stack(stack, sleepers):
    stack.compose(["stop"], 120, extra=[sleepers])
    names = our_containers()
    check(names, "no containers left to inspect")
    for name in names:
        state = inspect(name)["State"]
        check(state["Status"] == "exited" and state["ExitCode"] == 0,
              "%s: %s, exit code %s" % (name, state["Status"], state["ExitCode"]))
    logs = run(["podman", "logs", PROJECT + "_server_1"], 30)
    messages = []
    for line in (logs.stdout + logs.stderr).splitlines():
        try:
            messages.append(json.loads(line).get("message", ""))
        except ValueError:
            pass
    check("shutdown signal: draining" in messages, "no drain in the server's log:\n" + logs.stdout[-2000:])
    check(any(m.startswith("taskq stopped") for m in messages), "the server's log does not say it stopped")
    return "%d containers exited 0; the server drained" % len(names)


def run_read_only(ulimits, tokens):
    run(["podman", "run", "-d", "--name", READ_ONLY, "--read-only"] + ulimits +
        ["-v", tokens + ":/run/secrets/taskq_tokens:ro",
         "-e", "TASKQ_TOKEN_FILE=/run/secrets/taskq_tokens", IMAGE], 60)
    wait_for("the read-only server healthy", 60, lambda: health_status(READ_ONLY) == "healthy")
    check(inspect(READ_ONLY)["HostConfig"]["ReadonlyRootfs"] is True, "root filesystem not read-only")
    uid = run(["podman", "exec", READ_ONLY, "id", "-u"], 30).stdout.strip()
    check(uid == "10001", "runs as uid %s" % uid)
    write = run(["podman", "exec", READ_ONLY, "touch", "/usr/local/bin/written"], 30, expect_ok=False)
    check(write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr)
    run(["podman", "stop", "-t", "15", READ_ONLY], 60)
    code = inspect(READ_ONLY)["State"]["ExitCode"]
    check(code == 0, "exit code %s after SIGTERM" % code)
    return "healthy as uid 10001, exit 0 on SIGTERM"


def postgres_source_hash():
    """A hash of deploy/postgres/: what the PostgreSQL image is built from."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(PG_CONTEXT)):
        digest.update(name.encode() + b"\0")
        with open(os.path.join(PG_CONTEXT, name), "rb") as f:
            digest.update(f.read() + b"\0")
    return digest.hexdigest()[:16]


def image_label(name, label):
    done = run(["podman", "image", "inspect", name], 30, expect_ok=False)
    if done.returncode != 0:
        return None
    return (json.loads(done.stdout)[0].get("Labels") or {}).get(label)


def make_postgres_image():
    """taskq-postgres:latest, from podman's storage, the cache, or a build."""
    source = postgres_source_hash()
    archive = os.path.join(WORK, "taskq-postgres-%s.tar" % source)
    if image_label(PG_IMAGE, PG_SOURCE_LABEL) == source:
        made = "present in podman's storage"
    elif os.path.exists(archive):
        run(["podman", "load", "-i", archive], 300)
        made = "loaded from the cache " + os.path.relpath(archive, ROOT)
    else:
        previous = image_id(PG_IMAGE)
        # The same base as taskq's image; packages from the Debian mirror.
        try:
            run(["podman", "build", "--format", "docker", "--pull=never",
                 "--label", "%s=%s" % (PG_SOURCE_LABEL, source), "-t", PG_IMAGE, PG_CONTEXT], 900)
        except Failure as failure:
            raise Failure("%s\n(the build runs apt-get in a container: it needs the Debian mirror "
                          "in the base image's sources.list, %s)" % (failure, MIRROR))
        if previous and previous != image_id(PG_IMAGE):
            run(["podman", "rmi", previous], 60, expect_ok=False)
        for name in os.listdir(WORK):
            if name.startswith("taskq-postgres-") and name.endswith(".tar"):
                os.remove(os.path.join(WORK, name))
        partial = archive + ".partial"
        run(["podman", "save", "--format", "docker-archive", "-o", partial, PG_IMAGE], 300)
        os.replace(partial, archive)
        made = "built (cached as %s)" % os.path.relpath(archive, ROOT)
    check(image_label(PG_IMAGE, PG_SOURCE_LABEL) == source,
          "%s is not the image of deploy/postgres/ as it is" % PG_IMAGE)
    image = json.loads(run(["podman", "image", "inspect", PG_IMAGE], 30).stdout)[0]
    health = (image.get("Healthcheck") or {}).get("Test") or []
    check("pg_isready" in " ".join(health), "HEALTHCHECK lost (built as OCI?): %r" % health)
    check(image["User"] == "postgres", "image user %r, not postgres" % image["User"])
    return "%s; %.0f MB" % (made, image["Size"] / 1e6)


def container(service, index=1):
    return "%s_%s_%d" % (PROJECT, service, index)


def run_postgres_profile(stack, client_a, client_b):
    # `up` returns once PostgreSQL is healthy (a fresh cluster made in the
    # volume), then both servers (migrations applied), then the workers.
    stack.compose(["--profile", "postgres", "up", "-d", "--no-build", "worker-a", "worker-b"], 240)
    running = our_containers(running_only=True)
    missing = [s for s in PG_SERVICES if container(s) not in running]
    check(not missing, "not running after up: %s (running: %s)" % (missing, running))
    for service in ("postgres", "server-a", "server-b"):
        status = health_status(container(service))
        check(status == "healthy", "%s is %r after up, not healthy" % (service, status))

    # Put through server-a where no worker takes them; server-b counts them.
    held = "held-%d" % os.getpid()
    for n in range(5):
        client_a(["put", "--queue", held, "--data", str(n)])
    seen = client_b.queue(held)
    check(seen.get("pending") == 5, "server-b's stats for the 5 tasks put through server-a: %r" % seen)

    # The demo master: ten squares put through server-a, read through server-b.
    out = stack.compose(["--profile", "postgres", "run", "--rm", "master-pg"], 120).stdout
    rows = [line.split("\t") for line in out.splitlines() if "\t" in line]
    ids = [line for line in out.splitlines() if line and "\t" not in line]
    check(len(ids) == 10 and len(rows) == 10, out)
    check(all(state == "SUCCEEDED" for _, state, _ in rows), out)
    check(sorted(int(v) for _, _, v in rows) == [n * n for n in range(1, 11)], out)
    check({t for t, _, _ in rows} == set(ids), "results for other tasks than the ones put:\n" + out)
    squares = client_a.queue("squares")
    check(squares.get("succeeded", 0) >= 10, "server-a's stats after the demo: %r" % squares)
    return "5 put through server-a pending on server-b; 10 squares put via a, read via b"


def put_naps(client, count):
    path = os.path.join(WORK, "naps")
    with open(path, "w") as f:
        f.write((PG_NAP + "\n") * count)
    ids = client(["put", "--queue", "naps", "--max-attempts", "5", "--lines", "--file", path]).split()
    check(len(ids) == count, "put %d naps, got ids %r" % (count, ids))
    return ids


def restart_postgres_servers(stack, client_a, client_b, sleepers):
    stack.compose(["--profile", "postgres", "up", "-d", "--no-build", "worker-a", "worker-b"], 180,
                  extra=[sleepers])
    postgres_before = inspect(container("postgres"))["State"]
    ids = put_naps(client_a, PG_NAPS // 2) + put_naps(client_b, PG_NAPS - PG_NAPS // 2)

    # Down with results written, tasks running and tasks waiting.
    def mixed():
        q = client_b.queue("naps")
        return q if q.get("succeeded", 0) >= 1 and q.get("leased", 0) >= 1 else None
    before = wait_for("some naps finished and some running", 30, mixed, interval=0.2)
    down = time.monotonic()
    stack.compose(["--profile", "postgres", "kill", "-s", "SIGKILL", "server-b"], 60)
    stack.compose(["--profile", "postgres", "stop", "server-a"], 60)
    for service, code in (("server-a", 0), ("server-b", 137)):
        state = inspect(container(service))["State"]
        check(state["Status"] == "exited" and state["ExitCode"] == code,
              "%s after stop/kill: %s, exit code %s (expected %d)"
              % (service, state["Status"], state["ExitCode"], code))
    stack.compose(["--profile", "postgres", "start", "server-a", "server-b"], 60)
    for service in ("server-a", "server-b"):
        wait_for(service + " healthy again", 60,
                 lambda: health_status(container(service)) == "healthy")
    up = time.monotonic()

    # Every task finishes, and every result reads the same through either server.
    retried = 0
    for i, task in enumerate(ids):
        client = (client_a, client_b)[i % 2]
        result = json.loads(client(["result", task, "--wait", "90s", "--json"], timeout=100))
        check(result["state"] == "SUCCEEDED" and result["output"] == PG_NAP,
              "task %s after the restart: %r" % (task, result))
        again = json.loads((client_b, client_a)[i % 2](["result", task, "--json"]))
        check(again == result, "task %s reads differently through the other server:\n%r\n%r"
              % (task, result, again))
        retried += result["attempts"] > 1
    finished = time.monotonic()
    after = inspect(container("postgres"))["State"]
    check(after["Status"] == "running" and after["StartedAt"] == postgres_before["StartedAt"],
          "PostgreSQL did not stay up: %s, started %s (before: %s)"
          % (after["Status"], after["StartedAt"], postgres_before["StartedAt"]))

    # Stop: PostgreSQL shuts down cleanly (SIGINT), the servers drain.
    stack.compose(["--profile", "postgres", "stop"] + PG_SERVICES, 120, extra=[sleepers])
    for service in PG_SERVICES:
        state = inspect(container(service))["State"]
        check(state["Status"] == "exited" and state["ExitCode"] == 0,
              "%s after stop: %s, exit code %s" % (service, state["Status"], state["ExitCode"]))
    return ("%d naps (%d done, %d running at the kill): all finished, %d on a later attempt; "
            "PostgreSQL stayed up; servers down and healthy again in %.0fs, every result %.0fs later"
            % (len(ids), before["succeeded"], before["leased"], retried, up - down, finished - up))


# ---- set-up and clean-up ------------------------------------------------

def free_ports(count):
    # Compose publishes the ports itself: the best the test can do is pick
    # ones that are free now (held together, so they differ).
    held = [socket.socket() for _ in range(count)]
    try:
        for s in held:
            s.bind(("0.0.0.0", 0))
        return [s.getsockname()[1] for s in held]
    finally:
        for s in held:
            s.close()


def write_inputs():
    """The token and store files and the compose override files."""
    tokens = os.path.join(WORK, "tokens")
    with open(tokens, "w") as f:
        f.write(secrets.token_urlsafe(32) + "\n")
    store = os.path.join(WORK, "store")
    with open(store, "w") as f:
        f.write("postgres://taskq:%s@postgres:5432/taskq\n" % secrets.token_hex(24))
    # Read by uid 10001 (taskq) and by postgres in the containers, through
    # bind mounts.
    os.chmod(tokens, 0o644)
    os.chmod(store, 0o644)
    inputs = os.path.join(WORK, "compose.inputs.yaml")
    with open(inputs, "w") as f:
        f.write("# Written by tests/deploy/run_stack.py: the test's token and store files.\n"
                "services:\n  server:\n    secrets: [taskq_tokens]\n"
                "secrets:\n  taskq_tokens:\n    file: %s\n  taskq_store:\n    file: %s\n"
                % (tokens, store))
    sleepers = os.path.join(WORK, "compose.sleepers.yaml")
    with open(sleepers, "w") as f:
        f.write("# Written by tests/deploy/run_stack.py: workers whose tasks last long\n"
                "# enough to be killed while running one.\n"
                "services:\n  worker:\n"
                "    command: [\"worker\", \"--queue\", \"naps\", \"--builtin\", \"sleep\","
                " \"--concurrency\", \"4\"]\n")
    pg_sleepers = os.path.join(WORK, "compose.pg-sleepers.yaml")
    with open(pg_sleepers, "w") as f:
        f.write("# Written by tests/deploy/run_stack.py: the postgres profile's workers\n"
                "# on long tasks, with a short lease so that a task whose server went\n"
                "# down comes back soon after it.\n"
                "services:\n" + "".join(
                    "  %s:\n    command: [\"worker\", \"--queue\", \"naps\", \"--builtin\", \"sleep\","
                    " \"--concurrency\", \"4\", \"--lease\", \"%s\"]\n" % (w, PG_LEASE)
                    for w in ("worker-a", "worker-b")))
    return tokens, inputs, sleepers, pg_sleepers


def compose_ulimits(stack):
    """The server's ulimits in compose.yaml, as `podman run` flags."""
    config = yaml.safe_load(stack.compose(["config"], 60).stdout)
    flags = []
    for name, value in (config["services"]["server"].get("ulimits") or {}).items():
        soft, hard = (value["soft"], value["hard"]) if isinstance(value, dict) else (value, value)
        flags += ["--ulimit", "%s=%s:%s" % (name, soft, hard)]
    return flags


def start_service():
    if os.path.exists(SOCKET):
        os.remove(SOCKET)
    log = open(os.path.join(WORK, "podman-service.log"), "w")
    service = subprocess.Popen(["podman", "system", "service", "--time=0", "unix://" + SOCKET],
                               stdout=log, stderr=subprocess.STDOUT)
    wait_for("podman's API socket", 20, lambda: os.path.exists(SOCKET) or service.poll() is not None)
    check(service.poll() is None, "podman system service exited %s: see %s"
          % (service.returncode, log.name))
    return service


def remove_leftovers(stack):
    # --volumes: the PostgreSQL data of this test's project.
    stack.compose(["--profile", "demo", "--profile", "postgres", "down", "--remove-orphans",
                   "--volumes"], 120, expect_ok=False)
    run(["podman", "rm", "-f", "-t", "0", READ_ONLY], 60, expect_ok=False)


def print_logs():
    for name in our_containers():
        logs = run(["podman", "logs", "--tail", "20", name], 30, expect_ok=False)
        print("---- %s (last 20 lines)\n%s%s" % (name, logs.stdout, logs.stderr))


def main():
    # A stopped test still removes its containers and stops podman's
    # service (the `finally` below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    os.chdir(ROOT)
    os.makedirs(WORK, exist_ok=True)
    step = "prerequisites"
    service = stack = None
    try:
        check(os.geteuid() == 0, "run as root: debootstrap and rootful podman need it")
        for tool, package in (("podman", "podman"), ("docker-compose", "docker-compose")):
            check(shutil.which(tool), "%s is missing: apt-get install %s" % (tool, package))
        check(os.path.exists(BINARY), "%s is missing: cargo build --profile release-image"
              % os.path.relpath(BINARY, ROOT))
        tokens, inputs, sleepers, pg_sleepers = write_inputs()
        port, port_a, port_b = free_ports(3)
        client = Client(port, tokens)
        client_a, client_b = Client(port_a, tokens), Client(port_b, tokens)
        service = start_service()
        stack = Stack(port, [inputs], port_a, port_b)
        ulimits = compose_ulimits(stack)
        remove_leftovers(stack)
        with HealthTicker():
            for step, action in (
                ("base image " + BASE_IMAGE, make_base_image),
                ("a container runs (ulimits from compose.yaml: %s)" % " ".join(ulimits[1::2]),
                 lambda: check_runtime(ulimits)),
                ("image: runtime-prebuilt, docker format, stripped", build_image),
                ("compose: server, two workers, demo master", lambda: run_demo(stack)),
                ("compose: kill -9 a worker holding a task", lambda: fail_over(stack, client, sleepers)),
                ("compose: stop drains, every container exits 0", lambda: stop_stack(stack, sleepers)),
                ("image: read-only root, non-root user, healthy",
                 lambda: run_read_only(ulimits, tokens)),
                ("postgres image: Debian's postgresql on " + BASE_IMAGE, make_postgres_image),
                ("compose --profile postgres: two servers, one database",
                 lambda: run_postgres_profile(stack, client_a, client_b)),
                ("compose --profile postgres: both servers down and up, nothing lost",
                 lambda: restart_postgres_servers(stack, client_a, client_b, pg_sleepers)),
            ):
                t0 = time.monotonic()
                detail = action()
                print("ok      %s (%.0fs)%s" % (step, time.monotonic() - t0,
                                                ": " + detail if detail else ""))
        print("deploy stack: passed in %.0fs" % (time.monotonic() - started))
        return 0
    except Failure as failure:
        print("FAILED  %s\n%s" % (step, failure))
        if service is not None:
            print_logs()
        return 1
    except Exception:
        print("FAILED  %s" % step)
        traceback.print_exc()
        return 1
    finally:
        if stack is not None:
            remove_leftovers(stack)
        if service is not None:
            service.terminate()
            try:
                service.wait(15)
            except subprocess.TimeoutExpired:
                service.kill()
                service.wait(15)


if __name__ == "__main__":
    sys.exit(main())
