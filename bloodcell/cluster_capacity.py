"""Whether bloodcell fits on a cluster's nodes, read through ``kubectl``: before KFP is installed (``make
cluster-up``: a Docker VM too small for a trainer would leave the trainer pods Pending without a word) and
before a run is submitted (``make submit``: a task that no node can ever take stops the submission; one
that must wait for a busy cluster is a warning).

Requests are compared, as the scheduler compares them: a node's allocatable memory and CPU minus what the
pods on it request. The trainers' and data steps' requests are :class:`bloodcell.config.ClusterSettings`'
(the ``BLOODCELL_*`` variables ``make submit`` passes), MLflow's stack is read from the rendered overlay.

    python -m bloodcell.cluster_capacity {cluster-up,submit} OVERLAY_DIR   (env KUBECTL, default kubectl)
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess  # nosec B404: kubectl, with arguments of our own
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import yaml

from bloodcell import config, errors

GIB = 2**30
_SUFFIXES = {
    **{s: 1000**i for i, s in enumerate(["", "k", "M", "G", "T", "P"])},
    **{s: 1024**i for i, s in enumerate(["", "Ki", "Mi", "Gi", "Ti", "Pi"]) if s},
    "m": 1e-3,
}
# Summed requests of the Deployments of KFP 2.17.0 standalone (manifests/kfp; the sum of
# tests/fixtures/kfp-2.17.0-platform-agnostic.yaml, checked by a test).
KFP_REQUESTS_CPU = 0.704
KFP_REQUESTS_MEMORY = 3_328_180_224
# The three trainers run at once when they fit; the data steps run alone.
PARALLEL_TRAINERS = 3
# Pods of pipeline runs (KFP labels every task pod of a v2 run so): what a busy cluster is busy with.
PIPELINE_POD_LABEL = "pipelines.kubeflow.org/v2_component"
# Where KFP and our stack run: a namespace with pods means that part is installed (its requests counted).
KFP_NAMESPACE = "kubeflow"
STACK_NAMESPACE = "bloodcell"


def quantity(text: str | int | float) -> float:
    """A Kubernetes quantity (``500m``, ``6Gi``, ``1.5``) as a number (cores, bytes)."""
    text = str(text)
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if suffix and text.endswith(suffix):
            return float(text[: -len(suffix)]) * _SUFFIXES[suffix]
    return float(text)


@dataclass(frozen=True)
class Resources:
    cpu: float = 0.0  # cores
    memory: float = 0.0  # bytes

    @classmethod
    def of(cls, values: dict | None) -> Resources:
        values = values or {}
        return cls(quantity(values.get("cpu", 0)), quantity(values.get("memory", 0)))

    def __add__(self, other: Resources) -> Resources:
        return Resources(self.cpu + other.cpu, self.memory + other.memory)

    def __sub__(self, other: Resources) -> Resources:
        return Resources(self.cpu - other.cpu, self.memory - other.memory)

    def times(self, n: int) -> Resources:
        return Resources(self.cpu * n, self.memory * n)

    def holds(self, other: Resources) -> bool:
        return self.cpu >= other.cpu - 1e-9 and self.memory >= other.memory - 1

    def how_many(self, one: Resources) -> int:
        counts = [int(have // need + 1e-9) for have, need in ((self.cpu, one.cpu), (self.memory, one.memory)) if need]
        return max(0, min(counts)) if counts else PARALLEL_TRAINERS

    def __str__(self) -> str:
        return f"{self.memory / GIB:.1f} GiB and {self.cpu:.2f} CPUs"


KFP_REQUESTS = Resources(KFP_REQUESTS_CPU, KFP_REQUESTS_MEMORY)


def pod_spec_requests(spec: dict) -> Resources:
    """What the scheduler reserves for a pod: its containers' requests, or its largest init container's."""
    containers = sum(
        (Resources.of(c.get("resources", {}).get("requests")) for c in spec.get("containers", [])), Resources()
    )
    inits = [Resources.of(c.get("resources", {}).get("requests")) for c in spec.get("initContainers", [])]
    return Resources(
        max([containers.cpu, *(i.cpu for i in inits)]), max([containers.memory, *(i.memory for i in inits)])
    )


def workload_requests(docs: Iterable[dict]) -> Resources:
    """The summed requests of the Deployments and StatefulSets among rendered manifests."""
    total = Resources()
    for doc in docs:
        if doc and doc.get("kind") in ("Deployment", "StatefulSet"):
            total += pod_spec_requests(doc["spec"]["template"]["spec"]).times(doc["spec"].get("replicas", 1))
    return total


@dataclass(frozen=True)
class Node:
    name: str
    allocatable: Resources
    requested: Resources  # by the pods running on it now
    requested_by_runs: Resources  # the part of it held by pipeline runs' pods

    @property
    def free(self) -> Resources:
        return self.allocatable - self.requested


@dataclass(frozen=True)
class Cluster:
    nodes: list[Node]
    namespaces_with_pods: set[str]


class Kubectl:
    """``kubectl`` as $KUBECTL names it (it may carry flags, e.g. ``--context``)."""

    def __init__(self, command: str | None = None) -> None:
        self.command = shlex.split(command or os.environ.get("KUBECTL") or "kubectl")

    def json(self, *args: str) -> dict:
        return json.loads(self._run(*args, "-o", "json"))

    def kustomize(self, directory: str) -> list[dict]:
        return [doc for doc in yaml.safe_load_all(self._run("kustomize", directory)) if doc]

    def _run(self, *args: str) -> str:
        try:
            done = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=120, check=False)  # nosec B603
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise errors.BloodcellError(f"cannot run {shlex.join(self.command)}: {exc}") from None
        if done.returncode != 0:
            raise errors.BloodcellError(
                f"{shlex.join([*self.command, *args])} failed: {done.stderr.strip() or done.returncode}; "
                "is the cluster up and kubectl's context set to it (make cluster-create)?"
            )
        return done.stdout


def read_cluster(kubectl: Kubectl) -> Cluster:
    nodes = kubectl.json("get", "nodes")["items"]
    pods = [
        pod
        for pod in kubectl.json("get", "pods", "--all-namespaces")["items"]
        if pod.get("status", {}).get("phase") not in ("Succeeded", "Failed")
    ]
    result = []
    for node in nodes:
        spec = node.get("spec", {})
        if spec.get("unschedulable") or any(
            t.get("effect") in ("NoSchedule", "NoExecute") for t in spec.get("taints", [])
        ):
            continue
        name = node["metadata"]["name"]
        here = [p for p in pods if p.get("spec", {}).get("nodeName") == name]
        runs = [p for p in here if p["metadata"].get("labels", {}).get(PIPELINE_POD_LABEL) == "true"]
        result.append(
            Node(
                name,
                Resources.of(node.get("status", {}).get("allocatable")),
                sum((pod_spec_requests(p["spec"]) for p in here), Resources()),
                sum((pod_spec_requests(p["spec"]) for p in runs), Resources()),
            )
        )
    return Cluster(result, {p["metadata"]["namespace"] for p in pods})


def task_requests(settings: config.ClusterSettings) -> tuple[Resources, Resources]:
    """(a trainer's, a data step's) requests as ``pipeline.py`` compiles them."""
    return (
        Resources.of({"cpu": settings.trainer_cpu, "memory": settings.trainer_memory}),
        Resources.of({"cpu": settings.data_cpu, "memory": settings.data_memory}),
    )


SMALLER_TRAINERS = (
    "or ask less for the steps: make submit SUBMIT_ENV='BLOODCELL_TRAINER_MEMORY=... BLOODCELL_TRAINER_CPU=...' "
    "(the laptop profile's largest trainer peaked at 1.7 GB, docs/performance.md)"
)


def check_before_install(cluster: Cluster, stack: Resources, settings: config.ClusterSettings) -> list[str]:
    """Lines to print once the cluster exists and before KFP and our stack are installed; raises when the
    largest node cannot also hold a trainer."""
    if not cluster.nodes:
        raise errors.BloodcellError("the cluster has no node that takes pods (all are cordoned or tainted)")
    trainer, data_step = task_requests(settings)
    parts_to_install = [
        ("KFP", KFP_NAMESPACE, KFP_REQUESTS),
        ("MLflow's stack and the scoring server", STACK_NAMESPACE, stack),
    ]
    to_come = [
        (what, need) for what, namespace, need in parts_to_install if namespace not in cluster.namespaces_with_pods
    ]
    node = max(cluster.nodes, key=lambda n: (n.free.memory, n.free.cpu))
    left = node.free - sum((need for _, need in to_come), Resources())
    parts = [f"{what} {need}" for what, need in to_come]
    summary = (
        f"node {node.name}: {node.allocatable} allocatable, {node.requested} requested by its pods now"
        + (f"; still to come: {', '.join(parts)}" if parts else "")
        + f"; left for the pipeline's steps: {_clamped(left)}"
    )
    largest = max(trainer, data_step, key=lambda r: (r.memory, r.cpu))
    if not left.holds(trainer) or not left.holds(data_step):
        short = largest - left
        raise errors.BloodcellError(
            f"{summary}. A trainer requests {trainer} and a data step {data_step}: they would stay Pending. "
            f"Give the cluster {max(short.memory, 0) / GIB:.1f} GiB of memory and {max(short.cpu, 0):.1f} CPUs "
            "more (Docker Desktop: Settings > Resources; minikube: MINIKUBE_FLAGS='... --memory ... --cpus ...'), "
            + SMALLER_TRAINERS
        )
    lines = [f"capacity: {summary}: enough for a trainer ({trainer})"]
    at_once = left.how_many(trainer)
    if at_once < PARALLEL_TRAINERS:
        lines.append(
            f"note: {at_once} of the {PARALLEL_TRAINERS} trainers fit at once: they will take turns "
            f"(all at once need {trainer.times(PARALLEL_TRAINERS)})"
        )
    return lines


def check_before_submit(cluster: Cluster, settings: config.ClusterSettings) -> list[str]:
    """Lines to print before a run is submitted; raises when no node could ever take a task."""
    trainer, data_step = task_requests(settings)
    if settings.gpu_resource:  # GPU nodes come from an autoscaled pool: absent until a trainer asks
        return [f"capacity: trainers request a GPU ({settings.gpu_resource}): left to the cluster's autoscaler"]
    lines = []
    for what, need in (("trainer", trainer), ("data step", data_step)):
        ever = [n for n in cluster.nodes if (n.allocatable - n.requested + n.requested_by_runs).holds(need)]
        if not ever:
            largest = max(cluster.nodes, key=lambda n: n.allocatable.memory, default=None)
            where = (
                f"the largest node, {largest.name}, has {largest.allocatable} allocatable"
                if largest
                else "no node takes pods"
            )
            raise errors.BloodcellError(
                f"no node can ever schedule a {what}, which requests {need} ({where}, and KFP and MLflow "
                "hold part of it): the run would wait forever. Give the cluster more memory or CPUs, "
                + SMALLER_TRAINERS
            )
        if not any(n.free.holds(need) for n in cluster.nodes):
            busy = sum((n.requested_by_runs for n in cluster.nodes), Resources())
            lines.append(
                f"warning: no node has {need} free now for a {what} (other runs' pods request {busy}): "
                "the run's pods wait (Pending) until those finish"
            )
    return lines or [f"capacity: a trainer ({trainer}) and a data step ({data_step}) fit now"]


def _clamped(resources: Resources) -> Resources:
    return Resources(max(resources.cpu, 0.0), max(resources.memory, 0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloodcell.cluster_capacity", description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["cluster-up", "submit"])
    parser.add_argument("overlay", help="the kustomization deployed (manifests/overlays/local)")
    args = parser.parse_args(argv)
    kubectl = Kubectl()
    settings = config.ClusterSettings.from_env()
    with errors.exits_on_user_error():
        cluster = read_cluster(kubectl)
        if args.stage == "cluster-up":
            lines = check_before_install(cluster, workload_requests(kubectl.kustomize(args.overlay)), settings)
        else:
            lines = check_before_submit(cluster, settings)
    for line in lines:
        print(line, file=sys.stderr if line.startswith("warning") else sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
