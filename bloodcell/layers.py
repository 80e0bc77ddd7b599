"""Every custom Keras layer a bloodcell model file may hold, registered with Keras (package ``bloodcell``)
when this module is imported: :mod:`bloodcell.modelfile`, the one loader, imports it, so any step loads any
model. Keras finds a layer by its registered name (``bloodcell>ClassName``), not by this module's path.

- training: :class:`RandomSymmetry` (augmentation), :class:`VGGPreprocess`, :class:`BatchNorm`;
- the combined model: :class:`ResizeImages`, :class:`DihedralImages`, :class:`SymmetryMean`;
- the familiarity check: :class:`ImageStatistics`, :class:`Familiarity`, :class:`CombinedFamiliarity`;
- calibration and the refer and set rules: :class:`Calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import keras
import numpy as np
from keras import layers, ops

from bloodcell import selective

# The eight right-angle symmetries of a square image are reached by applying each of these or not
# (horizontal flip, vertical flip, transpose): training augmentation and test-time augmentation share them.
SYMMETRY_TRANSFORMS = (
    lambda images: ops.flip(images, axis=1),
    lambda images: ops.flip(images, axis=2),
    lambda images: ops.transpose(images, (0, 2, 1, 3)),
)
SYMMETRIES = 2 ** len(SYMMETRY_TRANSFORMS)  # the dihedral group of the square: 4 rotations, each optionally mirrored
RESIZE_METHODS = ("bilinear", "area")  # tried in this order on validation; a tie keeps the first
MAX_IMAGE_SIZE = 4096  # px: far above any profile's input size
# Familiarity: bounds on what a model's config may ask to allocate; the floor of the detail logarithm.
MAX_FEATURES, MAX_CLASSES = 8192, 1000  # per feature vector (VGG16's widest block: 512); classes
TINY_DISTANCE = 1e-12
DEFAULT_FLAG_SHARE = 0.05
TINY = 1e-37  # clip before log: float32 softmax outputs reach 0 only for logit gaps above ~87


class FittedBlock(Protocol):
    """One block's fitted statistics (familiarity.BlockStatistics), as the :class:`Familiarity` layer holds them."""

    @property
    def offset(self) -> np.ndarray: ...

    @property
    def whitening(self) -> np.ndarray: ...

    @property
    def centres(self) -> np.ndarray: ...

    @property
    def log_mean(self) -> float: ...

    @property
    def log_std(self) -> float: ...


@keras.saving.register_keras_serializable(package="bloodcell")
class RandomSymmetry(layers.Layer):
    """In training, give each image one of its eight right-angle symmetries, drawn at random.

    Three coin flips per image (horizontal flip, vertical flip, transpose) reach all eight,
    which are label-preserving for cell images and need no interpolation. Each flip selects whole
    images with one gather along the batch axis, on the raw uint8 input, which is much cheaper than
    ``RandomFlip``'s element-wise selects (docs/performance.md). Images must be square.
    """

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=False):
        if not training:
            return images
        batch = ops.shape(images)[0]
        for transform in SYMMETRY_TRANSFORMS:
            chosen = ops.cast(keras.random.uniform((batch,), seed=self.seed_generator) < 0.5, "int32")
            candidates = ops.concatenate([images, transform(images)], axis=0)
            images = ops.take(candidates, ops.arange(batch) + batch * chosen, axis=0)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="bloodcell")
class VGGPreprocess(layers.Layer):
    """The VGG16 ImageNet preprocessing (RGB->BGR, subtract channel means) as a layer."""

    MEAN_BGR = (103.939, 116.779, 123.68)

    def call(self, images):
        bgr = ops.flip(ops.cast(images, self.compute_dtype), axis=-1)
        return bgr - ops.convert_to_tensor(self.MEAN_BGR, dtype=self.compute_dtype)


