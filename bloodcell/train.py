"""Train one model on the decode-once arrays, checkpointing to the bucket every epoch.

A restarted trainer resumes from its last checkpoint (weights and optimizer state) and ends
with the same number of epochs as an uninterrupted run. Results land in
``<run_uri>/models/<model>/`` (``model.keras``, ``history.json``, ``train.json``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import numpy as np

from bloodcell import arrays, feeding, hardware, models, sources, storage, tracking
from bloodcell.config import ModelConfig, Profile


@dataclass(frozen=True)
class TrainResult:
    model: str
    model_uri: str
    mlflow_run_id: str
    mlflow_model_uri: str
    epochs: int
    train_seconds: float
    images_per_second: float


def train(
    model_name: str,
    arrays_uri: str,
    run_uri: str,
    profile: Profile,
    experiment: str,
    pipeline_run_id: str,
    parent_run_id: str | None,
    vgg16_weights: str = "none",
    tracker: tracking.Tracker | None = None,
) -> TrainResult:
    """Train ``model_name`` and store it under ``run_uri``; log everything to its MLflow run.

    A model already stored for this run is returned as is. MLflow failures never stop training
    (see :class:`tracking.Tracker`); the bucket always gets the model, history and ``train.json``.
    """
    out_uri = storage.join(run_uri, "models", model_name)
    if storage.exists(storage.join(out_uri, "train.json")):
        info = storage.read_json(storage.join(out_uri, "train.json"))
        print(f"{model_name} is already trained in this run ({info['model_uri']}); reusing it")
        return TrainResult(
            model_name,
            info["model_uri"],
            info["mlflow_run_id"],
            info["mlflow_model_uri"],
            info["epochs"],
            info["train_seconds"],
            info["images_per_second"],
        )
    tracker = tracker or tracking.Tracker(run_uri, f"train-{model_name}")
    cfg = profile.model(model_name)
    keras.utils.set_random_seed(profile.seed)
    policy = hardware.apply_precision(profile.precision)
    meta = arrays.meta(arrays_uri)
    x_train, y_train = arrays.load(arrays_uri, "train")
    x_val, y_val = arrays.load(arrays_uri, "val")
    ckpt_uri = storage.join(run_uri, "checkpoints", model_name)
    run_id = parent_run_id and tracker.call(
        "create the model run", tracking.model_run, experiment, pipeline_run_id, parent_run_id, model_name
    )
    print(
        f"training {model_name}: {len(x_train)} train / {len(x_val)} val images at "
        f"{cfg.image_size}px, {policy}, {hardware.device_name()}, MLflow run {run_id or '(none)'}"
    )
    started = time.perf_counter()
    if run_id:
        tracker.attempt(
            "log params",
            tracking.log_params,
            run_id,
            _params(model_name, cfg, profile, policy, arrays_uri, len(x_train), len(x_val), vgg16_weights),
        )
    epoch_logger = EpochMetricsLogger(tracker, run_id)
    try:
        if model_name == "vgg16":
            model, history = _train_vgg16(
                cfg,
                n_classes=len(meta["classes"]),
                train_data=(x_train, y_train),
                val_data=(x_val, y_val),
                ckpt_uri=ckpt_uri,
                weights=vgg16_weights,
                epoch_logger=epoch_logger,
            )
        else:
            model = models.build_model(model_name, len(meta["classes"]), cfg.image_size, augment=cfg.augment)
            _compile(model, learning_rate(cfg, len(x_train)))
            history = fit(
                model,
                (x_train, y_train),
                (x_val, y_val),
                cfg,
                cfg.epochs,
                storage.join(ckpt_uri, "main"),
                epoch_logger=epoch_logger,
            )
    except BaseException:
        if run_id:
            tracker.attempt("mark the model run failed", tracking.finish, run_id, "FAILED")
        raise
    seconds = time.perf_counter() - started
    epochs = len(history.get("loss", []))
    throughput = epochs * len(x_train) / seconds if seconds else 0.0
    mlflow_model_uri = None
    if run_id:
        tracker.await_server()
        epoch_logger.flush()  # epochs that ended during an outage
        tracker.attempt("log results", _log_results, run_id, model.count_params(), epochs, seconds, throughput)
        mlflow_model_uri = tracker.call(
            "log the model", tracking.log_keras_model, run_id, model, meta["classes"], _pip_requirements()
        )
        tracker.attempt("close the model run", tracking.finish, run_id)
    model_uri = _store(
        model,
        history,
        out_uri,
        {
            "model": model_name,
            "classes": meta["classes"],
            "image_size": cfg.image_size,
            "epochs": epochs,
            "train_seconds": seconds,
            "precision": policy,
            "params": model.count_params(),
            "arrays_uri": arrays_uri,
            "mlflow_run_id": run_id or None,
            "images_per_second": throughput,
            "mlflow_model_uri": mlflow_model_uri,
        },
    )
    print(f"{model_name}: {epochs} epochs in {seconds:.0f} s; stored {model_uri}; MLflow model {mlflow_model_uri}")
    return TrainResult(model_name, model_uri, run_id or None, mlflow_model_uri, epochs, seconds, throughput)


def _params(
    model_name: str,
    cfg: ModelConfig,
    profile: Profile,
    policy: str,
    arrays_uri: str,
    n_train: int,
    n_val: int,
    vgg16_weights: str,
) -> dict:
    """Every training choice, as MLflow params."""
    params = {
        **asdict(cfg),
        "precision": policy,
        "seed": profile.seed,
        "profile": profile.name,
        "arrays_uri": arrays_uri,
        "n_train": n_train,
        "n_val": n_val,
        "augmentation": "RandomSymmetry: one of the 8 right-angle symmetries per image" if cfg.augment else "none",
        "optimizer": "adam",
        "lr_schedule": _schedule_description(cfg),
        "early_stopping": f"val_loss, patience {cfg.early_stopping_patience}, from epoch "
        f"{cfg.early_stopping_start + 1}, restore best",
        "input_scaling": "vgg16 preprocess" if model_name == "vgg16" else "rescale 1/255",
        "input_pipeline": feeding.describe(),
    }
    if model_name == "vgg16":
        params["vgg16_weights"] = vgg16_weights
    return params


def _log_results(run_id: str, params: int, epochs: int, seconds: float, throughput: float) -> None:
    tracking.log_params(run_id, {"params": params, "epochs_run": epochs})
    tracking.log_metrics(run_id, {"train_seconds": seconds, "train_images_per_second": throughput})


def _pip_requirements() -> list[str]:
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


def _schedule_description(cfg: ModelConfig) -> str:
    if cfg.lr_schedule == "cosine":
        return "1 epoch linear warm-up from lr/10, then cosine decay to 0"
    return "ReduceLROnPlateau(val_loss, factor 0.5, patience 2)"


def learning_rate(cfg: ModelConfig, n_train: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """The constant rate (ReduceLROnPlateau adjusts it) or, for ``cosine``, a warm-up + cosine schedule."""
    if cfg.lr_schedule != "cosine":
        return cfg.learning_rate
    steps_per_epoch = -(-n_train // cfg.batch_size)
    return keras.optimizers.schedules.CosineDecay(
        cfg.learning_rate / 10,
        decay_steps=max(steps_per_epoch * (cfg.epochs - 1), 1),
        warmup_target=cfg.learning_rate,
        warmup_steps=steps_per_epoch,
    )


def _compile(model: keras.Model, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )


def fit(
    model: keras.Model,
    train_data: tuple,
    val_data: tuple,
    cfg: ModelConfig,
    epochs: int,
    ckpt_uri: str,
    step_offset: int = 0,
    epoch_logger: EpochMetricsLogger | None = None,
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
    callbacks = [
        keras.callbacks.EarlyStopping(
            "val_loss",
            patience=cfg.early_stopping_patience,
            restore_best_weights=True,
            start_from_epoch=cfg.early_stopping_start,
            verbose=1,
        ),
        BucketCheckpoint(ckpt_uri, history),
        *extra_callbacks,
    ]
    if epoch_logger:
        epoch_logger.step_offset = step_offset
        callbacks.append(epoch_logger)
    if cfg.lr_schedule == "plateau":
        callbacks.insert(
            1, keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=2, min_lr=1e-6, verbose=1)
        )
    x, y = train_data
    result = model.fit(
        feeding.batches(x, y, batch_size=cfg.batch_size, shuffle=True),
        validation_data=feeding.batches(*val_data, batch_size=cfg.batch_size),
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=callbacks,
        class_weight=_class_weights(y, cfg),
        verbose=1,
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


def _class_weights(y: np.ndarray, cfg: ModelConfig) -> dict[int, float] | None:
    if not cfg.class_weights:
        return None
    counts = np.bincount(y)
    return {i: len(y) / (len(counts) * c) for i, c in enumerate(counts) if c}


class EpochMetricsLogger(keras.callbacks.Callback):
    """Log each epoch's metrics (and learning rate) to an MLflow run.

    Epochs that cannot be logged (server down) are kept and sent with the next epoch that can,
    so a short outage leaves no gap in the run's metric history.
    """

    def __init__(self, tracker: tracking.Tracker, run_id: str | None, step_offset: int = 0):
        super().__init__()
        self.tracker, self.run_id, self.step_offset = tracker, run_id, step_offset
        self.pending: list[tuple[dict[str, float], int]] = []

    def on_epoch_end(self, epoch, logs=None):
        if not self.run_id:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items()}
        metrics["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.pending.append((metrics, self.step_offset + epoch))
        self.flush()

    def flush(self) -> None:
        if self.pending and self.tracker.attempt(
            "log per-epoch metrics", tracking.log_metric_steps, self.run_id, self.pending
        ):
            self.pending = []


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
        saved = keras.models.load_model(
            storage.download_file(storage.join(ckpt_uri, "last.keras"), Path(tmp, "last.keras"))
        )
    model.set_weights(saved.get_weights())
    model.optimizer.build(model.trainable_variables)
    for target, source in zip(model.optimizer.variables, saved.optimizer.variables):
        target.assign(source)
    return state


def _train_vgg16(
    cfg: ModelConfig,
    n_classes: int,
    train_data: tuple,
    val_data: tuple,
    ckpt_uri: str,
    weights: str,
    epoch_logger: EpochMetricsLogger | None = None,
) -> tuple[keras.Model, dict[str, list[float]]]:
    """Two phases on cached features: the frozen base is computed once, not every epoch.

    1. head only, on the base's output; 2. the top block (block5) and head at a low learning
    rate, on the output of block4 (frozen). The result is one model from uint8 images to classes.
    """
    base = models.vgg16_base(cfg.image_size, resolve_vgg16_weights(weights))
    stem = keras.Model(base.input, base.get_layer("block4_pool").output, name="vgg16_stem")
    top_input = keras.Input(stem.output_shape[1:], name="block4_features")
    x = top_input
    for layer in base.layers[base.layers.index(base.get_layer("block4_pool")) + 1 :]:
        x = layer(x)
    top = keras.Model(top_input, x, name="vgg16_block5")
    head = models.vgg16_head(top.output_shape[1:], n_classes)

    images = keras.Input((cfg.image_size, cfg.image_size, 3), dtype="uint8", name="image")
    featurizer = keras.Model(images, stem(models.VGGPreprocess(name="vgg_preprocess")(images)))
    stem_train, stem_val = (_features(featurizer, x, cfg.batch_size) for x in (train_data[0], val_data[0]))
    top_train, top_val = (_features(top, x, cfg.batch_size) for x in (stem_train, stem_val))

    _compile(head, cfg.learning_rate)
    history = fit(
        head,
        (top_train, train_data[1]),
        (top_val, val_data[1]),
        cfg,
        cfg.epochs,
        storage.join(ckpt_uri, "frozen"),
        epoch_logger=epoch_logger,
    )
    if cfg.fine_tune_epochs:
        top.trainable = True
        tune_input = keras.Input(stem.output_shape[1:])
        tuned = keras.Model(tune_input, head(top(tune_input)))
        _compile(tuned, cfg.fine_tune_learning_rate)
        tune_history = fit(
            tuned,
            (stem_train, train_data[1]),
            (stem_val, val_data[1]),
            cfg,
            cfg.fine_tune_epochs,
            storage.join(ckpt_uri, "fine_tune"),
            step_offset=len(history.get("loss", [])),
            epoch_logger=epoch_logger,
        )
        history = {k: history.get(k, []) + tune_history.get(k, []) for k in set(history) | set(tune_history)}
    model = keras.Model(images, head(top(featurizer(images))), name="vgg16")
    _compile(model, cfg.fine_tune_learning_rate)
    return model, history


def _features(extractor: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    return feeding.predict(extractor, x, batch_size)


def resolve_vgg16_weights(weights: str) -> str | None:
    """``imagenet`` | local path | ``gs://`` URI (downloaded) | ``none``, as Keras takes it."""
    models.check_vgg16_weights(weights)
    if weights in ("none", ""):
        return None
    if weights.startswith("gs://"):
        return str(storage.cached_download(weights, sources.cache_dir() / "weights"))
    return weights


def _store(model: keras.Model, history: dict, out_uri: str, info: dict) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, "model.keras")
        model.save(path)
        model_uri = storage.upload_file(path, storage.join(out_uri, "model.keras"))
    storage.write_json(history, storage.join(out_uri, "history.json"))
    storage.write_json({**info, "model_uri": model_uri}, storage.join(out_uri, "train.json"))
    return model_uri
