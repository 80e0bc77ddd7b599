"""What a cluster run retries, decided once: Argo's retry rule for every template (manifests/kfp's
workflow-defaults patch, rendered on the pinned KFP release), the trainers' own limit from the compiled
pipeline, and the mark a step leaves in its termination message when its accelerator failed.
"""

from __future__ import annotations

import re

import pytest
import yaml

from bloodcell import config, errors, steps
from conftest import render_offline_kfp


def rendered_retry_strategy(tmp_path) -> dict:
    controller = render_offline_kfp(tmp_path)[("ConfigMap", "workflow-controller-configmap")]
    return yaml.safe_load(controller["data"]["workflowDefaults"])["spec"]["templateDefaults"]["retryStrategy"]


def retries(expression: str, status: str, message: str) -> bool:
    """Argo's retry expression (expr-lang: ||, ==, matches, contains) evaluated for one failed attempt."""
    python = expression.replace("||", " or ").replace("&&", " and ")
    python = re.sub(r"lastRetry\.message matches '([^']*)'", r"bool(re.search(r'\1', message))", python)
    python = re.sub(r"lastRetry\.message contains '([^']*)'", r"('\1' in message)", python)
    python = python.replace("lastRetry.status", "status")
    assert "lastRetry" not in python, f"untranslated: {python}"
    return bool(eval(python, {"re": re}, {"status": status, "message": message}))


# (Argo's phase of the failed attempt, its message as Argo builds it from the pod) -> retried?
DECISIONS = [
    ("Error", "pod deleted", True),  # the node was lost or the pod removed
    ("Failed", "Pod was terminated in response to imminent node shutdown.", True),  # a spot GPU node
    ("Failed", "The node was low on resource: memory. Threshold quantity: 100Mi, available: 50Mi.", True),
    ("Failed", "main: Error (exit code 1): " + errors.RETRYABLE_FAILURE + ": InternalError: CUDA error", True),
    ("Failed", "main: OOMKilled (exit code 137)", False),  # the same request fails again
    ("Failed", "main: Error (exit code 1)", False),  # the step's own error: bad data or a bug
]


@pytest.mark.parametrize(("status", "message", "retried"), DECISIONS)
def test_the_cluster_retries_infrastructure_and_device_failures_only(tmp_path, status, message, retried):
    strategy = rendered_retry_strategy(tmp_path)
    # Every template gets this rule; a trainer's own retryStrategy (kfp's set_retry) brings only its limit
    # and backoff, so the rule applies to it too (Argo merges templateDefaults under each template).
    assert strategy["retryPolicy"] == "Always" and strategy["limit"] == "2"
    assert retries(strategy["expression"], status, message) is retried


def test_only_a_failed_accelerator_is_marked_retryable(tmp_path):
    tf = pytest.importorskip("tensorflow")
    log = tmp_path / "termination-log"
    log.touch()
    for exc, marked in [
        (tf.errors.InternalError(None, None, "CUDA error: an illegal memory access was encountered"), True),
        (tf.errors.UnknownError(None, None, "Fail to find the dnn implementation (cuDNN)."), True),
        (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor on GPU:0"), False),
        (ValueError("a bug"), False),
        (errors.DataError("no images"), False),
    ]:
        log.write_text("")
        with pytest.raises(type(exc)), errors.retryable_on_device_failure(log):
            raise exc
        assert log.read_text().startswith(errors.RETRYABLE_FAILURE) is marked, exc
    # Outside a Kubernetes container there is no termination log, and none is created.
    missing = tmp_path / "absent"
    with pytest.raises(tf.errors.InternalError), errors.retryable_on_device_failure(missing):
        raise tf.errors.InternalError(None, None, "CUDA error")
    assert not missing.exists()


def test_every_step_marks_a_failed_accelerator(tmp_path, monkeypatch):
    tf = pytest.importorskip("tensorflow")
    log = tmp_path / "termination-log"
    log.touch()
    monkeypatch.setattr(errors, "TERMINATION_LOG", log)

    @steps.user_errors
    def train() -> dict:
        raise tf.errors.InternalError(None, None, "CUDA error: unspecified launch failure")

    with pytest.raises(tf.errors.InternalError):
        train()
    assert log.read_text() == f"{errors.RETRYABLE_FAILURE}: InternalError: CUDA error: unspecified launch failure"


def test_trainers_retry_as_often_as_config_says(tmp_path):
    from test_pipeline_compile import TRAINERS, compile_pipeline

    spec, _ = compile_pipeline(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    limits = {name: task.get("retryPolicy", {}).get("maxRetryCount") for name, task in tasks.items()}
    assert {name for name, limit in limits.items() if limit == config.ClusterSettings().trainer_retries} == TRAINERS
    assert all(limit is None for name, limit in limits.items() if name not in TRAINERS)  # the cluster's default
