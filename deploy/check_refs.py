#!/usr/bin/env python3
"""Cross-reference checks for deploy/ that a per-object JSON schema cannot make.

Run by deploy/validate.sh (inside its virtual environment, for PyYAML) after
the schema validators:

    python check_refs.py DEPLOY_DIR

Kubernetes (DEPLOY_DIR/kubernetes):
  - kustomization.yaml is a Kustomization, lists every manifest of the folder
    (and only existing ones), and its configMapGenerator files exist (TOML ones
    must parse);
  - every object has a name, the kustomization's namespace (or none), the
    app.kubernetes.io/name and app.kubernetes.io/part-of labels, and no two
    objects share a kind and name;
  - workload selectors match their own pod template; Services, PDBs and HPAs
    point at a workload that exists; named ports (Service targetPort, probes)
    exist on the containers; ConfigMaps mounted as volumes exist (as objects or
    generated); a StatefulSet's serviceName is a headless Service; an HPA on
    CPU utilization targets containers that all request CPU.

Compose (DEPLOY_DIR/compose.yaml):
  - depends_on targets exist, and have a healthcheck when the condition is
    service_healthy; bind-mounted files and build context/Dockerfile exist;
    no host port is published twice.

Prints one line per problem and exits 1 if there is any.
"""

from __future__ import annotations

import pathlib
import sys

import yaml

try:
    import tomllib  # Python 3.11+
except ModuleNotFoundError:  # pragma: no cover - older Pythons
    tomllib = None

problems: list[str] = []


def fail(where: str, message: str) -> None:
    problems.append(f"{where}: {message}")


def load_all(path: pathlib.Path) -> list[dict]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def pod_spec(obj: dict) -> dict | None:
    if obj.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        return obj.get("spec", {}).get("template", {}).get("spec", {})
    return None


def pod_labels(obj: dict) -> dict:
    return obj.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}) or {}


