"""Model registry: the original architectures (cnn1, cnn2), VGG16 from scratch and VGG16 transfer learning.

Keras 3 APIs only, so models run on the TensorFlow and JAX backends. Pixel scaling and
augmentation are layers inside the model: a saved model takes raw uint8 RGB images.
Adding a model is one builder function decorated with :func:`register`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import keras
from keras import layers

from bloodcell.errors import BloodcellError
from bloodcell.layers import BatchNorm, RandomSymmetry, VGGPreprocess


@dataclass(frozen=True)
class ModelSpec:
    name: str
    build: Callable[..., keras.Model]
    min_size: int
    description: str


REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, min_size: int, description: str):
    def decorator(build: Callable[..., keras.Model]) -> Callable[..., keras.Model]:
        REGISTRY[name] = ModelSpec(name, build, min_size, description)
        return build

    return decorator


def build_model(name: str, n_classes: int, image_size: int, augment: bool = True, **settings) -> keras.Model:
    """Build registered model ``name`` for ``n_classes`` classes and square ``image_size`` inputs; ``settings``
    are the builder's own (e.g. ``width``, ``weights``)."""
    if name not in REGISTRY:
        raise BloodcellError(f"unknown model architecture {name!r}; registered: {', '.join(REGISTRY)}")
    spec = REGISTRY[name]
    if image_size < spec.min_size:
        raise BloodcellError(
            f"{name} needs images of at least {spec.min_size}x{spec.min_size} pixels "
            f"({spec.description}); got {image_size}. Set its image_size >= {spec.min_size}."
        )
    if n_classes < 2:
        raise BloodcellError(f"{name} needs at least 2 classes, got {n_classes}")
    unknown = set(settings) - set(inspect.signature(spec.build).parameters)
    if unknown:
        raise BloodcellError(f"architecture {name} has no setting {', '.join(sorted(unknown))}")
    return spec.build(n_classes=n_classes, image_size=image_size, augment=augment, **settings)


def augmentation(seed: int = 777) -> RandomSymmetry:
    """Flips and transposes: the eight right-angle symmetries of the image."""
    return RandomSymmetry(seed=seed, name="augment")


# With a blur setting, this share of the training images is blurred (the rest untouched).
BLUR_SHARE = 0.25


def _inputs(image_size: int, augment: bool, blur_sigma: float = 0.0) -> tuple[keras.KerasTensor, keras.KerasTensor]:
    """The uint8 image input and, in training, its augmentation: a random symmetry and, with ``blur_sigma``,
    a Gaussian blur of sigma up to that many pixels on :data:`BLUR_SHARE` of the images (the focus and optics
    of other microscopes)."""
    inputs = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    if not augment:
        return inputs, inputs
    x = augmentation()(inputs)
    if blur_sigma > 0:
        x = layers.RandomGaussianBlur(
            factor=(BLUR_SHARE, BLUR_SHARE),
            kernel_size=2 * math.ceil(2 * blur_sigma) + 1,
            sigma=(blur_sigma / 4, blur_sigma),
            value_range=(0, 255),
            seed=777,
            name="augment_blur",
        )(x)
    return inputs, x


def _classifier(x, n_classes: int):
    return layers.Dense(n_classes, activation="softmax", dtype="float32", name="probabilities")(x)


