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

import itertools
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import mlflow
import numpy as np
from keras import layers, ops
from mlflow.tracking import MlflowClient
from sklearn import metrics as skm

from bloodcell import arrays, calibration, decisions, familiarity, feeding, models, selective, storage, tracking  # noqa: F401
from bloodcell.config import ENSEMBLE_NAME
from bloodcell.errors import BloodcellError

SYMMETRIES = 8  # the dihedral group of the square: 4 rotations, each optionally mirrored
BRANCH_IMAGES_PER_BATCH = 128  # member images per forward pass (with TTA: 16 inputs x 8 symmetries)
SELECTION_RULE = (
    "on the validation split: per member, the resize method with the best accuracy, and test-time "
    "augmentation (8 symmetries) if it raises accuracy; then the set of members whose average has the best "
    "accuracy (ties: fewer members, lower log loss)"
)
RESIZE_METHODS = ("bilinear", "area")  # tried in this order on the validation split; a tie keeps the first


def shrink_weights(n_in: int, n_out: int, method: str) -> np.ndarray:
    """The (n_out, n_in) matrix that shrinks one image axis; each row sums to 1.

    ``bilinear``: a triangle filter widened by the shrink factor (antialiased, as PIL and Keras shrink);
    ``area``: each output pixel the mean of the input span it covers (sharper).
    """
    scale = n_in / n_out
    pixels = np.arange(n_in) + 0.5  # input pixel centres, in input pixels
    if method == "area":
        starts, ends = np.arange(n_out)[:, None] * scale, (np.arange(n_out)[:, None] + 1) * scale
        weights = np.clip(np.minimum(ends, pixels + 0.5) - np.maximum(starts, pixels - 0.5), 0, None)
    elif method == "bilinear":
        centres = (np.arange(n_out)[:, None] + 0.5) * scale
        weights = np.clip(1 - np.abs(pixels - centres) / max(scale, 1.0), 0, None)
    else:
        raise ValueError(f"unknown resize method {method!r}; one of {RESIZE_METHODS}")
    return (weights / weights.sum(axis=1, keepdims=True)).astype("float32")


MAX_IMAGE_SIZE = 4096  # px: far above any profile's input size


@keras.saving.register_keras_serializable(package="bloodcell")
class ResizeImages(layers.Layer):
    """Square uint8 images shrunk to ``size`` px (:func:`shrink_weights`' ``method``), rounded back to uint8.

    Two matrix products, so every Keras backend runs it the same. A member's arrays were shrunk by PIL
    from the decoded image; shrinking the larger arrays again blurs more, and which method brings a
    member closest to its own arrays differs (measured: area for 96 -> 64 px, bilinear for 96 -> 48),
    so it is chosen per member on the validation split.
    """

    def __init__(self, size: int, method: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        if not isinstance(size, int) or not 1 <= size <= MAX_IMAGE_SIZE:
            # A model's config is data: an absurd size would allocate memory before anything checks it.
            raise ValueError(f"ResizeImages size {size!r} is not between 1 and {MAX_IMAGE_SIZE} px: not our model")
        self.size, self.method = size, method

    def call(self, images):
        weights = ops.convert_to_tensor(shrink_weights(images.shape[1], self.size, self.method))
        x = ops.einsum("oh,bhwc->bowc", weights, ops.cast(images, "float32"))
        x = ops.einsum("pw,bowc->bopc", weights, x)
        return ops.cast(ops.clip(ops.round(x), 0, 255), "uint8")

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.size, self.size, input_shape[3])

    def compute_output_spec(self, images):
        return keras.KerasTensor(self.compute_output_shape(images.shape), dtype="uint8")

    def get_config(self):
        return {**super().get_config(), "size": self.size, "method": self.method}


