"""Train one model with its recipe, checkpointing every epoch through a :class:`Checkpoints` writer.

Keras and numpy only (no object storage, no MLflow): the pipeline's trainer (:mod:`bloodcell.train`) passes
the run store's bucket checkpoints and its MLflow callback; a bare accelerator machine
(``benchmarks/gpu_training.py``) and the tests pass a local folder or none. A restarted trainer resumes from
its last checkpoint (weights and optimizer state) and ends with the same epochs as an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Protocol

import keras
import numpy as np

from bloodcell import feeding, modelfile, models, recipes
from bloodcell.config import ModelConfig, Recipe, TransferConfig

Subset = tuple[np.ndarray, np.ndarray]  # images, labels
History = dict[str, list[float]]


class Checkpoints(Protocol):
    """Where a training phase keeps its last epoch: the model (with its optimizer) and a small state record."""

    def phase(self, name: str) -> Checkpoints:
        """The checkpoints of one phase of the training (``main``, ``frozen``, ``fine_tune``)."""
        ...

    def read_state(self) -> dict | None:
        """The last saved state (epoch, history, done), or None before the first epoch ended."""
        ...

    def read_model(self, folder: Path) -> Path:
        """The last saved ``.keras`` file, copied into ``folder``."""
        ...

    def write(self, model_file: Path, state: dict) -> None:
        """Keep ``model_file`` and then ``state`` (written last: a state always has its model)."""
        ...


class NoCheckpoints:
    """Nothing kept: a restart trains from the first epoch."""

    def phase(self, name: str) -> NoCheckpoints:
        return self

    def read_state(self) -> dict | None:
        return None

    def read_model(self, folder: Path) -> Path:
        raise FileNotFoundError("no checkpoints are kept")

    def write(self, model_file: Path, state: dict) -> None:
        return None

    def __str__(self) -> str:
        return "no checkpoints"


class FolderCheckpoints:
    """Checkpoints in a local folder: ``<folder>/<phase>/last.keras`` and ``state.json``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    def phase(self, name: str) -> FolderCheckpoints:
        return FolderCheckpoints(self.folder / name)

    def __str__(self) -> str:
        return str(self.folder)

    def read_state(self) -> dict | None:
        state = self.folder / "state.json"
        return json.loads(state.read_text()) if state.is_file() else None

    def read_model(self, folder: Path) -> Path:
        return Path(shutil.copyfile(self.folder / "last.keras", folder / "last.keras"))

    def write(self, model_file: Path, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        Path(shutil.copyfile(model_file, self.folder / "last.keras.partial")).replace(self.folder / "last.keras")
        (self.folder / "state.json.partial").write_text(json.dumps(state))
        (self.folder / "state.json.partial").replace(self.folder / "state.json")


class PhaseCallback(keras.callbacks.Callback):
    """A callback told where each phase's epochs start in the whole training (e.g. to number logged epochs)."""

    step_offset = 0


def train_recipe(
    recipe: Recipe,
    n_classes: int,
    data: tuple[Subset, Subset],
    checkpoints: Checkpoints,
    weights: str | None = None,
    callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> tuple[keras.Model, History]:
    """Build the model ``recipe`` describes and train it on ``data`` (train, validation); ``weights``: the
    pretrained base's, as Keras takes them (a transfer recipe only). The model and the history of all epochs."""
    if isinstance(recipe, TransferConfig):
        model = models.build_model(recipe.architecture, n_classes, recipe.image_size, augment=False, weights=weights)
        return model, fit_transfer(model, recipe, data, checkpoints, callbacks)
    model = recipes.build(recipe, n_classes)
    return model, fit_end_to_end(model, recipe, data, checkpoints, callbacks)


def fit_end_to_end(
    model: keras.Model,
    recipe: ModelConfig,
    data: tuple[Subset, Subset],
    checkpoints: Checkpoints,
    callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> History:
    """Train every layer of ``model`` on the (augmented) images, in one phase."""
    train_data, val_data = data
    recipes.compile_model(model, recipes.learning_rate(recipe, len(train_data[0])))
    return fit(model, train_data, val_data, recipe, recipe.epochs, checkpoints.phase("main"), callbacks=callbacks)


def fit_transfer(
    model: keras.Model,
    cfg: TransferConfig,
    data: tuple[Subset, Subset],
    checkpoints: Checkpoints,
    callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> History:
    """Train the parts of a :func:`models.vgg16_transfer` model in place, in two phases on cached features.

    The frozen layers run once over the images, not every epoch: 1. the head, on block 5's output;
    2. block 5 and the head at a low learning rate, on block 4's output. Returns both phases' history.
    """
    stem, block5, head = (model.get_layer(name) for name in ("vgg16_stem", "vgg16_block5", "head"))
    featurizer = keras.Model(model.input, stem(model.get_layer("vgg_preprocess")(model.input)))
    (x_train, y_train), (x_val, y_val) = data
    stem_train, stem_val = (feeding.predict(featurizer, x, cfg.batch_size) for x in (x_train, x_val))
    block5_train, block5_val = (feeding.predict(block5, x, cfg.batch_size) for x in (stem_train, stem_val))

    recipes.compile_model(head, cfg.learning_rate)
    frozen = checkpoints.phase("frozen")
    history = fit(head, (block5_train, y_train), (block5_val, y_val), cfg, cfg.epochs, frozen, callbacks=callbacks)
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
            checkpoints.phase("fine_tune"),
            step_offset=len(history.get("loss", [])),
            callbacks=callbacks,
        )
        history = {k: history.get(k, []) + tune_history.get(k, []) for k in set(history) | set(tune_history)}
    recipes.compile_model(model, cfg.fine_tune_learning_rate)
    return history


def fit(
    model: keras.Model,
    train_data: Subset,
    val_data: Subset,
    cfg: Recipe,
    epochs: int,
    checkpoints: Checkpoints,
    step_offset: int = 0,
    callbacks: tuple[keras.callbacks.Callback, ...] = (),
) -> History:
    """``model.fit`` with a checkpoint every epoch and resume; returns the history of all epochs."""
    state = restore(model, checkpoints)
    history = state.get("history", {})
    if state.get("done"):
        print(f"checkpoint {checkpoints}: phase already complete, reusing it")
        return history
    initial_epoch = state.get("epoch", 0)
    if initial_epoch:
        print(f"resuming from {checkpoints} at epoch {initial_epoch + 1}/{epochs}")
    for callback in callbacks:
        if isinstance(callback, PhaseCallback):
            callback.step_offset = step_offset
    x, y = train_data
    result = model.fit(
        feeding.batches(x, y, batch_size=cfg.batch_size, shuffle=True),
        validation_data=feeding.batches(*val_data, batch_size=cfg.batch_size),
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=[*recipes.callbacks(cfg), EpochCheckpoint(checkpoints, history), *callbacks],
        class_weight=class_weights(y, cfg),
        verbose=progress_verbosity(),
        shuffle=False,  # the batches reshuffle themselves every epoch
    )
    merged = {
        k: history.get(k, [])[:initial_epoch] + [float(v) for v in result.history.get(k, [])]
        for k in set(history) | set(result.history)
    }
    save(model, checkpoints, {"epoch": len(merged.get("loss", [])), "history": merged, "done": True})
    return merged


def progress_verbosity() -> int:
    """Keras' progress bar redraws in place only on a terminal; in a log (kfp's runners, a pod) it would add a
    line per step, so there it writes one line per epoch."""
    return 1 if sys.stdout.isatty() else 2


def class_weights(y: np.ndarray, cfg: Recipe) -> dict[int, float] | None:
    if not cfg.class_weights:
        return None
    counts = np.bincount(y)
    return {i: len(y) / (len(counts) * c) for i, c in enumerate(counts) if c}


class EpochCheckpoint(keras.callbacks.Callback):
    """Save model and optimizer after every epoch (the state written last)."""

    def __init__(self, checkpoints: Checkpoints, history: History):
        super().__init__()
        self.checkpoints = checkpoints
        self.history = {k: list(v) for k, v in history.items()}

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, [])[epoch:] = [float(value)]
        save(self.model, self.checkpoints, {"epoch": epoch + 1, "history": self.history, "done": False})


def save(model: keras.Model, checkpoints: Checkpoints, state: dict) -> None:
    if isinstance(checkpoints, NoCheckpoints):
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoints.write(modelfile.save(model, Path(tmp, "last.keras")), state)


def restore(model: keras.Model, checkpoints: Checkpoints) -> dict:
    """Weights and optimizer state of the last checkpoint, put into ``model``; the saved state ({} if none)."""
    state = checkpoints.read_state()
    if state is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        saved = modelfile.load(checkpoints.read_model(Path(tmp)), "the last checkpoint")
    model.set_weights(saved.get_weights())
    model.optimizer.build(model.trainable_variables)
    for target, source in zip(model.optimizer.variables, saved.optimizer.variables, strict=True):
        target.assign(source)
    return state
