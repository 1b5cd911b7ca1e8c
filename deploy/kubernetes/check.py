#!/usr/bin/env python3
"""Checks the Kubernetes and Istio manifests as an operator would apply them.

For each overlay (gateway, sidecar: Istio and the wasm filter; envoy-gateway: Envoy Gateway
and the native module; gateway with the cloudnative-pg component in place of database-url, as
the README tells operators to switch): renders it with `kubectl kustomize` (with generated
credentials and database URL, as the README tells operators to create them), validates every
Kubernetes object strictly against the Kubernetes API schemas (kubernetes-validate), the
WasmPlugin, EnvoyFilter, Gateway API, Envoy Gateway and CloudNativePG objects against the
schemas in ./schemas, checks the references between objects and what a fleet of control-plane
replicas needs (replicas, rolling updates, a disruption budget, readiness on /readyz, the
database URL from a Secret), loads each plugin configuration into the real filter with `envoy
--mode validate` (a WasmPlugin's pluginConfig into the wasm filter, an EnvoyExtensionPolicy's
module config into the native module, through the control-plane cluster its EnvoyProxy merges
into the bootstrap), and checks that the same proxies drop (or reject) headers with
underscores: an EnvoyFilter whose patch Envoy accepts (Istio), a ClientTrafficPolicy (Envoy
Gateway).

Usage: check.py --envoy ENVOY_BIN --wasm FILTER.wasm --module LIBTOKENGATE_NATIVE.so [--base-id N]
Needs: kubectl (for its built-in kustomize), PyYAML, jsonschema, kubernetes-validate.
"""
import argparse
import base64
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile

import jsonschema
import kubernetes_validate
import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
K8S_VERSION = "1.32.0"
OVERLAYS = ["gateway", "sidecar", "envoy-gateway", "gateway-cloudnative-pg"]
# The keys CloudNativePG writes in the `<cluster>-app` Secret.
CNPG_APP_KEYS = {"username", "password", "host", "port", "dbname", "uri", "jdbc-uri", "pgpass"}
PROBLEMS = []


def problem(where, what):
    PROBLEMS.append(f"{where}: {what}")


def load_schema(name):
    with open(os.path.join(HERE, "schemas", name)) as f:
        return json.load(f)


CRD_SCHEMAS = {
    "extensions.istio.io/v1alpha1": load_schema("wasmplugin.extensions.istio.io.v1alpha1.json"),
    "gateway.networking.k8s.io/v1": load_schema("gateway.networking.k8s.io.v1.json"),
    "gateway.envoyproxy.io/v1alpha1": load_schema("gateway.envoyproxy.io.v1alpha1.json"),
    "networking.istio.io/v1alpha3": load_schema("envoyfilter.networking.istio.io.v1alpha3.json"),
    "postgresql.cnpg.io/v1": load_schema("cluster.postgresql.cnpg.io.v1.json"),
}
HCM = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# Istio labels the pods it deploys for a Gateway (Gateway API) with the Gateway's name.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


