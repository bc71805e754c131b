#!/usr/bin/env python3
"""Checks what a schema and a policy scanner cannot: that the rendered manifests of an overlay
agree with themselves and with the Secrets that create-secrets.sh makes.

    check_rendered.py RENDERED.yaml SECRETS.yaml

RENDERED.yaml is `kubectl kustomize` of an overlay (with or without components), SECRETS.yaml
the output of `create-secrets.sh OVERLAY --print`. Exits 1 with one line per problem.

- Every ConfigMap and Secret a pod names exists, with the key it names; the only Secrets not
  made by create-secrets.sh are the shop's API keys (shop-bootstrap.sh) and the TLS Secrets
  (cert-manager's layout).
- Every $(VAR) in a command, an argument or a value is a variable of that container.
- Every Service selects pods that have the port it targets, and some NetworkPolicy lets that
  port in (the base denies every other ingress); every NetworkPolicy, PodDisruptionBudget,
  HorizontalPodAutoscaler and ServiceMonitor points at something that exists.
- Every container runs as the contract says (non-root, read-only root, no privilege
  escalation, every capability dropped, requests and limits, a liveness and a distinct
  readiness probe), and every pod without a service-account token or service links.
- Concord: liveness never asks the database (/health or a TCP check), readiness is /ready (or
  `concord healthcheck`), the grace period outlasts drain_ms + shutdown_grace_s, and the
  secrets file and the vault key file it is told to read are mounted from a Secret.
- No ConfigMap key names a secret.
- concord.toml parses, and the shop's tokens in it equal those its services get.
"""

from __future__ import annotations

import base64
import re
import sys
import tomllib

import yaml

# Secrets made outside create-secrets.sh, with the keys the manifests may use.
EXTERNAL_SECRETS = {
    "shop-concord-keys": {
        "SHOP_ORDERS_CONCORD_KEY",
        "SHOP_INVENTORY_CONCORD_KEY",
        "SHOP_QUERY_CONCORD_KEY",
        "SHOP_PROVIDER_CONCORD_KEY",
    },
    "concord-tls": {"tls.crt", "tls.key", "ca.crt"},
    "concord-client-tls": {"tls.crt", "tls.key", "ca.crt"},
}
SECRET_NAME = re.compile(r"(PASSWORD|TOKEN|SECRET|_KEY)$|^(ADMIN_KEY|MASTER_KEY)")
NOT_SECRET = re.compile(r"(_FILE|_HOSTS|_URL)$")

problems: list[str] = []


def problem(text: str) -> None:
    problems.append(text)


def load(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d]


def matches(selector: dict, labels: dict) -> bool:
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for e in selector.get("matchExpressions") or []:
        value = labels.get(e["key"])
        op = e["operator"]
        if op == "In" and value not in e["values"]:
            return False
        if op == "NotIn" and value in e["values"]:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
    return True


def probe_handler(probe: dict | None) -> str | None:
    if not probe:
        return None
    for kind in ("httpGet", "tcpSocket", "exec", "grpc"):
        if kind in probe:
            return f"{kind}:{probe[kind]}"
    return None


