"""Classify image files with a trained model, or a run's combined model: ``bloodcell predict --model URI PATH...``."""

from __future__ import annotations

import json
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn import metrics as skm
from tabulate import tabulate
from tqdm import tqdm

from bloodcell import calibration, ensemble, explain, feeding, models, storage  # noqa: F401 - custom layers
from bloodcell.arrays import decode_resized
from bloodcell.errors import BloodcellError
from bloodcell.ingest import IMAGE_SUFFIXES

BATCH = 64


def load(model_uri: str) -> tuple[keras.Model, list[str]]:
    """A model and its class names from ``models:/...``, ``runs:/...``, ``gs://...`` or a local file."""
    if model_uri.startswith(("models:/", "runs:/")):
        from bloodcell import registry

        with tempfile.TemporaryDirectory() as tmp:
            path, classes = registry.download_keras_model(model_uri, Path(tmp))
            return load_keras(path, model_uri), classes
    if model_uri.startswith("gs://"):
        if not model_uri.endswith(".keras"):
            raise BloodcellError(f"model {model_uri!r} is not a .keras file: pass gs://.../model.keras")
        classes = storage.read_json(model_uri.rsplit("/", 1)[0] + "/train.json")["classes"]
        with tempfile.TemporaryDirectory() as tmp:
            return load_keras(storage.download_file(model_uri, Path(tmp, "model.keras")), model_uri), classes
    path = Path(model_uri)
    if not path.exists():
        raise BloodcellError(f"model {model_uri!r} not found: pass models:/<id>, gs://.../model.keras or a .keras file")
    train_json = path.with_name("train.json")
    classes = json.loads(train_json.read_text())["classes"] if train_json.exists() else []
    return load_keras(path, model_uri), classes


