"""Feed in-memory arrays to Keras without stalls at epoch ends.

Under TensorFlow, ``Model.fit`` wraps numpy arrays (and ``PyDataset``s) in a ``tf.data`` pipeline
with autotuning on. Destroying such an iterator, which Keras does at the end of every epoch and
every validation or prediction pass, waits for tf.data's autotuning thread to finish its current
sleep, and those sleeps double up to 60 s (docs/performance.md; ``benchmarks/epoch_stall.py``).
So under TensorFlow the arrays go through a small ``tf.data`` pipeline of our own with autotuning
off; other backends get a ``PyDataset``.
"""

from __future__ import annotations

import math

import keras
import numpy as np

PREFETCH_BATCHES = 2


def batches(x: np.ndarray, y: np.ndarray | None = None, *, batch_size: int, shuffle: bool = False):
    """Batches of ``x`` (and ``y``) to pass as ``x`` to ``fit``/``evaluate``/``predict``.

    ``shuffle`` reshuffles every epoch, reproducibly after ``keras.utils.set_random_seed``.
    """
    if len(x) == 0:
        raise ValueError("no images to feed: the array is empty")
    if y is not None and len(y) != len(x):
        raise ValueError(f"{len(x)} images but {len(y)} labels: the arrays must have the same length")
    if keras.backend.backend() == "tensorflow":
        return _tf_batches(x, y, batch_size, shuffle)
    return ArrayBatches(x, y, batch_size, shuffle)


def describe() -> str:
    """How :func:`batches` feeds this backend (an MLflow param)."""
    if keras.backend.backend() == "tensorflow":
        return "tf.data over in-memory uint8 arrays, autotuning off, reshuffled each epoch"
    return "keras PyDataset over in-memory uint8 arrays, reshuffled each epoch"


def predict(model: keras.Model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for ``x``, batch by batch (no input pipeline to tear down)."""
    return predict_outputs(model, x, batch_size)[0]


def predict_outputs(model: keras.Model, x: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Each of ``model``'s outputs for ``x`` (float32), batch by batch, as :func:`predict` does for one."""
    parts = []
    for start in range(0, len(x), batch_size):
        out = model.predict_on_batch(x[start : start + batch_size])
        parts.append(out if isinstance(out, (list, tuple)) else [out])
    return [
        np.concatenate([keras.ops.convert_to_numpy(p[i]) for p in parts]).astype(np.float32)
        for i in range(len(parts[0]))
    ]


class ArrayBatches(keras.utils.PyDataset):
    """Batches sliced from in-memory arrays, reshuffled every epoch (for non-TensorFlow backends)."""

    def __init__(self, x: np.ndarray, y: np.ndarray | None, batch_size: int, shuffle: bool):
        super().__init__()
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.order = np.arange(len(x))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __getitem__(self, index: int):
        rows = np.sort(self.order[index * self.batch_size : (index + 1) * self.batch_size])
        return self.x[rows] if self.y is None else (self.x[rows], self.y[rows])

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.order = np.random.permutation(len(self.x))


def _tf_batches(x: np.ndarray, y: np.ndarray | None, batch_size: int, shuffle: bool):
    import tensorflow as tf

    data = tuple(tf.convert_to_tensor(a) for a in ((x,) if y is None else (x, y)))
    rows = tf.data.Dataset.range(len(x))
    if shuffle:
        rows = rows.shuffle(len(x), reshuffle_each_iteration=True)
    rows = rows.batch(batch_size)

    def gather(indices, tensors):
        picked = tuple(tf.gather(t, indices) for t in tensors)
        return picked[0] if y is None else picked

    dataset = tf.data.Dataset.zip(rows, tf.data.Dataset.from_tensors(data).repeat()).map(gather)
    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    return dataset.prefetch(PREFETCH_BATCHES).with_options(options)
