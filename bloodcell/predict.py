"""Classify image files with a trained model, or a run's combined model: ``bloodcell predict --model URI PATH...``."""

from __future__ import annotations

import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn import metrics as skm
from tabulate import tabulate
from tqdm import tqdm

from bloodcell import decisions, explain, modelfile
from bloodcell.arrays import decode_resized
from bloodcell.errors import BloodcellError
from bloodcell.ingest import IMAGE_SUFFIXES
from bloodcell.runstore import RECORD_FILE, RunStore

BATCH = decisions.ANSWER_BATCH  # files read and answered together


def load(model_uri: str) -> tuple[keras.Model, list[str]]:
    """A model and its class names from ``models:/...``, ``runs:/...``, a run's ``gs://.../model.keras`` or a local
    ``.keras`` file (beside a ``train.json`` for its class names), always through :func:`modelfile.load`."""
    if model_uri.startswith(("models:/", "runs:/")):
        from bloodcell import registry

        with tempfile.TemporaryDirectory() as tmp:
            path, classes = registry.download_keras_model(model_uri, Path(tmp))
            return modelfile.load(path, model_uri), classes
    if model_uri.startswith("gs://"):
        store, name = RunStore.of_model(model_uri)
        return store.load_model(name), store.require_record(name).classes
    path = Path(model_uri)
    if not path.exists():
        raise BloodcellError(f"model {model_uri!r} not found: pass models:/<id>, gs://.../model.keras or a .keras file")
    record = path.with_name(RECORD_FILE)
    classes = json.loads(record.read_text())["classes"] if record.exists() else []
    return modelfile.load(path, model_uri), classes


def image_files(paths: list[str]) -> list[Path]:
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.exists():
            files.append(path)
        else:
            raise BloodcellError(f"{name} does not exist")
    return files


@dataclass
class Classified:
    """A folder's or file list's answers, with the decisions behind them (for summaries and ``validate``)."""

    predictions: list[decisions.Prediction]
    unreadable: list[dict[str, str]]
    rules: decisions.Rules
    outputs: decisions.Outputs  # of the readable images, in the order of ``predictions``
    decisions: decisions.Decisions
    first_prediction_seconds: float | None


def classify(
    model: keras.Model, classes: list[str], files: list[Path], explain_dir: str | None = None, started: float = 0.0
) -> Classified:
    """Every readable file of ``files`` classified with ``model`` (its own rules), batch by batch."""
    rules = decisions.Rules.of(model)
    scoring = decisions.scoring_model(model)
    first_prediction_seconds = None
    predictions: list[decisions.Prediction] = []
    unreadable: list[dict[str, str]] = []
    parts: list[decisions.Outputs] = []
    batches = tqdm(range(0, len(files), BATCH), desc="predicting", unit="batch", disable=len(files) <= BATCH)
    for start in batches:
        images, kept = read_images(files[start : start + BATCH], model.input_shape[1], unreadable)
        if not kept:
            continue
        outputs, batch = decisions.answer_images(scoring, rules, images, [str(path) for path in kept], classes)
        if first_prediction_seconds is None:
            first_prediction_seconds = round(time.perf_counter() - started, 2)  # loading included
        if explain_dir:
            write_explanations(model, images, outputs.probabilities.argmax(axis=1), batch, Path(explain_dir))
        predictions += batch
        parts.append(outputs)
    outputs = joined(parts, len(classes))
    return Classified(
        predictions, unreadable, rules, outputs, decisions.decide(rules, outputs), first_prediction_seconds
    )


def joined(parts: list[decisions.Outputs], n_classes: int) -> decisions.Outputs:
    """The outputs of several batches as one."""
    if not parts:
        empty = np.empty((0, n_classes), np.float32)
        return decisions.Outputs(empty, empty, None)
    scores = [p.familiarity for p in parts]
    return decisions.Outputs(
        np.concatenate([p.uncalibrated for p in parts]),
        np.concatenate([p.probabilities for p in parts]),
        None if scores[0] is None else np.concatenate(scores),  # type: ignore[arg-type]
    )


def main(
    model_uri: str,
    paths: list[str],
    labels_from_folders: bool = False,
    as_json: bool = False,
    explain_dir: str | None = None,
) -> None:
    """Classify the images of ``paths`` and print the predictions (a table, or JSON with ``as_json``)."""
    started = time.perf_counter()
    model, classes = load(model_uri)
    classes = classes or [f"class_{i}" for i in range(int(model.outputs[0].shape[-1]))]
    result = classify(model, classes, image_files(paths), explain_dir, started)
    summary = summarize(result, classes, labels_from_folders)
    summary.update(
        seconds=round(time.perf_counter() - started, 2), first_prediction_seconds=result.first_prediction_seconds
    )
    if summary.get("warning"):
        print(f"warning: {summary['warning']}", file=sys.stderr)
    if as_json:
        print(json.dumps({"predictions": [p.to_json() for p in result.predictions], **summary}))
    else:
        print_table(result.predictions, result.unreadable, summary)


def read_images(files: list[Path], size: int, unreadable: list[dict[str, str]]) -> tuple[np.ndarray, list[Path]]:
    """The readable ``files`` decoded at ``size`` px; each unreadable one is added to ``unreadable`` with why."""
    images, kept = [], []
    for path in files:
        try:
            images.append(decode_resized(str(path), [size])[0])
            kept.append(path)
        except Exception as exc:  # any decoding failure: reported, the other images still classified
            unreadable.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
    return (np.stack(images) if images else np.empty((0, size, size, 3), np.uint8)), kept