def main(rendered_path: str, secrets_path: str) -> int:
    docs = load(rendered_path)
    secrets: dict[str, dict[str, bytes]] = {}
    for s in load(secrets_path):
        if s.get("kind") == "Secret":
            secrets[s["metadata"]["name"]] = {k: base64.b64decode(v) for k, v in (s.get("data") or {}).items()}
    secret_keys = {name: set(data) for name, data in secrets.items()}
    for name, keys in EXTERNAL_SECRETS.items():
        secret_keys.setdefault(name, keys)

    by_kind: dict[str, list[dict]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    config_maps = {c["metadata"]["name"]: c.get("data") or {} for c in by_kind.get("ConfigMap", [])}
    workloads = by_kind.get("Deployment", []) + by_kind.get("StatefulSet", [])

    # No secret in a ConfigMap.
    for name, data in config_maps.items():
        for key in data:
            if SECRET_NAME.search(key.upper()) and not NOT_SECRET.search(key.upper()):
                problem(f"ConfigMap {name}: key {key} names a secret; it belongs in a Secret")

    pods = []  # (workload name, pod labels, pod spec)
    for w in workloads:
        name = f"{w['kind']}/{w['metadata']['name']}"
        template = w["spec"]["template"]
        labels = template["metadata"].get("labels") or {}
        spec = template["spec"]
        pods.append((name, labels, spec))
        if not matches(w["spec"]["selector"], labels):
            problem(f"{name}: its selector does not select its own pods")
        check_pod(name, spec, config_maps, secret_keys)

    # Services: pods selected, ports present, and let in by a NetworkPolicy.
    policies = by_kind.get("NetworkPolicy", [])
    for svc in by_kind.get("Service", []):
        name = f"Service/{svc['metadata']['name']}"
        selected = [(n, l, s) for n, l, s in pods if matches({"matchLabels": svc["spec"]["selector"]}, l)]
        if not selected:
            problem(f"{name}: selects no pod")
            continue
        for port in svc["spec"]["ports"]:
            target = port.get("targetPort", port["port"])
            for n, labels, spec in selected:
                numbers = {
                    p.get("name"): p["containerPort"] for c in spec["containers"] for p in c.get("ports") or []
                }
                number = numbers.get(target) if isinstance(target, str) else target
                if number is None or number not in numbers.values():
                    problem(f"{name}: port {target} is not a port of {n}")
                    continue
                if policies and not admitted(policies, labels, number):
                    problem(f"{name}: no NetworkPolicy lets port {number} of {n} in")
    for pol in policies:
        selector = pol["spec"]["podSelector"]
        if selector and not any(matches(selector, l) for _, l, _ in pods):
            problem(f"NetworkPolicy/{pol['metadata']['name']}: selects no pod")
    for pdb in by_kind.get("PodDisruptionBudget", []):
        if not any(matches(pdb["spec"]["selector"], l) for _, l, _ in pods):
            problem(f"PodDisruptionBudget/{pdb['metadata']['name']}: selects no pod")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        if not any(w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] for w in workloads):
            problem(f"HorizontalPodAutoscaler/{hpa['metadata']['name']}: no {ref['kind']}/{ref['name']}")
        for w in workloads:
            if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"] and "replicas" in w["spec"]:
                problem(f"{ref['kind']}/{ref['name']}: sets replicas, which the autoscaler owns")
    for sm in by_kind.get("ServiceMonitor", []):
        services = [s for s in by_kind.get("Service", []) if matches(sm["spec"]["selector"], s["metadata"].get("labels") or {})]
        if not services:
            problem(f"ServiceMonitor/{sm['metadata']['name']}: selects no Service")
        for ep in sm["spec"]["endpoints"]:
            if not any(ep["port"] == p.get("name") for s in services for p in s["spec"]["ports"]):
                problem(f"ServiceMonitor/{sm['metadata']['name']}: no selected Service has a port {ep['port']}")

    check_secret_values(secrets)
    for p in problems:
        print(f"{rendered_path}: {p}")
    return 1 if problems else 0


def admitted(policies: list[dict], labels: dict, port: int) -> bool:
    for pol in policies:
        if not matches(pol["spec"]["podSelector"], labels):
            continue
        for rule in pol["spec"].get("ingress") or []:
            ports = rule.get("ports")
            if not ports or any(p.get("port") == port for p in ports):
                return True
    return False


