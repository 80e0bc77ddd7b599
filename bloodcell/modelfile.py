"""Saving and loading ``.keras`` model files: the one loader every model read goes through (safe mode, no
code from the file runs), and the custom layers it needs registered first."""

from __future__ import annotations

import zipfile
from pathlib import Path

import keras

# Every custom layer a bloodcell model file may hold is registered with Keras when this module is imported,
# so a file saved by any step loads wherever this loader is used.
from bloodcell import layers
from bloodcell.errors import BloodcellError

REGISTERED_LAYERS = layers.REGISTERED
# The .keras file's artifact name in a logged pyfunc model (bloodcell.serving), which predict reads directly.
KERAS_ARTIFACT = "keras_model"


def save(model: keras.Model, path: str | Path) -> Path:
    """``model`` as a ``.keras`` file at ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


def load(path: Path, origin: str) -> keras.Model:
    """The Keras model in the ``.keras`` file ``path`` (``origin``: where it came from, for errors), loaded in
    safe mode: no Python code from the file runs.

    Other formats are refused: a SavedModel folder is a TensorFlow graph, and HDF5 predates safe mode.
    """
    if path.is_symlink() or not path.is_file() or path.suffix != ".keras" or not zipfile.is_zipfile(path):
        raise BloodcellError(
            f"model {origin} is not a Keras .keras file (a zip archive): refusing to load it. Other formats "
            "(a TensorFlow SavedModel folder, HDF5) can run operations or code; pass a .keras model."
        )
    try:
        return keras.saving.load_model(path, safe_mode=True)
    except (ValueError, TypeError, KeyError, OSError, zipfile.BadZipFile) as exc:  # what a hostile file can cause
        if "safe_mode" in str(exc):
            raise BloodcellError(
                f"model {origin} holds Python code (e.g. a Lambda layer), which Keras safe mode refuses to load: "
                "bloodcell never runs code from a model file. Pass a model trained by bloodcell."
            ) from None
        reason = str(exc).rsplit("Exception encountered: ", 1)[-1]  # Keras nests the first cause last
        raise BloodcellError(f"model {origin} cannot be loaded: {type(exc).__name__}: {reason[:300]}") from None
