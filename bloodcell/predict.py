"""Classify image files with a trained model: ``bloodcell predict --model URI PATH...``."""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
from sklearn import metrics as skm

from bloodcell import feeding, models, storage  # noqa: F401 - models registers custom layers
from bloodcell.arrays import decode_resized
from bloodcell.errors import BloodcellError
from bloodcell.ingest import IMAGE_SUFFIXES

BATCH = 64


def load(model_uri: str) -> tuple[keras.Model, list[str]]:
    """A model and its class names from ``models:/...``, ``runs:/...``, ``gs://...`` or a local file."""
    if model_uri.startswith(("models:/", "runs:/")):
        import mlflow

        info = mlflow.models.get_model_info(model_uri)
        return mlflow.keras.load_model(model_uri), list((info.metadata or {}).get("classes", []))
    if model_uri.startswith("gs://"):
        classes = storage.read_json(model_uri.rsplit("/", 1)[0] + "/train.json")["classes"]
        with tempfile.TemporaryDirectory() as tmp:
            return keras.models.load_model(storage.download_file(model_uri, Path(tmp, "model.keras"))), classes
    path = Path(model_uri)
    if not path.exists():
        raise BloodcellError(f"model {model_uri!r} not found: pass models:/<id>, gs://.../model.keras or a .keras file")
    train_json = path.with_name("train.json")
    classes = json.loads(train_json.read_text())["classes"] if train_json.exists() else []
    return keras.models.load_model(path), classes


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
        probabilities = feeding.predict(model, np.stack(batch), BATCH)
        for path, row in zip(kept, probabilities, strict=True):
            index = int(row.argmax())
            label = classes[index] if index < len(classes) else f"class_{index}"
            results.append({"path": str(path), "class": label, "probability": float(row[index])})
    summary: dict = {
        "images": len(results),
        "unreadable": unreadable,
        "seconds": round(time.perf_counter() - started, 2),
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