def load_keras(path: Path, origin: str) -> keras.Model:
    """The Keras model in the ``.keras`` file ``path``, loaded in safe mode: no Python code from the file runs.

    Other formats are refused: a SavedModel folder is a TensorFlow graph, and HDF5 predates safe mode.
    """
    if path.is_symlink() or not path.is_file() or path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise BloodcellError(
            f"model {origin} is not a Keras .keras file (a zip archive): refusing to load it. Other formats "
            "(a TensorFlow SavedModel folder, HDF5) can run operations or code; pass a .keras model."
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:  # what a hostile file can cause
        if "safe_mode" in str(exc):
            raise BloodcellError(
                f"model {origin} holds Python code (e.g. a Lambda layer), which Keras safe mode refuses to load: "
                "bloodcell never runs code from a model file. Pass a model trained by bloodcell."
            ) from None
        raise BloodcellError(f"model {origin} cannot be loaded: {type(exc).__name__}: {str(exc)[:300]}") from None


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
class Prediction:
    """One image's prediction: class, calibrated probabilities, whether a person should look at it."""

    path: str
    label: str  # the predicted class
    confidence: float  # its calibrated probability
    probabilities: dict[str, float]  # calibrated, per class
    refer: bool  # confidence below the model's refer threshold: a person should look at this cell
    explanation: str | None = None  # the Grad-CAM overlay's path (with --explain)

    def to_json(self) -> dict[str, Any]:
        fields = asdict(self)
        return {"path": fields.pop("path"), "class": fields.pop("label"), **fields}


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
    layer = calibration.calibration_layer(model)
    refer_below = layer.refer_below if layer else 0.0
    classes = classes or [f"class_{i}" for i in range(model.output_shape[-1])]
    first_prediction_seconds = None
    predictions: list[Prediction] = []
    unreadable: list[dict[str, str]] = []
    files = image_files(paths)
    batches = tqdm(range(0, len(files), BATCH), desc="predicting", unit="batch", disable=len(files) <= BATCH)
    for start in batches:
        images, kept = read_images(files[start : start + BATCH], model.input_shape[1], unreadable)
        if not kept:
            continue
        probabilities = feeding.predict(model, images, ensemble.inference_batch(model, BATCH))
        if first_prediction_seconds is None:
            first_prediction_seconds = round(time.perf_counter() - started, 2)  # loading included
        batch = [prediction(path, row, classes, refer_below) for path, row in zip(kept, probabilities, strict=True)]
        if explain_dir:
            write_explanations(model, images, probabilities.argmax(axis=1), batch, Path(explain_dir))
        predictions += batch
    summary = summarize(predictions, unreadable, refer_below, labels_from_folders)
    summary.update(
        seconds=round(time.perf_counter() - started, 2),
        first_prediction_seconds=first_prediction_seconds,
        calibrated=layer is not None,
        temperature=layer.temperature if layer else None,
    )
    if as_json:
        print(json.dumps({"predictions": [p.to_json() for p in predictions], **summary}))
    else:
        print_table(predictions, unreadable, summary)


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


def prediction(path: Path, row: np.ndarray, classes: list[str], refer_below: float) -> Prediction:
    index = int(row.argmax())
    return Prediction(
        path=str(path),
        label=classes[index],
        confidence=float(row[index]),
        probabilities={c: round(float(p), 6) for c, p in zip(classes, row, strict=True)},
        refer=bool(row[index] < refer_below),
    )


def write_explanations(
    model: keras.Model, images: np.ndarray, classes: np.ndarray, batch: list[Prediction], folder: Path
) -> None:
    """A Grad-CAM overlay per image, ``<folder>/<image's folder>/<image name>.png``; its path in the prediction."""
    maps, _ = explain.gradcam(model, images, classes)
    for image, heatmap, item in zip(images, maps, batch, strict=True):
        source = Path(item.path)
        target = folder / source.parent.name / f"{source.stem}.png"
        item.explanation = str(explain.save_overlay(image, heatmap, target))


def summarize(
    predictions: list[Prediction], unreadable: list[dict[str, str]], refer_below: float, labels_from_folders: bool
) -> dict[str, Any]:
    """Counts, the refer threshold and, with the folders as truth, accuracy of all and of the kept images."""
    kept = [p for p in predictions if not p.refer]
    summary: dict[str, Any] = {
        "images": len(predictions),
        "referred": len(predictions) - len(kept),
        "refer_below": refer_below,
        "unreadable": unreadable,
    }
    if labels_from_folders and predictions:
        truth = [Path(p.path).parent.name for p in predictions]
        predicted = [p.label for p in predictions]
        summary["accuracy"] = float(skm.accuracy_score(truth, predicted))
        summary["macro_f1"] = float(skm.f1_score(truth, predicted, average="macro", zero_division=0))
        summary["kept_accuracy"] = float(np.mean([Path(p.path).parent.name == p.label for p in kept])) if kept else None
    return summary


def print_table(predictions: list[Prediction], unreadable: list[dict[str, str]], summary: dict[str, Any]) -> None:
    rows = [
        [p.path, p.label, f"{p.confidence:.3f}", "refer" if p.refer else "", p.explanation or ""] for p in predictions
    ]
    headers = ["image", "class", "confidence", "refer", "explanation"]
    if not any(p.explanation for p in predictions):
        headers, rows = headers[:-1], [r[:-1] for r in rows]
    print(tabulate(rows, headers=headers, disable_numparse=True))
    for u in unreadable:
        print(f"unreadable: {u['path']} ({u['error']})")
    line = (
        f"{summary['images']} images, {summary['referred']} referred to a person "
        f"(calibrated confidence below {summary['refer_below']:.3f})"
    )
    if not summary["calibrated"]:
        line = f"{summary['images']} images; this model has no calibration, so none is referred"
    if "accuracy" in summary:
        kept = summary["kept_accuracy"]
        line += f"; accuracy {summary['accuracy']:.4f}, macro F1 {summary['macro_f1']:.4f}"
        line += f", accuracy of the images kept {kept:.4f}" if kept is not None else ""
    print(line)
