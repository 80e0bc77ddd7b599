"""How each model is trained, without storage or tracking: its schedule, optimizer, callbacks and build.

:mod:`bloodcell.train` wraps these with checkpoints, MLflow and the bucket; a bare accelerator machine
with only Keras (``benchmarks/gpu_training.py``) runs them as they are.
"""

from __future__ import annotations

from dataclasses import replace

import keras

from bloodcell import models
from bloodcell.config import ModelConfig

VGG16_PATHS = {
    "from_scratch": "no pretrained weights: every layer trains from random weights, on augmented images",
    "frozen_then_fine_tune": "phase 1: head on frozen blocks 1-5; phase 2: block 5 and head, blocks 1-4 frozen",
}


def vgg16_path(weights: str) -> str:
    """How vgg16 trains with ``--vgg16-weights weights``: a key of :data:`VGG16_PATHS`."""
    return "from_scratch" if weights in ("none", "") else "frozen_then_fine_tune"


def scratch_config(cfg: ModelConfig) -> ModelConfig:
    """The vgg16 settings as the from-scratch path uses them: its own epochs and rate, warm-up + cosine decay.

    Early stopping watches the second half only: while the rate is high, batch norm's moving statistics lag
    behind the weights and the validation loss says little.
    """
    return replace(
        cfg,
        epochs=cfg.scratch_epochs,
        learning_rate=cfg.scratch_learning_rate,
        lr_schedule="cosine",
        early_stopping_start=max(cfg.early_stopping_start, cfg.scratch_epochs // 2),
    )


def build_on_images(model_name: str, cfg: ModelConfig, n_classes: int) -> tuple[keras.Model, ModelConfig]:
    """A model that trains end to end on the images (cnn1, cnn2, vgg16 from scratch) and the settings it
    trains with (for vgg16, :func:`scratch_config`)."""
    if model_name == "vgg16":
        cfg = scratch_config(cfg)
        model = models.build_model(
            "vgg16",
            n_classes,
            cfg.image_size,
            augment=cfg.augment,
            weights=None,
            width=cfg.scratch_width,
            blur_sigma=cfg.blur_sigma,
        )
    else:
        model = models.build_model(
            model_name, n_classes, cfg.image_size, augment=cfg.augment, blur_sigma=cfg.blur_sigma
        )
    return model, cfg


def schedule_description(cfg: ModelConfig) -> str:
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


def compile_model(model: keras.Model, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
    )


def callbacks(cfg: ModelConfig) -> list[keras.callbacks.Callback]:
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
