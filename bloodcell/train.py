"""The train step's work: one model of a profile trained on the decode-once arrays, calibrated, stored in the
run store (``models/<name>/``) and logged to its MLflow run.

How it fits (recipes, checkpoints every epoch, resume after a restart) is :mod:`bloodcell.fitting`; here the
checkpoints go to the run store's bucket and the epochs to MLflow.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from typing import Any

import keras
import numpy as np

from bloodcell import arrays, calibration, familiarity, feeding, fitting, hardware, models, recipes, tracking
from bloodcell.config import ModelConfig, Profile, Recipe, TransferConfig
from bloodcell.runstore import ModelRecord, RunStore
from bloodcell.weights import Weights


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    calibration: tuple[np.ndarray, np.ndarray]  # read only after training, by the refer and set rules

    @property
    def for_fitting(self) -> tuple[fitting.Subset, fitting.Subset]:
        return self.train, self.val

    @classmethod
    def load(cls, arrays_uri: str) -> TrainingData:
        return cls(
            arrays.meta(arrays_uri)["classes"],
            arrays.load(arrays_uri, "train"),
            arrays.load(arrays_uri, "val"),
            arrays.load(arrays_uri, "calibration"),
        )


def train(
    model_name: str,
    *,
    recipe: Recipe,
    arrays_uri: str,
    store: RunStore,
    profile: Profile,
    experiment: str,
    mlflow_parent_run_id: str | None,
    weights: Weights,
    tracker: tracking.Tracker | None = None,
) -> ModelRecord:
    """Train ``model_name`` with ``recipe`` and keep it in ``store``; log everything to its MLflow run.

    A model already stored for this run is returned as is. MLflow failures never stop training
    (see :class:`tracking.Tracker`); the bucket always gets the model, history and record.
    """
    stored = store.record(model_name)
    if stored:
        print(f"{model_name} is already trained in this run ({stored.model_uri}); reusing it")
        return stored
    tracker = tracker or tracking.Tracker(store, f"train-{model_name}")
    keras.utils.set_random_seed(profile.seed)
    precision = hardware.apply_precision(profile.precision)
    loading = time.perf_counter()
    data = TrainingData.load(arrays_uri)
    loading = time.perf_counter() - loading
    mlflow_run_id = open_model_run(tracker, experiment, store.run_id, mlflow_parent_run_id, model_name)
    print(
        f"training {model_name}: {len(data.train[0])} train / {len(data.val[0])} val images at "
        f"{recipe.image_size}px, {precision}, {hardware.device_name()}, MLflow run {mlflow_run_id or '(none)'}; "
        f"{recipes.describe(recipe)}"
    )
    if mlflow_run_id:
        params = training_params(recipe, profile, precision, arrays_uri, data, weights)
        tracker.attempt("log params", tracking.log_params, mlflow_run_id, params)
    epoch_logger = EpochMetricsLogger(tracker, mlflow_run_id)
    checkpoints = store.checkpoints(model_name)
    model, history, seconds = _fit_timed(recipe, data, checkpoints, weights, epoch_logger, tracker)
    model, calibrated = calibrate(model, data, recipe.batch_size, profile)
    epochs = len(history.get("loss", []))
    record = ModelRecord(
        model=model_name,
        model_uri=store.model_uri(model_name),
        classes=data.classes,
        image_size=recipe.image_size,
        epochs=epochs,
        train_seconds=seconds,
        images_per_second=epochs * len(data.train[0]) / seconds if seconds else 0.0,
        precision=precision,
        params=model.count_params(),
        arrays_uri=arrays_uri,
        mlflow_run_id=mlflow_run_id,
        mlflow_model_uri=None,
        calibration=calibrated.params(),
    )
    return _log_and_store(record, model, history, tracker, epoch_logger, store, loading)


def _fit_timed(
    recipe: Recipe,
    data: TrainingData,
    checkpoints: fitting.Checkpoints,
    weights: Weights,
    epoch_logger: EpochMetricsLogger,
    tracker: tracking.Tracker,
) -> tuple[keras.Model, dict, float]:
    """The fitted model, its history and the seconds fitting took; its MLflow run is marked failed if it fails."""
    started = time.perf_counter()
    pretrained = weights.keras_argument() if isinstance(recipe, TransferConfig) else None
    try:
        model, history = fitting.train_recipe(
            recipe, len(data.classes), data.for_fitting, checkpoints, pretrained, callbacks=(epoch_logger,)
        )
    except BaseException:
        if epoch_logger.run_id:
            tracker.attempt("mark the model run failed", tracking.finish, epoch_logger.run_id, "FAILED")
        raise
    return model, history, time.perf_counter() - started


def _log_and_store(
    record: ModelRecord,
    model: keras.Model,
    history: dict,
    tracker: tracking.Tracker,
    epoch_logger: EpochMetricsLogger,
    store: RunStore,
    loading: float,
) -> ModelRecord:
    """Log the trained model to its MLflow run (when there is one) and keep it in the store (record last)."""
    storing = time.perf_counter()
    if record.mlflow_run_id:
        record = log_trained_model(record, model, tracker, epoch_logger)
    store.save_model(model, record.model)
    store.write_history(record.model, history)
    store.write_record(record)
    storing = time.perf_counter() - storing
    print(
        f"{record.model}: {record.epochs} epochs in {record.train_seconds:.0f} s (arrays loaded in {loading:.1f} s, "
        f"model logged and stored in {storing:.1f} s); stored {record.model_uri}; "
        f"MLflow model {record.mlflow_model_uri}"
    )
    return record


def calibrate(
    model: keras.Model, data: TrainingData, batch_size: int, profile: Profile
) -> tuple[keras.Model, calibration.Calibrated]:
    """``model`` with its rules and familiarity check: two outputs, the calibrated probabilities and the
    familiarity score. The check's statistics come from (a sample of) the training split, the temperature
    from validation, the refer and set rules from calibration (:func:`calibration.calibrate`)."""
    features = familiarity.pooled_features(model)
    probe = keras.Model(model.inputs, [model.outputs[0], *features.outputs])
    rows = familiarity_sample(data.train[1], profile.familiarity_fit_images, profile.seed)
    x_train, y_train = data.train
    fitted_on = feeding.predict_outputs(features, x_train[rows], batch_size)
    blocks = [familiarity.fit_block(f, y_train[rows], len(data.classes)) for f in fitted_on]
    (x_val, y_val), (x_cal, y_cal) = data.val, data.calibration
    val, cal = (feeding.predict_outputs(probe, x, batch_size) for x in (x_val, x_cal))
    blocks = familiarity.standardise(blocks, val[1:])
    calibrated = calibration.calibrate(
        (y_val, val[0], familiarity.block_scores(blocks, val[1:])),
        (y_cal, cal[0], familiarity.block_scores(blocks, cal[1:])),
        profile.refer_target_accuracy,
        profile.prediction_set_alpha,
        profile.familiarity_flag_share,
    )
    print(
        f"familiarity check: {len(blocks)} blocks fitted on {len(rows)} training images, threshold "
        f"{calibrated.familiarity_threshold:.3f} ({calibrated.flagged_share:.1%} of validation and calibration "
        f"flagged); temperature {calibrated.temperature:.3f} on {len(y_val)} validation images (ECE "
        f"{calibrated.val_ece_before:.4f} -> {calibrated.val_ece_after:.4f}); refer thresholds and prediction sets "
        f"on {len(y_cal)} calibration images ({calibrated.cal_kept_share:.1%} of the familiar ones kept)"
    )
    probabilities = calibration.calibration_layer_for(calibrated)(model.outputs[0])
    checked = familiarity.with_familiarity(
        model,
        probabilities,
        blocks,
        len(data.classes),
        threshold=calibrated.familiarity_threshold,
        flag_share=calibrated.flag_share,
    )
    return checked, calibrated


def familiarity_sample(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted rows of at most ``limit`` training images (0: all), the same share of each class."""
    if not limit or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    share = limit / len(labels)
    rows = [
        rng.permutation(np.flatnonzero(labels == c))[: round(share * (labels == c).sum())] for c in np.unique(labels)
    ]
    return np.sort(np.concatenate(rows))


