"""The run store: what one pipeline run keeps in the bucket, and the record of a model that flows between steps.

Every location under a run's folder is spelled here, and nowhere else::

    gs://<bucket>/runs/<run id>/
        models/<name>/model.keras           the model (a trained one, or the combined model)
        models/<name>/train.json            its ModelRecord, written last: the model is complete
        models/<name>/history.json          its training history (trained models)
        models/<name>/test_predictions.npz  evaluate's test predictions
        checkpoints/<name>/<phase>/         last.keras and state.json of the epoch that ended last
        metrics/<name>.json                 evaluate's test metrics
        report/                             report.html, report.md, plots/<figure>.png
        summary.json                        the run summary (report)
        mlflow_parent_run_id                the MLflow parent run, claimed by the first step that needs it
        tracking_failures/<step>.json       MLflow calls a step could not make

Datasets, splits and arrays are content-addressed and shared between runs (ingest, split, arrays).
"""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloodcell import storage
from bloodcell.config import ENSEMBLE_NAME
from bloodcell.errors import BloodcellError

MODEL_FILE, RECORD_FILE, HISTORY_FILE, PREDICTIONS_FILE = (
    "model.keras",
    "train.json",
    "history.json",
    "test_predictions.npz",
)
FAILURES = "tracking_failures"

if TYPE_CHECKING:
    import keras


@dataclass(frozen=True)
class Combination:
    """How the combined model was made from the trained ones (bloodcell.ensemble), all chosen on validation."""

    members: list[str]
    description: str  # in words: members, how each shrinks the images, test-time augmentation
    tta: dict[str, bool]  # per chosen member
    resize: dict[str, str | None]  # per chosen member: how it shrinks the images (None: already its size)
    val_accuracy: float
    val_log_loss: float
    selection: dict = field(default_factory=dict)  # every measurement behind the choices


@dataclass(frozen=True)
class ModelRecord:
    """A model of a run, trained or combined: what ``models/<name>/train.json`` holds (a combined model's
    choices at the top level beside the rest), a trainer's kfp Model metadata, and what evaluate reads."""

    model: str  # its name in the run: the profile's model name, or config.ENSEMBLE_NAME
    model_uri: str  # the stored model.keras
    classes: list[str]
    image_size: int
    epochs: int
    train_seconds: float  # training it, or building the combined model
    params: int
    arrays_uri: str  # the arrays at image_size (its test split is what evaluate scores)
    mlflow_run_id: str | None
    mlflow_model_uri: str | None
    calibration: dict = field(default_factory=dict)  # calibration.Calibrated's fields; empty before calibration
    images_per_second: float = 0.0  # training throughput (trained models)
    precision: str = ""  # the compute precision it trained in (trained models)
    combination: Combination | None = None  # the combined model's choices

    def to_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        combination = fields.pop("combination")
        return {**fields, **(combination or {})}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> ModelRecord:
        """The record in ``values`` (a train.json, or a kfp artifact's metadata: other keys are left out)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"combination"}
        combined = {f.name for f in dataclasses.fields(Combination)}
        combination = Combination(**{k: values[k] for k in combined if k in values}) if "members" in values else None
        return cls(**{k: values[k] for k in names if k in values}, combination=combination)

    def combination_fields(self) -> dict[str, Any]:
        """What the report shows of the combined model's choices ({} for a trained model)."""
        if self.combination is None:
            return {}
        keys = ("members", "description", "tta", "resize", "val_accuracy")
        return {key: getattr(self.combination, key) for key in keys}


