"""The MLflow model registry: each run's best model becomes a version of ``bloodcell-classifier``,
and the alias ``champion`` points at the best version so far. Models are read back only as Keras
``.keras`` files (:func:`download_keras_model`), never through a flavor's own loader."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from bloodcell import storage, tracking
from bloodcell.config import REGISTERED_MODEL, Profile
from bloodcell.errors import BloodcellError
from bloodcell.modelfile import KERAS_ARTIFACT

CHAMPION = "champion"


@dataclass(frozen=True)
class Candidate:
    """A run's best model as the registry weighs it: its test accuracy means something only on its test split."""

    model_uri: str
    model: str
    test_accuracy: float
    pipeline_run_id: str
    split: str = ""  # the split key: which dataset and split recipe, so which test set ("": not known)
    profile: str = ""
    takes_champion: bool = True  # False for profiles that only check the pipeline (smoke)


@dataclass(frozen=True)
class Champion:
    version: str
    test_accuracy: float
    split: str  # "" for a version registered before splits were recorded


def should_promote(candidate_accuracy: float, champion_accuracy: float | None) -> bool:
    """On the same test set, the champion alias moves only to a model with strictly better test accuracy."""
    return champion_accuracy is None or candidate_accuracy > champion_accuracy


def decide(candidate: Candidate, champion: Champion | None) -> tuple[bool, str]:
    """Whether ``candidate`` takes the champion alias, and why (said in the report and on the version)."""
    if not candidate.takes_champion:
        return False, (
            f"a {candidate.profile or 'check'}-profile run never takes the alias (it trains on a sample to check "
            "the pipeline)"
        )
    if champion is None:
        return True, "first champion"
    theirs = f"version {champion.version} ({champion.test_accuracy:.2%})"
    if champion.split and candidate.split and champion.split != candidate.split:
        return False, (
            f"{theirs} was tested on another test split ({champion.split}, this run's is {candidate.split}): "
            "accuracies on different test sets are not compared. Move the alias in MLflow's UI if this model "
            "should serve instead"
        )
    same = "on the same test split" if champion.split else "(its test split is not recorded)"
    if should_promote(candidate.test_accuracy, champion.test_accuracy):
        return True, f"{candidate.test_accuracy:.2%} beats {theirs} {same}"
    return False, f"{theirs} is not beaten {same}"


def current_champion(client: MlflowClient) -> Champion | None:
    try:
        current = client.get_model_version_by_alias(REGISTERED_MODEL, CHAMPION)
    except MlflowException:
        return None
    return Champion(current.version, float(current.tags.get("test_accuracy", "nan")), current.tags.get("split", ""))


