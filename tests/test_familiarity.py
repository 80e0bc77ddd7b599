"""The familiarity check on known features, inside a model, saved and reloaded; the shift warning."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bloodcell import decisions, familiarity, layers, modelfile, shifts
from bloodcell.arrays import decode_resized
from conftest import SHARED_DATA, checked_model, tiny_model


def clusters(rng: np.random.Generator, n: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, len(centres), n)
    return centres[labels] + rng.normal(size=(n, centres.shape[1])) @ np.diag(
        np.linspace(0.5, 2, centres.shape[1])
    ), labels


def test_the_check_flags_a_far_away_cluster_and_about_the_chosen_share_of_familiar_ones():
    rng = np.random.default_rng(0)
    centres = rng.normal(scale=4, size=(3, 16))
    train, labels = clusters(rng, 4000, centres)
    block = familiarity.fit_block(train, labels, 3)
    held_out = clusters(rng, 3000, centres)[0]
    blocks = familiarity.standardise([block], [held_out[:1000]])
    threshold = familiarity.flag_threshold(familiarity.block_scores(blocks, [held_out[:1000]]), 0.05)
    familiar = familiarity.block_scores(blocks, [held_out[1000:]])
    far = familiarity.block_scores(blocks, [clusters(rng, 500, centres + 12)[0]])
    assert (familiar > threshold).mean() == pytest.approx(0.05, abs=0.02)
    assert (far > threshold).mean() > 0.99
    # the same statistics by hand: squared Mahalanobis distance to the nearest class mean
    precision = block.whitening @ block.whitening.T
    means = np.stack([train[labels == c].mean(axis=0) for c in range(3)])
    x = held_out[:5]
    by_hand = np.min([np.einsum("nd,de,ne->n", x - m, precision, x - m) for m in means], axis=0)
    np.testing.assert_allclose(block.distances(x), by_hand, rtol=1e-6)


def test_the_check_lives_in_the_model_file_and_reloads_with_identical_scores_sets_and_refer_flags(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 64)
    model = checked_model(tiny_model(), images, labels)
    pools = [layer.name for layer in model.layers if isinstance(layer, keras.layers.MaxPooling2D)]
    assert [layer.name for layer in familiarity.feature_layers(model)] == pools and len(pools) == 2
    scoring = decisions.scoring_model(model)
    before = decisions.outputs_of(scoring, images, 16)
    features = [np.asarray(f) for f in familiarity.pooled_features(model).predict_on_batch(images)]
    layer = familiarity.familiarity_layer(model)
    assert layer is not None and layer.threshold > 0
    model.save(tmp_path / "model.keras")
    config = (tmp_path / "model.keras").read_bytes()
    assert len(config) > 8 * 8 * 4  # the statistics travel as weights
    reloaded = modelfile.load(tmp_path / "model.keras", "test")  # Keras safe mode
    after = decisions.outputs_of(decisions.scoring_model(reloaded), images, 16)
    np.testing.assert_array_equal(after.familiarity, before.familiarity)
    np.testing.assert_array_equal(after.probabilities, before.probabilities)
    rules, rules_after = decisions.Rules.of(model), decisions.Rules.of(reloaded)
    assert rules_after.familiarity_threshold == rules.familiarity_threshold and rules_after.promise == rules.promise
    first, second = decisions.decide(rules, before), decisions.decide(rules_after, after)
    np.testing.assert_array_equal(first.refer, second.refer)
    np.testing.assert_array_equal(first.sets, second.sets)
    assert first.familiar is not None and first.sets is not None
    # the layer's score is the numpy one: the largest standardised log-distance over the blocks
    check = model.get_layer(familiarity.LAYER_NAME)
    assert isinstance(check, layers.Familiarity)
    raw = decisions.outputs_of(decisions.scoring_model(model), images[:4], 4).familiarity
    assert raw is not None and raw.shape == (4,) and np.isfinite(raw).all()
    assert features[0].shape == (64, 12) and features[1].shape == (64, 8)  # the image statistics, then each block


def test_image_statistics_are_each_channels_mean_spread_and_fine_detail():
    from scipy import ndimage

    images = np.random.default_rng(3).integers(0, 256, (2, 20, 24, 3), dtype=np.uint8)
    got = keras.ops.convert_to_numpy(layers.ImageStatistics()(images))
    x = images.astype(np.float64) / 255
    kernel = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]])
    laplacian = np.stack(
        [np.stack([ndimage.convolve(i[..., c], kernel, mode="reflect") for c in range(3)], -1) for i in x]
    )
    floor = layers.LAPLACIAN_FLOOR
    expected = np.concatenate(
        [
            x.mean(axis=(1, 2)),
            x.std(axis=(1, 2)),
            np.log(np.abs(laplacian).mean(axis=(1, 2)) + floor),
            np.log(laplacian.std(axis=(1, 2)) + floor),
        ],
        axis=1,
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_a_model_checked_before_the_image_statistics_still_loads_and_scores_its_blocks(tmp_path):
    """Familiarity layers saved before the image statistics read the block maps only."""
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    model = tiny_model()
    maps = [layer.output for layer in familiarity.feature_layers(model)]
    features = [
        np.asarray(f) for f in keras.Model(model.inputs, [layers.pooled(m) for m in maps]).predict_on_batch(images)
    ]
    blocks = familiarity.standardise([familiarity.fit_block(f, rng.integers(0, 3, 64), 3) for f in features], features)
    layer = layers.Familiarity([8, 8], 3, name=familiarity.LAYER_NAME, dtype="float32", threshold=1.0)
    old = keras.Model(model.inputs, [model.outputs[0], layer(maps)])
    layer.set_statistics(blocks)
    old.save(tmp_path / "old.keras")
    reloaded = modelfile.load(tmp_path / "old.keras", "test")
    scores = decisions.outputs_of(decisions.scoring_model(reloaded), images, 16).familiarity
    assert scores is not None
    np.testing.assert_allclose(scores, familiarity.block_scores(blocks, features), rtol=1e-4, atol=1e-4)
    assert decisions.Rules.of(reloaded).familiarity_threshold == 1.0


def test_a_model_saved_before_the_checks_still_predicts_and_says_so(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "old.keras")
    reloaded = modelfile.load(tmp_path / "old.keras", "test")
    rules = decisions.Rules.of(reloaded)
    assert rules.familiarity_threshold is None and rules.set_min_probability is None and not rules.calibrated
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    decided = decisions.decide(rules, decisions.outputs_of(decisions.scoring_model(reloaded), images, 3))
    assert decided.familiar is None and decided.sets is None and not decided.refer.any()


def test_the_shift_warning_fires_on_a_shifted_batch_and_not_on_a_familiar_one():
    rules = decisions.Rules(np.zeros(8), ["group"] * 8, 0.99, None, None, 1.0, 0.05, True)
    assert decisions.shift_warning(unfamiliar=2, images=40, rules=rules) is None  # 5%: as on validation
    assert decisions.shift_warning(unfamiliar=7, images=40, rules=rules) is None  # 17.5%: not above 20%
    warning = decisions.shift_warning(unfamiliar=30, images=40, rules=rules)
    assert warning and "unlike the training images" in warning and "bloodcell validate" in warning
    assert decisions.shift_warning(unfamiliar=10, images=12, rules=rules) is None  # too few images to tell


def test_shifts_change_an_image_as_named():
    path = next(iter(sorted((SHARED_DATA / "monocyte").iterdir())))
    image = decode_resized(str(path), [96])[0]
    from PIL import Image

    original = Image.fromarray(image)
    for name, shift in shifts.CELL_SHIFTS.items():
        out = np.asarray(shift(original))
        assert out.shape == image.shape and out.dtype == np.uint8, name
        assert np.abs(out.astype(int) - image).mean() > 1, name
    gray = np.asarray(shifts.grayscale(original)).astype(int)
    assert (gray[..., 0] == gray[..., 1]).all()
    for kind in shifts.NON_CELLS:
        made = shifts.non_cell_images(kind, 2, seed=3)
        assert [im.size for im in made] == [shifts.NON_CELL_SIZE] * 2
