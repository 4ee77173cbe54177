"""Checks the deploy files without a container engine or a cluster.

- deploy/k8s/*.yaml: every document parses and has a known kind; the
  server Deployment has native gRPC liveness and readiness probes (port and
  service), resources, a non-root user; no manifest carries a token.
- deploy/Dockerfile: the stages exist in the order that lets
  `--target runtime-prebuilt` skip the Rust stage, the runtime runs as a
  non-root user, with `taskq` as entrypoint and `taskq health` as the
  health check.
- deploy/compose.yaml: `docker-compose config -q` (Debian's docker-compose)
  accepts it, every service sets open-file limits, and it bakes in no
  token.

Prints one line per check and "N passed, M failed"; exits 1 on failure.
"""

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


def documents():
    docs = []
    folder = os.path.join(DEPLOY, "k8s")
    for name in sorted(os.listdir(folder)):
        if name.endswith(".yaml"):
            with open(os.path.join(folder, name)) as f:
                docs += [(name, d) for d in yaml.safe_load_all(f) if d is not None]
    return docs


def containers(doc):
    return doc["spec"]["template"]["spec"]["containers"]


def check_kinds():
    docs = documents()
    kinds = {d["kind"] for _, d in docs}
    check(kinds == KINDS, kinds)
    for name, d in docs:
        check(d.get("apiVersion") and d.get("metadata", {}).get("name"), name)


def check_server_probes():
    server = [d for _, d in documents() if d["kind"] == "Deployment" and d["metadata"]["name"] == "taskq"]
    check(len(server) == 1)
    (c,) = containers(server[0])
    port = c["ports"][0]
    check(port["name"] == "grpc" and port["containerPort"] == 50051)
    for probe, service in (("livenessProbe", ""), ("readinessProbe", "taskq.v1.TaskQueue")):
        grpc = c[probe]["grpc"]
        check(grpc["port"] == 50051 and grpc["service"] == service, (probe, grpc))
    service = [d for _, d in documents() if d["kind"] == "Service"][0]
    check(service["spec"]["ports"][0]["name"] == "grpc")


def check_resources_and_user():
    for name, d in documents():
        if d["kind"] != "Deployment":
            continue
        pod = d["spec"]["template"]["spec"]
        check(pod["securityContext"]["runAsNonRoot"] is True, name)
        for c in pod["containers"]:
            for kind in ("requests", "limits"):
                check({"cpu", "memory"} <= set(c["resources"][kind]), (name, kind))


def check_no_inline_token():
    for name, d in documents():
        if d["kind"] == "Secret":
            check(not d.get("data") and not d.get("stringData"), name + " carries secret data")
        if d["kind"] == "Deployment":
            for c in containers(d):
                for env in c.get("env", []):
                    if TOKENISH.search(env["name"]) and "value" in env:
                        check(env["value"].startswith("/"), (name, env))  # a file path only
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


def check_compose():
    path = os.path.join(DEPLOY, "compose.yaml")
    secrets = os.path.join(DEPLOY, "secrets", "tokens")
    made = not os.path.exists(secrets)
    if made:
        with open(secrets, "w") as f:
            f.write("compose-check-token\n")
    try:
        out = subprocess.run(["docker-compose", "-f", path, "config", "-q"], capture_output=True, text=True)
        check(out.returncode == 0, out.stderr)
        rendered = subprocess.run(["docker-compose", "-f", path, "--profile", "demo", "config"],
                                  capture_output=True, text=True, check=True).stdout
    finally:
        if made:
            os.remove(secrets)
    config = yaml.safe_load(rendered)
    services = config["services"]
    check({"server", "worker", "master"} <= set(services), set(services))
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


CHECKS = [
    ("k8s: documents parse, kinds known", check_kinds),
    ("k8s: server has native gRPC liveness and readiness probes", check_server_probes),
    ("k8s: resources and non-root user on every Deployment", check_resources_and_user),
    ("k8s: no token inline", check_no_inline_token),
    ("Dockerfile: stages, non-root user, entrypoint, health check", check_dockerfile),
    ("compose: docker-compose config accepts it; health-gated; ulimits; no token", check_compose),
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
