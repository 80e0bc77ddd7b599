"""``bloodcell compare``: the models of recent pipeline runs side by side, from MLflow."""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from tabulate import tabulate

from bloodcell.tracking import MODEL_TAG, PIPELINE_RUN_TAG, ROLE_TAG

COLUMNS = {  # column: number format
    "pipeline_run": "",
    "profile": "",
    "model": "",
    "test_accuracy": ".4f",
    "macro_f1": ".4f",
    "params": "",
    "image_size": "",
    "epochs": "",
    "train_minutes": ".1f",
    "images_per_s": ",.0f",  # test-set inference speed
    "ece": ".4f",  # calibrated, test split
    "acc_at_90pct": ".4f",  # accuracy of the 90% most confident test images
    "refer_share": ".3f",  # share of test images below the stored refer threshold
}


def compare(experiment: str, last: int = 10) -> list[dict[str, Any]]:
    """Models of the ``last`` pipeline runs of ``experiment``, best test accuracy first."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    client = MlflowClient()
    parents = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`{ROLE_TAG}` = 'pipeline'",
        order_by=["attributes.start_time DESC"],
        max_results=last,
    )
    rows = []
    for parent in parents:
        children = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}' and tags.`{ROLE_TAG}` = 'model'",
        )
        for child in children:
            metrics, params = child.data.metrics, child.data.params
            rows.append(
                {
                    "pipeline_run": parent.data.tags.get(PIPELINE_RUN_TAG, ""),
                    "profile": parent.data.tags.get("profile", ""),
                    "model": child.data.tags.get(MODEL_TAG, child.info.run_name),
                    "test_accuracy": metrics.get("test_accuracy"),
                    "macro_f1": metrics.get("test_macro_f1"),
                    "params": params.get("params"),
                    "image_size": params.get("image_size"),
                    "epochs": params.get("epochs_run"),
                    "train_minutes": (metrics.get("train_seconds") or 0) / 60 or None,
                    "images_per_s": metrics.get("test_inference_images_per_second"),
                    "ece": metrics.get("test_ece"),
                    "acc_at_90pct": metrics.get("test_accuracy_at_coverage_90"),
                    "refer_share": 1 - metrics["test_kept_share"] if "test_kept_share" in metrics else None,
                    "mlflow_run_id": child.info.run_id,
                }
            )
    return sorted(rows, key=lambda r: -(r["test_accuracy"] if r["test_accuracy"] is not None else -1))


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no pipeline run with evaluated models in this experiment"
    body = [
        [format(row[c], spec) if spec and row[c] is not None else row[c] for c, spec in COLUMNS.items()] for row in rows
    ]
    return tabulate(body, headers=list(COLUMNS), tablefmt="plain", missingval="-", disable_numparse=True)