def open_model_run(
    tracker: tracking.Tracker, experiment: str, pipeline_run_id: str, mlflow_parent_run_id: str | None, model_name: str
) -> str | None:
    """The model's nested MLflow run; None without a parent run or when MLflow cannot be reached."""
    if not mlflow_parent_run_id:
        return None
    return tracker.call(
        "create the model run", tracking.model_run, experiment, pipeline_run_id, mlflow_parent_run_id, model_name
    )


def log_trained_model(
    record: ModelRecord, model: keras.Model, tracker: tracking.Tracker, epoch_logger: EpochMetricsLogger
) -> ModelRecord:
    """Log the results and the model to the model's MLflow run; ``record`` with the logged model's URI."""
    run_id = record.mlflow_run_id
    tracker.await_server()
    epoch_logger.flush()  # epochs that ended during an outage
    tracker.attempt("log results", _log_results, run_id, record)
    model_uri = tracker.call("log the model", tracking.log_model, run_id, model, record.classes, pip_requirements())
    tracker.attempt("close the model run", tracking.finish, run_id)
    return replace(record, mlflow_model_uri=model_uri)


def training_params(
    recipe: Recipe, profile: Profile, precision: str, arrays_uri: str, data: TrainingData, weights: Weights
) -> dict:
    """Every training choice, as MLflow params: the chosen recipe's own fields and what they mean."""
    params = {
        **asdict(recipe),
        "recipe": "transfer" if isinstance(recipe, TransferConfig) else "end_to_end",
        "training": recipes.describe(recipe),
        "precision": precision,
        "seed": profile.seed,
        "profile": profile.name,
        "arrays_uri": arrays_uri,
        "n_train": len(data.train[0]),
        "n_val": len(data.val[0]),
        "optimizer": "adam",
        "lr_schedule": recipes.schedule_description(recipe),
        "early_stopping": f"val_loss, patience {recipe.early_stopping_patience}, from epoch "
        f"{recipe.early_stopping_start + 1}, restore best",
        "input_pipeline": feeding.describe(),
    }
    if isinstance(recipe, TransferConfig):
        params.update(
            weights=str(weights),
            augmentation="none: both phases train on features the frozen layers computed once",
            input_scaling="vgg16 preprocess (BGR, ImageNet channel means)",
        )
    else:
        params.update(augmentation=_augmentation(recipe), input_scaling="rescale 1/255")
    return params


