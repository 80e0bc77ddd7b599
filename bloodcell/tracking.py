"""MLflow tracking: one experiment, one parent run per pipeline run, one nested run per model.

Runs are found by tags, so a restarted step reuses its run instead of creating a second one.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from bloodcell import storage

PIPELINE_RUN_TAG = "bloodcell.pipeline_run_id"
ROLE_TAG = "bloodcell.role"
MODEL_TAG = "bloodcell.model"


def experiment_id(name: str) -> str:
    return mlflow.set_experiment(name).experiment_id


def parent_run(experiment: str, pipeline_run_id: str, run_uri: str, tags: dict[str, str] | None = None) -> str:
    """The id of the parent run of ``pipeline_run_id``, created by whichever step asks first.

    Steps running in parallel each create a candidate run; an atomic create-if-absent of
    ``<run_uri>/mlflow_parent_run_id`` in the bucket picks one, and the others delete theirs.
    """
    claim = storage.join(run_uri, "mlflow_parent_run_id")
    if storage.exists(claim):
        return storage.read_bytes(claim).decode()
    run_id = MlflowClient().create_run(
        experiment_id(experiment), run_name=f"pipeline-{pipeline_run_id}",
        tags={PIPELINE_RUN_TAG: pipeline_run_id, ROLE_TAG: "pipeline", "code_version": code_version(),
              **(tags or {})},
    ).info.run_id
    if storage.create_if_absent(run_id, claim):
        return run_id
    winner = storage.read_bytes(claim).decode()
    if winner != run_id:
        MlflowClient().delete_run(run_id)
    return winner


def model_run(experiment: str, pipeline_run_id: str, parent_run_id: str, model: str) -> str:
    """The id of the nested run of ``model`` under ``parent_run_id``, created on first use."""
    found = _find(experiment, pipeline_run_id, role="model", model=model)
    if found:
        return found
    run = MlflowClient().create_run(
        experiment_id(experiment), run_name=model,
        tags={PIPELINE_RUN_TAG: pipeline_run_id, ROLE_TAG: "model", MODEL_TAG: model,
              "mlflow.parentRunId": parent_run_id},
    )
    return run.info.run_id


def _find(experiment: str, pipeline_run_id: str, role: str, model: str | None = None) -> str | None:
    query = f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}' and tags.`{ROLE_TAG}` = '{role}'"
    if model:
        query += f" and tags.`{MODEL_TAG}` = '{model}'"
    runs = MlflowClient().search_runs([experiment_id(experiment)], filter_string=query,
                                      order_by=["attributes.start_time ASC"], max_results=1)
    return runs[0].info.run_id if runs else None


def code_version() -> str:
    if os.environ.get("BLOODCELL_CODE_VERSION"):
        return os.environ["BLOODCELL_CODE_VERSION"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, cwd=os.path.dirname(__file__)).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def finish(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def log_params(params: dict[str, Any]) -> None:
    mlflow.log_params({k: str(v)[:500] for k, v in params.items()})
