"""Evaluate trained models on the test split with scikit-learn metrics.

Per model: ``<run_uri>/metrics/<model>.json`` (metrics, confusion matrix, per-class report) and
``test_predictions.npz`` beside the model (true labels and probabilities, for the report). The
combined model (:mod:`bloodcell.ensemble`), chosen on the validation split, is built from the trained
models first and evaluated exactly like them.
"""

from __future__ import annotations

import io
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
from sklearn import metrics as skm

from bloodcell import arrays, calibration, decisions, ensemble, feeding, plots, tracking
from bloodcell.runstore import ModelRecord, RunStore

INFERENCE_BATCH = 128


def evaluate(records: list[ModelRecord], store: RunStore, tracker: tracking.Tracker | None = None) -> dict[str, dict]:
    """Evaluate each model of ``records`` on its test arrays, and their combined model; metrics by model name.

    Each model's metrics go to the run store (``metrics_uri`` in the result).
    """
    tracker = tracker or tracking.Tracker(store, "evaluate")
    results = {}
    for record in with_ensemble(records, store, tracker):
        result = evaluate_one(record, store)
        result["metrics_uri"] = store.write_metrics(record.model, result)
        results[record.model] = result
        print(f"{record.model}: test accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f}")
        if record.mlflow_run_id:
            tracker.attempt(f"log {record.model}'s test metrics", _log_to_mlflow, record.mlflow_run_id, result)
    return results


def with_ensemble(records: list[ModelRecord], store: RunStore, tracker: tracking.Tracker) -> list[ModelRecord]:
    """``records`` and, from two trained models on, the record of their combined model (built now,
    or already built by an earlier evaluation of this run)."""
    if len(records) < 2:
        return records
    return [*records, ensemble.build(records, store, tracker)]


def evaluate_one(record: ModelRecord, store: RunStore) -> dict:
    """Test-split metrics of one model, its inference speed and size; predictions stored beside it."""
    x_test, y_test = arrays.load(record.arrays_uri, "test")
    model = store.load_model(record.model)
    batch = decisions.inference_batch(model, INFERENCE_BATCH)  # the combined model: 8 symmetries per image
    scoring = decisions.scoring_model(model)  # one pass: before and after calibration, familiarity
    feeding.predict_outputs(scoring, x_test[:batch], batch)  # warm-up
    started = time.perf_counter()
    outputs = decisions.outputs_of(scoring, x_test, batch)
    seconds = time.perf_counter() - started
    uncalibrated, probabilities = outputs.uncalibrated, outputs.probabilities
    result = classification_metrics(y_test, probabilities, record.classes)
    layer = calibration.calibration_layer(model)
    rules = decisions.Rules.of(model)
    result["calibration"] = {
        "temperature": layer.temperature if layer else 1.0,
        "target_accuracy": layer.target_accuracy if layer else None,
        **calibration.quality(y_test, uncalibrated, probabilities),
    }
    result["answers"] = answers_summary(y_test, rules, outputs, record.classes)
    result.update(
        {
            "model": record.model,
            "params": int(record.params),
            "train_seconds": float(record.train_seconds),
            "epochs": int(record.epochs),
            "image_size": int(record.image_size),
            "inference_images_per_second": len(x_test) / seconds if seconds else 0.0,
            "model_size_bytes": store.model_size(record.model),
            "model_uri": record.model_uri,
            "arrays_uri": record.arrays_uri,
            "mlflow_run_id": record.mlflow_run_id,
            "mlflow_model_uri": record.mlflow_model_uri,
            **record.combination_fields(),
        }
    )
    result["predictions_uri"] = store.write_predictions(record.model, predictions_file(y_test, outputs))
    return result


def predictions_file(y_test: np.ndarray, outputs: decisions.Outputs) -> bytes:
    """The test labels and the model's outputs, as the ``.npz`` the report reads."""
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        y_true=y_test,
        probabilities=outputs.probabilities,
        uncalibrated=outputs.uncalibrated,
        familiarity=outputs.familiarity if outputs.familiarity is not None else np.full(len(y_test), np.nan),
    )
    return buffer.getvalue()


