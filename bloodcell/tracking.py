"""MLflow tracking of runs: one experiment, one parent run per pipeline run, one nested run per model;
the :class:`Tracker` that keeps MLflow failures from sinking a step, and the per-epoch logger.

Runs are found by tags, so a restarted step reuses its run instead of creating a second one.
The model registry is :mod:`bloodcell.registry`; comparing runs, :mod:`bloodcell.comparison`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

import mlflow
import requests
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bloodcell import config, storage
from bloodcell.runstore import RunStore

# A down tracking server must cost seconds per call, not MLflow's default of minutes of retries
# (7 retries, backoff factor 2, 120 s timeout).
CLIENT_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

PIPELINE_RUN_TAG = "bloodcell.pipeline_run_id"
ROLE_TAG = "bloodcell.role"
MODEL_TAG = "bloodcell.model"


def configure_client() -> None:
    """Apply :data:`CLIENT_SETTINGS` to this process's MLflow client (values the user set win).

    MLflow reads these settings from the environment at each request; every :class:`Tracker` calls this
    (``bloodcell predict``/``compare`` use shorter ones of their own).
    """
    for name, value in CLIENT_SETTINGS.items():
        os.environ.setdefault(name, value)


def experiment_id(name: str) -> str:
    experiment = mlflow.set_experiment(name)
    for key, value in config.EXPERIMENT_KIND.items():
        if experiment.tags.get(key) != value:
            try:
                MlflowClient().set_experiment_tag(experiment.experiment_id, key, value)
            except MlflowException as exc:  # a step of another run set it at the same moment (sqlite: UNIQUE)
                if "UNIQUE constraint" not in str(exc):
                    raise
    return experiment.experiment_id


def log_dataset(run_id: str, name: str, digest: str, source: str) -> None:
    """Record the ingested dataset as ``run_id``'s training input (the UI's "Dataset" column)."""
    dataset = Dataset(name=name, digest=digest, source_type="gcs", source=json.dumps({"uri": source}))
    training = InputTag(key="mlflow.data.context", value="training")
    MlflowClient().log_inputs(run_id, datasets=[DatasetInput(dataset, tags=[training])])


def parent_run(experiment: str, store: RunStore, tags: dict[str, str] | None = None) -> str:
    """The id of the parent run of pipeline run ``store``, created by whichever step asks first.

    Steps running in parallel each create a candidate run; the run store's atomic claim picks one, and the
    others delete theirs.
    """
    claimed = store.parent_run_id()
    if claimed:
        return claimed
    run_id = (
        MlflowClient()
        .create_run(
            experiment_id(experiment),
            run_name=f"pipeline-{store.run_id}",
            tags={
                PIPELINE_RUN_TAG: store.run_id,
                ROLE_TAG: "pipeline",
                "code_version": code_version(),
                **(tags or {}),
            },
        )
        .info.run_id
    )
    winner = store.claim_parent_run(run_id)
    if winner != run_id:
        MlflowClient().delete_run(run_id)
    return winner


def nested_run(parent_run_id: str, store: RunStore, model: str) -> str:
    """The nested run of ``model`` under ``parent_run_id``, in the parent's experiment (e.g. the combined model's)."""
    client = MlflowClient()
    experiment = client.get_experiment(client.get_run(parent_run_id).info.experiment_id).name
    return model_run(experiment, store.run_id, parent_run_id, model)


def log_json(run_id: str, value: Any, artifact_file: str) -> None:
    """``value`` as a JSON artifact of run ``run_id``."""
    MlflowClient().log_dict(run_id, value, artifact_file)


def experiment_url(tracking_uri: str, experiment_id: str | None = None) -> str:
    """The MLflow UI page of an experiment (or the list), in its model-training view: MLflow 3's UI opens
    in its GenAI view unless the link asks otherwise, whatever the experiment's kind tag says."""
    page = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{tracking_uri.rstrip('/')}/#/{page}?workflowType=machine_learning"