@keras.saving.register_keras_serializable(package="bloodcell")
class BatchNorm(layers.BatchNormalization):
    """Keras' ``BatchNormalization`` (same math, weights and config), fused under TensorFlow.

    Keras computes batch statistics, normalisation and their gradients as a dozen separate float32
    passes over the activations; TensorFlow's ``FusedBatchNormV3`` does each direction in one kernel
    (docs/performance.md). Other backends (XLA fuses these itself), masks and the
    renorm/synchronized variants use Keras' own code.
    """

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        channels = inputs.shape[-1]
        gamma = tf.cast(self.gamma, "float32") if self.scale else tf.ones(channels, "float32")
        beta = tf.cast(self.beta, "float32") if self.center else tf.zeros(channels, "float32")
        if training and self.trainable:
            outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
                inputs, gamma, beta, epsilon=self.epsilon, is_training=True
            )
            count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), "float32")
            variance = variance * (count - 1) / count  # TF returns it Bessel-corrected; Keras keeps the biased one
            self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
            self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
        else:
            outputs, _, _ = tf.compat.v1.nn.fused_batch_norm(
                inputs,
                gamma,
                beta,
                mean=tf.cast(self.moving_mean, "float32"),
                variance=tf.cast(self.moving_variance, "float32"),
                epsilon=self.epsilon,
                is_training=False,
            )
        return tf.cast(outputs, self.compute_dtype)

    def _fusable(self, inputs, mask) -> bool:
        return (
            keras.backend.backend() == "tensorflow"
            and mask is None
            and len(inputs.shape) == 4
            and self.axis in (3, -1, [3], [-1])
            and not self.renorm
            and not self.synchronized
            and self.epsilon >= 1.001e-5
            and inputs.shape[-1] is not None
        )


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
    for transform in SYMMETRY_TRANSFORMS:
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


LAPLACIAN_FLOOR = 1e-4  # keeps the logarithm finite on flat images


@keras.saving.register_keras_serializable(package="bloodcell")
class ImageStatistics(layers.Layer):
    """uint8 images -> per channel (0-1 scale): the mean, the standard deviation, and the logarithms of the
    mean absolute value and the standard deviation of the 4-neighbour Laplacian (fine detail). (B, 12)."""

    def call(self, images):
        x = ops.cast(images, "float32") / 255.0
        padded = ops.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="symmetric")
        laplacian = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:] - 4.0 * x
        return ops.concatenate(
            [
                ops.mean(x, axis=(1, 2)),
                ops.std(x, axis=(1, 2)),
                ops.log(ops.mean(ops.abs(laplacian), axis=(1, 2)) + LAPLACIAN_FLOOR),
                ops.log(ops.std(laplacian, axis=(1, 2)) + LAPLACIAN_FLOOR),
            ],
            axis=1,
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], 4 * input_shape[-1])


def pooled(features: keras.KerasTensor) -> keras.KerasTensor:
    """A feature vector as it is, or a block's maps averaged over their positions (float32)."""
    features = ops.cast(features, "float32")
    return ops.mean(features, axis=(1, 2)) if len(features.shape) == 4 else features


class ScoredFamiliarity(layers.Layer):
    """What both familiarity layers carry in their config: the threshold and how often validation was flagged."""

    def __init__(self, threshold: float = math.inf, flag_share: float = DEFAULT_FLAG_SHARE, **kwargs):
        super().__init__(**kwargs)
        self.threshold, self.flag_share = threshold, flag_share

    def get_config(self):
        return {**super().get_config(), "threshold": self.threshold, "flag_share": self.flag_share}


