"""Every model as an MLflow pyfunc model: send image files, get answers, from any MLflow tool.

The pyfunc model takes base64-encoded image files (any size, the formats ``bloodcell predict`` reads) in
one column, :data:`INPUT_COLUMN`, and answers each with :meth:`bloodcell.decisions.Prediction.answer`'s
fields: the class, the calibrated probabilities per class name, whether to refer it to a person and why,
the familiarity check and the prediction set, exactly as ``bloodcell predict`` does. ``mlflow models
serve`` serves it (``POST /invocations``); ``mlflow.pyfunc.load_model`` loads it.

What the model folder holds: the ``.keras`` file (artifact ``keras_model``, which ``bloodcell predict``
reads directly, in Keras safe mode), this package as ``code/bloodcell`` (MLflow puts ``code/`` on the
path before loading: nothing to install, so ``--env-manager local``, ``uv``, ``virtualenv`` and MLflow's
serving image all get it), the model's definition (``serving_model.py``, a "model from code": nothing is
unpickled), and its requirements pinned to the versions that trained it.
"""

from __future__ import annotations

import base64
import binascii
import importlib.metadata
import io
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array, Map
from PIL import Image

from bloodcell import compat
from bloodcell.modelfile import KERAS_ARTIFACT

INPUT_COLUMN = "image"
MAX_IMAGES_PER_REQUEST = 256  # a request's images are decoded and held together
MODEL_CODE = Path(__file__).with_name("serving_model.py")
# The image column is optional in the schema so that a request without it reaches the model, which says what
# to send (MLflow's own schema error would come after an echo of the whole request).
SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec(DataType.string, INPUT_COLUMN, required=False)]),
    outputs=Schema(
        [
            ColSpec(DataType.string, "class"),
            ColSpec(DataType.double, "confidence"),
            ColSpec(Map(DataType.double), "probabilities"),
            ColSpec(DataType.boolean, "refer"),
            ColSpec(DataType.string, "refer_reason", required=False),
            ColSpec(DataType.boolean, "familiar", required=False),
            ColSpec(DataType.double, "familiarity", required=False),
            ColSpec(Array(DataType.string), "prediction_set", required=False),
            ColSpec(DataType.string, "promise"),
        ]
    ),
)


class RequestError(compat.KeepsFirstMessage, MlflowException):
    """A request the model cannot answer: MLflow's scoring server answers 400 with this message first."""

    def __init__(self, message: str):
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


class ImageClassifier(PythonModel):
    """A bloodcell model (trained or combined) behind MLflow's pyfunc interface."""

    def load_context(self, context: PythonModelContext) -> None:
        from bloodcell import decisions, modelfile

        path = Path(context.artifacts[KERAS_ARTIFACT])
        self.model = modelfile.load(path, str(path))
        self.classes = list((context.model_config or {}).get("classes") or [])
        self.classes = self.classes or [f"class_{i}" for i in range(int(self.model.outputs[0].shape[-1]))]
        self.rules = decisions.Rules.of(self.model)
        self.scoring = decisions.scoring_model(self.model)

    def predict(self, context: PythonModelContext, model_input: pd.DataFrame, params: dict | None = None) -> list:
        from bloodcell import decisions

        images = decode_request(model_input, int(self.model.input_shape[1]))
        names = [str(i) for i in range(len(images))]
        _, answered = decisions.answer_images(self.scoring, self.rules, images, names, self.classes)
        return [prediction.answer() for prediction in answered]


def decode_request(model_input: pd.DataFrame, size: int) -> np.ndarray:
    """The request's images, decoded and shrunk to ``size`` px; :class:`RequestError` for what is not."""
    from bloodcell.arrays import decode_resized

    if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
        raise RequestError(
            f"send the images as base64-encoded files in one column named {INPUT_COLUMN!r}, e.g. "
            f'{{"dataframe_split": {{"columns": ["{INPUT_COLUMN}"], "data": [["<base64>"]]}}}}'
        )
    if model_input.empty:
        raise RequestError(f"the request has no images: send base64-encoded image files in column {INPUT_COLUMN!r}")
    if len(model_input) > MAX_IMAGES_PER_REQUEST:
        raise RequestError(
            f"the request has {len(model_input)} images; send at most {MAX_IMAGES_PER_REQUEST} per request"
        )
    images = []
    for row, value in enumerate(model_input[INPUT_COLUMN]):
        try:
            data = base64.b64decode(str(value), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise RequestError(f"image {row} is not base64 text: {exc}") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)  # over Pillow's pixel limit
                images.append(decode_resized(io.BytesIO(data), [size])[0])
        except Exception as exc:  # Pillow's errors for non-images, truncated files and decompression bombs
            raise RequestError(f"image {row} cannot be read as an image: {type(exc).__name__}: {exc}") from None
    return np.stack(images)


def input_example(image_size: int) -> pd.DataFrame:
    """A request with one small JPEG (the model's logged input example)."""
    buffer = io.BytesIO()
    Image.new("RGB", (image_size, image_size), (200, 120, 160)).save(buffer, "JPEG")
    return pd.DataFrame({INPUT_COLUMN: [base64.b64encode(buffer.getvalue()).decode()]})


def requirements(backend: list[str]) -> list[str]:
    """What the model needs installed: ``backend`` (Keras and its backend, pinned) and this package's own
    dependencies (not its extras) at the versions installed here; the package itself travels in the folder."""
    from packaging.requirements import Requirement

    own = [Requirement(line) for line in importlib.metadata.requires("bloodcell") or []]
    names = sorted({r.name for r in own if r.marker is None or "extra" not in str(r.marker)})
    given = {Requirement(entry).name.lower() for entry in backend}
    return [*backend, *(f"{n}=={importlib.metadata.version(n)}" for n in names if n.lower() not in given)]


def log_model(model: Any, classes: list[str], backend: list[str]) -> str:
    """Log ``model`` as a pyfunc model to the active MLflow run; its logged-model URI (``models:/m-...``)."""
    import mlflow

    from bloodcell import modelfile

    with tempfile.TemporaryDirectory() as tmp:
        keras_file = modelfile.save(model, Path(tmp, "model.keras"))
        package = Path(__file__).parent
        code = shutil.copytree(package, Path(tmp, package.name), ignore=shutil.ignore_patterns("__pycache__"))
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(MODEL_CODE),
            artifacts={KERAS_ARTIFACT: str(keras_file)},
            code_paths=[str(code)],
            pip_requirements=requirements(backend),
            signature=SIGNATURE,
            input_example=input_example(int(model.input_shape[1])),
            model_config={"classes": classes},
            metadata={"classes": classes},
        ).model_uri
