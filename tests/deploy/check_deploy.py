"""Checks the deploy files without a container engine or a cluster.

- deploy/k8s/*.yaml: every document parses and has a known kind; the
  server Deployment has native gRPC liveness and readiness probes (port and
  service), resources, a non-root user; no manifest carries a token.
- deploy/k8s/postgres/: the server on the PostgreSQL store differs from
  the in-memory one only in replicas (2 or more, where the memory server
  keeps 1 with Recreate), its rolling update and TASKQ_STORE, which comes
  from a Secret (no URL, hence no password, in a manifest).
- deploy/Dockerfile: the stages exist in the order that lets
  `--target runtime-prebuilt` skip the Rust stage, the runtime runs as a
  non-root user, with `taskq` as entrypoint and `taskq health` as the
  health check.
- deploy/compose.yaml: `docker-compose config -q` (Debian's docker-compose)
  accepts it, every service sets open-file limits, and it bakes in no
  token; without a profile it is the server and its workers only; the
  profile `postgres` adds PostgreSQL (health-checked, data in a named
  volume) and two servers gated on its health, the store's URL from a
  secret file.
- deploy/postgres/Dockerfile: FROM the local debian:bookworm-slim, Debian's
  postgresql, a non-root user, pg_isready as the health check, SIGINT to
  stop.

Prints one line per check and "N passed, M failed"; exits 1 on failure.
"""

import copy
import os
import re
import subprocess
import sys
import traceback

import yaml


def check(condition, message="check failed"):
    """An assertion that `python -O` cannot strip: the checks are the test."""
    if not condition:
        raise AssertionError(message)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEPLOY = os.path.join(ROOT, "deploy")
KINDS = {"Deployment", "Service", "Secret", "PodDisruptionBudget"}
TOKENISH = re.compile(r"token", re.I)