def describe_run(run_id: str, text: str) -> None:
    """The run's description in the MLflow UI (its note)."""
    MlflowClient().set_tag(run_id, "mlflow.note.content", text)


def model_run(experiment: str, pipeline_run_id: str, parent_run_id: str, model: str) -> str:
    """The id of the nested run of ``model`` under ``parent_run_id``, created on first use."""
    found = _find(experiment, pipeline_run_id, role="model", model=model)
    if found:
        return found
    run = MlflowClient().create_run(
        experiment_id(experiment),
        run_name=model,
        tags={
            PIPELINE_RUN_TAG: pipeline_run_id,
            ROLE_TAG: "model",
            MODEL_TAG: model,
            "mlflow.parentRunId": parent_run_id,
        },
    )
    client = MlflowClient()
    inputs = client.get_run(parent_run_id).inputs
    if inputs and inputs.dataset_inputs:  # the same data, shown on each model's run too
        client.log_inputs(run.info.run_id, datasets=inputs.dataset_inputs)
    return run.info.run_id


def _find(experiment: str, pipeline_run_id: str, role: str, model: str | None = None) -> str | None:
    query = f"tags.`{PIPELINE_RUN_TAG}` = '{pipeline_run_id}' and tags.`{ROLE_TAG}` = '{role}'"
    if model:
        query += f" and tags.`{MODEL_TAG}` = '{model}'"
    runs = MlflowClient().search_runs(
        [experiment_id(experiment)], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1
    )
    return runs[0].info.run_id if runs else None


def code_version() -> str:
    if os.environ.get("BLOODCELL_CODE_VERSION"):
        return os.environ["BLOODCELL_CODE_VERSION"]
    try:
        return (
            subprocess.run(
                [shutil.which("git") or "git", "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                cwd=os.path.dirname(__file__),
            ).stdout.strip()
            or "unknown"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def finish(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status)


def log_params(run_id: str, params: dict[str, Any]) -> None:
    MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:500]) for k, v in params.items()])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    log_metric_steps(run_id, [(metrics, step)])


def log_metric_steps(run_id: str, steps: list[tuple[dict[str, float], int]]) -> None:
    """Log several steps' metrics in one request (used to backfill epochs logged while the server was down)."""
    now = int(time.time() * 1000)
    MlflowClient().log_batch(
        run_id, metrics=[Metric(k, float(v), now, step) for metrics, step in steps for k, v in metrics.items()]
    )


def log_calibration(run_id: str, calibrated: dict, classes: list[str]) -> None:
    """A model's rules (``calibration.Calibrated``'s fields): the settings and per-class thresholds as params,
    the measures behind them as metrics."""
    if not calibrated:
        return
    settings = ("temperature", "target_accuracy", "level", "set_alpha", "familiarity_threshold", "flag_share")
    params = {f"calibration_{k}": f"{calibrated[k]:.6g}" for k in settings}
    for name, below, promise, minimum, cells in zip(
        classes,
        calibrated["refer_below"],
        calibrated["promise"],
        calibrated["set_min_probability"],
        calibrated["set_calibration_cells"],
        strict=True,
    ):
        params.update(
            {
                f"refer_below_{name}": f"{below:.6g}",
                f"promise_{name}": promise,
                f"set_min_probability_{name}": f"{minimum:.6g}",
                f"calibration_cells_{name}": cells,
            }
        )
    log_params(run_id, params)
    log_metrics(run_id, {k: v for k, v in calibrated.items() if k not in settings and isinstance(v, (int, float))})


def log_model(run_id: str, model: Any, classes: list[str], pip_requirements: list[str]) -> str:
    """Log ``model`` to ``run_id`` as a pyfunc model (:mod:`bloodcell.serving`); its URI (``models:/m-...``)."""
    from bloodcell import serving

    with mlflow.start_run(run_id=run_id):
        return serving.log_model(model, classes, pip_requirements)


def wait_timeout() -> float:
    """Seconds a step waits for an unreachable tracking server before going on without it."""
    return float(os.environ.get("BLOODCELL_MLFLOW_WAIT_S", "60"))


