"""deploy/k8s/: each overlay, rendered by kustomize, validates offline and says what it means.

Kubernetes objects are validated strictly (unknown fields rejected) against the schemas that
``kubernetes-validate`` ships, for the oldest and the newest Kubernetes version we claim; the
custom resources (KEDA, Prometheus Operator) against the schemas in ``k8s_crd_schemas/``,
written from their CRD documentation for the fields we use. Then the checks no schema makes:
probes on the declared port, resources, no secret in a manifest, the PodDisruptionBudget's
pods, KEDA's cap at the partition count, the scrape jobs, and settings that
``streams.settings`` accepts. kustomize comes from ``deploy/k8s/tools.sh`` (``.ci/run``).
"""

from __future__ import annotations

import copy
import functools
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from engine.campaigns import load_campaigns
from engine.model.signing import signing_key_pem, verify_key_pem
from streams.settings import (
    LearnerSettings,
    Settings,
    model_verify_key_from_env,
    require_signing_key,
)

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
OVERLAYS = ("dev", "production")
KUBERNETES_VERSIONS = ("1.30", "1.37")
"""The oldest Kubernetes we support and the newest whose schemas kubernetes-validate ships."""
CRD_SCHEMAS = Path(__file__).parent / "k8s_crd_schemas"
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda-v1alpha1.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "triggerauthentication-keda-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring-v1.json",
}
SECRET_SETTINGS = {
    "DEALSTREAM_PSEUDONYM_KEY",
    "DEALSTREAM_REDIS_PASSWORD",
    "DEALSTREAM_KAFKA_SASL_PASSWORD",
    "DEALSTREAM_KAFKA_SSL_KEY_PASSWORD",
    "DEALSTREAM_REDIS_SSL_KEY_PASSWORD",
    "DEALSTREAM_HTTP_TOKEN",
    "DEALSTREAM_LOG_SALT",
    "DEALSTREAM_MODEL_SIGNING_KEY",
}
"""Settings that must come from a Secret, never from a manifest or a ConfigMap."""
KEDA_SASL = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
"""KEDA's name of each DEALSTREAM_KAFKA_SASL_MECHANISM."""
PORT_SETTING = {"worker": "DEALSTREAM_HTTP_PORT", "learner": "DEALSTREAM_LEARNER_HTTP_PORT"}

Doc = dict[str, Any]


def kustomize() -> str:
    """The kustomize that deploy/k8s/tools.sh installs beside this Python, else one on PATH."""
    beside = Path(sys.executable).parent / "kustomize"
    found = str(beside) if beside.exists() else shutil.which("kustomize")
    if found is None:
        pytest.fail("kustomize is missing: run `bash deploy/k8s/tools.sh` (.ci/run does)")
    return found