def documents(sub=""):
    docs = []
    folder = os.path.join(DEPLOY, "k8s", sub)
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            with open(os.path.join(folder, name)) as f:
                docs += [(name, d) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def containers(doc):
    return doc["spec"]["template"]["spec"]["containers"]


def check_kinds():
    for sub in ("", "postgres"):
        docs = documents(sub)
        kinds = {d["kind"] for _, d in docs}
        check(kinds == KINDS, (sub, kinds))
        for name, d in docs:
            check(d.get("apiVersion") and d.get("metadata", {}).get("name"), (sub, name))


def server_deployment(sub=""):
    (server,) = [d for _, d in documents(sub)
                 if d["kind"] == "Deployment" and d["metadata"]["name"] == "taskq"]
    return server


def check_postgres_variant():
    memory, postgres = server_deployment(), server_deployment("postgres")
    check(memory["spec"]["replicas"] == 1 and memory["spec"]["strategy"]["type"] == "Recreate",
          "the in-memory server must stay one replica, replaced with Recreate")
    (c,) = containers(memory)
    check(not any(e["name"] == "TASKQ_STORE" for e in c.get("env", [])), "memory server names a store")
    check(postgres["spec"]["replicas"] >= 2, postgres["spec"]["replicas"])
    check(postgres["spec"]["strategy"]["type"] == "RollingUpdate", postgres["spec"]["strategy"])
    (pc,) = containers(postgres)
    (store,) = [e for e in pc["env"] if e["name"] == "TASKQ_STORE"]
    check("value" not in store and store["valueFrom"]["secretKeyRef"]["name"] == "taskq-store", store)
    # Nothing else differs: probes, limits, security, the Service.
    def rest(deployment):
        d = copy.deepcopy(deployment)
        for key in ("replicas", "strategy"):
            d["spec"].pop(key)
        (container,) = containers(d)
        container["env"] = [e for e in container["env"] if e["name"] != "TASKQ_STORE"]
        return d
    check(rest(memory) == rest(postgres), "deploy/k8s/postgres/server.yaml drifted from server.yaml")
    services = [[d for _, d in documents(sub) if d["kind"] == "Service"] for sub in ("", "postgres")]
    check(services[0] == services[1], "the two Services differ")
    (secret,) = [d for _, d in documents("postgres") if d["kind"] == "Secret"]
    check(secret["metadata"]["name"] == "taskq-store", secret["metadata"])


def check_server_probes():
    (c,) = containers(server_deployment())
    port = c["ports"][0]
    check(port["name"] == "grpc" and port["containerPort"] == 50051)
    for probe, service in (("livenessProbe", ""), ("readinessProbe", "taskq.v1.TaskQueue")):
        grpc = c[probe]["grpc"]
        check(grpc["port"] == 50051 and grpc["service"] == service, (probe, grpc))
    service = [d for _, d in documents() if d["kind"] == "Service"][0]
    check(service["spec"]["ports"][0]["name"] == "grpc")


def check_resources_and_user():
    for name, d in documents() + documents("postgres"):
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        check(pod["securityContext"]["runAsNonRoot"] is True, name)
        for c in pod["containers"]:
            for kind in ("requests", "limits"):
                check({"cpu", "memory"} <= set(c["resources"][kind]), (name, kind))


def check_no_inline_token():
    for name, d in documents() + documents("postgres"):
        if d["kind"] == "Secret":
            check(not d.get("data") and not d.get("stringData"), name + " carries secret data")
        if d["kind"] == "Deployment":
            for c in containers(d):
                for env in c.get("env", []):
                    if TOKENISH.search(env["name"]) and "value" in env:
                        check(env["value"].startswith("/"), (name, env))  # a file path only
                    check("postgres://" not in str(env.get("value", "")), (name, env))
                check(not any(TOKENISH.search(a) and "=" in a for a in c.get("args", [])), name)


def dockerfile_stages():
    with open(os.path.join(DEPLOY, "Dockerfile")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    stages, current = [], None
    for line in lines:
        match = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if match:
            current = {"base": match.group(1), "name": match.group(2), "lines": []}
            stages.append(current)
        elif current is not None:
            current["lines"].append(line)
    return stages


def check_dockerfile():
    stages = dockerfile_stages()
    names = [s["name"] for s in stages]
    check(names == ["build", "runtime-base", "runtime-prebuilt", "runtime"], names)
    check(stages[0]["base"].startswith("rust:"), stages[0]["base"])
    base = stages[1]
    check("slim" in base["base"] or "distroless" in base["base"], base["base"])
    user = [l for l in base["lines"] if l.upper().startswith("USER ")]
    check(user and not user[-1].split()[1].startswith(("root", "0")), user)
    check(any(l.startswith("ENTRYPOINT") and "taskq" in l for l in base["lines"]))
    check(any(l.startswith("HEALTHCHECK") or "taskq\", \"health" in l for l in base["lines"]))
    prebuilt = stages[2]
    check(not any("--from=build" in l for l in prebuilt["lines"]), "prebuilt must not need the Rust stage")
    check(any("target/release-image/taskq" in l for l in prebuilt["lines"]), "prebuilt must package the stripped build")
    check(any("--from=build" in l for l in stages[3]["lines"]))
    for s in stages:
        check(not any(TOKENISH.search(l) and re.search(r"TOKENS?=\S", l) for l in s["lines"]), "a token in the image")


def compose(*args):
    """`docker-compose -f deploy/compose.yaml ARGS`, with a token file in
    place when there is none (removed after), and without the store's file,
    which only the profile `postgres` needs when it runs."""
    path = os.path.join(DEPLOY, "compose.yaml")
    secrets = os.path.join(DEPLOY, "secrets", "tokens")
    made = not os.path.exists(secrets)
    if made:
        with open(secrets, "w") as f:
            f.write("compose-check-token\n")
    try:
        return subprocess.run(["docker-compose", "-f", path] + list(args), capture_output=True, text=True)
    finally:
        if made:
            os.remove(secrets)


def check_compose():
    out = compose("config", "-q")
    check(out.returncode == 0, out.stderr)
    rendered = compose("--profile", "demo", "--profile", "postgres", "config")
    check(rendered.returncode == 0, rendered.stderr)
    rendered = rendered.stdout
    config = yaml.safe_load(rendered)
    services = config["services"]
    check({"server", "worker", "master"} <= set(services), set(services))
    # The default stack (`up` with no profile): what it was before profiles.
    default = sorted(name for name, s in services.items() if not s.get("profiles"))
    check(default == ["server", "worker"], default)
    check(services["worker"]["depends_on"]["server"]["condition"] == "service_healthy")
    check(services["server"]["healthcheck"]["test"][1:3] == ["taskq", "health"])
    for name, s in services.items():
        check("restart" in s, name)
        # Above the server's --max-connections; and set at all, since a
        # runtime's defaults can exceed the host's limits (run_stack.py).
        nofile = (s.get("ulimits") or {}).get("nofile") or 0
        soft = nofile.get("soft", 0) if isinstance(nofile, dict) else nofile
        check(int(soft) > 10000, (name, "ulimits", nofile))
        for key, value in (s.get("environment") or {}).items():
            check(not (TOKENISH.search(key) and value and not str(value).startswith("/")), (name, key))
    check("compose-check-token" not in rendered)
    check("postgres://" not in rendered, "the store's URL (with its password) inline in compose.yaml")


def check_compose_postgres():
    config = yaml.safe_load(compose("--profile", "postgres", "config").stdout)
    services = config["services"]
    check({"postgres", "server-a", "server-b", "worker-a", "worker-b", "master-pg"} <= set(services),
          set(services))
    pg = services["postgres"]
    check("pg_isready" in " ".join(pg["healthcheck"]["test"]), pg["healthcheck"])
    check(pg.get("stop_signal") == "SIGINT", "PostgreSQL's smart shutdown (SIGTERM) waits for clients")
    check(not pg.get("ports"), "PostgreSQL published on the host")
    (volume,) = pg["volumes"]
    source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
    check(source in (config.get("volumes") or {}), "PostgreSQL's data not in a named volume: %r" % volume)
    check(pg["build"]["context"].endswith(os.path.join("deploy", "postgres")), pg["build"])
    ports = set()
    for name in ("server-a", "server-b"):
        s = services[name]
        check(s["depends_on"]["postgres"]["condition"] == "service_healthy", name)
        check(s["healthcheck"]["test"][1:3] == ["taskq", "health"], name)
        check({"taskq_tokens", "taskq_store"} <= {x["source"] for x in s["secrets"]}, name)
        ports.add(s["ports"][0]["published"] if isinstance(s["ports"][0], dict) else s["ports"][0])
    check(len(ports) == 2, "server-a and server-b publish the same port")
    check(services["worker-a"]["environment"]["TASKQ_SERVER"] == "http://server-a:50051")
    check(services["worker-b"]["environment"]["TASKQ_SERVER"] == "http://server-b:50051")


def check_postgres_dockerfile():
    with open(os.path.join(DEPLOY, "postgres", "Dockerfile")) as f:
        lines = [l.strip() for l in f if l.strip() and not l.lstrip().startswith("#")]
    froms = [l for l in lines if l.upper().startswith("FROM ")]
    check(froms == ["FROM debian:bookworm-slim"], froms)
    check(any("apt-get install" in l and "postgresql" in l for l in lines), "Debian's postgresql")
    user = [l for l in lines if l.upper().startswith("USER ")]
    check(user == ["USER postgres"], user)
    check(any(l.startswith("HEALTHCHECK") for l in lines) and any("pg_isready" in l for l in lines))
    check("STOPSIGNAL SIGINT" in lines)
    check(not any("PASSWORD" in l.upper() and "=" in l and l.upper().startswith("ENV") for l in lines),
          "a password in the image")


CHECKS = [
    ("k8s: documents parse, kinds known", check_kinds),
    ("k8s: server has native gRPC liveness and readiness probes", check_server_probes),
    ("k8s: resources and non-root user on every Deployment", check_resources_and_user),
    ("k8s: no token inline", check_no_inline_token),
    ("k8s: postgres/ server differs from the memory one only in replicas, update, store",
     check_postgres_variant),
    ("Dockerfile: stages, non-root user, entrypoint, health check", check_dockerfile),
    ("compose: docker-compose config accepts it; health-gated; ulimits; no token", check_compose),
    ("compose: profile postgres: PostgreSQL health-checked with a volume, two gated servers",
     check_compose_postgres),
    ("postgres/Dockerfile: local Debian base, non-root, pg_isready, SIGINT", check_postgres_dockerfile),
]


def main():
    passed = failed = 0
    for name, check in CHECKS:
        try:
            check()
            passed += 1
            print("ok      " + name)
        except Exception:
            failed += 1
            print("FAILED  " + name)
            traceback.print_exc()
    print("deploy: %d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