def server_answers(timeout_s: float = 2.0) -> bool:
    """Whether the tracking server answers its health check (always true for a non-HTTP store)."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return True
    try:
        return requests.get(f"{uri.rstrip('/')}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def wait_for_server(timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not server_answers():
        if time.monotonic() >= deadline:
            return False
        time.sleep(1)
    return True


class Tracker:
    """MLflow calls that cannot sink a step: bounded retries, and every failure recorded in the bucket.

    A step waits up to :func:`wait_timeout` seconds for the server (at its start, and again before
    its final logging through :meth:`await_server`), then goes on without it. After a
    failed call, later calls first probe the server (2 s) and are skipped while it stays down. What
    failed is written to the run store (``tracking_failures/<step>.json``), which the report shows; an
    entry is marked ``recovered`` when a later call of the same kind succeeds (e.g. epoch metrics
    backfilled after an outage).
    """

    def __init__(self, store: RunStore, step: str, wait_s: float | None = None):
        configure_client()
        self.store, self.step = store, step
        self.failures: dict[str, dict[str, Any]] = {}
        self.wait_s = wait_timeout() if wait_s is None else wait_s
        self.down = not wait_for_server(self.wait_s)
        if self.down:
            self._record("connect", f"no answer from {mlflow.get_tracking_uri()} within {self.wait_s:.0f} s")

    def await_server(self, wait_s: float | None = None) -> bool:
        """If the server was down at the last call, wait up to ``wait_s`` (default: the bound the step
        started with) seconds for it to return, so a step's final logging survives a short outage."""
        if self.down:
            wait_s = self.wait_s if wait_s is None else wait_s
            print(f"MLflow was unreachable at the last call; waiting up to {wait_s:.0f} s for it to return", flush=True)
            self.down = not wait_for_server(wait_s)
        return not self.down

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``, or None (recorded) if the server is down or the call fails."""
        return self._run(what, fn, args, kwargs)[1]

    def attempt(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> bool:
        """Like :meth:`call`, for calls whose value does not matter: whether it succeeded."""
        return self._run(what, fn, args, kwargs)[0]

    def _run(self, what: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> tuple[bool, Any]:
        if self.down and not server_answers():
            self._record(what, "skipped: tracking server unreachable")
            return False, None
        try:
            value = fn(*args, **kwargs)
        except Exception as exc:
            self.down = True
            self._record(what, _one_line(exc))
            return False, None
        self.down = False
        if what in self.failures and not self.failures[what]["recovered"]:
            self.failures[what]["recovered"] = True
            self._save()
        return True, value

    def _record(self, what: str, error: str) -> None:
        entry = self.failures.setdefault(what, {"what": what, "count": 0, "first_error": error})
        entry.update(count=entry["count"] + 1, last_error=error, recovered=False)
        if entry["count"] == 1:
            print(f"warning: MLflow: {what} failed ({error}); going on, results stay in the bucket", flush=True)
        self._save()

    def _save(self) -> None:
        try:
            storage.write_json(
                {"step": self.step, "failures": list(self.failures.values())},
                self.store.failures_uri(self.step),
            )
        except Exception as exc:
            print(f"warning: could not record the MLflow failure in the bucket: {exc}", flush=True)


def _one_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def recorded_failures(store: RunStore) -> dict[str, list[dict[str, Any]]]:
    """Every step's recorded MLflow failures for a run: ``{step: [entry, ...]}``."""
    found = {}
    for uri in store.failure_uris():
        record = storage.read_json(uri)
        if record["failures"]:
            found[record["step"]] = record["failures"]
    return dict(sorted(found.items()))


def describe_failures(failures: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One sentence per step, for the report."""
    lines = []
    for step, entries in failures.items():
        parts = [
            f"{e['what']} ({'recovered later' if e['recovered'] else 'not logged'}: {e['last_error']})" for e in entries
        ]
        lines.append(f"{step}: " + "; ".join(parts))
    return lines