def write_explanations(
    model: keras.Model, images: np.ndarray, classes: np.ndarray, batch: list[decisions.Prediction], folder: Path
) -> None:
    """A Grad-CAM overlay per image, ``<folder>/<image's folder>/<image name>.png``; its path in the prediction."""
    maps, _ = explain.gradcam(model, images, classes)
    for image, heatmap, item in zip(images, maps, batch, strict=True):
        source = Path(item.path)
        target = folder / source.parent.name / f"{source.stem}.png"
        item.explanation = str(explain.save_overlay(image, heatmap, target))


def true_labels(predictions: list[decisions.Prediction], classes: list[str]) -> np.ndarray:
    """Each image's folder name as its true class index (-1 for a folder that names no class of the model)."""
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index.get(Path(p.path).parent.name, -1) for p in predictions], dtype=int)


def summarize(result: Classified, classes: list[str], labels_from_folders: bool) -> dict[str, Any]:
    """Counts (referred, and why), the rules and, with the folders as truth, accuracy of all and of the kept
    images and the prediction sets' coverage."""
    predictions, rules, decided = result.predictions, result.rules, result.decisions
    unfamiliar = int((~decided.familiar).sum()) if decided.familiar is not None else None
    summary: dict[str, Any] = {
        "images": len(predictions),
        "referred": int(decided.refer.sum()),
        "referred_low_confidence": int((~decided.confident).sum()),
        "unfamiliar": unfamiliar,
        "familiarity_check": rules.familiarity_threshold is not None,
        "validation_unfamiliar_share": rules.flag_share,
        "warning": decisions.shift_warning(unfamiliar, len(predictions), rules) if unfamiliar is not None else None,
        "refer_below": dict(zip(classes, rules.refer_below.tolist(), strict=True)),
        "promise": dict(zip(classes, rules.promise, strict=True)),
        "prediction_sets": rules.set_min_probability is not None,
        "set_alpha": rules.set_alpha,
        "calibrated": rules.calibrated,
        "temperature": rules.temperature,
        "unreadable": result.unreadable,
    }
    if labels_from_folders and predictions:
        truth = [Path(p.path).parent.name for p in predictions]
        predicted = [p.label for p in predictions]
        kept = [p for p in predictions if not p.refer]
        summary["accuracy"] = float(skm.accuracy_score(truth, predicted))
        summary["macro_f1"] = float(skm.f1_score(truth, predicted, average="macro", zero_division=0))
        summary["kept_accuracy"] = float(np.mean([Path(p.path).parent.name == p.label for p in kept])) if kept else None
        if decided.sets is not None:
            y = true_labels(predictions, classes)
            inside = np.array([y[i] >= 0 and decided.sets[i, y[i]] for i in range(len(y))])
            summary["set_coverage"] = float(inside.mean())
            summary["set_mean_size"] = float(decided.sets.sum(axis=1).mean())
    return summary


def print_table(
    predictions: list[decisions.Prediction], unreadable: list[dict[str, str]], summary: dict[str, Any]
) -> None:
    show_sets = any(p.prediction_set is not None and len(p.prediction_set) > 1 for p in predictions)
    rows = [
        [
            p.path,
            p.label,
            f"{p.confidence:.3f}",
            {None: "", True: "", False: "no"}[p.familiar],
            f"refer: {p.refer_reason}" if p.refer else "",
            ", ".join(p.prediction_set) if show_sets and p.prediction_set and len(p.prediction_set) > 1 else "",
            p.explanation or "",
        ]
        for p in predictions
    ]
    headers = ["image", "class", "confidence", "familiar", "refer", "prediction set", "explanation"]
    keep = [True, True, True, summary["familiarity_check"], True, show_sets, any(p.explanation for p in predictions)]
    print(
        tabulate(
            [[c for c, k in zip(r, keep, strict=True) if k] for r in rows],
            headers=[h for h, k in zip(headers, keep, strict=True) if k],
            disable_numparse=True,
        )
    )
    for u in unreadable:
        print(f"unreadable: {u['path']} ({u['error']})")
    print(summary_line(summary))


def summary_line(summary: dict[str, Any]) -> str:
    """The counts in words, with what the model cannot tell (an older model without the checks)."""
    if not summary["calibrated"]:
        line = f"{summary['images']} images; this model has no calibration, so none is referred for low confidence"
    else:
        line = (
            f"{summary['images']} images, {summary['referred']} referred to a person "
            f"({summary['referred_low_confidence']} for low confidence"
        )
        if summary["unfamiliar"] is not None:
            line += f", {summary['unfamiliar']} unlike the training images"
        line += ")"
    if not summary["familiarity_check"]:
        line += "; this model was saved before the familiarity check: it cannot tell images unlike its training images"
    if "accuracy" in summary:
        kept = summary["kept_accuracy"]
        line += f"; accuracy {summary['accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}"
        line += f", accuracy of the images kept {kept:.4f}" if kept is not None else ""
        if "set_coverage" in summary:
            line += f", prediction sets hold the true class for {summary['set_coverage']:.1%}"
            line += f" (mean size {summary['set_mean_size']:.2f})"
    return line
