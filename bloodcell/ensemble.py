"""The combined model (``ensemble``): the average of a run's trained models' probabilities.

It is one Keras model taking uint8 images at the largest member's input size; each member branch
resizes them to its own size inside the model and, where that helps on the validation split,
averages its predictions over the image's eight right-angle symmetries (test-time augmentation).
Built only from serializable layers (no Lambda), so it loads in Keras safe mode like any trained
model, and is stored, evaluated, logged and registered like one (``<run_uri>/models/ensemble/``).

What it uses is decided on the validation split alone: per member, how it shrinks the images (the
method with the best validation accuracy) and whether test-time augmentation raises its validation
accuracy; then which non-empty set of members has the best validation accuracy (ties: fewer members,
then lower validation log loss). The test split is never read here.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace

import keras
import numpy as np
from keras import layers

from bloodcell import arrays, calibration, decisions, familiarity, feeding, selection, selective, tracking
from bloodcell.config import ENSEMBLE_NAME
from bloodcell.errors import BloodcellError
from bloodcell.layers import (
    DEFAULT_FLAG_SHARE,
    RESIZE_METHODS,
    SYMMETRIES,
    CombinedFamiliarity,
    DihedralImages,
    ResizeImages,
    SymmetryMean,
)
from bloodcell.runstore import Combination, ModelRecord, RunStore

BRANCH_IMAGES_PER_BATCH = 128  # member images per forward pass (with TTA: 16 inputs x 8 symmetries)


def resized_input(member: keras.Model, images: keras.KerasTensor, name: str, method: str | None) -> keras.KerasTensor:
    """``images`` at ``member``'s input size, shrunk with ``method`` (unchanged when already that size)."""
    size = member.input_shape[1]
    if images.shape[1] == size:
        return images
    return ResizeImages(size, method or RESIZE_METHODS[0], name=f"{name}_resize")(images)


def member_outputs(member: keras.Model, x: keras.KerasTensor) -> list[keras.KerasTensor]:
    """``member`` called on ``x``: [probabilities] or, with its familiarity check, [probabilities, score]."""
    out = member(x)
    return list(out) if isinstance(out, (list, tuple)) else [out]


def branch(
    member: keras.Model, images: keras.KerasTensor, name: str, tta: bool, resize: str | None
) -> list[keras.KerasTensor]:
    """``member``'s outputs for ``images`` (any size), averaged over the 8 symmetries if ``tta``."""
    x = resized_input(member, images, name, resize)
    if not tta:
        return member_outputs(member, x)
    stacked = member_outputs(member, DihedralImages(name=f"{name}_tta")(x))
    means = [SymmetryMean(name=f"{name}_tta_mean", dtype="float32")(stacked[0])]
    if len(stacked) > 1:
        means.append(SymmetryMean(name=f"{name}_tta_familiarity", dtype="float32")(stacked[1]))
    return means


def combined_model(
    members: dict[str, keras.Model],
    tta: dict[str, bool],
    image_size: int,
    resize: dict[str, str | None] | None = None,
    calibrated: calibration.Calibrated | None = None,
) -> keras.Model:
    """The average of ``members``' probabilities for uint8 images of ``image_size`` px: each member shrinks
    them with its ``resize`` method and uses test-time augmentation where ``tta`` says.

    When every member has a familiarity check, a second output combines them (:class:`CombinedFamiliarity`).
    With ``calibrated``, the average ends in its calibration layer and the familiarity in its threshold.
    """
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    resize = resize or {}
    outputs = [branch(member, images, name, tta[name], resize.get(name)) for name, member in members.items()]
    probabilities = [o[0] for o in outputs]
    average = (
        probabilities[0]
        if len(probabilities) == 1
        else layers.Average(name="probabilities", dtype="float32")(probabilities)
    )
    if calibrated is not None:
        average = calibration.calibration_layer_for(calibrated)(average)
    checks = [familiarity.familiarity_layer(member) for member in members.values()]
    if any(check is None for check in checks):
        return keras.Model(images, average, name=ENSEMBLE_NAME)
    combined = CombinedFamiliarity(
        [check.threshold for check in checks if check is not None],
        threshold=calibrated.familiarity_threshold if calibrated else math.inf,
        flag_share=calibrated.flag_share if calibrated else DEFAULT_FLAG_SHARE,
        name=familiarity.LAYER_NAME,
        dtype="float32",
    )([o[1] for o in outputs])
    return keras.Model(images, [average, combined], name=ENSEMBLE_NAME)


def plain_probabilities(member: keras.Model, x: np.ndarray, name: str, resize: str | None) -> np.ndarray:
    """``member``'s probabilities for ``x``, shrunk to its size inside the model as in :func:`branch`."""
    images = keras.Input(x.shape[1:], dtype="uint8", name="image")
    model = keras.Model(images, member_outputs(member, resized_input(member, images, name, resize))[0])
    return feeding.predict(model, x, BRANCH_IMAGES_PER_BATCH)