def register_best(candidate: Candidate, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    """Register ``candidate`` as a new version of ``bloodcell-classifier`` (with ``tags``, e.g. its calibration);
    move ``champion`` to it when :func:`decide` says so."""
    client = MlflowClient()
    champion = current_champion(client)
    version = mlflow.register_model(candidate.model_uri, REGISTERED_MODEL).version
    promoted, reason = decide(candidate, champion)
    version_tags = {
        "test_accuracy": candidate.test_accuracy,
        "model": candidate.model,
        "pipeline_run_id": candidate.pipeline_run_id,
        "split": candidate.split,
        "profile": candidate.profile,
        "champion_decision": ("took the alias: " if promoted else "did not take the alias: ") + reason,
        **(tags or {}),
    }
    for key, value in version_tags.items():
        client.set_model_version_tag(REGISTERED_MODEL, version, key, str(value))
    if promoted:
        client.set_registered_model_alias(REGISTERED_MODEL, CHAMPION, version)
    return {
        "registered_model": REGISTERED_MODEL,
        "version": str(version),
        "promoted": promoted,
        "reason": reason,
        "previous_champion_version": champion.version if champion else None,
        "previous_champion_accuracy": champion.test_accuracy if champion else None,
        "test_accuracy": candidate.test_accuracy,
        "model": candidate.model,
    }


def register_run_best(
    best: dict[str, Any], pipeline_run_id: str, tracker: tracking.Tracker, *, split: str, profile: Profile
) -> dict[str, Any]:
    """Register a run's best model (its evaluation result, tested on ``split``); the outcome, or why it was not
    done, for the report."""
    if not best.get("mlflow_model_uri"):
        return {"error": f"{best['model']} has no MLflow model (its training could not log to MLflow)"}
    candidate = Candidate(
        best["mlflow_model_uri"],
        best["model"],
        best["accuracy"],
        pipeline_run_id,
        split=split,
        profile=profile.name,
        takes_champion=profile.takes_champion,
    )
    registry = tracker.call("register the best model", register_best, candidate, calibration_tags(best))
    return registry or {"error": "MLflow could not be reached (see the MLflow logging section)"}


def calibration_tags(result: dict[str, Any]) -> dict[str, Any]:
    """What a model version says of its calibration (the model file itself carries it: its last layer)."""
    quality = {**(result.get("calibration") or {}), **(result.get("answers") or {})}
    keys = ("temperature", "target_accuracy", "ece", "kept_share", "kept_accuracy", "unfamiliar_share", "set_coverage")
    tags = {f"calibration_{k}": f"{quality[k]:.6g}" for k in keys if isinstance(quality.get(k), (int, float))}
    if isinstance(quality.get("promise"), dict):
        promised = [c for c, p in quality["promise"].items() if p == "class"]
        tags["calibration_promised_classes"] = ",".join(promised) or "none"
    return tags


def describe(registry: dict[str, Any]) -> str:
    """The registry outcome in one or two sentences."""
    if "error" in registry:
        return f"Registering the best model in MLflow failed: {registry['error']}"
    text = (
        f"The best model ({registry['model']}, test accuracy {registry['test_accuracy']:.2%}) is version "
        f"{registry['version']} of registered model {registry['registered_model']}. "
    )
    reason = registry.get("reason", "")  # absent in summaries written before the reason was recorded
    if registry["promoted"]:
        return text + f"The alias 'champion' now points to it ({reason})."
    if registry["previous_champion_version"] is None:
        return text + f"No version holds the alias 'champion': {reason}."
    return text + f"The alias 'champion' stays on version {registry['previous_champion_version']}: {reason}."


def download_keras_model(model_uri: str, dst: Path) -> tuple[Path, list[str]]:
    """The ``.keras`` file of MLflow model ``model_uri`` (downloaded under ``dst``) and its class names."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        text = str(exc)
        if exc.error_code in ("PERMISSION_DENIED", "RESOURCE_DOES_NOT_EXIST") or "403" in text or "not found" in text:
            raise not_readable(f"model {model_uri}") from None
        raise BloodcellError(f"cannot download model {model_uri} from MLflow: {exc.message[:300]}") from exc
    return keras_file_of(local, model_uri), list((_mlmodel(local, model_uri).metadata or {}).get("classes", []))


def not_readable(what: str) -> BloodcellError:
    """``what`` is not in MLflow or its user may not read it: MLflow's auth answers 403 for an id it does not
    know, so both causes read the same."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME") or "(none)"
    return BloodcellError(
        f"{what} not found or not readable in MLflow at {mlflow.get_tracking_uri()} for user {user}: check the "
        "URI (`bloodcell compare` lists the runs' models; the run summary has their URIs); if it is right, that "
        "user has no READ permission on it."
    )


def keras_file_of(model_dir: Path, model_uri: str) -> Path:
    """The ``.keras`` file of the MLflow model in ``model_dir``, refusing every other flavor or format.

    A model from a registry others can write to is code: other flavors unpickle Python or run the model's
    code, and a Keras SavedModel export (``save_exported_model``) is a TensorFlow graph. A ``.keras`` file
    loaded in safe mode runs no code from the file. Our models: a pyfunc model whose artifact
    ``keras_model`` is the file (:mod:`bloodcell.serving`; its code is never run here), or, logged before it,
    flavor ``keras`` with ``data/model.keras``.
    """
    flavors = _mlmodel(model_dir, model_uri).flavors
    ours = (flavors.get("python_function", {}).get("artifacts") or {}).get(KERAS_ARTIFACT)
    if ours:
        return checked_keras_file(model_dir, str(ours.get("path", "")), model_uri)
    keras_flavor = flavors.get("keras")
    if keras_flavor is None:
        raise BloodcellError(
            f"model {model_uri} has the MLflow flavor(s) {', '.join(sorted(flavors)) or 'none'}, neither keras nor "
            f"a bloodcell pyfunc model (artifact {KERAS_ARTIFACT}): refusing to load it (other flavors can run code "
            "when loaded). Pass a model logged by a bloodcell run."
        )
    if keras_flavor.get("save_exported_model"):
        raise BloodcellError(
            f"model {model_uri} is a TensorFlow SavedModel export (a graph of operations), not a .keras file: "
            "refusing to load it. Pass a model logged by a bloodcell run."
        )
    return checked_keras_file(model_dir, f"{keras_flavor.get('data', 'data')}/model.keras", model_uri)


def checked_keras_file(model_dir: Path, relative: str, model_uri: str) -> Path:
    """``model_dir/relative``, refused unless it is a file inside ``model_dir``."""
    path = storage.local_path(model_dir, relative, f"model {model_uri}")
    if path.is_symlink() or not path.is_file():
        raise BloodcellError(f"model {model_uri} has no .keras file (expected {path}); refusing to load it.")
    return path


def _mlmodel(model_dir: Path, model_uri: str) -> Model:
    mlmodel = model_dir / "MLmodel"
    if not mlmodel.is_file():
        raise BloodcellError(f"{model_uri} is not an MLflow model (no MLmodel file); pass models:/<id> or runs:/...")
    return Model.load(str(mlmodel))