def render(overlay, workdir):
    out = subprocess.run(["kubectl", "kustomize", os.path.join(workdir, overlay)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        problem(overlay, f"kubectl kustomize failed:\n{out.stderr}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate_object(overlay, doc):
    where = f"{overlay}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
    schema = CRD_SCHEMAS.get(doc.get("apiVersion"))
    if schema is not None:
        for e in jsonschema.Draft202012Validator(schema).iter_errors(doc):
            problem(where, f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}")
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        problem(where, f"{'.'.join(str(p) for p in e.path)}: {e.message}")
    except kubernetes_validate.SchemaNotFoundError:
        problem(where, f"no schema for {doc.get('apiVersion')} {doc.get('kind')}")


def index(docs):
    return {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for d in docs}


def labels_match(selector, labels):
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def check_references(overlay, docs, sync_token, admin_token):
    by = index(docs)
    secret = by.get(("Secret", "tokengate", "tokengate-credentials"))
    if not secret:
        problem(overlay, "Secret tokengate/tokengate-credentials is missing")
        return
    data = {k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()}
    if data != {"admin-token": admin_token, "sync-token": sync_token}:
        problem(overlay, f"the Secret holds {sorted(data)} but not the generated credentials")
    # Secret keys a pod may read: those in the rendered Secrets, and those CloudNativePG
    # writes for each Cluster it runs.
    secret_keys = {}
    for d in docs:
        if d["kind"] == "Secret":
            keys = set(d.get("data", {})) | set(d.get("stringData", {}))
            secret_keys[(d["metadata"]["namespace"], d["metadata"]["name"])] = keys
        if d["kind"] == "Cluster" and d["apiVersion"].startswith("postgresql.cnpg.io/"):
            secret_keys[(d["metadata"]["namespace"], d["metadata"]["name"] + "-app")] = CNPG_APP_KEYS
    check_fleet(overlay, docs, secret_keys)
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        name = f"{overlay}: Deployment/{d['metadata']['name']}"
        spec = d["spec"]
        pod = spec["template"]
        if not labels_match(spec["selector"]["matchLabels"], pod["metadata"].get("labels", {})):
            problem(name, "selector does not match the pod labels")
        if not pod["spec"].get("securityContext", {}).get("runAsNonRoot"):
            problem(name, "pods must run as non-root")
        for c in pod["spec"]["containers"]:
            if not c.get("resources", {}).get("requests"):
                problem(name, f"container {c['name']} has no resource requests")
            if not c.get("readinessProbe"):
                problem(name, f"container {c['name']} has no readiness probe")
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe"):
                for how in c.get(probe, {}).values():
                    if isinstance(how, dict) and isinstance(how.get("port"), str) and how["port"] not in ports:
                        problem(name, f"{probe} uses port {how['port']!r}, which the container does not name")
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref and ref["key"] not in secret_keys.get((d["metadata"]["namespace"], ref["name"]), set()):
                    problem(name, f"env {env['name']} refers to a missing secret key {ref}")
            for vm in c.get("volumeMounts", []):
                vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
                claim = vols.get(vm["name"], {}).get("persistentVolumeClaim", {}).get("claimName")
                if vm["name"] not in vols:
                    problem(name, f"volume {vm['name']} is mounted but not declared")
                elif claim and ("PersistentVolumeClaim", d["metadata"]["namespace"], claim) not in by:
                    problem(name, f"PersistentVolumeClaim {claim} is missing")
    for d in docs:
        if d["kind"] == "Service":
            ns = d["metadata"]["namespace"]
            pods = [x for x in docs if x["kind"] == "Deployment" and x["metadata"]["namespace"] == ns
                    and labels_match(d["spec"]["selector"], x["spec"]["template"]["metadata"]["labels"])]
            if not pods:
                problem(f"{overlay}: Service/{d['metadata']['name']}", "selects no Deployment")
    if any(d["kind"] == "EnvoyExtensionPolicy" for d in docs):
        check_policy_references(overlay, docs, by, sync_token)
    else:
        check_wasmplugin_references(overlay, docs, by, sync_token)
    for d in docs:
        if d["kind"] == "HTTPRoute":
            for rule in d["spec"].get("rules", []):
                for b in rule.get("backendRefs", []):
                    target = by.get(("Service", d["metadata"]["namespace"], b["name"]))
                    if not target or b["port"] not in [x["port"] for x in target["spec"]["ports"]]:
                        problem(overlay, f"HTTPRoute backend {b} is not a Service port")


def check_wasmplugin_references(overlay, docs, by, sync_token):
    plugins = [d for d in docs if d["kind"] == "WasmPlugin"]
    if len(plugins) != 1:
        problem(overlay, f"expected one WasmPlugin, found {len(plugins)}")
        return
    p = plugins[0]
    spec, cfg = p["spec"], p["spec"].get("pluginConfig", {})
    if spec.get("phase") != "AUTHN" or spec.get("failStrategy") != "FAIL_CLOSE":
        problem(overlay, "the WasmPlugin must run in phase AUTHN and fail closed")
    if cfg.get("sync_token") != sync_token:
        problem(overlay, "pluginConfig.sync_token is not the generated sync credential")
    svc = by.get(("Service", "tokengate", "tokengate"))
    port = svc and next((x["port"] for x in svc["spec"]["ports"]), None)
    want = f"outbound|{port}||tokengate.tokengate.svc.cluster.local"
    if cfg.get("control_plane_cluster") != want:
        problem(overlay, f"control_plane_cluster is {cfg.get('control_plane_cluster')!r}, the Service makes it {want!r}")
    ns = p["metadata"]["namespace"]
    if "selector" in spec:
        sel = spec["selector"]["matchLabels"]
        if not any(x["kind"] == "Deployment" and x["metadata"]["namespace"] == ns
                   and labels_match(sel, x["spec"]["template"]["metadata"]["labels"]) for x in docs):
            problem(overlay, f"WasmPlugin selector {sel} matches no workload in {ns}")
    for ref in spec.get("targetRefs", []):
        if (ref["kind"], ref.get("namespace", ns), ref["name"]) not in by:
            problem(overlay, f"WasmPlugin targetRef {ref} names no object in the overlay")


def bootstrap_clusters(proxy):
    """The clusters an EnvoyProxy merges into its fleet's bootstrap, by name."""
    boot = proxy["spec"].get("bootstrap") or {}
    if boot.get("type") != "Merge" or not boot.get("value"):
        return {}
    value = yaml.safe_load(boot["value"]) or {}
    return {c["name"]: c for c in value.get("static_resources", {}).get("clusters", [])}


def check_policy_references(overlay, docs, by, sync_token):
    policies = [d for d in docs if d["kind"] == "EnvoyExtensionPolicy"]
    if len(policies) != 1:
        problem(overlay, f"expected one EnvoyExtensionPolicy, found {len(policies)}")
        return
    p = policies[0]
    ns, spec = p["metadata"]["namespace"], p["spec"]
    modules = spec.get("dynamicModule", [])
    if len(modules) != 1:
        problem(overlay, f"expected one dynamicModule in the policy, found {len(modules)}")
        return
    module, cfg = modules[0], modules[0].get("config") or {}
    if cfg.get("sync_token") != sync_token:
        problem(overlay, "the module config's sync_token is not the generated sync credential")
    gateways = []
    for ref in spec.get("targetRefs", []):
        target = by.get((ref["kind"], ns, ref["name"]))
        if not target:
            problem(overlay, f"EnvoyExtensionPolicy targetRef {ref} names no object in the overlay")
        elif target["kind"] == "Gateway":
            gateways.append(target)
    if not gateways:
        problem(overlay, "the EnvoyExtensionPolicy attaches to no Gateway of the overlay")
    for gw in gateways:
        pref = gw["spec"].get("infrastructure", {}).get("parametersRef")
        proxy = pref and by.get((pref["kind"], ns, pref["name"]))
        if not proxy or pref.get("group") != "gateway.envoyproxy.io":
            problem(overlay, f"Gateway {gw['metadata']['name']} names no EnvoyProxy of the overlay")
            continue
        entries = {e["name"]: e for e in proxy["spec"].get("dynamicModules", [])}
        entry = entries.get(module["name"])
        if not entry:
            problem(overlay, f"module {module['name']!r} is not registered in EnvoyProxy {pref['name']}")
        elif not entry.get("doNotClose"):
            problem(overlay, f"module {module['name']!r} must be registered with doNotClose: true")
        clusters = bootstrap_clusters(proxy)
        cluster = clusters.get(cfg.get("control_plane_cluster"))
        if not cluster:
            problem(overlay, f"control_plane_cluster {cfg.get('control_plane_cluster')!r} is not in "
                             f"EnvoyProxy {pref['name']}'s bootstrap (it has {sorted(clusters)})")
            continue
        svc = by.get(("Service", "tokengate", "tokengate"))
        port = svc and next((x["port"] for x in svc["spec"]["ports"]), None)
        addrs = [e["endpoint"]["address"]["socket_address"]
                 for ep in cluster["load_assignment"]["endpoints"] for e in ep["lb_endpoints"]]
        want = {"address": "tokengate.tokengate.svc.cluster.local", "port_value": port}
        if [{k: a.get(k) for k in want} for a in addrs] != [want]:
            problem(overlay, f"cluster {cluster['name']} reaches {addrs}, the Service is {want}")


def check_module_config_loads(overlay, docs, envoy, module, base_id):
    """The real native module must accept the policy's config, through the cluster its
    EnvoyProxy merges into the bootstrap."""
    policy = next((d for d in docs if d["kind"] == "EnvoyExtensionPolicy"), None)
    if policy is None:
        return
    proxy = next((d for d in docs if d["kind"] == "EnvoyProxy"), None)
    with open(os.path.join(ROOT, "envoy", "envoy-native.yaml")) as f:
        template = f.read()
    for name, value in {"LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "10000", "ADMIN_ADDRESS": "127.0.0.1",
                        "ADMIN_PORT": "9901", "UPSTREAM_PORT": "8080", "CONTROL_PLANE_PORT": "8081",
                        "UPSTREAM_HOST": "127.0.0.1", "CONTROL_PLANE_HOST": "127.0.0.1", "SYNC_TOKEN": "unused",
                        "MODULE_PATH": module}.items():
        template = template.replace("${" + name + "}", value)
    config = yaml.safe_load(template)
    dm = policy["spec"]["dynamicModule"][0]
    filters = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"]
    tokengate = next(f for f in filters if f["name"] == "envoy.filters.http.dynamic_modules")
    tokengate["typed_config"]["filter_name"] = dm.get("filterName", "")
    tokengate["typed_config"]["filter_config"] = {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": json.dumps(dm.get("config", {}))}
    # The control-plane cluster as the EnvoyProxy gives it, instead of the template's.
    clusters = bootstrap_clusters(proxy) if proxy else {}
    config["static_resources"]["clusters"] = [
        c for c in config["static_resources"]["clusters"] if c["name"] not in clusters
    ] + list(clusters.values())
    rendered = yaml.safe_dump(config)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(rendered)
    out = subprocess.run([envoy, "--mode", "validate", "-c", f.name, "--base-id", str(base_id),
                          "--disable-hot-restart", "-l", "warning"], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        problem(overlay, f"the native module refused the EnvoyExtensionPolicy's config:\n{out.stdout}{out.stderr}")


def check_fleet(overlay, docs, secret_keys):
    """What several control-plane replicas on one database need."""
    by = index(docs)
    d = by.get(("Deployment", "tokengate", "tokengate"))
    if not d:
        problem(overlay, "Deployment tokengate/tokengate is missing")
        return
    name = f"{overlay}: Deployment/tokengate"
    spec = d["spec"]
    pod = spec["template"]["spec"]
    if spec.get("replicas", 1) < 2:
        problem(name, "the control plane must run at least 2 replicas (no single point of failure)")
    strategy = spec.get("strategy", {})
    if strategy.get("type", "RollingUpdate") != "RollingUpdate":
        problem(name, "replicas on a shared database update one at a time (RollingUpdate)")
    if str(strategy.get("rollingUpdate", {}).get("maxUnavailable", "25%")) not in ("0", "0%"):
        problem(name, "a rolling update must keep every replica until its successor is ready (maxUnavailable: 0)")
    c = next((c for c in pod["containers"] if c["name"] == "tokengate"), None)
    if c is None:
        problem(name, "no container named tokengate")
        return
    if c.get("readinessProbe", {}).get("httpGet", {}).get("path") != "/readyz":
        problem(name, "readiness must be /readyz (ready while the database answers)")
    if c.get("livenessProbe", {}).get("httpGet", {}).get("path") != "/healthz":
        problem(name, "liveness must be /healthz (a replica cut off from the database is not restarted)")
    db = next((e for e in c.get("env", []) if e["name"] == "TOKENGATE_DB"), None)
    ref = (db or {}).get("valueFrom", {}).get("secretKeyRef")
    if not ref:
        problem(name, "TOKENGATE_DB must come from a Secret (it holds the database password)")
    elif ref["key"] not in secret_keys.get(("tokengate", ref["name"]), set()):
        problem(name, f"TOKENGATE_DB refers to a missing secret key {ref}")
    generated = next((x for x in docs if x["kind"] == "Secret" and ref
                      and x["metadata"]["name"] == ref["name"]), None)
    if generated is not None:
        url = base64.b64decode(generated.get("data", {}).get(ref["key"], "")).decode()
        if not url.startswith(("postgres://", "postgresql://")):
            problem(name, f"the database URL in Secret {ref['name']} is not a postgres:// URL")
    if any("persistentVolumeClaim" in v for v in pod.get("volumes", [])):
        problem(name, "replicas share the database, not a volume: no PersistentVolumeClaim")
    pdbs = [x for x in docs if x["kind"] == "PodDisruptionBudget" and x["metadata"]["namespace"] == "tokengate"
            and labels_match(x["spec"].get("selector", {}).get("matchLabels"), spec["template"]["metadata"]["labels"])]
    if len(pdbs) != 1:
        problem(name, f"expected one PodDisruptionBudget for the replicas, found {len(pdbs)}")
    else:
        budget = pdbs[0]["spec"]
        if not (1 <= budget.get("minAvailable", 0) < spec.get("replicas", 1)):
            problem(name, "the disruption budget must keep one replica and still let a node drain (1 <= minAvailable < replicas)")
    for cl in (x for x in docs if x["kind"] == "Cluster"):
        if cl["spec"]["instances"] < 2:
            problem(overlay, f"Cluster/{cl['metadata']['name']} needs a standby (instances >= 2) for failover")


def check_plugin_config_loads(overlay, docs, envoy, wasm, base_id):
    """The real filter must accept the pluginConfig Istio will hand it."""
    plugin = next((d for d in docs if d["kind"] == "WasmPlugin"), None)
    if plugin is None:
        return
    with open(os.path.join(ROOT, "envoy", "envoy.yaml")) as f:
        template = f.read()
    config = json.dumps(plugin["spec"]["pluginConfig"])
    # Swap the template's plugin configuration for the WasmPlugin's.
    rendered, n = re.subn(r"value: \|\n(\s+\{.*?\n\s+\})\n", lambda m: "value: '" + config.replace("'", "''") + "'\n",
                          template, count=1, flags=re.S)
    if n != 1:
        problem(overlay, "could not find the plugin configuration in envoy/envoy.yaml")
        return
    for name, value in {"LISTEN_ADDRESS": "127.0.0.1", "LISTEN_PORT": "10000", "ADMIN_ADDRESS": "127.0.0.1",
                        "ADMIN_PORT": "9901", "UPSTREAM_PORT": "8080", "CONTROL_PLANE_PORT": "8081", "UPSTREAM_HOST": "127.0.0.1", "CONTROL_PLANE_HOST": "127.0.0.1",
                        "WASM_PATH": wasm, "SYNC_TOKEN": "unused"}.items():
        rendered = rendered.replace("${" + name + "}", value)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(rendered)
    out = subprocess.run([envoy, "--mode", "validate", "-c", f.name, "--base-id", str(base_id),
                          "--disable-hot-restart", "-l", "warning"], capture_output=True, text=True)
    os.unlink(f.name)
    if out.returncode != 0:
        problem(overlay, f"the filter refused the WasmPlugin's pluginConfig:\n{out.stdout}{out.stderr}")


def merged(base, patch):
    """An EnvoyFilter MERGE, as Istio applies it to the proto: maps merge, the rest is replaced."""
    out = dict(base)
    for k, v in patch.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def check_gateway_underscore_headers(overlay, docs):
    """Envoy Gateway: a ClientTrafficPolicy on the policy's Gateway drops or rejects headers
    with underscores."""
    policy = next((d for d in docs if d["kind"] == "EnvoyExtensionPolicy"), None)
    gateways = {r["name"] for r in (policy or {}).get("spec", {}).get("targetRefs", []) if r["kind"] == "Gateway"}
    ctps = [d for d in docs if d["kind"] == "ClientTrafficPolicy"]
    covered = set()
    for c in ctps:
        where = f"{overlay}: ClientTrafficPolicy/{c['metadata']['name']}"
        action = c["spec"].get("headers", {}).get("withUnderscoresAction")
        if action not in ("DropHeader", "RejectRequest"):
            problem(where, f"withUnderscoresAction is {action!r}, not DropHeader or RejectRequest")
            continue
        covered |= {r["name"] for r in c["spec"].get("targetRefs", []) if r["kind"] == "Gateway"}
    if not gateways or not gateways <= covered:
        problem(overlay, f"no ClientTrafficPolicy drops headers with underscores on Gateway(s) {sorted(gateways - covered)}")


def check_underscore_headers(overlay, docs, envoy, base_id):
    """The proxies that run the WasmPlugin must drop or reject headers with underscores."""
    if any(d["kind"] == "EnvoyExtensionPolicy" for d in docs):
        check_gateway_underscore_headers(overlay, docs)
        return
    filters = [d for d in docs if d["kind"] == "EnvoyFilter"]
    plugin = next((d for d in docs if d["kind"] == "WasmPlugin"), None)
    if len(filters) != 1 or plugin is None:
        problem(overlay, f"expected one EnvoyFilter for headers with underscores, found {len(filters)}")
        return
    ef, spec = filters[0], plugin["spec"]
    where = f"{overlay}: EnvoyFilter/{ef['metadata']['name']}"
    if ef["metadata"]["namespace"] != plugin["metadata"]["namespace"]:
        problem(where, "is not in the WasmPlugin's namespace")
    labels = ef["spec"].get("workloadSelector", {}).get("labels")
    if "selector" in spec:
        want_labels, want_context = spec["selector"]["matchLabels"], "SIDECAR_INBOUND"
    else:
        gateways = [r["name"] for r in spec.get("targetRefs", []) if r["kind"] == "Gateway"]
        want_labels = {GATEWAY_NAME_LABEL: gateways[0]} if gateways else None
        want_context = "GATEWAY"
    if labels != want_labels:
        problem(where, f"workloadSelector {labels} does not select the WasmPlugin's proxies {want_labels}")
    for i, cp in enumerate(ef["spec"]["configPatches"]):
        at = f"{where} configPatches[{i}]"
        match = cp.get("match", {})
        if cp["applyTo"] != "NETWORK_FILTER" or cp["patch"]["operation"] != "MERGE" \
                or match.get("listener", {}).get("filterChain", {}).get("filter", {}).get("name") != HCM:
            problem(at, f"must MERGE into the NETWORK_FILTER {HCM}")
            continue
        if match.get("context") != want_context:
            problem(at, f"context is {match.get('context')}, the WasmPlugin runs in {want_context}")
        typed = cp["patch"]["value"].get("typed_config", {})
        action = typed.get("common_http_protocol_options", {}).get("headers_with_underscores_action")
        if action not in ("DROP_HEADER", "REJECT_REQUEST"):
            problem(at, f"headers_with_underscores_action is {action!r}, not DROP_HEADER or REJECT_REQUEST")
        if typed.get("@type") != HCM_TYPE:
            problem(at, f"typed_config @type is {typed.get('@type')!r}")
            continue
        # The patch merged into a plain connection manager must be a configuration Envoy takes.
        hcm = merged({"@type": HCM_TYPE, "stat_prefix": "inbound",
                      "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": []}]},
                      "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                          "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]},
                     typed)
        config = {"static_resources": {"listeners": [{
            "name": "inbound", "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
            "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}]}]}}
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
            yaml.safe_dump(config, f)
        out = subprocess.run([envoy, "--mode", "validate", "-c", f.name, "--base-id", str(base_id),
                              "--disable-hot-restart", "-l", "warning"], capture_output=True, text=True)
        os.unlink(f.name)
        if out.returncode != 0:
            problem(at, f"Envoy refused the patched connection manager:\n{out.stdout}{out.stderr}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--envoy", required=True)
    ap.add_argument("--wasm", required=True)
    ap.add_argument("--module", required=True)
    ap.add_argument("--base-id", type=int, default=7320)
    args = ap.parse_args()
    if shutil.which("kubectl") is None:
        sys.exit("check.py: kubectl is needed for its built-in kustomize (apt: kubectl)")
    with tempfile.TemporaryDirectory() as tmp:
        work = os.path.join(tmp, "kubernetes")
        shutil.copytree(HERE, work, ignore=shutil.ignore_patterns("*.env"))
        admin, sync = secrets.token_hex(32), secrets.token_hex(32)
        with open(os.path.join(work, "base", "admin.env"), "w") as f:
            f.write(f"admin-token={admin}\n")
        with open(os.path.join(work, "base", "sync.env"), "w") as f:
            f.write(f"sync-token={sync}\n")
        with open(os.path.join(work, "database-url", "database.env"), "w") as f:
            f.write(f"url=postgres://tokengate:{secrets.token_hex(16)}@postgres.example.com:5432/tokengate\n")
        # The README's switch to CloudNativePG: the overlay names ../cloudnative-pg in place
        # of ../database-url.
        shutil.copytree(os.path.join(work, "gateway"), os.path.join(work, "gateway-cloudnative-pg"))
        k = os.path.join(work, "gateway-cloudnative-pg", "kustomization.yaml")
        with open(k) as f:
            text = f.read()
        if "- ../database-url" not in text:
            problem("gateway", "the overlay does not list ../database-url among its components")
        with open(k, "w") as f:
            f.write(text.replace("- ../database-url", "- ../cloudnative-pg"))
        for i, overlay in enumerate(OVERLAYS):
            docs = render(overlay, work)
            if not docs:
                continue
            for d in docs:
                validate_object(overlay, d)
            check_references(overlay, docs, sync, admin)
            check_plugin_config_loads(overlay, docs, args.envoy, args.wasm, args.base_id + i)
            check_module_config_loads(overlay, docs, args.envoy, args.module, args.base_id + i)
            check_underscore_headers(overlay, docs, args.envoy, args.base_id + i)
            kinds = sorted({d["kind"] for d in docs})
            print(f"{overlay}: {len(docs)} objects checked ({', '.join(kinds)})")
    if PROBLEMS:
        print("\n".join(["manifest problems:"] + PROBLEMS), file=sys.stderr)
        sys.exit(1)
    print("kubernetes manifests OK")


if __name__ == "__main__":
    main()