def symmetries(images):
    """The eight right-angle symmetries of square images (B, H, W, C), concatenated: (8B, H, W, C).

    Two flips and a transpose, each applied or not, reach all eight; symmetry-major order
    (the first B rows are the images as given).
    """
    variants = [images]
    for transform in (
        lambda x: ops.flip(x, axis=1),
        lambda x: ops.flip(x, axis=2),
        lambda x: ops.transpose(x, (0, 2, 1, 3)),
    ):
        variants += [transform(v) for v in variants]
    return ops.concatenate(variants, axis=0)


@keras.saving.register_keras_serializable(package="bloodcell")
class DihedralImages(layers.Layer):
    """Each image in its eight right-angle symmetries (:func:`symmetries`): (B, H, W, C) -> (8B, H, W, C)."""

    def call(self, images):
        return symmetries(images)

    def compute_output_shape(self, input_shape):
        return (None if input_shape[0] is None else SYMMETRIES * input_shape[0], *input_shape[1:])

    def compute_output_spec(self, images):
        return keras.KerasTensor(self.compute_output_shape(images.shape), dtype=images.dtype)


@keras.saving.register_keras_serializable(package="bloodcell")
class SymmetryMean(layers.Layer):
    """The mean of :class:`DihedralImages`' stacked predictions over the symmetries: (8B, K) -> (B, K)."""

    def call(self, probabilities):
        by_symmetry = ops.reshape(probabilities, (SYMMETRIES, -1, ops.shape(probabilities)[-1]))
        return ops.mean(by_symmetry, axis=0)

    def compute_output_shape(self, input_shape):
        return (None if input_shape[0] is None else input_shape[0] // SYMMETRIES, input_shape[-1])


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
    combined = familiarity.CombinedFamiliarity(
        [check.threshold for check in checks if check is not None],
        threshold=calibrated.familiarity_threshold if calibrated else math.inf,
        flag_share=calibrated.flag_share if calibrated else familiarity.DEFAULT_FLAG_SHARE,
        name=familiarity.LAYER_NAME,
        dtype="float32",
    )([o[1] for o in outputs])
    return keras.Model(images, [average, combined], name=ENSEMBLE_NAME)


def inference_batch(model: keras.Model, images_per_batch: int = BRANCH_IMAGES_PER_BATCH) -> int:
    """Input images per batch so that each member sees at most ``images_per_batch`` images (TTA: 8 per input)."""
    with_tta = any(isinstance(layer, DihedralImages) for layer in model.layers)
    return max(1, images_per_batch // SYMMETRIES) if with_tta else images_per_batch


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


@dataclass(frozen=True)
class Score:
    """Validation accuracy and log loss of some probabilities."""

    accuracy: float
    log_loss: float

    @classmethod
    def of(cls, y_true: np.ndarray, probabilities: np.ndarray) -> Score:
        labels = list(range(probabilities.shape[1]))
        return cls(
            float(skm.accuracy_score(y_true, probabilities.argmax(axis=1))),
            float(skm.log_loss(y_true, np.clip(probabilities, 1e-7, 1), labels=labels)),
        )


def choose_resize(member: keras.Model, x_val: np.ndarray, y_val: np.ndarray, name: str) -> tuple[str | None, dict]:
    """How ``member`` shrinks the combined model's images: the method of :data:`RESIZE_METHODS` with the best
    validation accuracy (None when they are already its size), and each method's score."""
    if member.input_shape[1] == x_val.shape[1]:
        return None, {}
    scores = {m: Score.of(y_val, plain_probabilities(member, x_val, name, m)) for m in RESIZE_METHODS}
    return max(RESIZE_METHODS, key=lambda m: scores[m].accuracy), {m: asdict(s) for m, s in scores.items()}


def choose_tta(by_symmetry: dict[str, np.ndarray], y_val: np.ndarray) -> dict[str, dict]:
    """Per member: its validation score without and with test-time augmentation, and whether to use it.

    TTA costs 8x the inference, so a member keeps it only if it raises validation accuracy.
    """
    choices = {}
    for name, probabilities in by_symmetry.items():
        plain, averaged = Score.of(y_val, probabilities[0]), Score.of(y_val, probabilities.mean(axis=0))
        choices[name] = {"plain": asdict(plain), "tta": asdict(averaged), "use": averaged.accuracy > plain.accuracy}
    return choices


def choose_members(member_probabilities: dict[str, np.ndarray], y_val: np.ndarray) -> list[dict]:
    """Every non-empty set of members, scored by the validation accuracy of their average; best first.

    Ties go to the smaller set (cheaper, and no evidence the extra member helps), then to the lower
    validation log loss.
    """
    names = list(member_probabilities)
    candidates = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            average = np.mean([member_probabilities[n] for n in subset], axis=0)
            candidates.append({"members": list(subset), **asdict(Score.of(y_val, average))})
    return sorted(candidates, key=lambda c: (-c["accuracy"], len(c["members"]), c["log_loss"]))


@dataclass(frozen=True)
class EnsembleRecord:
    """The combined model: what ``<run_uri>/models/ensemble/train.json`` holds (a training record's
    keys, so evaluate, predict and the report read it like a trained model's)."""

    model: str
    model_uri: str
    classes: list[str]
    image_size: int
    members: list[str]
    description: str  # in words: members, how each shrinks the images, test-time augmentation
    tta: dict[str, bool]  # per chosen member
    resize: dict[str, str | None]  # per chosen member: how it shrinks the images (None: already its size)
    val_accuracy: float
    val_log_loss: float
    params: int
    arrays_uri: str  # the arrays at image_size: validation for choosing, test for evaluate
    train_seconds: float  # building it: validation predictions, choices, storing
    mlflow_run_id: str | None
    mlflow_model_uri: str | None
    epochs: int = 0
    selection: dict = field(default_factory=dict)  # every measurement behind the choices
    calibration: dict = field(
        default_factory=dict
    )  # calibration.Calibrated's fields, fitted on validation and calibration


def stored(run_uri: str) -> EnsembleRecord | None:
    """The combined model this run already built, if any (a rerun of evaluate reuses it)."""
    record = storage.join(run_uri, "models", ENSEMBLE_NAME, "train.json")
    return EnsembleRecord(**storage.read_json(record)) if storage.exists(record) else None


def build(trained: list[dict], run_uri: str, tracker: tracking.Tracker) -> EnsembleRecord:
    """Choose, build, store and log the combined model of ``trained`` (training records), on validation data."""
    found = stored(run_uri)
    if found:
        print(f"{ENSEMBLE_NAME} is already built in this run ({found.model_uri}); reusing it")
        return found
    started = time.perf_counter()
    check_members(trained)
    largest = max(trained, key=lambda info: int(info["image_size"]))
    x_val, y_val = arrays.load(largest["arrays_uri"], "val")
    members = {info["model"]: load_member(info) for info in trained}
    tta, resize, selection = choose(members, x_val, y_val)
    chosen = {name: members[name] for name in tta}
    calibrated = fit_rules(
        combined_model(chosen, tta, x_val.shape[1], resize), trained, (x_val, y_val), largest["arrays_uri"]
    )
    model = combined_model(chosen, tta, x_val.shape[1], resize, calibrated)
    best = selection["candidates"][0]
    record = EnsembleRecord(
        model=ENSEMBLE_NAME,
        model_uri=storage.join(run_uri, "models", ENSEMBLE_NAME, "model.keras"),
        classes=list(largest["classes"]),
        image_size=int(x_val.shape[1]),
        members=list(tta),
        description=describe(list(tta), tta, resize),
        tta=tta,
        resize=resize,
        val_accuracy=best["accuracy"],
        val_log_loss=best["log_loss"],
        params=model.count_params(),
        arrays_uri=largest["arrays_uri"],
        train_seconds=time.perf_counter() - started,
        mlflow_run_id=None,
        mlflow_model_uri=None,
        selection=selection,
        calibration=calibrated.params(),
    )
    print(
        f"{ENSEMBLE_NAME}: {record.description}; chosen on {len(y_val)} validation images "
        f"(validation accuracy {record.val_accuracy:.4f}, log loss {record.val_log_loss:.4f})"
    )
    record = log_to_mlflow(record, model, run_uri, tracker)
    store(model, record)
    return record


def member_setting(trained: list[dict], key: str, default: float) -> float:
    """A setting the members were calibrated with (the profile's: target accuracy, set alpha, flag share)."""
    values = [info.get("calibration", {}).get(key) for info in trained]
    return max([v for v in values if v] or [default])


def fit_rules(
    uncalibrated: keras.Model, trained: list[dict], validation: tuple[np.ndarray, np.ndarray], arrays_uri: str
) -> calibration.Calibrated:
    """The combined model's own rules, fitted like a trained model's (:func:`calibration.calibrate`) on its
    outputs for the validation and calibration splits, through the very branches it will have."""
    x_cal, y_cal = arrays.load(arrays_uri, "calibration")
    scoring = decisions.scoring_model(uncalibrated)
    batch = inference_batch(uncalibrated)
    (x_val, y_val), parts = validation, []
    for x in (x_val, x_cal):
        out = decisions.outputs_of(scoring, x, batch)
        parts.append((out.probabilities, out.familiarity if out.familiarity is not None else np.zeros(len(x))))
    (p_val, s_val), (p_cal, s_cal) = parts
    return calibration.calibrate(
        (y_val, p_val, s_val),
        (y_cal, p_cal, s_cal),
        member_setting(trained, "target_accuracy", calibration.DEFAULT_TARGET_ACCURACY),
        member_setting(trained, "set_alpha", selective.DEFAULT_SET_ALPHA),
        member_setting(trained, "flag_share", familiarity.DEFAULT_FLAG_SHARE),
    )


def choose(
    members: dict[str, keras.Model], x_val: np.ndarray, y_val: np.ndarray
) -> tuple[dict[str, bool], dict[str, str | None], dict]:
    """The chosen members with their test-time augmentation and resize method, and every measurement behind
    the choices (all on the validation split, through the branches the combined model will have)."""
    resizing = {name: choose_resize(member, x_val, y_val, name) for name, member in members.items()}
    resize = {name: method for name, (method, _) in resizing.items()}
    by_symmetry = {name: symmetry_probabilities(m, x_val, name, resize[name]) for name, m in members.items()}
    tta = choose_tta(by_symmetry, y_val)
    probabilities = {n: p.mean(axis=0) if tta[n]["use"] else p[0] for n, p in by_symmetry.items()}
    candidates = choose_members(probabilities, y_val)
    chosen = candidates[0]["members"]
    selection = {
        "rule": SELECTION_RULE,
        "n_val": len(y_val),
        "resize": {name: scores for name, (_, scores) in resizing.items() if scores},
        "tta": tta,
        "candidates": candidates,
    }
    return {n: bool(tta[n]["use"]) for n in chosen}, {n: resize[n] for n in chosen}, selection


def check_members(trained: list[dict]) -> None:
    if len(trained) < 2:
        raise BloodcellError(f"a combined model needs at least 2 trained models, got {len(trained)}")
    if len({tuple(info["classes"]) for info in trained}) != 1:
        raise BloodcellError("the trained models do not share their classes; they cannot be combined")


def load_member(info: dict) -> keras.Model:
    """A trained model from the bucket, loaded in Keras safe mode, named after its training record."""
    with tempfile.TemporaryDirectory() as tmp:
        path = storage.download_file(info["model_uri"], Path(tmp, "model.keras"))
        model = keras.saving.load_model(path, safe_mode=True)
    model.name = info["model"]  # unique layer names in the combined model, whatever the builder called it
    return model


def describe(members: list[str], tta: dict[str, bool], resize: dict[str, str | None]) -> str:
    """What the combined model is, e.g. ``the average of cnn2 (averaged over the 8 symmetries) and vgg16
    (shrunk by area)`` (for the log, the report and the summary)."""

    def branch(name: str) -> str:
        parts = [
            f"shrunk by {resize[name]}" if resize[name] else "",
            "averaged over the 8 symmetries" if tta[name] else "",
        ]
        return name + (f" ({', '.join(p for p in parts if p)})" if any(parts) else "")

    if len(members) == 1:
        return f"{branch(members[0])} alone"
    return f"the average of {', '.join(branch(n) for n in members[:-1])} and {branch(members[-1])}"


def store(model: keras.Model, record: EnsembleRecord) -> None:
    """``model.keras``, then ``train.json`` (written last: the model is complete)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        model.save(path)
        storage.upload_file(path, record.model_uri)
    storage.write_json(asdict(record), storage.join(record.model_uri.rsplit("/", 1)[0], "train.json"))


def log_to_mlflow(
    record: EnsembleRecord, model: keras.Model, run_uri: str, tracker: tracking.Tracker
) -> EnsembleRecord:
    """Log the combined model as a nested run of the pipeline's parent run (its choices as params, the
    validation measurements as metrics, the model itself); ``record`` with the run and model URIs.

    Without a parent run (MLflow was down when the trainers started) nothing is logged.
    """
    claim = storage.join(run_uri, "mlflow_parent_run_id")
    if not storage.exists(claim):
        return record
    run_id = tracker.call(
        f"create the {ENSEMBLE_NAME} run", _open_run, storage.read_bytes(claim).decode(), run_uri.rsplit("/", 1)[-1]
    )
    if not run_id:
        return record
    from bloodcell.train import pip_requirements  # what loading a model of this run needs

    tracker.attempt(f"log the {ENSEMBLE_NAME} choices", _log_choices, run_id, record)
    model_uri = tracker.call(
        f"log the {ENSEMBLE_NAME} model", tracking.log_keras_model, run_id, model, record.classes, pip_requirements()
    )
    tracker.attempt(f"close the {ENSEMBLE_NAME} run", tracking.finish, run_id)
    return replace(record, mlflow_run_id=run_id, mlflow_model_uri=model_uri)


def _open_run(parent_run_id: str, pipeline_run_id: str) -> str:
    client = MlflowClient()
    experiment = client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
    return tracking.model_run(experiment, pipeline_run_id, parent_run_id, ENSEMBLE_NAME)


def _log_choices(run_id: str, record: EnsembleRecord) -> None:
    tracking.log_params(
        run_id,
        {
            "members": ",".join(record.members),
            "tta": ",".join(n for n in record.members if record.tta[n]) or "none",
            "resize": ",".join(f"{n}:{record.resize[n]}" for n in record.members if record.resize[n]) or "none",
            "image_size": record.image_size,
            "params": record.params,
            "selection": SELECTION_RULE,
            "n_val": record.selection["n_val"],
        },
    )
    scores = {
        "val_accuracy": record.val_accuracy,
        "val_log_loss": record.val_log_loss,
        "train_seconds": record.train_seconds,  # building it (compare's training time)
    }
    for name, decision in record.selection["tta"].items():
        scores[f"val_accuracy_{name}"] = decision["plain"]["accuracy"]
        scores[f"val_accuracy_{name}_tta"] = decision["tta"]["accuracy"]
    for name, by_method in record.selection["resize"].items():
        scores.update({f"val_accuracy_{name}_{method}": score["accuracy"] for method, score in by_method.items()})
    tracking.log_metrics(run_id, scores)
    tracking.log_calibration(run_id, record.calibration, record.classes)
    tracking.describe_run(
        run_id,
        f"{ENSEMBLE_NAME}: {record.description}, chosen on the validation split (accuracy "
        f"{record.val_accuracy:.2%}). " + calibration.Calibrated(**record.calibration).describe(record.classes),
    )
    with mlflow.start_run(run_id=run_id):
        mlflow.log_dict(record.selection, "ensemble/selection.json")