def _augmentation(cfg: ModelConfig) -> str:
    if not cfg.augment:
        return "none"
    text = "RandomSymmetry: one of the 8 right-angle symmetries per image"
    if cfg.blur_sigma > 0:
        text += (
            f"; RandomGaussianBlur on {models.BLUR_SHARE:.0%} of the images, sigma {cfg.blur_sigma / 4:g}-"
            f"{cfg.blur_sigma:g} px"
        )
    return text


def _log_results(run_id: str, record: ModelRecord) -> None:
    tracking.log_params(run_id, {"params": record.params, "epochs_run": record.epochs})
    tracking.log_metrics(
        run_id, {"train_seconds": record.train_seconds, "train_images_per_second": record.images_per_second}
    )
    tracking.log_calibration(run_id, record.calibration, record.classes)
    text = f"{record.model}: {record.epochs} epochs at {record.image_size} px, {record.params:,} parameters."
    if record.calibration:
        text += " " + calibration.Calibrated(**record.calibration).describe(record.classes)
    tracking.describe_run(run_id, text)


def pip_requirements() -> list[str]:
    """What loading the logged model needs: Keras and the backend it was trained with (and bloodcell's layers)."""
    import importlib.metadata

    requirements = [f"keras=={keras.__version__}"]
    candidates = {"tensorflow": ("tensorflow", "tensorflow-cpu"), "jax": ("jax",)}.get(keras.backend.backend(), ())
    for distribution in candidates:
        try:
            requirements.append(f"{distribution}=={importlib.metadata.version(distribution)}")
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return requirements


class EpochMetricsLogger(fitting.PhaseCallback):
    """Log each epoch's metrics (and learning rate) to an MLflow run.

    Epochs that cannot be logged (server down) are kept and sent with the next epoch that can,
    so a short outage leaves no gap in the run's metric history.
    """

    def __init__(self, tracker: tracking.Tracker, run_id: str | None, step_offset: int = 0):
        super().__init__()
        self.tracker, self.run_id, self.step_offset = tracker, run_id, step_offset
        self.pending: list[tuple[dict[str, float], int]] = []

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self.run_id:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.pending.append((metrics, self.step_offset + epoch))
        self.flush()

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        self.flush()

    def flush(self) -> None:
        if self.pending and self.tracker.attempt(
            "log per-epoch metrics", tracking.log_metric_steps, self.run_id, self.pending
        ):
            self.pending = []
