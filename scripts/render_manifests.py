#!/usr/bin/env python3
"""Renders deploy/helm/sluice with Helm's own Go SDK and validates every object offline.

    .venv-deploy/bin/python scripts/render_manifests.py --out /tmp/rendered
    .venv-deploy/bin/python scripts/render_manifests.py --check some.yaml ...

Needs .venv-deploy (scripts/setup.sh makes it): helm-python-sdk (Helm v4's Go SDK through
its C ABI, no helm binary), kubernetes-validate (Kubernetes' JSON schemas), the kserve SDK
(only its generated model classes are read, as source: the package is never imported),
and cloudcoil's prometheus-operator models (the ServiceMonitor).

With --out it
  1. lints the chart and renders it for each value set in VALUE_SETS, writing
     <out>/<set>.yaml (multi-document YAML, as `helm template` prints it);
  2. checks that values.schema.json (and the templates' guards) reject misspelled or
     invalid values: Helm refuses to render them;
  3. validates every rendered object: built-in kinds against Kubernetes' strict JSON
     schemas (unknown fields are errors), the ServiceMonitor against prometheus-operator's
     models, and deploy/kserve/*.yaml against the kserve SDK's models (every key known,
     every value of the declared type, Kubernetes types such as V1Container against
     Kubernetes' schemas), then writes them to <out>/kserve.yaml;
  4. checks what the schemas cannot: sluice's contract (ports, probe paths, flags, the
     grace period covering drain + shutdown, the security context), selectors that match,
     and that the KServe runtime and InferenceService fit together;
  5. proves the validators strict: a copy of each kind with a misspelled field must fail.
With --check it runs 3 and 4 on the given files. Exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import helm_python as helm
import jsonschema
import kubernetes_validate
import yaml
from kubernetes_validate import utils as kv_utils
from referencing import Registry, Resource

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "sluice"
KSERVE_FILES = [
    ROOT / "deploy" / "kserve" / "cluster-serving-runtime.yaml",
    ROOT / "deploy" / "kserve" / "inference-service.yaml",
]
RELEASE = "sluice"
NAMESPACE = "serving"

# The value sets rendered, each written to <out>/<name>.yaml, with the kinds (and counts)
# it must render.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "gpu-hpa-monitoring": {
        "replicaCount": 3,
        "gpu": {"count": 1},
        "runtimeClassName": "nvidia",
        "autoscaling": {
            "enabled": True,
            "minReplicas": 2,
            "maxReplicas": 8,
            "queueTime": {"targetAverageValue": "20m", "selector": {"matchLabels": {"model": "resnet50"}}},
            "cpu": {"enabled": True, "targetAverageUtilization": 90},
        },
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
        "repository": {"existingClaim": "sluice-models", "subPath": "v3"},
        "server": {"pools": {"default": "8:256", "decode": 4}, "loadNice": 0, "maxMessageMb": 512},
        "lifecycle": {"preStopSleepSeconds": 5},
        "drain": {"delaySeconds": 15, "shutdownTimeoutSeconds": 60},
    },
    "init-models": {
        "replicaCount": 2,
        "server": {"reload": "none", "modelAliases": {"classifier": "classify"}, "requestTimeoutMs": 2000},
        "repository": {
            "init": {
                "enabled": True,
                "image": "busybox:1.36",
                "command": ["sh", "-c"],
                "args": ['wget -qO- "$MODELS_URL" | tar -xz -C "$SLUICE_REPOSITORY"'],
                "env": [{"name": "MODELS_URL", "value": "http://models.example.internal/sluice/models.tar.gz"}],
                "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}},
            }
        },
        "pipelines": {"definitions": {"classify": (ROOT / "pipelines" / "classify.yaml").read_text()}},
    },
    # What tests/tests/deploy.rs starts as containers: two replicas serving the example
    # repository (models from a claim it stands in for, the example pipelines as a
    # ConfigMap).
    "examples": {
        "replicaCount": 2,
        "repository": {"existingClaim": "sluice-examples"},
        "pipelines": {
            "definitions": {p.stem: p.read_text() for p in sorted((ROOT / "pipelines").glob("*.yaml"))},
        },
    },
    "existing-configmap": {
        "pipelines": {"existingConfigMap": "sluice-pipelines-prod"},
        "repository": {"existingClaim": "sluice-models", "readOnly": True},
        "serviceAccount": {"create": False},
        "headlessService": {"enabled": False},
        "server": {"bindAddress": "::", "extraArgs": ["--reload-debounce-ms=1000"]},
    },
    # The two tiers of docs/deploy.md, as their values files ship, each its own release.
    "model-tier": yaml.safe_load((ROOT / "deploy" / "helm" / "two-tiers" / "model-tier.yaml").read_text()),
    "cpu-tier": {
        **yaml.safe_load((ROOT / "deploy" / "helm" / "two-tiers" / "cpu-tier.yaml").read_text()),
        "pipelines": {"definitions": {"detect_crop_classify": (ROOT / "pipelines" / "detect_crop_classify.yaml").read_text()}},
    },
}
# Release names other than RELEASE (the two tiers find each other by name).
RELEASES = {"model-tier": "model-tier", "cpu-tier": "cpu-tier"}
EXPECTED_KINDS: dict[str, dict[str, int]] = {
    "defaults": {"ConfigMap": 1, "Deployment": 1, "Service": 2, "ServiceAccount": 1},
    "gpu-hpa-monitoring": {
        "ConfigMap": 1, "Deployment": 1, "Service": 2, "ServiceAccount": 1,
        "HorizontalPodAutoscaler": 1, "PodDisruptionBudget": 1, "ServiceMonitor": 1,
    },
    "init-models": {"ConfigMap": 1, "Deployment": 1, "Service": 2, "ServiceAccount": 1, "PodDisruptionBudget": 1},
    "examples": {"ConfigMap": 1, "Deployment": 1, "Service": 2, "ServiceAccount": 1, "PodDisruptionBudget": 1},
    "existing-configmap": {"Deployment": 1, "Service": 1},
    "model-tier": {"ConfigMap": 1, "Deployment": 1, "Service": 2, "ServiceAccount": 1, "PodDisruptionBudget": 1},
    "cpu-tier": {"ConfigMap": 2, "Deployment": 1, "Service": 2, "ServiceAccount": 1, "PodDisruptionBudget": 1},
}

# Values that values.schema.json (or a template's guard) must reject: Helm refuses to
# render them, with an error that names the word given.
BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("remote model without remote:", {"remoteModels": {"m": {"instances": 2}}}, "remote"),
    ("remote models with a claim", {"remoteModels": {"m": {"remote": {"endpoints": ["a:8001"]}}},
                                    "repository": {"existingClaim": "c"}}, "remoteModels"),
    ("remote models, pipelines from the repository", {"remoteModels": {"m": {"remote": {"endpoints": ["a:8001"]}}},
                                                      "pipelines": {"source": "repository"}}, "remoteModels"),
    ("misspelled top-level key", {"replicaCont": 2}, "replicaCont"),
    ("misspelled nested key", {"server": {"relaod": "none"}}, "relaod"),
    ("misspelled drain key", {"drain": {"delaySecond": 5}}, "delaySecond"),
    ("unknown reload mode", {"server": {"reload": "sometimes"}}, "reload"),
    ("port out of range", {"server": {"httpPort": 80000}}, "httpPort"),
    ("string where a number belongs", {"gpu": {"count": "one"}}, "count"),
    # Caught by the templates' own guards (fail), past the schema:
    ("init container without an image", {"repository": {"init": {"enabled": True}}}, "init.image"),
    ("minReplicas above maxReplicas", {"autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}},
     "maxReplicas"),
    ("PDB with neither bound", {"replicaCount": 2, "podDisruptionBudget": {"maxUnavailable": None}}, "maxUnavailable"),
]

# A misspelled field per kind (a path to a dict, the key added): each validator must
# reject the copy. Type errors too, where the KServe walker checks types itself.
MUTATIONS: dict[str, list[tuple[tuple[Any, ...], str, Any]]] = {
    "Deployment": [(("spec", "template", "spec", "containers", 0), "readynessProbe", {})],
    "Service": [(("spec", "ports", 0), "targetPot", 8000)],
    "ServiceAccount": [((), "automountServiceAccountTokens", False)],
    "ConfigMap": [((), "datas", {})],
    "PodDisruptionBudget": [(("spec",), "maxUnavailible", 1)],
    "HorizontalPodAutoscaler": [(("spec", "metrics", 0, "pods", "target"), "averageValues", "1")],
    "ServiceMonitor": [(("spec", "endpoints", 0), "scrapeTimout", "10s")],
    "ClusterServingRuntime": [
        (("spec", "containers", 0), "readynessProbe", {}),
        (("spec", "supportedModelFormats", 0), "autoselect", True),
    ],
    "InferenceService": [
        (("spec", "predictor", "model"), "storageURI", "pvc://x"),
        (("spec", "predictor", "model", "resources"), "limit", {}),
        (("spec", "predictor"), "terminationGracePeriodSeconds", "45"),
    ],
}


# ---------------------------------------------------------------------------------------
# Kubernetes' schemas


class K8sSchemas:
    """Kubernetes' strict JSON schemas as kubernetes-validate ships them, for whole objects
    (kubernetes_validate.validate) and for sub-objects of a named definition."""

    def __init__(self, version: str):
        self.version = version
        directory = f"kubernetes-json-schema/v{self._schema_version(version)}-local-strict"
        self.defs = kv_utils.schema_contents(f"{directory}/_definitions.json", version)
        self.registry = Resource.from_contents(self.defs) @ Registry()
        self.names = self.defs["$defs"]
        self._validators: dict[str, jsonschema.protocols.Validator] = {}

    @staticmethod
    def _schema_version(version: str) -> str:
        wanted = kv_utils.major_minor(version)
        return [v for v in kv_utils.all_versions() if kv_utils.major_minor(v) <= wanted][-1]

    def validate_object(self, obj: dict) -> list[str]:
        try:
            kubernetes_validate.validate(obj, self.version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            return [f"{where}: {e.message}"]
        except kubernetes_validate.SchemaNotFoundError as e:
            return [e.message]
        return []

    def definition_for(self, sdk_type: str) -> str | None:
        """The definition named by an OpenAPI-generated class name: V1Container ->
        io.k8s.api.core.v1.Container, K8sIoApiAppsV1DeploymentStrategy ->
        io.k8s.api.apps.v1.DeploymentStrategy, ResourceQuantity -> ...resource.Quantity."""
        if sdk_type == "ResourceQuantity":
            return "io.k8s.apimachinery.pkg.api.resource.Quantity"
        if sdk_type.startswith("K8sIo"):
            flat = sdk_type.lower()
            for name in self.names:
                if name.startswith("io.k8s.") and ("k8s.io." + name[len("io.k8s."):]).replace(".", "").lower() == flat:
                    return name
            return None
        m = re.fullmatch(r"V(\d+(?:alpha\d+|beta\d+)?)([A-Z]\w*)", sdk_type)
        if not m:
            return None
        suffix = f".v{m.group(1)}.{m.group(2)}"
        found = [n for n in self.names if n.endswith(suffix)]
        for preferred in ("io.k8s.api.core.", "io.k8s.apimachinery.pkg.apis.meta."):
            for n in found:
                if n.startswith(preferred):
                    return n
        return found[0] if len(found) == 1 else None

    def validate_definition(self, name: str, value: Any, path: str) -> list[str]:
        validator = self._validators.get(name)
        if validator is None:
            schema = {"$ref": f"{self.defs['$id']}#/$defs/{name}"}
            validator = jsonschema.Draft202012Validator(schema, registry=self.registry)
            self._validators[name] = validator
        errors = []
        for e in sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path)):
            sub = "/".join(str(p) for p in e.absolute_path)
            errors.append(f"{path}{'/' + sub if sub else ''}: {e.message} ({name.rsplit('.', 1)[-1]})")
        return errors


# ---------------------------------------------------------------------------------------
# KServe's generated models, read as source


@dataclass
class SdkModel:
    types: dict[str, str]  # python attribute -> OpenAPI type
    keys: dict[str, str]  # JSON key -> python attribute
    required: set[str] = field(default_factory=set)  # python attributes


class KServeModels:
    """The kserve SDK's OpenAPI-generated model classes (openapi_types, attribute_map, and
    the attributes whose setters refuse None), parsed from kserve/models/*.py without
    importing kserve (its __init__ pulls in the whole model server)."""

    def __init__(self, k8s: K8sSchemas):
        self.k8s = k8s
        spec = importlib.util.find_spec("kserve")  # locates the package, runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("kserve is not installed (scripts/setup.sh installs it into .venv-deploy)")
        self.models: dict[str, SdkModel] = {}
        for path in sorted(Path(spec.submodule_search_locations[0], "models").glob("*.py")):
            source = path.read_text()
            for node in ast.parse(source).body:
                if isinstance(node, ast.ClassDef):
                    model = self._parse_class(node, source)
                    if model is not None:
                        self.models[node.name] = model
        if "V1beta1InferenceService" not in self.models:
            raise SystemExit(f"no kserve model classes found under {spec.submodule_search_locations[0]}")

    @staticmethod
    def _parse_class(node: ast.ClassDef, source: str) -> SdkModel | None:
        found: dict[str, dict[str, str]] = {}
        for stmt in node.body:
            if (
                isinstance(stmt, ast.Assign)
                and len(stmt.targets) == 1
                and isinstance(stmt.targets[0], ast.Name)
                and stmt.targets[0].id in ("openapi_types", "attribute_map")
            ):
                found[stmt.targets[0].id] = ast.literal_eval(stmt.value)
        if len(found) != 2:
            return None
        text = ast.get_source_segment(source, node) or ""
        required = set(re.findall(r"Invalid value for `(\w+)`, must not be `None`", text))
        keys = {json_key: attr for attr, json_key in found["attribute_map"].items()}
        return SdkModel(found["openapi_types"], keys, required)

    def validate(self, obj: dict) -> list[str]:
        group, _, version = obj.get("apiVersion", "").partition("/")
        cls = version[:1].upper() + version[1:] + obj.get("kind", "")  # V1beta1InferenceService
        if group != "serving.kserve.io" or cls not in self.models:
            return [f"the kserve SDK has no model for {obj.get('apiVersion')} {obj.get('kind')}"]
        return self.check(obj, cls, "")

    def check(self, value: Any, type_name: str, path: str) -> list[str]:
        where = path or "(top)"
        if m := re.fullmatch(r"list\[(.+)\]", type_name):
            if not isinstance(value, list):
                return [f"{where}: expected a list ({type_name}), got {type(value).__name__}"]
            return [e for i, item in enumerate(value) for e in self.check(item, m.group(1), f"{path}/{i}")]
        if m := re.fullmatch(r"dict\((\w+), (.+)\)", type_name):
            if not isinstance(value, dict):
                return [f"{where}: expected a mapping ({type_name}), got {type(value).__name__}"]
            errors = [f"{path}/{k}: key is not a string" for k in value if not isinstance(k, str)]
            return errors + [e for k, v in value.items() for e in self.check(v, m.group(2), f"{path}/{k}")]
        scalar = {"str": str, "int": int, "float": (int, float), "bool": bool, "date": str, "datetime": str}
        if type_name in scalar:
            ok = isinstance(value, scalar[type_name]) and (type_name == "bool" or not isinstance(value, bool))
            return [] if ok else [f"{where}: expected {type_name}, got {type(value).__name__} {value!r}"]
        if type_name == "object":
            return []
        model = self.models.get(type_name)
        if model is not None:
            if not model.types:  # e.g. V1Time: nothing more is declared
                return []
            if not isinstance(value, dict):
                return [f"{where}: expected an object ({type_name}), got {type(value).__name__}"]
            errors = []
            for key, item in value.items():
                attr = model.keys.get(key)
                if attr is None:
                    errors.append(f"{path}/{key}: unknown field of {type_name}")
                elif item is not None:
                    errors.extend(self.check(item, model.types[attr], f"{path}/{key}"))
            present = {model.keys[k] for k in value if k in model.keys and value[k] is not None}
            for attr in sorted(model.required - present):
                key = next(k for k, a in model.keys.items() if a == attr)
                errors.append(f"{where}: missing required field {key} of {type_name}")
            return errors
        definition = self.k8s.definition_for(type_name)
        if definition is not None:
            return self.k8s.validate_definition(definition, value, path or "(top)")
        return [f"{where}: type {type_name} is known neither to the kserve SDK nor to Kubernetes' schemas"]


# ---------------------------------------------------------------------------------------
# prometheus-operator's ServiceMonitor


class PrometheusOperatorModels:
    """prometheus-operator's CRD types as pydantic models (cloudcoil). They ignore unknown
    fields, so the object is validated, dumped back, and compared: whatever did not
    survive the round trip is unknown (or was coerced to another value)."""

    def __init__(self) -> None:
        from cloudcoil.models.prometheus_operator import v1
        from pydantic import ValidationError

        self.models = {"ServiceMonitor": v1.ServiceMonitor, "PodMonitor": v1.PodMonitor}
        self.error = ValidationError

    def validate(self, obj: dict) -> list[str]:
        model = self.models.get(obj.get("kind", ""))
        if obj.get("apiVersion") != "monitoring.coreos.com/v1" or model is None:
            return [f"no prometheus-operator model for {obj.get('apiVersion')} {obj.get('kind')}"]
        try:
            parsed = model.model_validate(obj)
        except self.error as e:
            return [f"{'/'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()]
        dumped = parsed.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return list(_round_trip_diff(obj, dumped, ""))


def _round_trip_diff(given: Any, kept: Any, path: str):
    if isinstance(given, dict) and isinstance(kept, dict):
        for key, value in given.items():
            if key not in kept:
                yield f"{path}/{key}: unknown field"
            else:
                yield from _round_trip_diff(value, kept[key], f"{path}/{key}")
    elif isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        for i, (a, b) in enumerate(zip(given, kept)):
            yield from _round_trip_diff(a, b, f"{path}/{i}")
    elif given != kept:
        yield f"{path or '(top)'}: {given!r} read as {kept!r}"


# ---------------------------------------------------------------------------------------
# Validation of one object, and the checks across objects


class Validators:
    def __init__(self, kube_version: str):
        self.k8s = K8sSchemas(kube_version)
        self.kserve = KServeModels(self.k8s)
        self.prometheus = PrometheusOperatorModels()

    def validate(self, obj: Any) -> tuple[str, list[str]]:
        """(what validated it, errors)."""
        if not isinstance(obj, dict) or "apiVersion" not in obj or "kind" not in obj:
            return "-", ["not a Kubernetes object (apiVersion and kind needed)"]
        group = obj["apiVersion"].rpartition("/")[0]
        if group == "serving.kserve.io":
            return "kserve SDK models + Kubernetes schemas", self.kserve.validate(obj)
        if group == "monitoring.coreos.com":
            return "prometheus-operator models", self.prometheus.validate(obj)
        if "." not in group or group.endswith(".k8s.io"):
            return f"Kubernetes {kv_utils.major_minor(self.k8s.version)} strict schema", self.k8s.validate_object(obj)
        return "-", [f"no schema for {obj['apiVersion']} {obj['kind']}"]


def _get(obj: Any, *path: Any, default: Any = None) -> Any:
    for p in path:
        try:
            obj = obj[p]
        except (KeyError, IndexError, TypeError):
            return default
    return obj


def _flag(args: list[str], name: str) -> str | None:
    """The value of --name=V or --name V in args (the last one)."""
    value = None
    for i, a in enumerate(args):
        if a.startswith(f"--{name}="):
            value = a.split("=", 1)[1]
        elif a == f"--{name}" and i + 1 < len(args):
            value = args[i + 1]
    return value


def _port_of(addr: str | None) -> int | None:
    return int(addr.rsplit(":", 1)[1]) if addr and ":" in addr else None


def _selects(selector: dict | None, labels: dict | None) -> bool:
    selector, labels = selector or {}, labels or {}
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_sluice_container(pod: dict, container: dict, http_port_name: str, where: str) -> list[str]:
    """sluice's contract for a pod spec and its sluice container."""
    errors = []
    args = [str(a) for a in container.get("args", [])]
    ports = {p.get("name"): p.get("containerPort") for p in container.get("ports", [])}
    http, grpc_ = _port_of(_flag(args, "http-addr")), _port_of(_flag(args, "grpc-addr"))
    if http is not None and ports.get(http_port_name) != http:
        errors.append(f"{where}: port {http_port_name} is {ports.get(http_port_name)}, --http-addr says {http}")
    grpc_ports = [p for n, p in ports.items() if n and ("grpc" in n or "h2c" in n)]
    if grpc_ is not None and grpc_ports != [grpc_]:
        errors.append(f"{where}: gRPC container port(s) {grpc_ports}, --grpc-addr says {grpc_}")
    for flag in ("models", "pipelines"):
        if not _flag(args, flag):
            errors.append(f"{where}: no --{flag}")
    for probe, path in (("startupProbe", "/v2/health/startup"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        got = _get(container, probe, "httpGet", "path")
        if got != path:
            errors.append(f"{where}: {probe} GETs {got}, expected {path}")
        port = _get(container, probe, "httpGet", "port")
        if port not in (http_port_name, http, ports.get(http_port_name)):
            errors.append(f"{where}: {probe} port {port} is not the HTTP port")
    sc, psc = container.get("securityContext") or {}, pod.get("securityContext") or {}
    want = {"runAsNonRoot": True, "runAsUser": 10001, "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True}
    for key, value in want.items():
        if sc.get(key, psc.get(key)) != value:
            errors.append(f"{where}: securityContext.{key} is {sc.get(key, psc.get(key))!r}, expected {value!r}")
    if "ALL" not in (_get(sc, "capabilities", "drop") or []):
        errors.append(f"{where}: capabilities do not drop ALL")
    if _get(sc, "seccompProfile", "type", default=_get(psc, "seccompProfile", "type")) != "RuntimeDefault":
        errors.append(f"{where}: seccompProfile is not RuntimeDefault")
    if not any(m.get("mountPath") == "/tmp" for m in container.get("volumeMounts", [])):
        errors.append(f"{where}: no volume at /tmp (the root filesystem is read-only)")
    return errors


def drain_seconds(container: dict) -> int:
    """What SIGTERM to exit may take, as the container's flags and preStop say."""
    args = [str(a) for a in container.get("args", [])]
    sleep = _get(container, "lifecycle", "preStop", "sleep", "seconds", default=0)
    return int(_flag(args, "drain-delay-s") or 0) + int(_flag(args, "shutdown-timeout-s") or 30) + int(sleep)


def check_chart_objects(objs: list[dict]) -> list[str]:
    """Checks across the chart's objects that no schema makes."""
    errors = []
    by_kind: dict[str, list[dict]] = {}
    for o in objs:
        by_kind.setdefault(o["kind"], []).append(o)
    services = by_kind.get("Service", [])
    config_maps = {_get(c, "metadata", "name") for c in by_kind.get("ConfigMap", [])}
    for dep in by_kind.get("Deployment", []):
        name = _get(dep, "metadata", "name")
        pod = _get(dep, "spec", "template", "spec", default={})
        labels = _get(dep, "spec", "template", "metadata", "labels", default={})
        if not _selects(_get(dep, "spec", "selector", "matchLabels"), labels):
            errors.append(f"Deployment/{name}: selector does not match the pod labels")
        containers = [c for c in pod.get("containers", []) if c.get("name") == "sluice"]
        if not containers:
            errors.append(f"Deployment/{name}: no container named sluice")
            continue
        c = containers[0]
        errors += check_sluice_container(pod, c, "http", f"Deployment/{name}")
        grace, needed = pod.get("terminationGracePeriodSeconds", 30), drain_seconds(c)
        if grace <= needed:
            errors.append(f"Deployment/{name}: terminationGracePeriodSeconds {grace} <= preStop + drain + shutdown = {needed}")
        if pod.get("automountServiceAccountToken") is not False:
            errors.append(f"Deployment/{name}: the pod mounts a service account token")
        volumes = {v.get("name"): v for v in pod.get("volumes", [])}
        for m in c.get("volumeMounts", []):
            v = volumes.get(m.get("name"), {})
            if "configMap" in v:
                if "subPath" in m:
                    errors.append(f"Deployment/{name}: ConfigMap {m['name']} mounted with subPath: updates never arrive")
                cm = v["configMap"].get("name")
                if config_maps and cm not in config_maps:
                    errors.append(f"Deployment/{name}: mounts ConfigMap {cm}, which the chart does not render")
        for svc in services:
            sname = _get(svc, "metadata", "name")
            if not _selects(_get(svc, "spec", "selector"), labels):
                errors.append(f"Service/{sname}: selector does not match Deployment/{name}'s pods")
            names = {p.get("name") for p in c.get("ports", [])}
            for p in _get(svc, "spec", "ports", default=[]):
                if isinstance(p.get("targetPort"), str) and p["targetPort"] not in names:
                    errors.append(f"Service/{sname}: targetPort {p['targetPort']} is no container port")
        for pdb in by_kind.get("PodDisruptionBudget", []):
            if not _selects(_get(pdb, "spec", "selector", "matchLabels"), labels):
                errors.append(f"PodDisruptionBudget/{_get(pdb, 'metadata', 'name')}: selector misses the pods")
        for hpa in by_kind.get("HorizontalPodAutoscaler", []):
            ref = _get(hpa, "spec", "scaleTargetRef", default={})
            if (ref.get("kind"), ref.get("name")) != ("Deployment", name):
                errors.append(f"HorizontalPodAutoscaler/{_get(hpa, 'metadata', 'name')}: scales {ref}, not Deployment/{name}")
            if "replicas" in dep["spec"]:
                errors.append(f"Deployment/{name}: sets replicas although an HPA owns the count")
    for sm in by_kind.get("ServiceMonitor", []):
        sel = _get(sm, "spec", "selector", "matchLabels")
        matched = [s for s in services if _selects(sel, _get(s, "metadata", "labels"))]
        if len(matched) != 1:
            errors.append(f"ServiceMonitor/{_get(sm, 'metadata', 'name')}: selects {len(matched)} Services, expected 1")
        else:
            port_names = {p.get("name") for p in _get(matched[0], "spec", "ports", default=[])}
            for ep in _get(sm, "spec", "endpoints", default=[]):
                if ep.get("port") not in port_names:
                    errors.append(f"ServiceMonitor: endpoint port {ep.get('port')} is not a port of the Service")
    for svc in services:
        if _get(svc, "spec", "clusterIP") == "None" and _get(svc, "spec", "publishNotReadyAddresses"):
            errors.append(f"Service/{_get(svc, 'metadata', 'name')}: headless Service publishes not-ready pods")
    return errors


def check_kserve_objects(objs: list[dict]) -> list[str]:
    """The runtime and the InferenceServices fit together, and sluice's contract holds."""
    errors = []
    runtimes = {_get(o, "metadata", "name"): o for o in objs if o["kind"] in ("ClusterServingRuntime", "ServingRuntime")}
    for name, rt in runtimes.items():
        containers = _get(rt, "spec", "containers", default=[])
        c = next((c for c in containers if c.get("name") == "kserve-container"), None)
        if c is None:
            errors.append(f"ServingRuntime/{name}: no container named kserve-container")
            continue
        pod = {"securityContext": {}, **_get(rt, "spec", default={})}
        first = (c.get("ports") or [{}])[0]
        errors += check_sluice_container(pod, c, first.get("name", ""), f"ServingRuntime/{name}")
        args = [str(a) for a in c.get("args", [])]
        if first.get("containerPort") != _port_of(_flag(args, "http-addr")):
            errors.append(f"ServingRuntime/{name}: the first port must be the HTTP one (KServe routes port 80 to it)")
        if not str(_flag(args, "models") or "").startswith("/mnt/models"):
            errors.append(f"ServingRuntime/{name}: --models is not under /mnt/models, where KServe puts storageUri")
    for isvc in (o for o in objs if o["kind"] == "InferenceService"):
        iname = _get(isvc, "metadata", "name")
        model = _get(isvc, "spec", "predictor", "model", default={})
        rt = runtimes.get(model.get("runtime"))
        if rt is None:
            errors.append(f"InferenceService/{iname}: runtime {model.get('runtime')} is not among {sorted(runtimes)}")
            continue
        formats = {f.get("name") for f in _get(rt, "spec", "supportedModelFormats", default=[])}
        if _get(model, "modelFormat", "name") not in formats:
            errors.append(f"InferenceService/{iname}: model format {_get(model, 'modelFormat', 'name')} not in {formats}")
        if model.get("protocolVersion", "v1") not in _get(rt, "spec", "protocolVersions", default=[]):
            errors.append(f"InferenceService/{iname}: protocolVersion {model.get('protocolVersion')} not offered")
        c = next(c for c in _get(rt, "spec", "containers") if c.get("name") == "kserve-container")
        all_args = [str(a) for a in c.get("args", []) + model.get("args", [])]  # KServe appends the ISVC's
        aliases = [a.split("=", 1)[1].split("=", 1)[0] for a in all_args if a.startswith("--model-alias=")]
        if iname not in aliases:
            errors.append(f"InferenceService/{iname}: no --model-alias for the service's own name")
        grace, needed = _get(isvc, "spec", "predictor", "terminationGracePeriodSeconds", default=30), drain_seconds(c)
        if grace <= needed:
            errors.append(f"InferenceService/{iname}: terminationGracePeriodSeconds {grace} <= drain + shutdown = {needed}")
    return errors


# ---------------------------------------------------------------------------------------


@dataclass
class Report:
    failures: int = 0

    def ok(self, text: str) -> None:
        print(f"  ok    {text}")

    def fail(self, text: str, details: list[str] | None = None) -> None:
        self.failures += 1
        print(f"  FAIL  {text}")
        for d in details or []:
            print(f"          {d}")


def load_documents(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate_objects(objs: list[dict], validators: Validators, report: Report, label: str) -> None:
    for obj in objs:
        how, errors = validators.validate(obj)
        name = f"{obj.get('kind')}/{_get(obj, 'metadata', 'name')}" if isinstance(obj, dict) else repr(obj)[:40]
        if errors:
            report.fail(f"{label}: {name} ({how})", errors)
        else:
            report.ok(f"{label}: {name} ({how})")


def cross_checks(objs: list[dict], report: Report, label: str) -> None:
    objs = [o for o in objs if isinstance(o, dict) and isinstance(o.get("kind"), str)]
    kserve = [o for o in objs if str(o.get("apiVersion", "")).startswith("serving.kserve.io/")]
    others = [o for o in objs if o not in kserve]
    for what, group, check in (("chart contract", others, check_chart_objects),
                               ("KServe contract", kserve, check_kserve_objects)):
        if not group or (check is check_chart_objects and not any(o["kind"] == "Deployment" for o in group)):
            continue
        try:
            errors = check(group)
        except (AttributeError, KeyError, IndexError, TypeError, ValueError, StopIteration) as e:
            errors = [f"malformed objects: {type(e).__name__}: {e}"]
        if errors:
            report.fail(f"{label}: {what}", errors)
        else:
            report.ok(f"{label}: {what} (ports, probes, flags, grace period, security, selectors)")


def negative_controls(objs: list[dict], validators: Validators, report: Report) -> None:
    """A copy of one object of each kind with a misspelled field (or a wrong type) must fail."""
    done: set[str] = set()
    for obj in objs:
        kind = obj["kind"]
        if kind in done or kind not in MUTATIONS:
            continue
        done.add(kind)
        if validators.validate(obj)[1]:
            report.fail(f"negative controls: {kind} fails as it is, so its controls prove nothing")
            continue
        for path, key, value in MUTATIONS[kind]:
            bad = copy.deepcopy(obj)
            target = _get(bad, *path)
            if not isinstance(target, dict):
                report.fail(f"negative control {kind}: nothing at {'/'.join(map(str, path))} to break")
                continue
            target[key] = value
            _, errors = validators.validate(bad)
            spot = "/".join(map(str, path + (key,)))
            named = [e for e in errors if key in e]
            if named:
                report.ok(f"negative control: {kind} with {spot} rejected: {named[0]}")
            elif errors:
                report.fail(f"negative control: {kind} with {spot} rejected, but not for {key}", errors)
            else:
                report.fail(f"negative control: {kind} with {spot} was accepted")
    missing = sorted(set(MUTATIONS) - done)
    if missing:
        report.fail(f"negative controls: no object of kind {', '.join(missing)} was rendered")


def render_chart(out: Path, validators: Validators, kube_version: str, report: Report) -> list[dict]:
    print(f"helm SDK {helm.helm_sdk_version()} (helm-python-sdk {helm.__version__}), chart {CHART.relative_to(ROOT)}")
    rendered_all: list[dict] = []
    with helm.Chart.load(CHART) as chart:
        meta = chart.metadata
        print(f"chart {meta['name']} {meta['version']} (app {meta.get('appVersion')}), schema: "
              f"{'yes' if chart.schema else 'NO'}")
        if not chart.schema:
            report.fail("the chart has no values.schema.json")

        print("values.schema.json and the templates reject bad values:")
        for what, values, word in BAD_VALUES:
            try:
                chart.render(values, name=RELEASE, namespace=NAMESPACE)
            except (helm.HelmValuesError, helm.HelmRenderError) as e:
                msg = " ".join(str(e).split())
                if word in msg:
                    shown = msg[msg.find("- at"):] if "- at" in msg else msg[msg.rfind("): ") + 3:]
                    report.ok(f"{what} {values}: {type(e).__name__}: {shown[:110]}")
                else:
                    report.fail(f"{what} {values}: rejected, but the error does not name {word!r}", [msg])
            except helm.HelmError as e:
                report.fail(f"{what} {values}: failed with {type(e).__name__}, not a values error", [str(e)])
            else:
                report.fail(f"{what} {values}: rendered without complaint")

        for set_name, values in VALUE_SETS.items():
            print(f"value set {set_name}:")
            lint = helm.lint(CHART, values, strict=True, namespace=NAMESPACE, kube_version=f"v{kube_version}")
            serious = [m for m in lint.get("messages", []) if m.get("severity", 0) >= 2]
            if serious or lint.get("errors"):
                report.fail(f"{set_name}: helm lint --strict",
                            [f"{m.get('path')}: {m.get('error')}" for m in serious] + list(lint.get("errors", [])))
            else:
                report.ok(f"{set_name}: helm lint --strict (kube {kube_version})")
            try:
                manifests = chart.render(values, name=RELEASES.get(set_name, RELEASE), namespace=NAMESPACE,
                                         is_install=True)
            except helm.HelmError as e:
                report.fail(f"{set_name}: render failed: {type(e).__name__}", [str(e)])
                continue
            parts, objs = [], []
            for path in sorted(manifests):
                text = manifests[path]
                if path.endswith("NOTES.txt"):
                    if not text.strip():
                        report.fail(f"{set_name}: NOTES.txt rendered empty")
                    continue
                docs = load_documents(text)
                if docs:
                    parts.append(f"---\n# Source: {path}\n{text.strip()}\n")
                    objs.extend(docs)
            (out / f"{set_name}.yaml").write_text("".join(parts))
            kinds: dict[str, int] = {}
            for o in objs:
                kinds[o["kind"]] = kinds.get(o["kind"], 0) + 1
            if kinds != EXPECTED_KINDS[set_name]:
                report.fail(f"{set_name}: rendered {kinds}, expected {EXPECTED_KINDS[set_name]}")
            validate_objects(objs, validators, report, set_name)
            cross_checks(objs, report, set_name)
            for check in SET_CHECKS.get(set_name, []):
                problem = check(objs)
                if problem:
                    report.fail(f"{set_name}: {problem}")
            rendered_all.extend(objs)
    return rendered_all


def _deployment(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] == "Deployment")


def _sluice(objs: list[dict]) -> dict:
    return next(c for c in _get(_deployment(objs), "spec", "template", "spec", "containers") if c["name"] == "sluice")


def _remote_models_problem(objs: list[dict]) -> str | None:
    """The CPU tier's models folder is the ConfigMap of remote model.yaml files, each
    naming the model tier's headless Service in this namespace."""
    cm = next((x for x in objs if x["kind"] == "ConfigMap" and x["metadata"]["name"].endswith("-remote-models")), None)
    if cm is None:
        return "no remote-models ConfigMap"
    want = f"model-tier-sluice-headless.{NAMESPACE}.svc.cluster.local:8001"
    values = VALUE_SETS["cpu-tier"]["remoteModels"]
    if sorted(cm.get("data", {})) != sorted(f"{n}.yaml" for n in values):
        return f"the ConfigMap's keys {sorted(cm.get('data', {}))} are not the remoteModels {sorted(values)}"
    for name, entry in values.items():
        m = yaml.safe_load(cm["data"][f"{name}.yaml"])
        if m != {"backend": "remote", **entry}:
            return f"{name}.yaml renders {m}, not backend: remote plus its values {entry}"
        if _get(m, "remote", "dns") != want:
            return f"{name}.yaml: not a remote model of {want}"
    vols = {v["name"]: v for v in _get(_deployment(objs), "spec", "template", "spec", "volumes")}
    items = _get(vols.get("remote-models", {}), "configMap", "items") or []
    if sorted(i["path"] for i in items) != ["detector/model.yaml", "resnet50/model.yaml"]:
        return f"the remote models are not laid out as <name>/model.yaml: {items}"
    mounts = {m["name"]: m["mountPath"] for m in _sluice(objs)["volumeMounts"]}
    models_flag = next((a.split("=", 1)[1] for a in _sluice(objs)["args"] if a.startswith("--models=")), None)
    if mounts.get("remote-models") != models_flag:
        return f"remote models mounted at {mounts.get('remote-models')}, but --models={models_flag}"
    # Nothing mounted above it: a mount point inside another (read-only) volume may not
    # be creatable (kubernetes#121294).
    above = [n for n, p in mounts.items() if n != "remote-models" and models_flag.startswith(p.rstrip("/") + "/")]
    if above or "repository" in vols:
        return f"the remote models' mount sits below {above or 'a repository volume'}"
    return None


# What each value set must have changed in the Deployment (a message when it did not).
SET_CHECKS: dict[str, list[Callable[[list[dict]], str | None]]] = {
    "defaults": [
        lambda o: None if _get(_deployment(o), "spec", "template", "spec", "terminationGracePeriodSeconds") == 45
        else "grace period is not 10 + 30 + 5 = 45",
        lambda o: None if "lifecycle" not in _sluice(o) else "a preStop hook by default",
    ],
    "gpu-hpa-monitoring": [
        lambda o: None if str(_get(_sluice(o), "resources", "limits", "nvidia.com/gpu")) == "1" else "no GPU limit",
        lambda o: None if _get(_deployment(o), "spec", "template", "spec", "terminationGracePeriodSeconds") == 5 + 15 + 60 + 5
        else "grace period is not preStop 5 + 15 + 60 + 5",
        lambda o: None if "--load-nice=0" in _sluice(o)["args"] else "--load-nice=0 missing (0 must not read as unset)",
        lambda o: None if "--pool=decode=4" in _sluice(o)["args"] else "--pool=decode=4 missing",
    ],
    "init-models": [
        lambda o: None if _get(_deployment(o), "spec", "template", "spec", "initContainers", 0, "name") == "fetch-models"
        else "no init container",
        lambda o: None if _get(_deployment(o), "spec", "template", "metadata", "annotations", "checksum/pipelines")
        else "reload=none without the checksum annotation that rolls pods on a pipeline change",
        lambda o: None if "--model-alias=classifier=classify" in _sluice(o)["args"] else "alias missing",
        lambda o: None if _get(next(x for x in o if x["kind"] == "ConfigMap"), "data", "classify.yaml")
        == (ROOT / "pipelines" / "classify.yaml").read_text() else "ConfigMap's classify.yaml differs from the value",
    ],
    "model-tier": [
        lambda o: None if any(x["kind"] == "Service" and _get(x, "spec", "clusterIP") == "None"
                              and x["metadata"]["name"] == "model-tier-sluice-headless" for x in o)
        else "no headless Service model-tier-sluice-headless for the CPU tier to resolve",
    ],
    "cpu-tier": [lambda o: _remote_models_problem(o)],
    "existing-configmap": [
        lambda o: None if any(_get(v, "configMap", "name") == "sluice-pipelines-prod"
                              for v in _get(_deployment(o), "spec", "template", "spec", "volumes"))
        else "the existing ConfigMap is not mounted",
        lambda o: None if "--http-addr=[::]:8000" in _sluice(o)["args"] else "IPv6 bind address not bracketed",
        lambda o: None if _get(_deployment(o), "spec", "template", "spec", "serviceAccountName") == "default"
        else "serviceAccount.create=false should use the default account",
    ],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="folder for <set>.yaml and kserve.yaml")
    ap.add_argument("--check", type=Path, nargs="+", metavar="FILE",
                    help="only validate these manifests (multi-document YAML)")
    ap.add_argument("--kube-version", default=kv_utils.latest_version(),
                    help="Kubernetes version of the schemas (default: the newest kubernetes-validate ships, %(default)s)")
    opts = ap.parse_args()
    if not opts.out and not opts.check:
        ap.error("give --out DIR (render and validate) or --check FILE... (validate only)")
    kube_version = opts.kube_version.lstrip("v")
    if kube_version.count(".") == 1:
        kube_version += ".0"
    validators = Validators(kube_version)
    report = Report()

    if opts.check:
        for path in opts.check:
            print(f"{path}:")
            try:
                objs = load_documents(path.read_text())
            except (OSError, yaml.YAMLError) as e:
                report.fail(f"{path}: unreadable", [str(e)])
                continue
            validate_objects(objs, validators, report, path.name)
            cross_checks(objs, report, path.name)
    else:
        out: Path = opts.out
        out.mkdir(parents=True, exist_ok=True)
        objs = render_chart(out, validators, kube_version, report)
        print("KServe manifests:")
        kserve_objs, parts = [], []
        for path in KSERVE_FILES:
            text = path.read_text()
            docs = load_documents(text)
            kserve_objs.extend(docs)
            parts.append(f"---\n# Source: {path.relative_to(ROOT)}\n{text.strip()}\n")
        validate_objects(kserve_objs, validators, report, "kserve")
        cross_checks(kserve_objs, report, "kserve")
        (out / "kserve.yaml").write_text("".join(parts))
        print("negative controls (each validator must reject a misspelled field):")
        negative_controls(objs + kserve_objs, validators, report)
        print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.yaml')))} to {out}")

    if report.failures:
        print(f"FAILED: {report.failures} check(s) failed")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
