"""How each model is trained, without storage or tracking: its schedule, optimizer, callbacks and build.

:mod:`bloodcell.fitting` trains with them (checkpoints through any writer), :mod:`bloodcell.train` adds the
bucket and MLflow; a bare accelerator machine with only Keras (``benchmarks/gpu_training.py``) runs fitting as is.
"""

from __future__ import annotations

import keras

from bloodcell import models
from bloodcell.config import ModelConfig, ModelEntry, Recipe, TransferConfig, TransferOrScratch
from bloodcell.weights import Weights


def choose(entry: ModelEntry, weights: Weights) -> Recipe:
    """How a profile's model trains in this run: a transfer-or-scratch model by ``--vgg16-weights``."""
    if isinstance(entry, TransferOrScratch):
        return entry.transfer if weights.pretrained else entry.scratch
    return entry


def describe(recipe: Recipe) -> str:
    """The recipe in words (MLflow's ``training`` param, the log)."""
    if isinstance(recipe, TransferConfig):
        second = (
            f"; phase 2: the top block and head, {recipe.fine_tune_epochs} epochs at {recipe.fine_tune_learning_rate:g}"
            if recipe.fine_tune_epochs
            else ""
        )
        return f"pretrained base: phase 1: the head on the frozen base's features, {recipe.epochs} epochs{second}"
    return f"end to end on the images: every layer from random weights, {recipe.epochs} epochs"


def build(recipe: ModelConfig, n_classes: int) -> keras.Model:
    """A model that trains end to end on the images, as ``recipe`` says."""
    settings = {"width": recipe.width} if recipe.width != 1.0 else {}
    return models.build_model(
        recipe.architecture,
        n_classes,
        recipe.image_size,
        augment=recipe.augment,
        blur_sigma=recipe.blur_sigma,
        **settings,
    )


def schedule_description(cfg: Recipe) -> str:
    if cfg.lr_schedule == "cosine":
        return "1 epoch linear warm-up from lr/10, then cosine decay to 0"
    return "ReduceLROnPlateau(val_loss, factor 0.5, patience 2)"


def learning_rate(cfg: Recipe, n_train: int) -> float | keras.optimizers.schedules.LearningRateSchedule:
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


def compile_model(model: keras.Model, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )


def callbacks(cfg: Recipe) -> list[keras.callbacks.Callback]:
    """Early stopping (best weights restored) and, for the ``plateau`` schedule, ReduceLROnPlateau."""
    chosen: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(
            "val_loss",
            patience=cfg.early_stopping_patience,
            restore_best_weights=True,
            start_from_epoch=cfg.early_stopping_start,
            verbose=1,
        )
    ]
    if cfg.lr_schedule == "plateau":
        chosen.append(keras.callbacks.ReduceLROnPlateau("val_loss", factor=0.5, patience=2, min_lr=1e-6, verbose=1))
    return chosen
