"""Feeding arrays to Keras: every image once per epoch, labels aligned, reshuffled, reproducible."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from bloodcell import feeding, models


def labelled_images(count: int = 23) -> tuple[np.ndarray, np.ndarray]:
    """Tiny uint8 images whose first pixel encodes the row, labels the row modulo 8."""
    x = np.zeros((count, 4, 4, 3), dtype=np.uint8)
    x[:, 0, 0, 0] = np.arange(count)
    return x, (np.arange(count) % 8).astype(np.int32)


def epoch(batches) -> list[tuple[np.ndarray, ...]]:
    items = batches if not isinstance(batches, keras.utils.PyDataset) else (batches[i] for i in range(len(batches)))
    return [tuple(np.asarray(part) for part in item) for item in items]


@pytest.mark.parametrize(
    "make",
    [
        lambda x, y, shuffle: feeding.batches(x, y, batch_size=5, shuffle=shuffle),
        lambda x, y, shuffle: feeding.ArrayBatches(x, y, 5, shuffle),
    ],
    ids=["backend", "pydataset"],
)
def test_each_epoch_feeds_every_image_once_with_its_label(make):
    x, y = labelled_images()
    keras.utils.set_random_seed(7)
    batches = make(x, y, True)
    orders = []
    for _ in range(2):
        rows = []
        for images, labels in epoch(batches):
            assert len(images) <= 5 and images.dtype == np.uint8
            assert (labels == images[:, 0, 0, 0] % 8).all()
            rows.extend(images[:, 0, 0, 0].tolist())
        assert sorted(rows) == list(range(len(x)))
        orders.append(rows)
        if isinstance(batches, keras.utils.PyDataset):
            batches.on_epoch_end()
    assert orders[0] != orders[1], "shuffled batches are reshuffled every epoch"
    assert epoch(make(x, y, False))[0][0][:, 0, 0, 0].tolist() == [0, 1, 2, 3, 4]


def test_shuffled_order_is_reproducible_from_the_seed():
    x, y = labelled_images()
    firsts = []
    for _ in range(2):
        keras.utils.set_random_seed(777)
        firsts.append(
            [images[:, 0, 0, 0].tolist() for images, _ in epoch(feeding.batches(x, y, batch_size=5, shuffle=True))]
        )
    assert firsts[0] == firsts[1]


def test_images_alone_feed_predict_and_match_keras_predict():
    model = models.build_model("cnn1", 8, 48, augment=False)
    images = np.random.default_rng(0).integers(0, 256, (37, 48, 48, 3), dtype=np.uint8)
    expected = model.predict(images, batch_size=16, verbose=0)
    assert np.allclose(model.predict(feeding.batches(images, batch_size=16), verbose=0), expected, atol=1e-5)
    probabilities = feeding.predict(model, images, 16)
    assert probabilities.shape == (37, 8) and probabilities.dtype == np.float32
    assert np.allclose(probabilities, expected, atol=1e-5)


def test_mismatched_or_empty_arrays_are_refused_clearly():
    x, y = labelled_images()
    with pytest.raises(ValueError, match="23 images but 22 labels"):
        feeding.batches(x, y[:-1], batch_size=4)
    with pytest.raises(ValueError, match="empty"):
        feeding.batches(x[:0], y[:0], batch_size=4)
