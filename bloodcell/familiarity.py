"""The familiarity check: is an image like the training images? (Out-of-distribution detection.)

Every model ends in two outputs: its calibrated class probabilities and a familiarity score (higher:
less like the training images). For a trained model the score reads feature vectors at several depths:
the input image's own statistics (:class:`ImageStatistics`: per channel the mean, the spread and the
strength of fine detail) and, at the end of each convolutional block (every 2x2 max pooling, or a nested
block model), the spatial mean of the feature maps. For each, its Mahalanobis distance to the nearest
class mean under one shared covariance (Lee et al., 2018), fitted on the training split; the logarithm of
each distance is standardised on the validation split, and the score is the largest of them. An image is
flagged unfamiliar when its score is above the threshold under which the chosen share of the validation
and calibration cells fall (default: 5% flagged). The image statistics see exposure, stain and
magnification; the early blocks colour and texture; the late ones what the cell looks like: a check on the
last features alone missed most of another laboratory's images (docs/when-not-to-answer.md).

For the combined model, each member scores the image (on the views it sees); the combined score is the
largest of the members' scores, each less its own threshold, with a threshold of its own chosen the same
way. The statistics are layer weights (not config), so the ``.keras`` file carries them and Keras safe mode
loads them; a model saved before this check existed has one output, and ``None`` for its familiarity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras
import numpy as np
from keras import layers
from sklearn.covariance import LedoitWolf

from bloodcell.layers import (
    TINY_DISTANCE,
    Familiarity,
    ImageStatistics,
    ScoredFamiliarity,
    pooled,
)

LAYER_NAME = "familiarity"


def feature_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The layers whose maps the check reads: the end of each convolutional block."""
    return [
        layer
        for layer in model.layers
        if isinstance(layer, layers.MaxPooling2D) or (isinstance(layer, keras.Model) and len(layer.output.shape) == 4)
    ]


def feature_outputs(model: keras.Model) -> list[keras.KerasTensor]:
    """The vectors the check reads, as tensors of ``model``'s graph: the input image's statistics, then each
    of :func:`feature_layers`' maps (the check pools them itself)."""
    chosen = feature_layers(model)
    if not chosen:
        raise ValueError(f"model {model.name} has no convolutional blocks for a familiarity check")
    image = ImageStatistics(name="image_statistics", dtype="float32")(model.inputs[0])
    return [image, *(layer.output for layer in chosen)]


def pooled_features(model: keras.Model) -> keras.Model:
    """A model giving each vector the check reads (:func:`feature_outputs`, pooled), in float32."""
    return keras.Model(model.inputs, [pooled(f) for f in feature_outputs(model)])


@dataclass(frozen=True)
class BlockStatistics:
    """One block's fitted statistics: whitening W (shared precision = W W^T), class means and offset, and
    the validation mean and spread of the log-distance."""

    offset: np.ndarray  # (d,) the training features' mean, subtracted first (float32 precision)
    whitening: np.ndarray  # (d, d)
    centres: np.ndarray  # (C, d) the class means, offset and whitened
    log_mean: float = 0.0
    log_std: float = 1.0

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance of each row to the nearest class mean."""
        g = (np.asarray(features, np.float64) - self.offset) @ self.whitening
        d = (g**2).sum(axis=1)[:, None] - 2 * g @ self.centres.T + (self.centres**2).sum(axis=1)[None, :]
        return np.maximum(d.min(axis=1), TINY_DISTANCE)

    def standardised(self, features: np.ndarray) -> np.ndarray:
        return (np.log(self.distances(features)) - self.log_mean) / self.log_std


def fit_block(features: np.ndarray, labels: np.ndarray, n_classes: int) -> BlockStatistics:
    """Class-conditional Gaussians with a shared (Ledoit-Wolf shrunk) covariance over ``features``."""
    features = np.asarray(features, np.float64)
    offset = features.mean(axis=0)
    means = np.stack([features[labels == c].mean(axis=0) if (labels == c).any() else offset for c in range(n_classes)])
    precision = LedoitWolf().fit(features - means[labels]).precision_
    whitening = np.linalg.cholesky((precision + precision.T) / 2)
    return BlockStatistics(offset, whitening, (means - offset) @ whitening)


def standardise(blocks: list[BlockStatistics], features: list[np.ndarray]) -> list[BlockStatistics]:
    """``blocks`` with each log-distance's mean and spread measured on ``features`` (validation)."""
    result = []
    for block, f in zip(blocks, features, strict=True):
        logs = np.log(block.distances(f))
        result.append(
            BlockStatistics(block.offset, block.whitening, block.centres, float(logs.mean()), float(logs.std() or 1.0))
        )
    return result


def block_scores(blocks: list[BlockStatistics], features: list[np.ndarray]) -> np.ndarray:
    """The familiarity score (largest standardised log-distance over the blocks) of each image."""
    return np.max([b.standardised(f) for b, f in zip(blocks, features, strict=True)], axis=0)


def flag_threshold(scores: np.ndarray, flag_share: float) -> float:
    """The score above which about ``flag_share`` of familiar images fall: the ceil((n + 1)(1 - share))-th
    smallest of ``scores`` (a conformal quantile: at most that share of new familiar images are flagged, on
    average)."""
    ordered = np.sort(np.asarray(scores, np.float64))
    rank = math.ceil((len(ordered) + 1) * (1 - flag_share))
    return float(ordered[min(rank, len(ordered)) - 1])


def familiarity_layer(model: keras.Model) -> ScoredFamiliarity | None:
    """The layer giving ``model``'s familiarity output; None for a model saved before the check existed."""
    if len(model.outputs) < 2:
        return None
    found = [layer for layer in model.layers if isinstance(layer, ScoredFamiliarity) and layer.name == LAYER_NAME]
    return found[-1] if found else None


def with_familiarity(
    model: keras.Model, probabilities: keras.KerasTensor, blocks: list[BlockStatistics], n_classes: int, **config
) -> keras.Model:
    """``model`` with two outputs: ``probabilities`` (a tensor of its graph) and the familiarity score."""
    layer = Familiarity([b.offset.shape[0] for b in blocks], n_classes, name=LAYER_NAME, dtype="float32", **config)
    score = layer(feature_outputs(model))
    layer.set_statistics(blocks)
    return keras.Model(model.inputs, [probabilities, score], name=model.name)


@dataclass(frozen=True)
class Fitted:
    """A fitted check: the blocks' statistics, the threshold, and the share of validation and calibration
    cells above it."""

    blocks: list[BlockStatistics]
    threshold: float
    flag_share: float
    flagged_share: float  # measured on the cells the threshold was chosen on

    def params(self) -> dict:
        return {
            "familiarity_threshold": self.threshold,
            "familiarity_flag_share": self.flag_share,
            "familiarity_flagged_share": self.flagged_share,
            "familiarity_blocks": len(self.blocks),
        }
