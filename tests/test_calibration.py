"""Calibration, selective prediction and Grad-CAM on known inputs."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bloodcell import calibration, explain, modelfile, selective
from conftest import sampled_labels


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
def test_temperature_fitting_recovers_a_known_temperature(temperature):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(20000, 8)) * 2.0
    labels = sampled_labels(rng, calibration.softmax(logits))
    off = calibration.softmax(logits * temperature)  # a model whose logits are ``temperature`` times too large
    assert calibration.fit_temperature(labels, off) == pytest.approx(temperature, rel=0.05)


def test_ece_equals_a_hand_computed_value():
    probabilities = np.array([[0.95, 0.05], [0.95, 0.05], [0.6, 0.4], [0.3, 0.7], [0.45, 0.55]])
    labels = np.array([0, 1, 0, 1, 0])
    # 15 bins: 0.95 falls in (14/15, 1]: confidence 0.95, accuracy 1/2; 0.6 in (8/15, 9/15]: 0.6 vs 1;
    # 0.7 in (10/15, 11/15]: 0.7 vs 1; 0.55 in (8/15, 9/15] too: that bin holds 0.6 (right) and 0.55 (wrong).
    expected = 2 / 5 * abs(0.5 - 0.95) + 2 / 5 * abs(0.5 - 0.575) + 1 / 5 * abs(1 - 0.7)
    assert calibration.ece(labels, probabilities) == pytest.approx(expected)
    assert calibration.nll(labels, probabilities) == pytest.approx(-np.mean(np.log([0.95, 0.05, 0.6, 0.7, 0.45])))
    assert calibration.brier(labels, probabilities) == pytest.approx(
        np.mean([2 * 0.05**2, 2 * 0.95**2, 2 * 0.4**2, 2 * 0.3**2, 2 * 0.55**2])
    )


def test_the_accuracy_bound_is_clopper_pearson():
    # 99 of 100 right: the exact one-sided 95% lower bound is 0.9535 (solving P(X >= 99 | p) = 0.05)
    assert selective.accuracy_lower_bound(np.array([99]), np.array([100]), 0.95)[0] == pytest.approx(0.9535, abs=1e-4)
    assert selective.accuracy_lower_bound(np.array([100]), np.array([100]), 0.95)[0] == pytest.approx(0.05 ** (1 / 100))


def test_selective_prediction_figures():
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    labels = np.array([0, 0, 1, 0])  # the third most confident is wrong
    assert calibration.accuracy_at_coverage(labels, probabilities, 0.5) == 1.0
    assert calibration.accuracy_at_coverage(labels, probabilities, 1.0) == 0.75
    assert calibration.coverage_for_accuracy(labels, probabilities, 0.99) == (0.5, 0.8)
    assert calibration.coverage_for_accuracy(labels, probabilities, 0.75) == (1.0, 0.6)


def tiny_classifier(n_classes: int = 3) -> keras.Model:
    keras.utils.set_random_seed(3)
    images = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255)(images)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(n_classes, activation="softmax")(x), name="tiny")


def test_a_calibrated_model_saved_and_reloaded_predicts_identical_calibrated_probabilities(tmp_path):
    model = tiny_classifier()
    fitted = calibration.Calibrated(
        2.0, [0.7, 0.8, 0.9], ["class", "group", "none"], 0.99, 0.95, [0.1, 0.2, 0.0], 0.01, [120, 130, 50],
        0.9, 1.5, 0.05, 0.05, 0.1, 0.02, 0.5, 0.4,
    )  # fmt: skip
    calibrated = keras.Model(model.inputs, calibration.calibration_layer_for(fitted)(model.outputs[0]))
    images = np.random.default_rng(4).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    raw = keras.ops.convert_to_numpy(model.predict_on_batch(images))
    expected = keras.ops.convert_to_numpy(calibrated.predict_on_batch(images))
    np.testing.assert_allclose(expected, calibration.apply_temperature(raw, 2.0), rtol=1e-4, atol=1e-6)
    calibrated.save(tmp_path / "model.keras")
    reloaded = modelfile.load(tmp_path / "model.keras", "test")  # Keras safe mode
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(reloaded.predict_on_batch(images)), expected)
    layer = calibration.calibration_layer(reloaded)
    assert layer is not None
    assert (layer.temperature, layer.refer_below, layer.target_accuracy) == (2.0, [0.7, 0.8, 0.9], 0.99)
    assert (layer.promise, layer.set_min_probability, layer.set_alpha) == (fitted.promise, [0.1, 0.2, 0.0], 0.01)


def test_gradcam_maps_have_the_image_size_are_finite_and_differ_between_classes():
    model = tiny_classifier()
    images = np.random.default_rng(5).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    maps, classes = explain.gradcam(model, images)
    assert maps.shape == (4, 32, 32) and np.isfinite(maps).all()
    assert maps.min() >= 0 and maps.max() <= 1 and (maps.reshape(4, -1).max(axis=1) > 0).any()
    others, _ = explain.gradcam(model, images, (classes + 1) % 3)
    assert np.abs(maps - others).mean() > 1e-3
    assert explain.feature_layer(model).name == model.layers[3].name  # the last convolution
    overlay = explain.overlay(images[0], maps[0])
    assert overlay.shape == (32, 32, 3) and overlay.dtype == np.uint8