@functools.cache
def _rendered(overlay: str) -> str:
    result = subprocess.run(
        [kustomize(), "build", str(K8S / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(overlay: str) -> list[Doc]:
    """The overlay's objects (a fresh copy each call, so tests may change them)."""
    return [doc for doc in yaml.safe_load_all(_rendered(overlay)) if doc]


def validate(doc: Doc, version: str) -> None:
    """Raise ``jsonschema.ValidationError`` (or SchemaNotFoundError) when ``doc`` is invalid."""
    crd = CRDS.get((doc["apiVersion"], doc["kind"]))
    if crd is not None:
        schema = json.loads((CRD_SCHEMAS / crd).read_text())
        jsonschema.Draft202012Validator(schema).validate(doc)
    else:
        kubernetes_validate.validate(doc, version, strict=True)


def of_kind(docs: list[Doc], kind: str) -> list[Doc]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Doc], kind: str, name: str) -> Doc:
    (found,) = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    return found


def config(docs: list[Doc]) -> dict[str, str]:
    """The data of the generated ConfigMap ``dealstream-config-<hash>``."""
    (found,) = [
        doc
        for doc in of_kind(docs, "ConfigMap")
        if doc["metadata"]["name"].startswith("dealstream-config-")
    ]
    return dict(found.get("data", {}))


def workloads(docs: list[Doc]) -> Iterator[tuple[Doc, Doc]]:
    """(object, pod spec) of each Deployment and Job."""
    for doc in docs:
        if doc["kind"] in ("Deployment", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def component(doc: Doc) -> str:
    return str(doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"])


def cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def memory(quantity: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert match, f"unexpected memory quantity {quantity!r}"
    return int(match.group(1)) * units.get(match.group(2) or "", 1)


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    wanted = selector.get("matchLabels", {})
    assert "matchExpressions" not in selector, "only matchLabels is checked here"
    return all(labels.get(key) == value for key, value in wanted.items())


# -- schemas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_the_schemas(overlay: str, version: str) -> None:
    docs = render(overlay)
    assert {"Deployment", "Service", "PodDisruptionBudget", "ConfigMap"} <= {
        d["kind"] for d in docs
    }
    for doc in docs:
        validate(doc, version)  # a kind without a schema raises SchemaNotFoundError: a failure


def test_production_has_the_custom_resources() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in render("production")}
    assert set(CRDS) <= kinds


def _broken(docs: list[Doc]) -> Iterator[tuple[str, Doc]]:
    worker = named(docs, "Deployment", "dealstream-worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    bad = copy.deepcopy(worker)
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "6066"
    yield "a port as a string", bad
    bad = copy.deepcopy(worker)
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbes"] = container["livenessProbe"]
    yield "an unknown container field", bad
    bad = copy.deepcopy(named(docs, "PodDisruptionBudget", "dealstream-worker"))
    bad["spec"]["maxUnavailabel"] = 1
    yield "a misspelt PDB field", bad
    scaled = named(docs, "ScaledObject", "dealstream-worker")
    bad = copy.deepcopy(scaled)
    bad["spec"]["maxReplicaCount"] = "12"
    yield "maxReplicaCount as a string", bad
    bad = copy.deepcopy(scaled)
    bad["spec"]["triggers"][0]["metadata"]["lagTreshold"] = "10"
    yield "a misspelt Kafka trigger parameter", bad
    bad = copy.deepcopy(scaled)
    bad["spec"]["triggers"][0]["metadata"]["lagThreshold"] = 10
    yield "trigger metadata that is not a string", bad
    bad = copy.deepcopy(named(docs, "ServiceMonitor", "dealstream-worker"))
    bad["spec"]["endpoints"][0]["interval"] = "5 seconds"
    yield "a scrape interval that is no duration", bad
    bad = copy.deepcopy(named(docs, "TriggerAuthentication", "dealstream-kafka"))
    bad["spec"]["secretTargetRef"][0].pop("key")
    yield "a secret reference without its key", bad


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_same_validator_rejects_broken_copies(version: str) -> None:
    docs = render("production")
    cases = list(_broken(docs))
    assert len(cases) == 8
    for what, doc in cases:
        with pytest.raises(jsonschema.ValidationError):
            validate(doc, version)
            pytest.fail(f"{what} was accepted")


def test_an_unknown_kind_is_an_error_not_a_pass() -> None:
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {}}, "1.37")


# -- what the schemas cannot say ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_probe_health_and_ready_on_the_declared_port(overlay: str) -> None:
    docs = render(overlay)
    settings = config(docs)
    assert settings["DEALSTREAM_HTTP_BIND"] == "0.0.0.0"  # probes come from the kubelet
    deployments = of_kind(docs, "Deployment")
    assert {component(d) for d in deployments} == {"worker", "learner"}
    for deployment in deployments:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports == {"http": int(settings[PORT_SETTING[component(deployment)]])}
        for probe, path in (
            ("startupProbe", "/health"),
            ("livenessProbe", "/health"),
            ("readinessProbe", "/ready"),
        ):
            assert container[probe]["httpGet"] == {"path": path, "port": "http"}, probe


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_has_requests_and_limits(overlay: str) -> None:
    for doc, pod in workloads(render(overlay)):
        for container in pod["containers"]:
            resources = container["resources"]
            where = f"{doc['metadata']['name']}/{container['name']}"
            for kind, parse in (("cpu", cpu), ("memory", memory)):
                request = resources["requests"][kind]
                limit = resources["limits"][kind]
                assert parse(request) <= parse(limit), f"{where}: {kind} {request} > {limit}"


def test_production_sizes_are_the_documented_ones() -> None:
    docs = render("production")
    worker = named(docs, "Deployment", "dealstream-worker")["spec"]["template"]["spec"]
    learner = named(docs, "Deployment", "dealstream-learner")["spec"]["template"]["spec"]
    assert worker["containers"][0]["resources"]["requests"] == {"cpu": "1", "memory": "640Mi"}
    assert learner["containers"][0]["resources"]["requests"] == {"cpu": "250m", "memory": "384Mi"}
    # The worker's memory figure assumes the default cache of 200,000 users.
    assert config(docs)["DEALSTREAM_STATE_CACHE_USERS"] == "200000"
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    for figure in ("640Mi", "896Mi", "384Mi", "768Mi"):
        assert figure in doc, f"docs/kubernetes.md does not explain {figure}"


def _secret_refs(pod: Doc) -> Iterator[tuple[str, str]]:
    """(Secret, key) of every env reference and secret volume item of a pod."""
    for container in pod["containers"]:
        for var in container.get("env", []):
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                yield ref["name"], ref["key"]
        for source in container.get("envFrom", []):
            assert "secretRef" not in source, "a whole Secret as variables hides what is used"
    for volume in pod.get("volumes", []):
        if "secret" in volume:
            for item in volume["secret"]["items"]:
                yield volume["secret"]["secretName"], item["key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_value_in_the_manifests(overlay: str) -> None:
    docs = render(overlay)
    text = _rendered(overlay)
    assert not of_kind(docs, "Secret"), "Secrets are made by the operator (docs/kubernetes.md)"
    assert "PRIVATE KEY" not in text and "BEGIN " not in text
    settings = config(docs)
    assert not SECRET_SETTINGS & set(settings), "a secret setting in the ConfigMap"
    assert urlsplit(settings["DEALSTREAM_REDIS_URL"]).password is None
    for _, pod in workloads(docs):
        for container in pod["containers"]:
            for var in container.get("env", []):
                if var["name"] in SECRET_SETTINGS:
                    assert "secretKeyRef" in var.get("valueFrom", {}), var["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_learner_holds_the_signing_key(overlay: str) -> None:
    docs = render(overlay)
    learner_refs = set(
        _secret_refs(named(docs, "Deployment", "dealstream-learner")["spec"]["template"]["spec"])
    )
    assert ("dealstream-learner", "model-signing.pem") in learner_refs
    for doc, pod in workloads(docs):
        if doc["metadata"]["name"] != "dealstream-learner":
            assert not {name for name, _ in _secret_refs(pod)} & {"dealstream-learner"}


def test_every_secret_the_manifests_use_is_documented() -> None:
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    refs = set()
    for overlay in OVERLAYS:
        docs = render(overlay)
        for _, pod in workloads(docs):
            refs |= set(_secret_refs(pod))
        for auth in of_kind(docs, "TriggerAuthentication"):
            refs |= {(r["name"], r["key"]) for r in auth["spec"].get("secretTargetRef", [])}
    assert refs
    for name, key in sorted(refs):
        assert f"`{name}`" in doc and f"`{key}`" in doc, f"{name}/{key} not in docs/kubernetes.md"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pdb_selects_the_worker_pods_only(overlay: str) -> None:
    docs = render(overlay)
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    for doc, _ in workloads(docs):
        labels = doc["spec"]["template"]["metadata"]["labels"]
        expected = doc["metadata"]["name"] == "dealstream-worker"
        assert selects(pdb["spec"]["selector"], labels) == expected, doc["metadata"]["name"]
    assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_learner_is_one_replica_recreated(overlay: str) -> None:
    learner = named(render(overlay), "Deployment", "dealstream-learner")
    assert learner["spec"]["replicas"] == 1
    assert learner["spec"]["strategy"] == {"type": "Recreate"}


def test_keda_scales_workers_within_the_partition_count() -> None:
    docs = render("production")
    settings = config(docs)
    (scaled,) = of_kind(docs, "ScaledObject")
    spec = scaled["spec"]
    partitions = int(settings["DEALSTREAM_PARTITIONS"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] <= partitions
    target = named(docs, "Deployment", spec["scaleTargetRef"]["name"])
    assert component(target) == "worker"
    assert "replicas" not in target["spec"], "an applied replica count fights the autoscaler"
    (trigger,) = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert meta["bootstrapServers"] == settings["DEALSTREAM_KAFKA_BOOTSTRAP"]
    assert meta["consumerGroup"] == settings.get("DEALSTREAM_GROUP_ID", "dealstream")
    assert meta["allowIdleConsumers"] == "false"
    assert "topic" not in meta, "the lag of all three event topics is the backlog"
    protocol = settings.get("DEALSTREAM_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    assert (meta.get("tls") == "enable") == (protocol in ("SSL", "SASL_SSL"))
    mechanism = settings.get("DEALSTREAM_KAFKA_SASL_MECHANISM")
    assert meta.get("sasl") == (KEDA_SASL[mechanism] if mechanism else None)
    auth = named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    worker_refs = set(_secret_refs(target["spec"]["template"]["spec"]))
    by_parameter = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert by_parameter["password"] in worker_refs  # the worker's own Kafka password
    (username,) = auth["spec"]["env"]
    worker_env = {v["name"]: v for v in target["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert username["name"] in worker_env and username["containerName"] == "worker"


def test_dev_runs_without_an_autoscaler() -> None:
    docs = render("dev")
    assert not of_kind(docs, "ScaledObject")
    assert named(docs, "Deployment", "dealstream-worker")["spec"]["replicas"] == 1


def test_service_monitors_scrape_the_prometheus_jobs() -> None:
    docs = render("production")
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in prometheus["scrape_configs"]}
    services = of_kind(docs, "Service")
    scraped = set()
    for monitor in of_kind(docs, "ServiceMonitor"):
        (service,) = [
            s for s in services if selects(monitor["spec"]["selector"], s["metadata"]["labels"])
        ]
        # Without jobLabel the job is the Service's name, which the alert rules select on.
        assert "jobLabel" not in monitor["spec"]
        port_names = {p["name"] for p in service["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"
        scraped.add(service["metadata"]["name"])
    assert scraped == jobs


# -- the settings the pods would start with ------------------------------------------------------


OPTIONAL_WHEN = {
    "DEALSTREAM_KAFKA_SASL_PASSWORD": lambda env: env.get(
        "DEALSTREAM_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"
    ).startswith("SASL_"),
    "DEALSTREAM_REDIS_PASSWORD": lambda env: "DEALSTREAM_REDIS_USERNAME" in env,
}
"""When an optional Secret key is in the Secret (docs/kubernetes.md): a Kafka password only
with SASL (the settings refuse one without), a Redis password with an ACL user."""


def _placeholder(name: str, key: str) -> str:
    if key == "pseudonym-key":
        return "0123456789abcdef0123456789abcdef"
    return f"placeholder-{name}-{key}-0123456789"


def _environment(doc: Doc, pod: Doc, container: Doc, docs: list[Doc], root: Path) -> dict[str, str]:
    """The container's DEALSTREAM_* environment, Secrets replaced by placeholders and mounted
    files written under ``root`` (with generated model keys)."""
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in of_kind(docs, "ConfigMap")}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    for var in container.get("env", []):
        ref = var.get("valueFrom", {}).get("secretKeyRef")
        needed = OPTIONAL_WHEN.get(var["name"], lambda _: True)
        if ref and (not ref.get("optional") or needed(env)):
            env[var["name"]] = _placeholder(ref["name"], ref["key"])
    key = Ed25519PrivateKey.generate()
    pems = {
        "model-signing.pem": signing_key_pem(key).decode(),
        "model-verify.pem": verify_key_pem(key.public_key()).decode(),
    }
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}
    for name, value in list(env.items()):
        if not value.startswith("/"):
            continue
        path = Path(value)
        volume = mounts.get(str(path.parent))
        assert volume is not None, f"{doc['metadata']['name']}: {name}={value} is not mounted"
        if "configMap" in volume:
            content = maps[volume["configMap"]["name"]][path.name]
        else:
            items = {i["path"]: i["key"] for i in volume["secret"]["items"]}
            assert path.name in items, f"{name}={value}: no such item in the Secret volume"
            content = pems.get(items[path.name], "placeholder\n")
        local = root / path.relative_to("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(content)
        env[name] = str(local)
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pods_settings_are_accepted(overlay: str, tmp_path: Path) -> None:
    docs = render(overlay)
    for doc, pod in workloads(docs):
        for container in pod["containers"]:
            env = _environment(doc, pod, container, docs, tmp_path / doc["metadata"]["name"])
            settings = Settings.from_env(env)
            command = container["args"][0]
            if command == "worker":
                assert settings.pseudonym_key is not None and not settings.raw_user_ids
                assert model_verify_key_from_env(env) is not None
                assert settings.campaigns_path is not None
                assert load_campaigns(settings.campaigns_path)
            elif command == "learner":
                assert require_signing_key(env)
                assert LearnerSettings.from_env(env).http_port == int(
                    env["DEALSTREAM_LEARNER_HTTP_PORT"]
                )
            if settings.kafka_security.uses_sasl:
                assert settings.kafka_security.username == f"dealstream-{command}"
                assert settings.redis_security.username == f"dealstream-{command}"


def test_dev_campaigns_are_the_demo_campaigns() -> None:
    dev = (K8S / "overlays" / "dev" / "campaigns.toml").read_text()
    assert dev == (REPO / "deploy" / "campaigns" / "demo.toml").read_text()


def test_the_docs_say_how_to_apply_each_overlay() -> None:
    doc = (REPO / "docs" / "kubernetes.md").read_text()
    for overlay in OVERLAYS:
        assert f"kubectl apply -k deploy/k8s/overlays/{overlay}" in doc
