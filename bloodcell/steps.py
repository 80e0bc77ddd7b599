"""The seven pipeline steps as plain functions of strings, shared by the CLI and the kfp components.

Each returns a JSON-serialisable dict. A run's results live in its run store (:mod:`bloodcell.runstore`);
datasets, splits and arrays under content-addressed prefixes shared by runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, TypeVar

from bloodcell import config, errors, storage
from bloodcell.runstore import ModelRecord, RunStore

F = TypeVar("F", bound=Callable)


def runtime() -> dict:
    """Where this step runs, as the runner that started it says (``config.RUNTIME_ENV``): a local process, a
    container of an image (with its ID), a cluster pod; its user; whether its root filesystem is read-only."""
    started_as = os.environ.get(config.RUNTIME_ENV) or "a process started directly"
    in_container = started_as in (config.CONTAINER, config.CLUSTER_POD)
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "started_as": started_as,
        "container": in_container,
        "read_only_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
        "image": os.environ.get("BLOODCELL_IMAGE", "") if in_container else "",
        "image_id": os.environ.get("BLOODCELL_IMAGE_ID", "") if in_container else "",
    }


def describe_runtime(facts: dict) -> str:
    if not facts["container"]:
        return f"uid {facts['uid']}, {facts.get('started_as', config.LOCAL_PROCESS)}"
    image = f", image {facts['image']}" if facts["image"] else ""
    image += f" ({facts['image_id'][:19]})" if facts["image_id"] else ""
    root = "read-only" if facts["read_only_root"] else "writable"
    where = "a cluster pod" if facts.get("started_as") == config.CLUSTER_POD else "a container"
    return f"uid {facts['uid']}, in {where} ({root} root filesystem){image}"


# A step's last line: its key result in words, which the local runner shows when the step ends.
RESULT_PREFIX = "bloodcell result: "


def describe_result(step: str, result: dict) -> str:
    """A step's key result in one line (images ingested, split sizes, a model's training, test accuracies)."""
    if step == "ingest":
        hit = " (cache hit)" if result.get("cache_hit") else ""
        return (
            f"{result['images']:,} images in {len(result.get('classes', [])) or '?'} classes, "
            f"{result['quarantined']} quarantined, {result['duplicates']} duplicates dropped{hit}"
        )
    if step == "split":
        sizes = {subset: sum(per_class.values()) for subset, per_class in result["counts"].items()}
        return " / ".join(f"{subset} {count:,}" for subset, count in sizes.items()) + " images"
    if step == "train":
        return (
            f"{result['model']}: {result['epochs']} epochs in {result['train_seconds']:.0f} s "
            f"({result['images_per_second']:,.0f} images/s)"
        )
    if step == "evaluate":
        accuracies = ", ".join(f"{name} {r['accuracy']:.2%}" for name, r in result.items())
        return f"test accuracy {accuracies}"
    return f"best model {result.get('best_model', '?')}; report {result.get('report_uri', '?')}"


def user_errors(step: F) -> F:
    """The step reports an error the user can act on as one line (``error in step <name>: ...``), exit 2,
    marks a failed accelerator as worth a retry on a cluster; its last line is its result
    (:func:`describe_result`)."""

    @functools.wraps(step)
    def wrapper(*args, **kwargs):
        print(f"step {step.__name__}: {describe_runtime(runtime())}", flush=True)
        with errors.exits_on_user_error(f"error in step {step.__name__}"), errors.retryable_on_device_failure():
            result = step(*args, **kwargs)
        with contextlib.suppress(KeyError, TypeError, AttributeError):  # a result line is a courtesy
            print(RESULT_PREFIX + describe_result(step.__name__, result), flush=True)
        return result

    return wrapper  # type: ignore[return-value]


@user_errors
def ingest(
    *, source: str, bucket: str, vgg16_weights: str = config.DEFAULT_VGG16_WEIGHTS, data_sha256: str = ""
) -> dict:
    """Check the VGG16 weights can be had (fail in seconds, before training), then ingest ``source``
    (pinned to ``data_sha256`` when given)."""
    from bloodcell import ingest as ingest_lib
    from bloodcell.weights import Weights

    Weights.parse(vgg16_weights).check()
    storage.ensure_bucket(bucket)
    return asdict(ingest_lib.ingest(source, bucket, expected_sha256=data_sha256))


@user_errors
def split(*, dataset_uri: str, bucket: str, profile: str = "laptop", overrides: str = "{}") -> dict:
    from bloodcell import split as split_lib

    result = split_lib.split(dataset_uri, bucket, config.resolve(profile, overrides))
    return {
        "split_uri": result.split_uri,
        "counts": result.counts,
        "array_uris": {str(k): v for k, v in result.array_uris.items()},
    }


@user_errors
def train(
    *,
    model: str,
    split_uri: str,
    bucket: str,
    run_id: str,
    profile: str = "laptop",
    overrides: str = "{}",
    experiment: str = config.DEFAULT_EXPERIMENT,
    mlflow_parent_run_id: str = "",
    vgg16_weights: str = config.DEFAULT_VGG16_WEIGHTS,
) -> dict:
    """Train ``model`` (a model of the profile) for pipeline run ``run_id``; its record (``train.json``)."""
    from bloodcell import recipes, tracking
    from bloodcell import split as split_lib
    from bloodcell import train as train_lib
    from bloodcell.weights import Weights

    settings = config.resolve(profile, overrides)
    weights = Weights.parse(vgg16_weights)
    recipe = recipes.choose(settings.model(model), weights)
    store = RunStore(bucket, run_id)
    tracker = tracking.Tracker(store, f"train-{model}")
    parent_run = mlflow_parent_run_id or open_parent_run(split_uri, store, settings, overrides, experiment, tracker)
    record = train_lib.train(
        model,
        recipe=recipe,
        arrays_uri=split_lib.arrays_uri(split_uri, recipe.image_size),
        store=store,
        profile=settings,
        experiment=experiment,
        mlflow_parent_run_id=parent_run,
        weights=weights,
        tracker=tracker,
    )
    return record.to_json()


def fill_model_artifact(artifact: Any, result: dict) -> None:
    """A kfp ``Model`` output: the trained model.keras itself, its record as metadata."""
    with errors.exits_on_user_error("error in step train"):  # e.g. a full disk, reported like the step's own
        storage.download_file(result["model_uri"], artifact.path)
    artifact.metadata.update(result, format="keras", runtime=runtime())


def fill_evaluation_artifacts(results: dict[str, dict], *, metrics: Any, confusion: dict[str, Any]) -> None:
    """evaluate's kfp outputs: each model's headline metrics, its confusion matrix, the metrics' locations."""
    for name, result in results.items():
        for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr"):
            metrics.log_metric(f"{name}.{key}", result[key])
        confusion[name].log_confusion_matrix(result["classes"], result["confusion_matrix"])
    metrics.metadata.update(
        metrics_uris={name: result["metrics_uri"] for name, result in results.items()}, runtime=runtime()
    )


