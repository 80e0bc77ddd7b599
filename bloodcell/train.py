"""Train one model on the decode-once arrays, checkpointing to the bucket every epoch.

A restarted trainer resumes from its last checkpoint (weights and optimizer state) and ends
with the same number of epochs as an uninterrupted run. Results land in
``<run_uri>/models/<model>/`` (``model.keras``, ``history.json``, ``train.json``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import keras
import numpy as np

from bloodcell import arrays, calibration, familiarity, feeding, hardware, models, recipes, sources, storage, tracking
from bloodcell.config import ModelConfig, Profile


@dataclass(frozen=True)
class TrainResult:
    """A trained model: what ``<run_uri>/models/<model>/train.json`` holds."""

    model: str
    model_uri: str  # the stored model.keras in the bucket
    classes: list[str]
    image_size: int
    epochs: int
    train_seconds: float
    images_per_second: float
    precision: str
    params: int
    arrays_uri: str
    mlflow_run_id: str | None
    mlflow_model_uri: str | None
    calibration: dict = field(default_factory=dict)  # calibration.Calibrated's fields; empty before calibration


@dataclass(frozen=True)
class TrainingData:
    classes: list[str]
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]
    calibration: tuple[np.ndarray, np.ndarray]  # read only after training, by the refer and set rules

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
    arrays_uri: str,
    run_base: str,
    profile: Profile,
    experiment: str,
    pipeline_run_id: str,
    mlflow_parent_run_id: str | None,
    vgg16_weights: str = "none",
    tracker: tracking.Tracker | None = None,
) -> TrainResult:
    """Train ``model_name`` and store it under ``run_base`` (the run's folder); log everything to its MLflow run.

    A model already stored for this run is returned as is. MLflow failures never stop training
    (see :class:`tracking.Tracker`); the bucket always gets the model, history and ``train.json``.
    """
    out_uri = storage.join(run_base, "models", model_name)
    stored = stored_result(out_uri)
    if stored:
        print(f"{model_name} is already trained in this run ({stored.model_uri}); reusing it")
        return stored
    tracker = tracker or tracking.Tracker(run_base, f"train-{model_name}")
    cfg = profile.model(model_name)
    keras.utils.set_random_seed(profile.seed)
    precision = hardware.apply_precision(profile.precision)
    loading = time.perf_counter()
    data = TrainingData.load(arrays_uri)
    loading = time.perf_counter() - loading
    mlflow_run_id = open_model_run(tracker, experiment, pipeline_run_id, mlflow_parent_run_id, model_name)
    print(
        f"training {model_name}: {len(data.train[0])} train / {len(data.val[0])} val images at "
        f"{cfg.image_size}px, {precision}, {hardware.device_name()}, MLflow run {mlflow_run_id or '(none)'}"
    )
    params = training_params(model_name, cfg, profile, precision, arrays_uri, data, vgg16_weights)
    if mlflow_run_id:
        tracker.attempt("log params", tracking.log_params, mlflow_run_id, params)
    epoch_logger = tracking.EpochMetricsLogger(tracker, mlflow_run_id)
    checkpoints = storage.join(run_base, "checkpoints", model_name)
    model, history, seconds = _fit_timed(model_name, cfg, data, checkpoints, vgg16_weights, epoch_logger, tracker)
    model, calibrated = calibrate(model, data, cfg.batch_size, profile)
    epochs = len(history.get("loss", []))
    result = TrainResult(
        model=model_name,
        model_uri=storage.join(out_uri, "model.keras"),
        classes=data.classes,
        image_size=cfg.image_size,
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
    return _log_and_store(result, model, history, tracker, epoch_logger, out_uri, loading)


def _fit_timed(
    model_name: str,
    cfg: ModelConfig,
    data: TrainingData,
    checkpoints: str,
    vgg16_weights: str,
    epoch_logger: tracking.EpochMetricsLogger,
    tracker: tracking.Tracker,
) -> tuple[keras.Model, dict, float]:
    """The fitted model, its history and the seconds fitting took; its MLflow run is marked failed if it fails."""
    started = time.perf_counter()
    try:
        model, history = fit_model(model_name, cfg, data, checkpoints, vgg16_weights, epoch_logger)
    except BaseException:
        if epoch_logger.run_id:
            tracker.attempt("mark the model run failed", tracking.finish, epoch_logger.run_id, "FAILED")
        raise
    return model, history, time.perf_counter() - started


def _log_and_store(
    result: TrainResult,
    model: keras.Model,
    history: dict,
    tracker: tracking.Tracker,
    epoch_logger: tracking.EpochMetricsLogger,
    out_uri: str,
    loading: float,
) -> TrainResult:
    """Log the trained model to its MLflow run (when there is one) and store it in the bucket."""
    storing = time.perf_counter()
    if result.mlflow_run_id:
        result = log_trained_model(result, model, tracker, epoch_logger)
    store(model, history, result, out_uri)
    storing = time.perf_counter() - storing
    print(
        f"{result.model}: {result.epochs} epochs in {result.train_seconds:.0f} s (arrays loaded in {loading:.1f} s, "
        f"model logged and stored in {storing:.1f} s); stored {result.model_uri}; "
        f"MLflow model {result.mlflow_model_uri}"
    )
    return result


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


def stored_result(out_uri: str) -> TrainResult | None:
    """The model this run already trained and stored under ``out_uri``, if any."""
    train_json = storage.join(out_uri, "train.json")
    if not storage.exists(train_json):
        return None
    return TrainResult(**storage.read_json(train_json))


def open_model_run(
    tracker: tracking.Tracker, experiment: str, pipeline_run_id: str, mlflow_parent_run_id: str | None, model_name: str
) -> str | None:
    """The model's nested MLflow run; None without a parent run or when MLflow cannot be reached."""
    if not mlflow_parent_run_id:
        return None
    return tracker.call(
        "create the model run", tracking.model_run, experiment, pipeline_run_id, mlflow_parent_run_id, model_name
    )


def fit_model(
    model_name: str,
    cfg: ModelConfig,
    data: TrainingData,
    ckpt_uri: str,
    vgg16_weights: str,
    epoch_logger: tracking.EpochMetricsLogger | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Build ``model_name`` and train it with its recipe; the model and the history of all epochs."""
    n_classes = len(data.classes)
    if model_name == "vgg16":
        weights = resolve_vgg16_weights(vgg16_weights)
        path = recipes.vgg16_path(vgg16_weights)
        print(f"vgg16 path: {path} ({recipes.VGG16_PATHS[path]})")
        if weights is None:
            model, cfg = recipes.build_on_images(model_name, cfg, n_classes)
            return model, fit_vgg16_from_scratch(model, cfg, data, ckpt_uri, epoch_logger)
        model = models.build_model("vgg16", n_classes, cfg.image_size, augment=False, weights=weights)
        return model, fit_vgg16(model, cfg, data, ckpt_uri, epoch_logger)
    model, cfg = recipes.build_on_images(model_name, cfg, n_classes)
    recipes.compile_model(model, recipes.learning_rate(cfg, len(data.train[0])))
    return model, fit(
        model, data.train, data.val, cfg, cfg.epochs, storage.join(ckpt_uri, "main"), epoch_logger=epoch_logger
    )


def log_trained_model(
    result: TrainResult, model: keras.Model, tracker: tracking.Tracker, epoch_logger: tracking.EpochMetricsLogger
) -> TrainResult:
    """Log the results and the model to the model's MLflow run; ``result`` with the logged model's URI."""
    run_id = result.mlflow_run_id
    tracker.await_server()
    epoch_logger.flush()  # epochs that ended during an outage
    tracker.attempt("log results", _log_results, run_id, result)
    model_uri = tracker.call(
        "log the model", tracking.log_keras_model, run_id, model, result.classes, pip_requirements()
    )
    tracker.attempt("close the model run", tracking.finish, run_id)
    return replace(result, mlflow_model_uri=model_uri)


def store(model: keras.Model, history: dict, result: TrainResult, out_uri: str) -> None:
    """``model.keras``, ``history.json`` and ``train.json`` (written last: the model is complete)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        model.save(path)
        storage.upload_file(path, result.model_uri)
    storage.write_json(history, storage.join(out_uri, "history.json"))
    storage.write_json(asdict(result), storage.join(out_uri, "train.json"))


def training_params(
    model_name: str,
    cfg: ModelConfig,
    profile: Profile,
    precision: str,
    arrays_uri: str,
    data: TrainingData,
    vgg16_weights: str,
) -> dict:
    """Every training choice, as MLflow params: the ones this model's recipe really uses."""
    from_scratch = model_name == "vgg16" and recipes.vgg16_path(vgg16_weights) == "from_scratch"
    cfg = recipes.scratch_config(cfg) if from_scratch else cfg
    params = {
        **asdict(cfg),
        "precision": precision,
        "seed": profile.seed,
        "profile": profile.name,
        "arrays_uri": arrays_uri,
        "n_train": len(data.train[0]),
        "n_val": len(data.val[0]),
        "optimizer": "adam",
        "lr_schedule": recipes.schedule_description(cfg),
        "early_stopping": f"val_loss, patience {cfg.early_stopping_patience}, from epoch "
        f"{cfg.early_stopping_start + 1}, restore best",
        "input_pipeline": feeding.describe(),
    }
    if from_scratch:
        params.update(
            vgg16_path="from_scratch",
            vgg16_weights=vgg16_weights,
            fine_tune_epochs=0,
            architecture=f"VGG16 layout (13 3x3 convs in 5 blocks, He init) at {cfg.scratch_width:g}x its "
            "channels, batch norm after every conv, pooled dropout head",
            batch_norm=True,
            augmentation=_augmentation(cfg),
            input_scaling="rescale 1/255",
            training=recipes.VGG16_PATHS["from_scratch"],
        )
    elif model_name == "vgg16":
        params.update(
            vgg16_path="frozen_then_fine_tune",
            augment=False,
            augmentation="none: both phases train on features the frozen layers computed once",
            input_scaling="vgg16 preprocess (BGR, ImageNet channel means)",
            vgg16_weights=vgg16_weights,
            training=recipes.VGG16_PATHS["frozen_then_fine_tune"],
        )
    else:
        params.update(augmentation=_augmentation(cfg), input_scaling="rescale 1/255")
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


def _log_results(run_id: str, result: TrainResult) -> None:
    tracking.log_params(run_id, {"params": result.params, "epochs_run": result.epochs})
    tracking.log_metrics(
        run_id, {"train_seconds": result.train_seconds, "train_images_per_second": result.images_per_second}
    )
    tracking.log_calibration(run_id, result.calibration, result.classes)
    text = f"{result.model}: {result.epochs} epochs at {result.image_size} px, {result.params:,} parameters."
    if result.calibration:
        text += " " + calibration.Calibrated(**result.calibration).describe(result.classes)
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


def fit(
    model: keras.Model,
    train_data: tuple,
    val_data: tuple,
    cfg: ModelConfig,
    epochs: int,
    ckpt_uri: str,
    step_offset: int = 0,
    epoch_logger: tracking.EpochMetricsLogger | None = None,
    extra_callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> dict[str, list[float]]:
    """``model.fit`` with bucket checkpoints and resume; returns the history of all epochs."""
    state = _load_checkpoint(model, ckpt_uri)
    history = state.get("history", {})
    if state.get("done"):
        print(f"checkpoint {ckpt_uri}: phase already complete, reusing it")
        return history
    initial_epoch = state.get("epoch", 0)
    if initial_epoch:
        print(f"resuming from {ckpt_uri} at epoch {initial_epoch + 1}/{epochs}")
    callbacks = [*recipes.callbacks(cfg), BucketCheckpoint(ckpt_uri, history), *extra_callbacks]
    if epoch_logger:
        epoch_logger.step_offset = step_offset
        callbacks.append(epoch_logger)
    x, y = train_data
    result = model.fit(
        feeding.batches(x, y, batch_size=cfg.batch_size, shuffle=True),
        validation_data=feeding.batches(*val_data, batch_size=cfg.batch_size),
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        class_weight=_class_weights(y, cfg),
        verbose=progress_verbosity(),
        shuffle=False,  # the batches reshuffle themselves every epoch
    )
    if epoch_logger:
        epoch_logger.flush()
    merged = {
        k: history.get(k, [])[:initial_epoch] + [float(v) for v in result.history.get(k, [])]
        for k in set(history) | set(result.history)
    }
    _save_checkpoint(model, ckpt_uri, {"epoch": len(merged.get("loss", [])), "history": merged, "done": True})
    return merged


def progress_verbosity() -> int:
    """Keras' progress bar redraws in place only on a terminal; in a log (kfp's runners, a pod) it would add a
    line per step, so there it writes one line per epoch."""
    return 1 if sys.stdout.isatty() else 2


def _class_weights(y: np.ndarray, cfg: ModelConfig) -> dict[int, float] | None:
    if not cfg.class_weights:
        return None
    counts = np.bincount(y)
    return {i: len(y) / (len(counts) * c) for i, c in enumerate(counts) if c}


class BucketCheckpoint(keras.callbacks.Callback):
    """Save model and optimizer to the bucket after every epoch (state.json written last)."""

    def __init__(self, ckpt_uri: str, history: dict[str, list[float]]):
        super().__init__()
        self.ckpt_uri = ckpt_uri
        self.history = {k: list(v) for k, v in history.items()}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, [])[epoch:] = [float(value)]
        _save_checkpoint(self.model, self.ckpt_uri, {"epoch": epoch + 1, "history": self.history, "done": False})


def _save_checkpoint(model: keras.Model, ckpt_uri: str, state: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "last.keras")
        model.save(path)
        storage.upload_file(path, storage.join(ckpt_uri, "last.keras"))
    storage.write_json(state, storage.join(ckpt_uri, "state.json"))


def _load_checkpoint(model: keras.Model, ckpt_uri: str) -> dict:
    """Restore weights and optimizer state from ``ckpt_uri`` into ``model``; return the saved state."""
    state_uri = storage.join(ckpt_uri, "state.json")
    if not storage.exists(state_uri):
        return {}
    state = storage.read_json(state_uri)
    with tempfile.TemporaryDirectory() as tmp:
        saved = keras.saving.load_model(
            storage.download_file(storage.join(ckpt_uri, "last.keras"), Path(tmp, "last.keras")), safe_mode=True
        )
    model.set_weights(saved.get_weights())
    model.optimizer.build(model.trainable_variables)
    for target, source in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        target.assign(source)
    return state


def fit_vgg16(
    model: keras.Model,
    cfg: ModelConfig,
    data: TrainingData,
    ckpt_uri: str,
    epoch_logger: tracking.EpochMetricsLogger | None = None,
) -> dict[str, list[float]]:
    """Train the parts of a :func:`models.vgg16` model in place, in two phases on cached features.

    The frozen layers run once over the images, not every epoch: 1. the head, on block 5's output;
    2. block 5 and the head at a low learning rate, on block 4's output. Returns both phases' history.
    """
    stem, block5, head = (model.get_layer(name) for name in ("vgg16_stem", "vgg16_block5", "head"))
    featurizer = keras.Model(model.input, stem(model.get_layer("vgg_preprocess")(model.input)))
    (x_train, y_train), (x_val, y_val) = data.train, data.val
    stem_train, stem_val = (feeding.predict(featurizer, x, cfg.batch_size) for x in (x_train, x_val))
    block5_train, block5_val = (feeding.predict(block5, x, cfg.batch_size) for x in (stem_train, stem_val))

    recipes.compile_model(head, cfg.learning_rate)
    history = fit(
        head,
        (block5_train, y_train),
        (block5_val, y_val),
        cfg,
        cfg.epochs,
        storage.join(ckpt_uri, "frozen"),
        epoch_logger=epoch_logger,
    )
    if cfg.fine_tune_epochs:
        block5.trainable = True
        features = keras.Input(stem.output_shape[1:])
        tuned = keras.Model(features, head(block5(features)))
        recipes.compile_model(tuned, cfg.fine_tune_learning_rate)
        tune_history = fit(
            tuned,
            (stem_train, y_train),
            (stem_val, y_val),
            cfg,
            cfg.fine_tune_epochs,
            storage.join(ckpt_uri, "fine_tune"),
            step_offset=len(history.get("loss", [])),
            epoch_logger=epoch_logger,
        )
        history = {k: history.get(k, []) + tune_history.get(k, []) for k in set(history) | set(tune_history)}
    recipes.compile_model(model, cfg.fine_tune_learning_rate)
    return history


def fit_vgg16_from_scratch(
    model: keras.Model,
    cfg: ModelConfig,
    data: TrainingData,
    ckpt_uri: str,
    epoch_logger: tracking.EpochMetricsLogger | None = None,
) -> dict[str, list[float]]:
    """Train every layer of a :func:`models.vgg16_from_scratch` model on the (augmented) images, in one phase.

    ``cfg`` is the :func:`scratch_config` of the vgg16 settings.
    """
    recipes.compile_model(model, recipes.learning_rate(cfg, len(data.train[0])))
    return fit(
        model, data.train, data.val, cfg, cfg.epochs, storage.join(ckpt_uri, "scratch"), epoch_logger=epoch_logger
    )


def resolve_vgg16_weights(weights: str) -> str | None:
    """``imagenet`` | local path | ``gs://`` URI (downloaded) | ``none``, as Keras takes it."""
    models.check_vgg16_weights(weights)
    if weights in ("none", ""):
        return None
    if weights.startswith("gs://"):
        return str(storage.cached_download(weights, sources.cache_dir() / "weights"))
    return weights