def matches(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def container_ports(spec: dict) -> set:
    names = set()
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        for p in c.get("ports", []) or []:
            if "name" in p:
                names.add(p["name"])
            names.add(p.get("containerPort"))
    return names


def check_kubernetes(k8s: pathlib.Path) -> None:
    kfile = k8s / "kustomization.yaml"
    if not kfile.exists():
        fail(str(k8s), "no kustomization.yaml")
        return
    kust = yaml.safe_load(kfile.read_text()) or {}
    where = str(kfile)
    if kust.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or kust.get("kind") != "Kustomization":
        fail(where, "expected apiVersion kustomize.config.k8s.io/v1beta1, kind Kustomization")
    namespace = kust.get("namespace")
    resources = kust.get("resources", []) or []
    for r in resources:
        if not (k8s / r).is_file():
            fail(where, f"resource {r} does not exist")
    manifests = sorted(
        p.name for p in k8s.iterdir() if p.suffix in (".yaml", ".yml") and p.stem != "kustomization"
    )
    for m in manifests:
        if m not in resources:
            fail(where, f"{m} is in the folder but not listed in resources")

    generated_configmaps = set()
    for gen in kust.get("configMapGenerator", []) or []:
        generated_configmaps.add(gen.get("name"))
        for entry in gen.get("files", []) or []:
            name = entry.split("=", 1)[-1]
            path = k8s / name
            if not path.is_file():
                fail(where, f"configMapGenerator file {name} does not exist")
            elif path.suffix == ".toml":
                if tomllib is None:
                    print(f"note: {path}: TOML not checked (Python < 3.11)")
                    continue
                try:
                    tomllib.loads(path.read_text())
                except tomllib.TOMLDecodeError as e:
                    fail(str(path), f"not valid TOML: {e}")

    objects: list[tuple[str, dict]] = []
    for r in resources:
        path = k8s / r
        if path.is_file():
            try:
                objects += [(r, doc) for doc in load_all(path)]
            except yaml.YAMLError as e:
                fail(r, f"YAML: {e}")

    seen = set()
    by_kind: dict[str, dict[str, dict]] = {}
    for r, obj in objects:
        kind = obj.get("kind", "?")
        meta = obj.get("metadata", {}) or {}
        name = meta.get("name")
        here = f"{r}: {kind}/{name}"
        if not name:
            fail(here, "no metadata.name")
            continue
        if (kind, name) in seen:
            fail(here, "defined twice")
        seen.add((kind, name))
        by_kind.setdefault(kind, {})[name] = obj
        if kind != "Namespace" and namespace and meta.get("namespace") not in (None, namespace):
            fail(here, f"namespace {meta.get('namespace')!r}, kustomization says {namespace!r}")
        labels = meta.get("labels", {}) or {}
        for label in ("app.kubernetes.io/name", "app.kubernetes.io/part-of"):
            if label not in labels:
                fail(here, f"no {label} label")

    workloads = {
        (kind, name): obj
        for kind in ("Deployment", "StatefulSet", "DaemonSet")
        for name, obj in by_kind.get(kind, {}).items()
    }
    configmaps = set(by_kind.get("ConfigMap", {})) | generated_configmaps
    services = by_kind.get("Service", {})

    for (kind, name), obj in workloads.items():
        here = f"{kind}/{name}"
        spec = obj.get("spec", {})
        selector = spec.get("selector", {}).get("matchLabels", {})
        if not matches(selector, pod_labels(obj)):
            fail(here, "spec.selector.matchLabels does not match the pod template's labels")
        ps = pod_spec(obj) or {}
        ports = container_ports(ps)
        for c in ps.get("containers", []):
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                action = (c.get(probe) or {})
                for kind_ in ("httpGet", "tcpSocket", "grpc"):
                    port = (action.get(kind_) or {}).get("port")
                    if port is not None and port not in ports:
                        fail(here, f"container {c.get('name')} {probe} uses port {port!r}, not declared")
        for v in ps.get("volumes", []) or []:
            cm = (v.get("configMap") or {}).get("name")
            if cm and cm not in configmaps:
                fail(here, f"volume {v.get('name')} mounts ConfigMap {cm}, which is not defined")
        if kind == "StatefulSet":
            svc = services.get(spec.get("serviceName"))
            if svc is None:
                fail(here, f"serviceName {spec.get('serviceName')!r} is not a Service here")
            elif svc.get("spec", {}).get("clusterIP") != "None":
                fail(here, f"serviceName {spec.get('serviceName')} is not headless")

    def targets(selector: dict) -> list[dict]:
        return [obj for obj in workloads.values() if matches(selector, pod_labels(obj))]

    for name, svc in services.items():
        here = f"Service/{name}"
        selector = svc.get("spec", {}).get("selector", {})
        found = targets(selector)
        if not found:
            fail(here, f"selector {selector} matches no workload")
            continue
        for port in svc.get("spec", {}).get("ports", []):
            target = port.get("targetPort", port.get("port"))
            for obj in found:
                if target not in container_ports(pod_spec(obj) or {}):
                    fail(here, f"targetPort {target!r} is not a port of {obj['kind']}/{obj['metadata']['name']}")

    for name, pdb in by_kind.get("PodDisruptionBudget", {}).items():
        selector = pdb.get("spec", {}).get("selector", {}).get("matchLabels", {})
        if not targets(selector):
            fail(f"PodDisruptionBudget/{name}", f"selector {selector} matches no workload")

    for name, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        here = f"HorizontalPodAutoscaler/{name}"
        ref = hpa.get("spec", {}).get("scaleTargetRef", {})
        target = workloads.get((ref.get("kind"), ref.get("name")))
        if target is None:
            fail(here, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} does not exist")
            continue
        spec = hpa.get("spec", {})
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            fail(here, "minReplicas > maxReplicas")
        for metric in spec.get("metrics", []):
            res = metric.get("resource") or {}
            if res.get("target", {}).get("type") == "Utilization":
                for c in (pod_spec(target) or {}).get("containers", []):
                    if res.get("name") not in ((c.get("resources") or {}).get("requests") or {}):
                        fail(here, f"{res.get('name')} utilization needs a request on container {c.get('name')}")


def check_compose(compose: pathlib.Path) -> None:
    where = str(compose)
    try:
        doc = yaml.safe_load(compose.read_text()) or {}
    except yaml.YAMLError as e:
        fail(where, f"YAML: {e}")
        return
    services = doc.get("services") or {}
    if not services:
        fail(where, "no services")
    published: dict[str, str] = {}
    for name, svc in services.items():
        here = f"{where}: service {name}"
        svc = svc or {}
        if "image" not in svc and "build" not in svc:
            fail(here, "neither image nor build")
        deps = svc.get("depends_on") or {}
        if isinstance(deps, list):
            deps = {d: {"condition": "service_started"} for d in deps}
        for dep, opts in deps.items():
            if dep not in services:
                fail(here, f"depends_on {dep}, which is not a service")
            elif (opts or {}).get("condition") == "service_healthy" and not (services[dep] or {}).get("healthcheck"):
                fail(here, f"waits for {dep} to be healthy, but {dep} has no healthcheck")
        for vol in svc.get("volumes") or []:
            source = vol.split(":", 1)[0] if isinstance(vol, str) else (vol or {}).get("source", "")
            if source.startswith((".", "/")) and not (compose.parent / source).exists():
                fail(here, f"bind mount source {source} does not exist")
        build = svc.get("build")
        if build:
            context = compose.parent / (build if isinstance(build, str) else build.get("context", "."))
            dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
            if not context.is_dir():
                fail(here, f"build context {context} does not exist")
            elif not (context / dockerfile).is_file():
                fail(here, f"Dockerfile {dockerfile} not found in build context {context}")
        for port in svc.get("ports") or []:
            spec = str(port) if not isinstance(port, dict) else f"{port.get('published')}:{port.get('target')}"
            parts = spec.split(":")
            if len(parts) >= 2:
                host = ":".join(parts[:-1])
                if host in published:
                    fail(here, f"host port {host} is already published by {published[host]}")
                published[host] = name


def main() -> int:
    deploy = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else pathlib.Path(__file__).parent)
    check_kubernetes(deploy / "kubernetes")
    check_compose(deploy / "compose.yaml")
    for p in problems:
        print(f"ERROR {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