def symmetry_probabilities(member: keras.Model, x: np.ndarray, name: str, resize: str | None) -> np.ndarray:
    """``member``'s probabilities for each of the 8 symmetries of ``x`` (shrunk to its size inside the
    model, exactly as in :func:`branch`): shape (8, N, K), row 0 the images as given."""
    images = keras.Input(x.shape[1:], dtype="uint8", name="image")
    stacked = keras.Model(
        images, member_outputs(member, DihedralImages()(resized_input(member, images, name, resize)))[0]
    )
    batch = BRANCH_IMAGES_PER_BATCH // SYMMETRIES
    parts = []
    for start in range(0, len(x), batch):
        rows = np.asarray(x[start : start + batch])
        out = keras.ops.convert_to_numpy(stacked.predict_on_batch(rows)).astype(np.float32)
        parts.append(out.reshape(SYMMETRIES, len(rows), -1))
    return np.concatenate(parts, axis=1)


def choose_resize(member: keras.Model, x_val: np.ndarray, y_val: np.ndarray, name: str) -> tuple[str | None, dict]:
    """How ``member`` shrinks the combined model's images: the method of :data:`RESIZE_METHODS` with the best
    validation accuracy (None when they are already its size), and each method's score."""
    if member.input_shape[1] == x_val.shape[1]:
        return None, {}
    scores = {m: selection.Score.of(y_val, plain_probabilities(member, x_val, name, m)) for m in RESIZE_METHODS}
    return max(RESIZE_METHODS, key=lambda m: scores[m].accuracy), {m: asdict(s) for m, s in scores.items()}


def build(records: list[ModelRecord], store: RunStore, tracker: tracking.Tracker) -> ModelRecord:
    """Choose, build, store and log the combined model of ``records`` (trained models), on validation data."""
    found = store.record(ENSEMBLE_NAME)
    if found:
        print(f"{ENSEMBLE_NAME} is already built in this run ({found.model_uri}); reusing it")
        return found
    started = time.perf_counter()
    check_members(records)
    largest = max(records, key=lambda record: record.image_size)
    x_val, y_val = arrays.load(largest.arrays_uri, "val")
    members = {record.model: load_member(store, record) for record in records}
    tta, resize, choices = choose(members, x_val, y_val)
    chosen = {name: members[name] for name in tta}
    calibrated = fit_rules(
        combined_model(chosen, tta, x_val.shape[1], resize), records, (x_val, y_val), largest.arrays_uri
    )
    model = combined_model(chosen, tta, x_val.shape[1], resize, calibrated)
    best = choices["candidates"][0]
    combination = Combination(
        members=list(tta),
        description=selection.describe(list(tta), tta, resize),
        tta=tta,
        resize=resize,
        val_accuracy=best["accuracy"],
        val_log_loss=best["log_loss"],
        selection=choices,
    )
    record = ModelRecord(
        model=ENSEMBLE_NAME,
        model_uri=store.model_uri(ENSEMBLE_NAME),
        classes=list(largest.classes),
        image_size=int(x_val.shape[1]),
        epochs=0,
        train_seconds=time.perf_counter() - started,
        params=model.count_params(),
        arrays_uri=largest.arrays_uri,
        mlflow_run_id=None,
        mlflow_model_uri=None,
        calibration=calibrated.params(),
        combination=combination,
    )
    print(
        f"{ENSEMBLE_NAME}: {combination.description}; chosen on {len(y_val)} validation images "
        f"(validation accuracy {combination.val_accuracy:.4f}, log loss {combination.val_log_loss:.4f})"
    )
    record = log_to_mlflow(record, model, store, tracker)
    store.save_model(model, ENSEMBLE_NAME)
    store.write_record(record)  # last: the combined model is complete
    return record


def member_setting(records: list[ModelRecord], key: str, default: float) -> float:
    """A setting the members were calibrated with (the profile's: target accuracy, set alpha, flag share)."""
    values = [record.calibration.get(key) for record in records]
    return max([v for v in values if v] or [default])


def fit_rules(
    uncalibrated: keras.Model,
    records: list[ModelRecord],
    validation: tuple[np.ndarray, np.ndarray],
    arrays_uri: str,
) -> calibration.Calibrated:
    """The combined model's own rules, fitted like a trained model's (:func:`calibration.calibrate`) on its
    outputs for the validation and calibration splits, through the very branches it will have."""
    x_cal, y_cal = arrays.load(arrays_uri, "calibration")
    scoring = decisions.scoring_model(uncalibrated)
    batch = decisions.inference_batch(uncalibrated)
    (x_val, y_val), parts = validation, []
    for x in (x_val, x_cal):
        out = decisions.outputs_of(scoring, x, batch)
        parts.append((out.probabilities, out.familiarity if out.familiarity is not None else np.zeros(len(x))))
    (p_val, s_val), (p_cal, s_cal) = parts
    return calibration.calibrate(
        (y_val, p_val, s_val),
        (y_cal, p_cal, s_cal),
        member_setting(records, "target_accuracy", calibration.DEFAULT_TARGET_ACCURACY),
        member_setting(records, "set_alpha", selective.DEFAULT_SET_ALPHA),
        member_setting(records, "flag_share", DEFAULT_FLAG_SHARE),
    )


