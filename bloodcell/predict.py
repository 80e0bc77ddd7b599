"""Classify image files with a trained model, or a run's combined model: ``bloodcell predict --model URI PATH...``."""

from __future__ import annotations

import json
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn import metrics as skm

from bloodcell import ensemble, feeding, models, storage  # noqa: F401 - both register custom layers
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


def main(model_uri: str, paths: list[str], labels_from_folders: bool = False, as_json: bool = False) -> None:
    started = time.perf_counter()
    model, classes = load(model_uri)
    size = model.input_shape[1]
    model_batch = ensemble.inference_batch(model, BATCH)  # the combined model runs 8 symmetries per image
    first_prediction_seconds = None
    results: list[dict[str, Any]] = []
    unreadable: list[dict[str, str]] = []
    files = image_files(paths)
    for start in range(0, len(files), BATCH):
        batch, kept = [], []
        for path in files[start : start + BATCH]:
            try:
                batch.append(decode_resized(str(path), [size])[0])
                kept.append(path)
            except Exception as exc:
                unreadable.append({"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
        if not batch:
            continue
        probabilities = feeding.predict(model, np.stack(batch), model_batch)
        if first_prediction_seconds is None:
            first_prediction_seconds = round(time.perf_counter() - started, 2)  # loading included
        for path, row in zip(kept, probabilities, strict=True):
            index = int(row.argmax())
            label = classes[index] if index < len(classes) else f"class_{index}"
            results.append({"path": str(path), "class": label, "probability": float(row[index])})
    summary: dict = {
        "images": len(results),
        "unreadable": unreadable,
        "seconds": round(time.perf_counter() - started, 2),
        "first_prediction_seconds": first_prediction_seconds,
    }
    if labels_from_folders and results:
        truth = [Path(r["path"]).parent.name for r in results]
        predicted = [r["class"] for r in results]
        summary["accuracy"] = float(skm.accuracy_score(truth, predicted))
        summary["macro_f1"] = float(skm.f1_score(truth, predicted, average="macro", zero_division=0))
    if as_json:
        print(json.dumps({"predictions": results, **summary}))
        return
    for r in results:
        print(f"{r['path']}\t{r['class']}\t{r['probability']:.4f}")
    for u in unreadable:
        print(f"unreadable: {u['path']} ({u['error']})")
    if "accuracy" in summary:
        print(f"accuracy {summary['accuracy']:.4f}  macro F1 {summary['macro_f1']:.4f}  ({len(results)} images)")
