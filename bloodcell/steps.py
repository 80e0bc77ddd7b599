"""The seven pipeline steps as plain functions of strings, shared by the CLI and the kfp components.

Each returns a JSON-serialisable dict. Results live in the bucket under
``gs://<bucket>/runs/<run_id>/`` (per run) or content-addressed prefixes (datasets, splits, arrays).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TypeVar

from bloodcell import config, storage
from bloodcell.errors import BloodcellError

F = TypeVar("F", bound=Callable)

MODEL_NAMES = config.MODEL_NAMES


def runtime() -> dict:
    """Where this step runs: its user, whether in a container with a read-only root, the image."""
    in_container = os.path.exists("/.dockerenv") or "KUBERNETES_SERVICE_HOST" in os.environ
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "container": in_container,
        "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "image": os.environ.get("BLOODCELL_IMAGE", "") if in_container else "",
        "image_id": os.environ.get("BLOODCELL_IMAGE_ID", "") if in_container else "",
    }


def describe_runtime(facts: dict) -> str:
    if not facts["container"]:
        return f"uid {facts['uid']}, a local process"
    image = f", image {facts['image']}" if facts["image"] else ""
    image += f" ({facts['image_id'][:19]})" if facts["image_id"] else ""
    root = "read-only" if facts["read_only_root"] else "writable"
    return f"uid {facts['uid']}, in a container ({root} root filesystem){image}"


def user_errors(step: F) -> F:
    """Report a :class:`BloodcellError` as one clear line and exit 2, instead of a traceback."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        print(f"step {step.__name__}: {describe_runtime(runtime())}", flush=True)
        try:
            return step(*args, **kwargs)
        except (BloodcellError, config.ConfigError) as exc:
            print(f"error in step {step.__name__}: {exc}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except OSError as exc:
            if exc.errno not in storage.DISK_FULL_ERRNOS:
                raise
            print(
                f"error in step {step.__name__}: {storage.disk_full_error(exc.filename)}", file=sys.stderr, flush=True
            )
            raise SystemExit(2) from None

    return wrapper  # type: ignore[return-value]


def run_uri(bucket: str, run_id: str) -> str:
    return f"gs://{bucket}/runs/{run_id}"


@user_errors
def ingest(source: str, bucket: str, vgg16_weights: str = "imagenet") -> dict:
    """Check the VGG16 weights can be had (fail in seconds, before training), then ingest ``source``."""
    from bloodcell import ingest as ingest_lib
    from bloodcell import models

    models.check_vgg16_weights(vgg16_weights)
    storage.ensure_bucket(bucket)
    return asdict(ingest_lib.ingest(source, bucket))


@user_errors
def split(dataset_uri: str, bucket: str, profile: str = "laptop", overrides: str = "{}") -> dict:
    from bloodcell import split as split_lib

    result = split_lib.split(dataset_uri, bucket, config.resolve(profile, overrides))
    return {
        "split_uri": result.split_uri,
        "counts": result.counts,
        "array_uris": {str(k): v for k, v in result.array_uris.items()},
    }


@user_errors
def train(
    model: str,
    split_uri: str,
    bucket: str,
    run_id: str,
    profile: str = "laptop",
    overrides: str = "{}",
    experiment: str = config.DEFAULT_EXPERIMENT,
    parent_run_id: str = "",
    vgg16_weights: str = "none",
) -> dict:
    from bloodcell import split as split_lib
    from bloodcell import tracking
    from bloodcell import train as train_lib

    settings = config.resolve(profile, overrides)
    tracker = tracking.Tracker(run_uri(bucket, run_id), f"train-{model}")
    parent_run_id = parent_run_id or open_parent_run(
        split_uri, bucket, run_id, settings, overrides, experiment, tracker
    )
    arrays_uri = split_lib.arrays_uri(split_uri, settings.model(model).image_size)
    result = train_lib.train(
        model, arrays_uri, run_uri(bucket, run_id), settings, experiment, run_id, parent_run_id, vgg16_weights, tracker
    )
    return asdict(result)


def describe_model_artifact(artifact, result: dict) -> None:
    """Fill a kfp ``Model`` output: the trained model's metadata, and its bucket URI as the file's content."""
    artifact.metadata.update(result, runtime=runtime())
    with open(artifact.path, "w") as pointer:
        pointer.write(result["model_uri"])


def open_parent_run(
    split_uri: str, bucket: str, run_id: str, settings: config.Profile, overrides: str, experiment: str, tracker
) -> str | None:
    """The MLflow parent run of ``run_id`` (created on first call), tagged and with the profile's params.

    None when MLflow cannot be reached (``tracker`` records it).
    """
    from bloodcell import tracking

    dataset_uri = storage.read_json(storage.join(split_uri, "split.json"))["dataset_uri"]
    parent = tracker.call(
        "open the parent run",
        tracking.parent_run,
        experiment,
        run_id,
        run_uri(bucket, run_id),
        tags={
            "profile": settings.name,
            "dataset_hash": dataset_uri.rstrip("/").rsplit("/", 1)[-1],
            "dataset_uri": dataset_uri,
            "bucket": bucket,
        },
    )
    if parent:
        tracker.attempt(
            "log the profile params",
            _log_parent_params,
            parent,
            {**settings.flat_params(), "overrides": overrides or "{}"},
        )
    return parent


def _log_parent_params(parent: str, params: dict) -> None:
    from mlflow.exceptions import MlflowException

    from bloodcell import tracking

    try:
        tracking.log_params(parent, params)
    except MlflowException as exc:  # a step run by hand with other overrides: keep the first values
        if exc.error_code != "INVALID_PARAMETER_VALUE":
            raise
        print(f"warning: parent run {parent} keeps its first profile params ({exc.message[:200]})")


@user_errors
def evaluate(bucket: str, run_id: str, models: list[str] | None = None) -> dict:
    from bloodcell import evaluate as evaluate_lib
    from bloodcell import tracking

    base = run_uri(bucket, run_id)
    dirs = [storage.join(base, "models", name) for name in (models or MODEL_NAMES)]
    return evaluate_lib.evaluate(dirs, base, tracking.Tracker(base, "evaluate"))


@user_errors
def report(
    bucket: str,
    run_id: str,
    split_uri: str,
    profile: str = "laptop",
    experiment: str = config.DEFAULT_EXPERIMENT,
    parent_run_id: str = "",
    overrides: str = "{}",
    models: list[str] | None = None,
) -> dict:
    from bloodcell import report as report_lib
    from bloodcell import tracking

    settings = config.resolve(profile, overrides)
    tracker = tracking.Tracker(run_uri(bucket, run_id), "report")
    parent_run_id = parent_run_id or open_parent_run(
        split_uri, bucket, run_id, settings, overrides, experiment, tracker
    )
    summary = {
        "run_id": run_id,
        "profile": profile,
        "bucket": bucket,
        "run_uri": run_uri(bucket, run_id),
        "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
        "mlflow_experiment": experiment,
        "mlflow_parent_run_id": parent_run_id,
    }
    result = report_lib.build_report(run_uri(bucket, run_id), split_uri, list(models or MODEL_NAMES), summary, tracker)
    return result.summary