def choose(
    members: dict[str, keras.Model], x_val: np.ndarray, y_val: np.ndarray
) -> tuple[dict[str, bool], dict[str, str | None], dict]:
    """The chosen members with their test-time augmentation and resize method, and every measurement behind
    the choices (all on the validation split, through the branches the combined model will have)."""
    resizing = {name: choose_resize(member, x_val, y_val, name) for name, member in members.items()}
    resize = {name: method for name, (method, _) in resizing.items()}
    by_symmetry = {name: symmetry_probabilities(m, x_val, name, resize[name]) for name, m in members.items()}
    tta = selection.choose_tta(by_symmetry, y_val)
    probabilities = {n: p.mean(axis=0) if tta[n]["use"] else p[0] for n, p in by_symmetry.items()}
    candidates = selection.choose_members(probabilities, y_val)
    chosen = candidates[0]["members"]
    measured = {
        "rule": selection.SELECTION_RULE,
        "n_val": len(y_val),
        "resize": {name: scores for name, (_, scores) in resizing.items() if scores},
        "tta": tta,
        "candidates": candidates,
    }
    return {n: bool(tta[n]["use"]) for n in chosen}, {n: resize[n] for n in chosen}, measured


def check_members(records: list[ModelRecord]) -> None:
    if len(records) < 2:
        raise BloodcellError(f"a combined model needs at least 2 trained models, got {len(records)}")
    if len({tuple(record.classes) for record in records}) != 1:
        raise BloodcellError("the trained models do not share their classes; they cannot be combined")


def load_member(store: RunStore, record: ModelRecord) -> keras.Model:
    """A trained model of the run (the safe loader), named after its record."""
    model = store.load_model(record.model)
    model.name = record.model  # unique layer names in the combined model, whatever the builder called it
    return model


def log_to_mlflow(record: ModelRecord, model: keras.Model, store: RunStore, tracker: tracking.Tracker) -> ModelRecord:
    """Log the combined model as a nested run of the pipeline's parent run (its choices as params, the
    validation measurements as metrics, the model itself); ``record`` with the run and model URIs.

    Without a parent run (MLflow was down when the trainers started) nothing is logged.
    """
    parent = store.parent_run_id()
    if not parent:
        return record
    run_id = tracker.call(f"create the {ENSEMBLE_NAME} run", tracking.nested_run, parent, store, ENSEMBLE_NAME)
    if not run_id:
        return record
    from bloodcell.train import pip_requirements  # what loading a model of this run needs

    tracker.attempt(f"log the {ENSEMBLE_NAME} choices", _log_choices, run_id, record)
    model_uri = tracker.call(
        f"log the {ENSEMBLE_NAME} model", tracking.log_model, run_id, model, record.classes, pip_requirements()
    )
    tracker.attempt(f"close the {ENSEMBLE_NAME} run", tracking.finish, run_id)
    return replace(record, mlflow_run_id=run_id, mlflow_model_uri=model_uri)


def _log_choices(run_id: str, record: ModelRecord) -> None:
    combination = record.combination
    assert combination is not None  # a combined model's record
    tracking.log_params(
        run_id,
        {
            "members": ",".join(combination.members),
            "tta": ",".join(n for n in combination.members if combination.tta[n]) or "none",
            "resize": ",".join(f"{n}:{combination.resize[n]}" for n in combination.members if combination.resize[n])
            or "none",
            "image_size": record.image_size,
            "params": record.params,
            "selection": selection.SELECTION_RULE,
            "n_val": combination.selection["n_val"],
        },
    )
    scores = {
        "val_accuracy": combination.val_accuracy,
        "val_log_loss": combination.val_log_loss,
        "train_seconds": record.train_seconds,  # building it (compare's training time)
    }
    for name, decision in combination.selection["tta"].items():
        scores[f"val_accuracy_{name}"] = decision["plain"]["accuracy"]
        scores[f"val_accuracy_{name}_tta"] = decision["tta"]["accuracy"]
    for name, by_method in combination.selection["resize"].items():
        scores.update({f"val_accuracy_{name}_{method}": score["accuracy"] for method, score in by_method.items()})
    tracking.log_metrics(run_id, scores)
    tracking.log_calibration(run_id, record.calibration, record.classes)
    tracking.describe_run(
        run_id,
        f"{ENSEMBLE_NAME}: {combination.description}, chosen on the validation split (accuracy "
        f"{combination.val_accuracy:.2%}). " + calibration.Calibrated(**record.calibration).describe(record.classes),
    )
    tracking.log_json(run_id, combination.selection, "ensemble/selection.json")