def answers_summary(y_true: np.ndarray, rules: decisions.Rules, outputs: decisions.Outputs, classes: list[str]) -> dict:
    """What the model's answers achieve on the test split (:func:`decisions.measures`) and its rules."""
    return {
        **decisions.measures(y_true, decisions.decide(rules, outputs), classes),
        "refer_below": dict(zip(classes, rules.refer_below.tolist(), strict=True)),
        "promise": dict(zip(classes, rules.promise, strict=True)),
        "target_accuracy": rules.target_accuracy,
        "set_alpha": rules.set_alpha,
        "familiarity_threshold": rules.familiarity_threshold,
        "flag_share": rules.flag_share,
    }


def classification_metrics(y_true: np.ndarray, probabilities: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro/weighted P/R/F1, per-class report, confusion matrix and one-vs-rest ROC AUC."""
    labels = list(range(len(classes)))
    y_pred = probabilities.argmax(axis=1)
    macro = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    weighted = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, average="weighted", zero_division=0)
    report = skm.classification_report(
        y_true, y_pred, labels=labels, target_names=classes, output_dict=True, zero_division=0
    )
    try:
        auc = float(skm.roc_auc_score(y_true, probabilities, multi_class="ovr", labels=labels))
    except ValueError:  # a class absent from y_true
        auc = float("nan")
    return {
        "classes": classes,
        "n_test": int(len(y_true)),
        "accuracy": float(skm.accuracy_score(y_true, y_pred)),
        "macro_precision": float(macro[0]),
        "macro_recall": float(macro[1]),
        "macro_f1": float(macro[2]),
        "weighted_precision": float(weighted[0]),
        "weighted_recall": float(weighted[1]),
        "weighted_f1": float(weighted[2]),
        "roc_auc_ovr": auc,
        "per_class": {c: {k: float(v) for k, v in report[c].items()} for c in classes},
        "confusion_matrix": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }


def _log_to_mlflow(run_id: str, result: dict) -> None:
    with mlflow.start_run(run_id=run_id):
        keys = (
            "accuracy",
            "macro_f1",
            "macro_precision",
            "macro_recall",
            "weighted_f1",
            "roc_auc_ovr",
            "inference_images_per_second",
            "model_size_bytes",
        )
        mlflow.log_metrics({f"test_{k}": float(result[k]) for k in keys if np.isfinite(result[k])})
        mlflow.log_dict(
            {k: result[k] for k in ("classes", "confusion_matrix", "per_class")}, "evaluation/test_metrics.json"
        )
        mlflow.log_metrics({f"test_f1_{c}": v["f1-score"] for c, v in result["per_class"].items()})
        mlflow.log_metrics({f"test_{k}": float(v) for k, v in calibration_metrics(result).items()})
        mlflow.log_metrics({f"test_{k}": v for k, v in answer_metrics(result).items()})
        mlflow.log_dict(result.get("answers", {}), "evaluation/test_answers.json")
        with tempfile.TemporaryDirectory() as tmp:
            figures = {
                "confusion_matrix.png": plots.confusion_matrices({result["model"]: result}),
                "reliability.png": plots.reliability_diagrams({result["model"]: result}),
                "accuracy_coverage.png": plots.accuracy_coverage({result["model"]: result}),
            }
            for name, png in figures.items():
                Path(tmp, name).write_bytes(png)
                mlflow.log_artifact(str(Path(tmp, name)), "evaluation")


def answer_metrics(result: dict) -> dict[str, float]:
    """The refer, familiarity and prediction-set figures of an evaluation result as flat metrics: overall
    (``kept_share``, ``unfamiliar_share``, ``set_coverage``, ...) and per class (``kept_accuracy_ig``, ...)."""
    answers = result.get("answers", {})
    flat = {k: float(v) for k, v in answers.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    flat.pop("images", None)
    for name, entry in answers.get("per_class", {}).items():
        for key in ("kept_share", "kept_accuracy", "set_coverage"):
            if entry.get(key) is not None:
                flat[f"{key}_{name}"] = float(entry[key])
    return {
        k: v
        for k, v in flat.items()
        if k not in ("target_accuracy", "set_alpha", "flag_share", "familiarity_threshold")
    }


def calibration_metrics(result: dict) -> dict[str, float]:
    """The calibration and selective-prediction figures of an evaluation result, by name (MLflow's, compare's)."""
    quality = result.get("calibration", {})
    return {k: v for k, v in quality.items() if isinstance(v, (int, float)) and k != "temperature"}
