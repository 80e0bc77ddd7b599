"""Every registered model builds for any class count and supported size, trains and round-trips."""

from pathlib import Path

import keras
import numpy as np
import pytest

from bloodcell import layers, models
from bloodcell.errors import BloodcellError
from bloodcell.weights import Weights


@pytest.mark.parametrize(
    "name, size",
    [("cnn1", 46), ("cnn1", 64), ("cnn2", 94), ("cnn2", 128), ("vgg16_from_scratch", 32), ("vgg16_transfer", 48)],
)
@pytest.mark.parametrize("n_classes", [2, 8])
def test_builds_for_any_class_count_and_size(name, size, n_classes):
    model = models.build_model(name, n_classes, size)
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, n_classes)


def test_cnn1_keeps_the_original_parameter_count():
    assert models.build_model("cnn1", 8, 128).count_params() == 205_656


@pytest.mark.parametrize("name, too_small", [("cnn1", 45), ("cnn2", 93), ("vgg16_from_scratch", 31)])
def test_below_minimum_size_is_a_clear_error(name, too_small):
    minimum = models.REGISTRY[name].min_size
    with pytest.raises(BloodcellError, match=rf"{name} needs images of at least {minimum}x{minimum} pixels"):
        models.build_model(name, 8, too_small)


def test_unknown_model():
    with pytest.raises(
        BloodcellError,
        match="unknown model architecture .resnet.; registered: cnn1, cnn2, vgg16_from_scratch, vgg16_transfer",
    ):
        models.build_model("resnet", 8, 64)