@dataclass(frozen=True)
class RunStore:
    """One pipeline run's folder in the bucket (``gs://<bucket>/runs/<run id>``)."""

    bucket: str
    run_id: str

    @classmethod
    def at(cls, run_uri: str) -> RunStore:
        """The store of ``gs://<bucket>/runs/<run id>``."""
        bucket, name = storage.split_uri(run_uri)
        parts = name.strip("/").split("/")
        if len(parts) != 2 or parts[0] != "runs" or not parts[1]:
            raise BloodcellError(f"{run_uri} is not a run's folder: expected gs://<bucket>/runs/<run id>")
        return cls(bucket, parts[1])

    @classmethod
    def of_model(cls, model_uri: str) -> tuple[RunStore, str]:
        """The store and model name of ``gs://<bucket>/runs/<run id>/models/<name>/model.keras``."""
        bucket, name = storage.split_uri(model_uri)
        parts = name.split("/")
        if len(parts) != 5 or parts[0] != "runs" or parts[2] != "models" or parts[4] != MODEL_FILE:
            raise BloodcellError(
                f"{model_uri} is not a model of a run: expected gs://<bucket>/runs/<run id>/models/<name>/{MODEL_FILE}"
            )
        return cls(bucket, parts[1]), parts[3]

    @property
    def uri(self) -> str:
        return f"gs://{self.bucket}/runs/{self.run_id}"

    def _at(self, *parts: str) -> str:
        return storage.join(self.uri, *parts)

    # Models and their records.
    def model_uri(self, name: str) -> str:
        return self._at("models", name, MODEL_FILE)

    def record(self, name: str) -> ModelRecord | None:
        """The record of model ``name``, if the run has it complete (the record is written last)."""
        uri = self._at("models", name, RECORD_FILE)
        data = storage.read_json_if_present(uri)
        return None if data is None else ModelRecord.from_json(data)

    def trained_names(self) -> list[str]:
        """The models this run trained (complete records), in name order; not the combined model."""
        records = [uri for uri in storage.list_uris(self._at("models")) if uri.endswith(f"/{RECORD_FILE}")]
        names = sorted(uri.rsplit("/", 2)[-2] for uri in records)
        return [name for name in names if name != ENSEMBLE_NAME]

    def require_record(self, name: str) -> ModelRecord:
        record = self.record(name)
        if record is None:
            where = self._at("models", name)
            raise BloodcellError(f"run {self.run_id} has no model {name!r} ({where}): train it first")
        return record

    def write_record(self, record: ModelRecord) -> None:
        storage.write_json(record.to_json(), self._at("models", record.model, RECORD_FILE))

    def save_model(self, model: keras.Model, name: str) -> str:
        """``model`` stored as model ``name``'s file; its URI (write the record after it)."""
        from bloodcell import modelfile

        with tempfile.TemporaryDirectory() as tmp:
            return storage.upload_file(modelfile.save(model, Path(tmp, MODEL_FILE)), self.model_uri(name))

    def load_model(self, name: str) -> keras.Model:
        """Model ``name``, loaded by the one safe loader (:func:`modelfile.load`)."""
        return load_model(self.model_uri(name))

    def model_size(self, name: str) -> int:
        """The stored model file's size in bytes."""
        return storage.size(self.model_uri(name))

    def write_history(self, name: str, history: dict) -> None:
        storage.write_json(history, self._at("models", name, HISTORY_FILE))

    def history(self, name: str) -> dict | None:
        return storage.read_json_if_present(self._at("models", name, HISTORY_FILE))

    def write_predictions(self, name: str, data: bytes) -> str:
        return storage.upload_bytes(data, self._at("models", name, PREDICTIONS_FILE))

    def checkpoints(self, name: str) -> BucketCheckpoints:
        return BucketCheckpoints(self._at("checkpoints", name))

    # Evaluation, report and summary.
    def metrics_uri(self, name: str) -> str:
        return self._at("metrics", f"{name}.json")

    def write_metrics(self, name: str, result: dict) -> str:
        return storage.write_json(result, self.metrics_uri(name))

    def evaluated(self, names: list[str]) -> dict[str, str]:
        """The metrics of models ``names``, and of their combined model if evaluate built one."""
        combined = self.metrics_uri(ENSEMBLE_NAME)
        uris = {name: self.metrics_uri(name) for name in names}
        return {**uris, ENSEMBLE_NAME: combined} if storage.exists(combined) else uris

    def write_report_file(self, relative: str, data: bytes | str, content_type: str) -> str:
        """``report/<relative>`` (``report.html``, ``plots/<figure>.png``)."""
        return storage.upload_bytes(data, self._at("report", relative), content_type)

    def write_summary(self, summary: dict) -> str:
        return storage.write_json(summary, self._at("summary.json"))

    def summary(self) -> dict:
        return storage.read_json(self._at("summary.json"))

    # MLflow.
    def parent_run_id(self) -> str | None:
        """The MLflow parent run a step of this run claimed, if any."""
        claim = storage.read_bytes_if_present(self._at("mlflow_parent_run_id"))
        return None if claim is None else claim.decode()

    def claim_parent_run(self, candidate: str) -> str:
        """``candidate`` as the run's MLflow parent run unless another step claimed one first; the winner."""
        claim = self._at("mlflow_parent_run_id")
        return candidate if storage.create_if_absent(candidate, claim) else storage.read_bytes(claim).decode()

    def failures_uri(self, step: str) -> str:
        return self._at(FAILURES, f"{step}.json")

    def failure_uris(self) -> list[str]:
        return storage.list_uris(self._at(FAILURES))


def load_model(model_uri: str) -> keras.Model:
    """The model file at ``model_uri`` (gs://), downloaded and loaded by :func:`modelfile.load`."""
    from bloodcell import modelfile

    with tempfile.TemporaryDirectory() as tmp:
        return modelfile.load(storage.download_file(model_uri, Path(tmp, MODEL_FILE)), model_uri)


class BucketCheckpoints:
    """:class:`bloodcell.fitting.Checkpoints` in the bucket: ``<uri>/<phase>/last.keras`` and ``state.json``."""

    def __init__(self, uri: str):
        self.uri = uri

    def phase(self, name: str) -> BucketCheckpoints:
        return BucketCheckpoints(storage.join(self.uri, name))

    def read_state(self) -> dict | None:
        return storage.read_json_if_present(storage.join(self.uri, "state.json"))

    def read_model(self, folder: Path) -> Path:
        return storage.download_file(storage.join(self.uri, "last.keras"), folder / "last.keras")

    def write(self, model_file: Path, state: dict) -> None:
        storage.upload_file(model_file, storage.join(self.uri, "last.keras"))
        storage.write_json(state, storage.join(self.uri, "state.json"))

    def __str__(self) -> str:
        return self.uri