def check_pod(name: str, spec: dict, config_maps: dict, secret_keys: dict) -> None:
    if spec.get("automountServiceAccountToken") is not False:
        problem(f"{name}: automountServiceAccountToken is not false")
    if spec.get("enableServiceLinks") is not False:
        problem(f"{name}: enableServiceLinks is not false (a Service named concord would set CONCORD_* variables)")
    psc = spec.get("securityContext") or {}
    if psc.get("runAsNonRoot") is not True or (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problem(f"{name}: the pod's securityContext lacks runAsNonRoot or seccompProfile RuntimeDefault")
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    for v in volumes.values():
        if "configMap" in v and v["configMap"]["name"] not in config_maps:
            problem(f"{name}: volume {v['name']} names no ConfigMap of the render: {v['configMap']['name']}")
        if "secret" in v:
            sname = v["secret"]["secretName"]
            if sname not in secret_keys:
                problem(f"{name}: volume {v['name']} names Secret {sname}, which nothing creates")
            for item in v["secret"].get("items") or []:
                if item["key"] not in secret_keys.get(sname, set()):
                    problem(f"{name}: Secret {sname} has no key {item['key']}")
    for c in spec.get("initContainers", []) + spec["containers"]:
        cname = f"{name} container {c['name']}"
        sc = c.get("securityContext") or {}
        if sc.get("readOnlyRootFilesystem") is not True:
            problem(f"{cname}: readOnlyRootFilesystem is not true")
        if sc.get("allowPrivilegeEscalation") is not False:
            problem(f"{cname}: allowPrivilegeEscalation is not false")
        if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
            problem(f"{cname}: capabilities do not drop ALL")
        res = c.get("resources") or {}
        for part in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in (res.get(part) or {}):
                    problem(f"{cname}: no {r} in resources.{part}")
        live, ready = probe_handler(c.get("livenessProbe")), probe_handler(c.get("readinessProbe"))
        if not live or not ready:
            problem(f"{cname}: a liveness and a readiness probe are both required")
        elif live == ready:
            problem(f"{cname}: liveness and readiness ask the same thing ({live})")
        env = check_env(cname, c, config_maps, secret_keys)
        mounts = {m["mountPath"]: m for m in c.get("volumeMounts") or []}
        if c["image"].split("@")[0].split(":")[0].endswith(("/concord", "/concord-shop")) and "/tmp" not in mounts:
            problem(f"{cname}: no volume at /tmp (the root filesystem is read-only)")
        if c["image"].split("@")[0].split(":")[0].endswith("/concord"):
            check_concord(cname, spec, c, env, mounts, volumes, secret_keys)


def check_env(cname: str, c: dict, config_maps: dict, secret_keys: dict) -> dict[str, str | None]:
    """The container's variables (value, or None when it comes from a Secret or the API)."""
    env: dict[str, str | None] = {}
    for src in c.get("envFrom") or []:
        if "configMapRef" in src:
            cm = src["configMapRef"]["name"]
            if cm not in config_maps:
                problem(f"{cname}: envFrom names no ConfigMap of the render: {cm}")
            env.update(config_maps.get(cm, {}))
        if "secretRef" in src:
            problem(f"{cname}: envFrom a whole Secret; name each variable instead")
    for e in c.get("env") or []:
        ref = (e.get("valueFrom") or {})
        if "secretKeyRef" in ref:
            s = ref["secretKeyRef"]
            if s["name"] not in secret_keys:
                problem(f"{cname}: {e['name']} names Secret {s['name']}, which nothing creates")
            elif s["key"] not in secret_keys[s["name"]]:
                problem(f"{cname}: {e['name']} names key {s['key']}, which Secret {s['name']} does not have")
        if "configMapKeyRef" in ref:
            m = ref["configMapKeyRef"]
            if m["key"] not in config_maps.get(m["name"], {}):
                problem(f"{cname}: {e['name']} names {m['name']}/{m['key']}, which the render does not have")
        env[e["name"]] = e.get("value")
    for text in (c.get("command") or []) + (c.get("args") or []) + [
        e.get("value") or "" for e in c.get("env") or []
    ]:
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", text):
            if var not in env:
                problem(f"{cname}: $({var}) is not a variable of the container")
    return env


def check_concord(cname, spec, c, env, mounts, volumes, secret_keys) -> None:
    live, ready = c.get("livenessProbe") or {}, c.get("readinessProbe") or {}
    if "httpGet" in live and live["httpGet"].get("path") != "/health":
        problem(f"{cname}: liveness must be GET /health, which never asks the database")
    if "exec" in live:
        problem(f"{cname}: liveness must not run healthcheck (it asks /ready, which asks the database)")
    if "httpGet" in ready and ready["httpGet"].get("path") != "/ready":
        problem(f"{cname}: readiness must be GET /ready")
    if "exec" in ready and "healthcheck" not in ready["exec"]["command"]:
        problem(f"{cname}: readiness by exec must be `concord healthcheck`")
    drain = int(env.get("CONCORD_DRAIN_MS") or 0) / 1000
    grace = int(env.get("CONCORD_SHUTDOWN_GRACE_S") or 30)
    period = spec.get("terminationGracePeriodSeconds", 30)
    if period <= drain + grace:
        problem(f"{cname}: terminationGracePeriodSeconds {period} is not above drain {drain} s + grace {grace} s")
    if drain <= 0:
        problem(f"{cname}: CONCORD_DRAIN_MS is 0: a terminating node stops accepting before proxies forget it")

    def secret_file(path: str, what: str) -> None:
        for mount_path, m in mounts.items():
            if path.startswith(mount_path.rstrip("/") + "/"):
                v = volumes.get(m["name"], {})
                if "secret" not in v:
                    problem(f"{cname}: {what} {path} is not mounted from a Secret")
                    return
                if m.get("subPath"):
                    problem(f"{cname}: {what} is mounted by subPath, which never sees an update")
                key = path[len(mount_path.rstrip("/")) + 1 :]
                if key not in secret_keys.get(v["secret"]["secretName"], set()):
                    problem(f"{cname}: Secret {v['secret']['secretName']} has no key {key} ({what})")
                return
        problem(f"{cname}: {what} {path} is on no mounted volume")

    args = c.get("args") or []
    if "--config" in args:
        secret_file(args[args.index("--config") + 1], "the config file")
    if env.get("CONCORD_VAULT_MASTER_KEY_FILE"):
        secret_file(env["CONCORD_VAULT_MASTER_KEY_FILE"], "the vault master key file")
    else:
        problem(f"{cname}: CONCORD_VAULT_MASTER_KEY_FILE is unset: each node would generate a key of its own")
    for var in ("CONCORD_TLS_CERT", "CONCORD_TLS_KEY", "CONCORD_TLS_CLIENT_CA"):
        if env.get(var):
            secret_file(env[var], var)


def check_secret_values(secrets: dict[str, dict[str, bytes]]) -> None:
    if "concord-secrets" not in secrets:
        return
    try:
        settings = tomllib.loads(secrets["concord-secrets"]["concord.toml"].decode())
    except (KeyError, tomllib.TOMLDecodeError) as e:
        problem(f"Secret concord-secrets: concord.toml does not parse: {e}")
        return
    if not settings.get("admin_key"):
        problem("Secret concord-secrets: concord.toml has no admin_key")
    key = base64.b64decode(secrets["concord-secrets"]["vault-master-key"])
    if len(key) != 32:
        problem("Secret concord-secrets: vault-master-key is not 32 bytes in base64")
    shop = secrets.get("shop-secrets")
    if shop:
        if settings.get("tx_participant_token", "").encode() != shop["tx-token"]:
            problem("concord.toml's tx_participant_token differs from shop-secrets tx-token")
        token = ((settings.get("saga_secrets") or {}).get("shop_token") or {}).get("value", "")
        if token.encode() != shop["token"]:
            problem("concord.toml's saga_secrets.shop_token differs from shop-secrets token")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2]))