def open_parent_run(
    split_uri: str, store: RunStore, settings: config.Profile, overrides: str, experiment: str, tracker
) -> str | None:
    """The MLflow parent run of the pipeline run (created on first call), tagged and with the profile's params.

    None when MLflow cannot be reached (``tracker`` records it).
    """
    from bloodcell import ingest as ingest_lib
    from bloodcell import split as split_lib
    from bloodcell import tracking

    dataset_uri = split_lib.dataset_of(split_uri)
    manifest = ingest_lib.read_manifest(dataset_uri)
    dataset_hash = ingest_lib.hash_of(dataset_uri)
    parent = tracker.call(
        "open the parent run",
        tracking.parent_run,
        experiment,
        store,
        tags={
            "profile": settings.name,
            "dataset_hash": dataset_hash,
            "dataset_uri": dataset_uri,
            # What to pass as --data-sha256 to get exactly this data again (the source that first gave it).
            "source_sha256": manifest.get("source_sha256", ""),
            "source_sha256_of": manifest.get("source_sha256_of", ""),
            "bucket": store.bucket,
        },
    )
    if parent:
        source_name = manifest.get("source", dataset_uri).rstrip("/").rsplit("/", 1)[-1]
        tracker.attempt("log the dataset", tracking.log_dataset, parent, source_name, dataset_hash, dataset_uri)
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
def evaluate(
    *, bucket: str, run_id: str, model_names: list[str] | None = None, trained: list[dict] | None = None
) -> dict:
    """Evaluate the ``trained`` models (their records), or those of ``model_names`` (default: every model the run
    trained), and their combined model (built now from two models on, chosen on the validation split)."""
    from bloodcell import evaluate as evaluate_lib
    from bloodcell import tracking

    store = RunStore(bucket, run_id)
    if trained is None:
        records = [store.require_record(name) for name in model_names or store.trained_names()]
    else:
        records = [ModelRecord.from_json(values) for values in trained]
    return evaluate_lib.evaluate(records, store, tracking.Tracker(store, "evaluate"))


@user_errors
def report(
    *,
    bucket: str,
    run_id: str,
    split_uri: str,
    profile: str = "laptop",
    experiment: str = config.DEFAULT_EXPERIMENT,
    mlflow_parent_run_id: str = "",
    overrides: str = "{}",
    model_names: list[str] | None = None,
    metrics_uris: dict[str, str] | None = None,
) -> dict:
    """Register the best of the evaluated models (``metrics_uris``, or those of ``model_names`` in run ``run_id``:
    default, every model it trained) and build the report; the run summary."""
    from bloodcell import registry, tracking
    from bloodcell import report as report_lib
    from bloodcell import split as split_lib

    settings = config.resolve(profile, overrides)
    store = RunStore(bucket, run_id)
    tracker = tracking.Tracker(store, "report")
    parent_run = mlflow_parent_run_id or open_parent_run(split_uri, store, settings, overrides, experiment, tracker)
    metrics_uris = metrics_uris or store.evaluated(model_names or store.trained_names())
    results = {name: storage.read_json(uri) for name, uri in metrics_uris.items()}
    best = results[report_lib.best_model(results)]
    summary = {
        "run_id": run_id,
        "profile": profile,
        "bucket": bucket,
        "run_uri": store.uri,
        "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI", ""),
        "mlflow_experiment": experiment,
        "mlflow_parent_run_id": parent_run,
        "mlflow_experiment_id": tracker.call("find the experiment", tracking.experiment_id, experiment)
        if parent_run
        else None,
        "registry": registry.register_run_best(
            best, run_id, tracker, split=split_lib.key_of(split_uri), profile=settings
        ),
    }
    return report_lib.build_report(store, split_uri, results, summary, tracker).summary
