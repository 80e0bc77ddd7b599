"""Visual explanations: Grad-CAM heatmaps of what in a cell image drove a model's decision.

Grad-CAM (Selvaraju et al., 2017): the feature maps of a late convolutional layer, weighted by the
mean gradient of the class's log-probability over each map, summed and rectified, then enlarged to the
image. The maps are computed with Keras ops; only the gradient comes from the backend's autodiff
(TensorFlow, JAX or PyTorch). For the combined model the map is the mean of its members' maps for the
class it predicts.
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import numpy as np
from keras import ops

from bloodcell import feeding
from bloodcell.config import ENSEMBLE_NAME

MIN_SIDE = 6  # the last layer whose maps are at least this wide: the last one at 48 px is 3 x 3
OVERLAY_ALPHA = 0.45


def members(model: keras.Model) -> list[keras.Model]:
    """The trained models inside a combined model (none for a single model)."""
    return [layer for layer in model.layers if isinstance(layer, keras.Model)] if _is_combined(model) else []


def _is_combined(model: keras.Model) -> bool:
    return model.name == ENSEMBLE_NAME


def feature_layer(model: keras.Model) -> keras.layers.Layer:
    """The layer whose output Grad-CAM weighs: the last one after the first convolution with spatial maps at
    least :data:`MIN_SIDE` wide (the last spatial one when none is)."""
    started, spatial = False, []
    for layer in model.layers:
        started = started or isinstance(layer, (keras.layers.Conv2D, keras.Model))
        shape = getattr(layer, "output", None) is not None and layer.output.shape
        if started and shape and len(shape) == 4:
            spatial.append(layer)
    if not spatial:
        raise ValueError(f"model {model.name} has no convolutional feature maps to explain")
    wide = [layer for layer in spatial if min(layer.output.shape[1:3]) >= MIN_SIDE]
    return (wide or spatial)[-1]


def class_gradients(tail: keras.Model, features: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """d log p(class) / d features for each image, through ``tail`` (features -> probabilities)."""
    backend = keras.backend.backend()

    def score(f):
        probabilities = ops.cast(tail(f, training=False), "float32")
        chosen = ops.take_along_axis(probabilities, ops.convert_to_tensor(classes[:, None]), axis=1)
        return ops.sum(ops.log(chosen + 1e-12))

    if backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            value = score(tensor)
        return np.asarray(tape.gradient(value, tensor), dtype=np.float32)
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(score)(features), dtype=np.float32)
    if backend == "torch":
        import torch

        tensor = torch.tensor(features, requires_grad=True)
        score(tensor).backward()
        return tensor.grad.detach().cpu().numpy().astype(np.float32)
    raise NotImplementedError(f"Grad-CAM needs gradients: backend {backend!r} is not one of tensorflow, jax, torch")


def gradcam(model: keras.Model, images: np.ndarray, classes: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Heatmaps in [0, 1] at the images' size (N, H, W) for ``classes`` (default: the predicted ones), and
    the classes explained."""
    if classes is None:
        classes = feeding.predict(model, images, len(images)).argmax(axis=1)  # the first output: probabilities
    classes = np.asarray(classes, dtype=np.int32)
    parts = members(model)
    if parts:
        maps = [_member_map(model, member, images, classes) for member in parts]
        return _normalized(np.mean(maps, axis=0)), classes
    layer = feature_layer(model)
    head = keras.Model(model.inputs, layer.output)
    tail = keras.Model(layer.output, model.outputs[0])
    features = np.asarray(ops.convert_to_numpy(head.predict_on_batch(images)), dtype=np.float32)
    gradients = class_gradients(tail, features, classes)
    weights = ops.mean(gradients, axis=(1, 2))
    cam = ops.relu(ops.sum(features * weights[:, None, None, :], axis=-1))
    enlarged = ops.image.resize(cam[..., None], images.shape[1:3], interpolation="bilinear")[..., 0]
    return _normalized(np.asarray(ops.convert_to_numpy(enlarged))), classes


def _member_map(combined: keras.Model, member: keras.Model, images: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """``member``'s heatmaps for the combined model's classes, on the images as it sees them, at full size."""
    resize = next((layer for layer in combined.layers if layer.name == f"{member.name}_resize"), None)
    seen = np.asarray(ops.convert_to_numpy(resize(images))) if resize is not None else images
    maps, _ = gradcam(member, seen, classes)
    return np.asarray(ops.convert_to_numpy(ops.image.resize(maps[..., None], images.shape[1:3])))[..., 0]


def _normalized(maps: np.ndarray) -> np.ndarray:
    peak = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
    return np.where(peak > 0, maps / np.maximum(peak, 1e-12), 0.0).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """``image`` (uint8 RGB) with ``heatmap`` (values in [0, 1]) blended over it in the jet colour map."""
    from matplotlib import colormaps

    coloured = colormaps["jet"](heatmap)[..., :3] * 255
    return np.clip((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * coloured, 0, 255).astype(np.uint8)


def save_overlay(image: np.ndarray, heatmap: np.ndarray, path: Path) -> Path:
    """The overlay of ``heatmap`` on ``image`` as a PNG at ``path`` (its folder created)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    Image.fromarray(overlay(image, heatmap)).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path