@pytest.mark.parametrize("name, size", [("cnn1", 48), ("cnn2", 96), ("vgg16_from_scratch", 32)])
def test_trains_one_step_and_round_trips(name, size, tmp_path: Path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8)
    y = rng.integers(0, 3, 8)
    model = models.build_model(name, 3, size)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(x, y, epochs=1, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_augmentation_gives_each_image_a_random_right_angle_symmetry():
    image = np.arange(4 * 4 * 3, dtype="uint8").reshape(1, 4, 4, 3)
    out = keras.ops.convert_to_numpy(models.augmentation(seed=1)(np.repeat(image, 64, axis=0), training=True))
    symmetries = [np.rot90(image[0], k) for k in range(4)] + [
        np.rot90(image[0].transpose(1, 0, 2), k) for k in range(4)
    ]
    assert out.dtype == np.uint8
    seen = [next(i for i, s in enumerate(symmetries) if np.array_equal(o, s)) for o in out]  # each is one
    assert sorted(set(seen)) == list(range(8))  # drawn per image: all eight occur in one batch
    np.testing.assert_array_equal(models.augmentation()(image, training=False), image)


def test_blur_augmentation_blurs_some_training_images_and_leaves_predictions_alone(tmp_path: Path):
    """With blur_sigma, about a quarter of a training batch is smoothed (less pixel-to-pixel variation, same
    mean); at inference the layer changes nothing, and the model saves and loads in safe mode."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (400, 32, 32, 3), dtype=np.uint8)
    model = models.build_model("cnn2", 3, 96, blur_sigma=0.8)
    blur = model.get_layer("augment_blur")
    out = keras.ops.convert_to_numpy(blur(images, training=True)).astype(np.float64)
    roughness = np.abs(np.diff(out, axis=2)).mean(axis=(1, 2, 3))
    smoothed = roughness < 0.9 * np.abs(np.diff(images.astype(np.float64), axis=2)).mean(axis=(1, 2, 3))
    assert 0.15 < smoothed.mean() < 0.35
    np.testing.assert_allclose(out.mean(), images.mean(), rtol=0.01)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(blur(images, training=False)), images)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    x = rng.integers(0, 256, (4, 96, 96, 3), dtype=np.uint8)
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_vgg16_from_scratch_keeps_the_vgg16_layout_at_a_width():
    """13 3x3 convolutions in 5 pooled blocks, named and shaped as Keras' VGG16, batch-normalised; all trainable."""
    model = models.build_model("vgg16_from_scratch", 8, 48, width=0.25)
    reference = keras.applications.VGG16(include_top=False, weights=None, input_shape=(48, 48, 3))
    convs, reference_convs = (
        [layer for layer in m.layers if isinstance(layer, keras.layers.Conv2D)] for m in (model, reference)
    )
    assert [c.name for c in convs] == [c.name for c in reference_convs]
    assert [c.filters for c in convs] == [c.filters // 4 for c in reference_convs]
    assert all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(layer, layers.BatchNorm) for layer in model.layers) == 13
    assert [layer.name for layer in model.layers if "pool" in layer.name] == [f"block{i}_pool" for i in range(1, 6)]
    assert all(layer.trainable for layer in model.layers)


def test_vgg16_with_a_weights_file_is_the_frozen_transfer_model(tmp_path: Path):
    weights = tmp_path / "vgg16_notop.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    model = models.build_model("vgg16_transfer", 8, 32, augment=False, weights=str(weights))
    assert not model.get_layer("vgg16_stem").trainable and not model.get_layer("vgg16_block5").trainable
    assert model.get_layer("head").trainable


def test_vgg16_weights_check_is_fast_and_names_the_options(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    Weights.parse("none").check()
    with pytest.raises(BloodcellError, match=r"does not exist. Offline options: --vgg16-weights none"):
        Weights.parse(str(tmp_path / "missing.h5")).check()


@pytest.mark.parametrize(
    "text, kind, pretrained",
    [("", "none", False), ("none", "none", False), ("imagenet", "imagenet", True), ("/w.h5", "file", True)],
)
def test_the_weights_setting_is_parsed_once_into_its_kind(text, kind, pretrained):
    weights = Weights.parse(text)
    assert (weights.kind, weights.pretrained) == (kind, pretrained)
    assert Weights.parse("gs://b/w.h5").kind == "bucket" and Weights.parse("gs://b/w.h5").local_file is None
    with pytest.raises(BloodcellError, match="give imagenet, none, a local file or a gs:// file"):
        Weights.parse("https://example.com/w.h5")


def test_a_builder_refuses_a_setting_it_does_not_take():
    with pytest.raises(BloodcellError, match="architecture cnn1 has no setting width"):
        models.build_model("cnn1", 8, 64, width=0.5)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_fused_batch_norm_matches_keras_batch_normalization(policy):
    """Same outputs, input gradients and moving statistics as Keras' layer, in training and inference."""
    import tensorflow as tf

    keras.mixed_precision.set_global_policy(policy)
    try:
        x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (6, 5, 5, 4)), "float32")
        ours, reference = layers.BatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
        for layer in (ours, reference):
            layer.build(x.shape)
            layer.gamma.assign([0.5, 1.0, 1.5, 2.0])
            layer.beta.assign([0.0, 0.1, -0.2, 0.3])
        results = []
        for layer in (ours, reference):
            with tf.GradientTape() as tape:
                tape.watch(x)
                outputs = tf.cast(layer(x, training=True), "float32")
                loss = tf.reduce_sum(outputs * tf.range(outputs.shape[-1], dtype="float32"))
            results.append(
                (
                    outputs,
                    tape.gradient(loss, x),
                    layer.moving_mean,
                    layer.moving_variance,
                    tf.cast(layer(x, training=False), "float32"),
                )
            )
        tolerance = 1e-4 if policy == "float32" else 5e-2
        for mine, theirs in zip(*results, strict=True):
            np.testing.assert_allclose(np.asarray(mine), np.asarray(theirs), rtol=tolerance, atol=tolerance)
        assert type(keras.layers.deserialize(keras.layers.serialize(ours))) is layers.BatchNorm
    finally:
        keras.mixed_precision.set_global_policy("float32")