@keras.saving.register_keras_serializable(package="bloodcell")
class Familiarity(ScoredFamiliarity):
    """The vectors of :func:`feature_outputs` (maps are pooled) -> the familiarity score (B, 1); statistics in
    non-trainable weights. (Models saved before the image statistics give it block maps only.)"""

    def __init__(self, dims: list[int], n_classes: int, **kwargs):
        super().__init__(**kwargs)
        # The weights' shapes come from the config, which is data: bound them before anything is allocated.
        if not all(isinstance(d, int) and 1 <= d <= MAX_FEATURES for d in dims) or not 2 <= n_classes <= MAX_CLASSES:
            raise ValueError(f"Familiarity dims {dims!r} / classes {n_classes!r} are out of bounds: not our model")
        self.dims, self.n_classes = list(dims), n_classes

    def build(self, input_shape):
        self.statistics = []
        for i, d in enumerate(self.dims):
            self.statistics.append(
                (
                    self.add_weight(name=f"offset_{i}", shape=(d,), initializer="zeros", trainable=False),
                    self.add_weight(name=f"whitening_{i}", shape=(d, d), initializer="zeros", trainable=False),
                    self.add_weight(
                        name=f"centres_{i}", shape=(self.n_classes, d), initializer="zeros", trainable=False
                    ),
                    self.add_weight(name=f"standardise_{i}", shape=(2,), initializer="ones", trainable=False),
                )
            )

    def set_statistics(self, blocks: Sequence[FittedBlock]) -> None:
        for variables, block in zip(self.statistics, blocks, strict=True):
            values = (block.offset, block.whitening, block.centres, np.array([block.log_mean, block.log_std]))
            for variable, value in zip(variables, values, strict=True):
                variable.assign(np.asarray(value, np.float32))

    def call(self, maps):
        scores = []
        for block_maps, (offset, whitening, centres, standardise) in zip(maps, self.statistics, strict=True):
            g = ops.matmul(pooled(block_maps) - offset, whitening)
            d = (
                ops.sum(g * g, axis=1, keepdims=True)
                - 2 * ops.matmul(g, ops.transpose(centres))
                + ops.sum(centres * centres, axis=1)[None, :]
            )
            distance = ops.maximum(ops.min(d, axis=1), TINY_DISTANCE)
            scores.append((ops.log(distance) - standardise[0]) / standardise[1])
        return ops.max(ops.stack(scores, axis=1), axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], 1)

    def get_config(self):
        return {**super().get_config(), "dims": self.dims, "n_classes": self.n_classes}


@keras.saving.register_keras_serializable(package="bloodcell")
class CombinedFamiliarity(ScoredFamiliarity):
    """The combined model's score: the largest of its members' scores, each less that member's threshold."""

    def __init__(self, member_thresholds: list[float], **kwargs):
        super().__init__(**kwargs)
        self.member_thresholds = [float(t) for t in member_thresholds]

    def call(self, scores):
        parts = scores if isinstance(scores, (list, tuple)) else [scores]
        shifted = [ops.cast(s, "float32") - t for s, t in zip(parts, self.member_thresholds, strict=True)]
        return ops.max(ops.concatenate(shifted, axis=1), axis=1, keepdims=True)

    def compute_output_shape(self, input_shape):
        first = input_shape[0] if isinstance(input_shape, list) else input_shape
        return (first[0], 1)

    def get_config(self):
        return {**super().get_config(), "member_thresholds": self.member_thresholds}


@keras.saving.register_keras_serializable(package="bloodcell")
class Calibration(layers.Layer):
    """Temperature-scaled probabilities: softmax(log p / temperature); carries the refer and set rules.

    The rules do not change the output: they travel in the layer's config so whoever loads the model
    (``predict``, ``validate``, the registry) refers and builds prediction sets as chosen for it.
    ``refer_below`` is one number in models saved before per-class thresholds (the same for every class).
    """

    def __init__(
        self,
        temperature: float = 1.0,
        refer_below: float | list[float] = 0.0,
        target_accuracy: float = 0.0,
        promise: list[str] | None = None,
        level: float = selective.DEFAULT_LEVEL,
        set_min_probability: list[float] | None = None,
        set_alpha: float | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.temperature, self.refer_below, self.target_accuracy = temperature, refer_below, target_accuracy
        self.promise, self.level = promise, level
        self.set_min_probability, self.set_alpha = set_min_probability, set_alpha

    def call(self, probabilities):
        logp = ops.log(ops.clip(ops.cast(probabilities, "float32"), TINY, 1.0))
        return ops.softmax(logp / self.temperature, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {
            **super().get_config(),
            "temperature": self.temperature,
            "refer_below": self.refer_below,
            "target_accuracy": self.target_accuracy,
            "promise": self.promise,
            "level": self.level,
            "set_min_probability": self.set_min_probability,
            "set_alpha": self.set_alpha,
        }


REGISTERED = (
    RandomSymmetry,
    VGGPreprocess,
    BatchNorm,
    ResizeImages,
    DihedralImages,
    SymmetryMean,
    ImageStatistics,
    Familiarity,
    CombinedFamiliarity,
    Calibration,
)