@register("cnn1", min_size=46, description="4 valid 3x3 convolutions with 2x2 pooling")
def cnn1(n_classes: int, image_size: int, augment: bool = True, blur_sigma: float = 0.0) -> keras.Model:
    """The original CNN1: 4 conv blocks with dropout, two dense layers."""
    inputs, x = _inputs(image_size, augment, blur_sigma)
    x = layers.Rescaling(1 / 255)(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    for filters, rate in ((32, 0.2), (64, 0.3), (32, 0.4)):
        x = layers.Conv2D(filters, 3, activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
        x = layers.Dropout(rate)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(80, activation="relu")(x)
    return keras.Model(inputs, _classifier(x, n_classes), name="cnn1")


@register("cnn2", min_size=94, description="5 valid 3x3 convolutions with 2x2 pooling")
def cnn2(n_classes: int, image_size: int, augment: bool = True, blur_sigma: float = 0.0) -> keras.Model:
    """The original CNN2: batch normalisation and L1-regularised convolutions."""
    inputs, x = _inputs(image_size, augment, blur_sigma)
    x = layers.Rescaling(1 / 255)(x)
    x = layers.Conv2D(32, 3, activation="relu")(x)
    x = BatchNorm()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(256, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(128, 3, activation="relu", kernel_regularizer="l1")(x)
    x = BatchNorm()(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(128, 3, activation="relu", kernel_regularizer=keras.regularizers.L1(1e-4))(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, activation="relu")(x)
    x = layers.MaxPooling2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    x = layers.Dense(32, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(inputs, _classifier(x, n_classes), name="cnn2")


# VGG16's convolutional layout: (filters, 3x3 convolutions) of each block, a 2x2 max pooling after each.
VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))


@register("vgg16_from_scratch", min_size=32, description="the VGG16 layout pools five times")
def vgg16_from_scratch(
    n_classes: int, image_size: int, augment: bool = True, width: float = 1.0, blur_sigma: float = 0.0
) -> keras.Model:
    """VGG16 from random weights: its 13 3x3 convolutions in 5 pooled blocks at ``width`` times its channels,
    each followed by batch normalisation, and the transfer model's pooled dropout ``head``; every layer trains.

    Without pretrained weights a plain 16-layer stack barely learns in a laptop's few epochs: He
    initialisation and batch normalisation let it train at a high learning rate from the first step.
    """
    inputs, x = _inputs(image_size, augment, blur_sigma)
    x = layers.Rescaling(1 / 255)(x)
    for block, (filters, convs) in enumerate(VGG16_BLOCKS, start=1):
        for conv in range(1, convs + 1):
            name = f"block{block}_conv{conv}"
            x = layers.Conv2D(
                max(round(filters * width), 1),
                3,
                padding="same",
                use_bias=False,
                kernel_initializer="he_normal",
                name=name,
            )(x)
            x = BatchNorm(name=f"{name}_bn")(x)
            x = layers.ReLU(name=f"{name}_relu")(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    head = vgg16_head(x.shape[1:], n_classes)
    return keras.Model(inputs, head(x), name="vgg16")


@register("vgg16_transfer", min_size=32, description="the VGG16 base pools five times")
def vgg16_transfer(n_classes: int, image_size: int, augment: bool = False, weights: str | None = None) -> keras.Model:
    """VGG16 transfer learning: ImageNet preprocessing, the VGG16 convolutional base in two frozen parts
    (blocks 1-4 ``vgg16_stem``, block 5 ``vgg16_block5``) and a pooled dropout ``head``. ``weights``: a Keras
    weights argument (None, a random frozen base, only for speed measurements).

    :func:`bloodcell.fitting.fit_transfer` trains it in two phases: the head, then block 5 with it.
    """
    inputs, x = _inputs(image_size, augment)
    stem, block5 = vgg16_base(image_size, weights)
    features = block5(stem(VGGPreprocess(name="vgg_preprocess")(x)))
    head = vgg16_head(block5.output_shape[1:], n_classes)
    return keras.Model(inputs, head(features), name="vgg16")


def vgg16_base(image_size: int, weights: str | None) -> tuple[keras.Model, keras.Model]:
    """The VGG16 convolutional base (``weights``: a Keras weights argument), frozen, cut after block 4."""
    base = keras.applications.VGG16(include_top=False, weights=weights, input_shape=(image_size, image_size, 3))
    cut = base.get_layer("block4_pool")
    stem = keras.Model(base.input, cut.output, name="vgg16_stem")
    block_input = keras.Input(cut.output.shape[1:], name="block4_features")
    x = block_input
    for layer in base.layers[base.layers.index(cut) + 1 :]:
        x = layer(x)
    block5 = keras.Model(block_input, x, name="vgg16_block5")
    stem.trainable = block5.trainable = False
    return stem, block5


def vgg16_head(feature_shape: tuple[int, ...], n_classes: int) -> keras.Model:
    features = keras.Input(feature_shape, name="vgg_features")
    x = layers.GlobalAveragePooling2D()(features)
    x = layers.Dropout(0.3)(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(0.3)(x)
    return keras.Model(features, _classifier(x, n_classes), name="head")
