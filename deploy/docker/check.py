#!/usr/bin/env python3
"""Checks what docker compose would use, without a Docker engine: the compose file's build
contexts, Dockerfiles, bind mounts, ports, required credentials, service names and network
aliases, health checks the start order waits for, the control-plane replicas' shared
database, and each Dockerfile's stages, COPY sources, user and entrypoint. (The compose Envoy configuration
itself is validated by `envoy --mode validate` in the Makefile.)

Usage: check.py   (from anywhere; needs PyYAML)
"""
import os
import re
import shlex
import sys

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMPOSE = os.path.join(ROOT, "envoy", "docker-compose.yaml")
# The ports `make run` uses; compose publishes the same ones.
PORTS = {"envoy": {"127.0.0.1:10000:10000", "127.0.0.1:9901:9901"},
         "control-plane": {"127.0.0.1:8081:8081"}, "control-plane-2": {"127.0.0.1:8082:8081"},
         "demo-upstream": {"127.0.0.1:8080:8080"}, "postgres": set()}
REPLICAS = ["control-plane", "control-plane-2"]
PROBLEMS = []


def problem(what):
    PROBLEMS.append(what)


def check_dockerfile(path, context):
    name = os.path.relpath(path, ROOT)
    stages, user, entrypoint = set(), None, None
    lines = open(path).read().replace("\\\n", " ").splitlines()
    for line in lines:
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        op = words[0].upper()
        if op == "FROM":
            if len(words) >= 4 and words[2].upper() == "AS":
                stages.add(words[3])
            user = None
        elif op == "COPY":
            args = [w for w in words[1:] if not w.startswith("--")]
            source_stage = next((w.split("=", 1)[1] for w in words[1:] if w.startswith("--from=")), None)
            if source_stage is not None:
                if source_stage not in stages:
                    problem(f"{name}: COPY --from={source_stage} names no earlier stage")
                continue
            for src in args[:-1]:
                if not os.path.exists(os.path.join(context, src)):
                    problem(f"{name}: COPY source {src} does not exist in the build context")
        elif op == "USER":
            user = words[1]
        elif op == "ENTRYPOINT":
            entrypoint = line
        elif op == "RUN":
            for pkg in re.findall(r"-p\s+([\w-]+)", line):
                if not os.path.isfile(os.path.join(ROOT, {"tokengate": "control-plane", "tokengate-e2e": "tests"}.get(pkg, pkg), "Cargo.toml")):
                    problem(f"{name}: builds package {pkg}, which the workspace does not have")
    if user is None or user.split(":")[0] in ("0", "root"):
        problem(f"{name}: the final stage must run as a non-root USER")
    if entrypoint is None:
        problem(f"{name}: no ENTRYPOINT")


def main():
    with open(COMPOSE) as f:
        compose = yaml.safe_load(f)
    base = os.path.dirname(COMPOSE)
    services = compose.get("services", {})
    if set(services) != set(PORTS):
        problem(f"compose services are {sorted(services)}, expected {sorted(PORTS)}")
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            context = os.path.normpath(os.path.join(base, build["context"]))
            dockerfile = os.path.join(context, build.get("dockerfile", "Dockerfile"))
            if not os.path.isdir(context):
                problem(f"{name}: build context {build['context']} does not exist")
            elif not os.path.isfile(dockerfile):
                problem(f"{name}: Dockerfile {build.get('dockerfile')} does not exist")
            else:
                check_dockerfile(dockerfile, context)
        elif not svc.get("image"):
            problem(f"{name}: neither build nor image")
        for vol in svc.get("volumes", []):
            src = vol.split(":", 1)[0]
            if src.startswith((".", "/")) and not os.path.exists(os.path.join(base, src)):
                problem(f"{name}: bind mount source {src} does not exist (run make build first?)")
            elif not src.startswith((".", "/")) and src not in (compose.get("volumes") or {}):
                problem(f"{name}: named volume {src} is not declared")
        if set(svc.get("ports", [])) != PORTS.get(name, set()):
            problem(f"{name}: ports {svc.get('ports')} differ from make run's {sorted(PORTS.get(name, []))}")
        for key, value in (svc.get("environment") or {}).items():
            if key == "TOKENGATE_DB":
                continue
            if ("TOKEN" in key or "PASSWORD" in key) and not re.fullmatch(r"\$\{\w+:\?.+\}", str(value)):
                problem(f"{name}: {key} must come from the user's environment with ${{VAR:?message}}")
        for dep, how in (svc.get("depends_on") or {}).items() if isinstance(svc.get("depends_on"), dict) else []:
            if dep not in services:
                problem(f"{name}: depends on {dep}, which is not a service")
            elif how.get("condition") == "service_healthy" and not services[dep].get("healthcheck"):
                problem(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    aliases = {a for n in REPLICAS
               for a in ((services.get(n, {}).get("networks") or {}).get("default") or {}).get("aliases", [])}
    urls = set()
    for n in REPLICAS:
        svc = services.get(n, {})
        url = str((svc.get("environment") or {}).get("TOKENGATE_DB", ""))
        urls.add(url)
        m = re.fullmatch(r"postgres://(\w+):\$\{(\w+):\?.+\}@([\w-]+):5432/(\w+)", url)
        if not m:
            problem(f"{n}: TOKENGATE_DB must be postgres://USER:${{PASSWORD:?message}}@SERVICE:5432/DB, not {url!r}")
            continue
        user, password_var, host, db = m.groups()
        pg = (services.get(host) or {}).get("environment") or {}
        if host not in services:
            problem(f"{n}: TOKENGATE_DB names host {host}, which is not a service")
        elif (pg.get("POSTGRES_USER"), pg.get("POSTGRES_DB")) != (user, db):
            problem(f"{n}: TOKENGATE_DB's user and database differ from {host}'s POSTGRES_USER and POSTGRES_DB")
        elif f"${{{password_var}:?" not in str(pg.get("POSTGRES_PASSWORD", "")):
            problem(f"{n}: TOKENGATE_DB's password is not {host}'s POSTGRES_PASSWORD")
        if ((svc.get("depends_on") or {}).get(host) or {}).get("condition") != "service_healthy":
            problem(f"{n}: must wait for {host} to be healthy (a replica refuses to start without its database)")
        if not set(((svc.get("networks") or {}).get("default") or {}).get("aliases", [])) & aliases:
            problem(f"{n}: does not answer to the replicas' shared alias")
    if len(urls) != 1:
        problem(f"the replicas {REPLICAS} must share one database, not {sorted(urls)}")
    entry = open(os.path.join(base, "compose", "entrypoint.sh")).read()
    for var, svc in re.findall(r"(UPSTREAM_HOST|CONTROL_PLANE_HOST)=([\w-]+)", entry):
        if svc not in services and svc not in aliases:
            problem(f"compose/entrypoint.sh: {var}={svc} is neither a compose service nor a network alias")
        if var == "CONTROL_PLANE_HOST" and svc not in aliases:
            problem(f"compose/entrypoint.sh: Envoy must reach every replica (the shared alias), not {svc}")
    mounts = {v.split(":")[1] for v in services.get("envoy", {}).get("volumes", [])}
    for path in re.findall(r"/etc/tokengate/[\w.-]+", entry):
        if path not in mounts:
            problem(f"compose/entrypoint.sh uses {path}, which the envoy service does not mount")
    if PROBLEMS:
        sys.exit("docker/compose problems:\n  " + "\n  ".join(PROBLEMS))
    print(f"compose file and Dockerfiles OK ({len(services)} services)")


if __name__ == "__main__":
    main()
