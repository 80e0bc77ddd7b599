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


REGISTERED_MODEL = "bloodcell-classifier"
CHAMPION = "champion"


def should_promote(candidate_accuracy: float, champion_accuracy: float | None) -> bool:
    """The champion alias moves only to a model with strictly better test accuracy."""
    return champion_accuracy is None or candidate_accuracy > champion_accuracy


def register_best(model_uri: str, model: str, test_accuracy: float, pipeline_run_id: str) -> dict[str, Any]:
    """Register ``model_uri`` as a new version of ``bloodcell-classifier``; move ``champion`` if it is better."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
        champion_accuracy = float(current.tags.get("test_accuracy", "nan"))
        champion_version = current.version
    except MlflowException:
        champion_accuracy, champion_version = None, None
    version = mlflow.register_model(model_uri, REGISTERED_MODEL).version
    for key, value in {"test_accuracy": test_accuracy, "model": model, "pipeline_run_id": pipeline_run_id}.items():
        client.set_model_version_tag(REGISTERED_MODEL, version, key, str(value))
    promoted = should_promote(test_accuracy, champion_accuracy)
    if promoted:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    return {"registered_model": REGISTERED_MODEL, "version": str(version), "promoted": promoted,
            "previous_champion_version": champion_version, "previous_champion_accuracy": champion_accuracy,
            "test_accuracy": test_accuracy, "model": model}


def compare(experiment: str, last: int = 10) -> list[dict[str, Any]]:
    """Models of the ``last`` pipeline runs of ``experiment``, best test accuracy first."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    client = MlflowClient()
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`{ROLE_TAG}` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=last)
    rows = []
    for parent in parents:
        children = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`{ROLE_TAG}` = 'model'")
        for child in children:
            metrics, params = child.data.metrics, child.data.params
            rows.append({
                "pipeline_run": parent.data.tags.get(PIPELINE_RUN_TAG, ""),
                "profile": parent.data.tags.get("profile", ""),
                "model": child.data.tags.get(MODEL_TAG, child.info.run_name),
                "test_accuracy": metrics.get("test_accuracy"), "macro_f1": metrics.get("test_macro_f1"),
                "params": params.get("params"), "image_size": params.get("image_size"),
                "epochs": params.get("epochs_run"), "train_minutes": (metrics.get("train_seconds") or 0) / 60,
                "mlflow_run_id": child.info.run_id,
            })
    return sorted(rows, key=lambda r: -(r["test_accuracy"] if r["test_accuracy"] is not None else -1))


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no pipeline run with evaluated models in this experiment"
    columns = ["pipeline_run", "profile", "model", "test_accuracy", "macro_f1", "params", "image_size", "epochs",
               "train_minutes"]

    def cell(column: str, value: Any) -> str:
        if value is None or (column == "train_minutes" and not value):
            return "-"
        if isinstance(value, float):
            return f"{value:.1f}" if column == "train_minutes" else f"{value:.4f}"
        return str(value)

    table = [columns] + [[cell(c, r[c]) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in table)
