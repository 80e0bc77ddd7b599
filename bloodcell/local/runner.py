"""The pipeline on this machine: local services, kfp's local runner (processes or containers), resume, stop.

``pipeline.py run`` and ``pipeline.py stop`` are thin commands over :func:`run` and :func:`stop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bloodcell import compat, config
from bloodcell.errors import BloodcellError
from bloodcell.local import runs
from bloodcell.weights import Weights

if TYPE_CHECKING:
    from bloodcell.local.containers import ContainerPlan

RUNNERS = ("subprocess", "docker")
DEFAULT_STATE_DIR = ".bloodcell"


@dataclass(frozen=True)
class RunOptions:
    """How a local run is run (its pipeline arguments are separate: see :func:`run`)."""

    state_dir: Path = Path(DEFAULT_STATE_DIR)
    runner: str | None = None  # None: subprocess, or on --resume the run's own runner
    image: str | None = None  # None: config.DEFAULT_IMAGE, or on --resume the run's own image
    summary: str | None = None
    gcs_port: int = 9023
    mlflow_port: int = 5023
    resume: str | None = None
    verbose: bool = False  # everything kfp and the steps print, as before; else a line per task and epoch


PipelineFactory = Callable[[str, list[str]], Callable[..., Any]]  # image, model names -> the kfp pipeline


def run(
    make_pipeline: PipelineFactory,
    options: RunOptions,
    arguments: dict[str, str] | None = None,
    run_id: str | None = None,
) -> int:
    """Run the pipeline (``arguments``, or a run's own with ``options.resume``); the exit status."""
    import kfp.local

    from bloodcell.local.services import LocalServices

    state = options.state_dir.resolve()
    run_id, arguments, runner, image = _what_to_run(state, options, arguments, run_id)
    weights = Weights.parse(arguments["vgg16_weights"])
    if weights.kind != "bucket":  # a bucket file is checked once the store runs
        weights.check()
    checked = None
    if runner == "docker":
        from bloodcell.local import containers

        arguments = containers.absolute_paths(arguments)
        checked = containers.check(image)  # before anything starts: an engine, the image, our package in it
    _check_not_in_progress(state, run_id)
    services = LocalServices(state, arguments["bucket"], options.gcs_port, options.mlflow_port)
    env = services.start()
    os.environ.update(env)
    if weights.kind == "bucket":
        weights.check()
    runs.save_arguments(state, run_id, arguments)
    kfp_runner, runner_record = _kfp_runner(runner, checked, state, run_id, arguments, env)
    runs.save_runner(state, run_id, runner_record)
    kfp.local.init(runner=kfp_runner, pipeline_root=str(state / "kfp"), raise_on_error=True)
    started = time.perf_counter()
    where = f"containers of {image}" if checked else "local processes"
    logs = state / "runs" / run_id / "logs"
    print(
        f"run {run_id}: profile {arguments['profile']}, data {arguments['source']}, steps in {where}"
        + (" (resumed: finished steps and epochs are kept)" if options.resume else "")
        + ("" if options.verbose else f"; each step's whole output in {logs}/ (--verbose shows it here)"),
        flush=True,
    )
    with (
        runs.active(state, run_id),
        runs.TaskLog(sys.stdout, logs=logs, verbose=options.verbose).installed() as task_log,
        _containers_fixed(checked is not None),
        _sigterm_exits(),
    ):
        try:
            make_pipeline(image, config.resolve(arguments["profile"], arguments["overrides"]).model_names)(**arguments)
        except RuntimeError as exc:
            if not compat.is_pipeline_failure(exc):
                raise
            return report_failure(run_id, task_log, exc, options.state_dir)
    return finish(run_id, arguments, state, time.perf_counter() - started, options, runner_record)


def _what_to_run(
    state: Path, options: RunOptions, arguments: dict[str, str] | None, run_id: str | None
) -> tuple[str, dict[str, str], str, str]:
    """The run id, pipeline arguments, runner and image: given, or on ``--resume`` the run's own."""
    if options.resume:
        run_id = options.resume
        arguments = runs.load_arguments(state, run_id)
        recorded = runs.load_runner(state, run_id)
    elif arguments is None or run_id is None:
        raise ValueError("a new run needs its arguments and run id")
    else:
        recorded = {}
    runner = options.runner or recorded.get("runner", "subprocess")
    image = options.image or recorded.get("image") or config.DEFAULT_IMAGE
    if runner not in RUNNERS:
        raise BloodcellError(f"unknown runner {runner!r}; choose one of: {', '.join(RUNNERS)}")
    return run_id, arguments, runner, image


def _check_not_in_progress(state: Path, run_id: str) -> None:
    others = runs.in_progress(state)
    if run_id in others:
        raise BloodcellError(f"run {run_id} is already in progress (pid {others[run_id]}); wait for it to end")
    if others:
        print(
            f"note: run(s) {', '.join(others)} in progress too; this run shares their services, "
            f"its outputs go under runs/{run_id}/"
        )


def _kfp_runner(
    runner: str, checked: ContainerPlan | None, state: Path, run_id: str, arguments: dict[str, str], env: dict[str, str]
) -> tuple[Any, dict[str, str]]:
    """kfp's local runner for ``runner`` and what to record of it (the image and its ID for containers)."""
    import kfp.local

    if checked is None:
        os.environ[config.RUNTIME_ENV] = config.LOCAL_PROCESS  # the steps inherit this process's environment
        compat.quiet_base_image_warning()
        return kfp.local.SubprocessRunner(use_venv=False), {"runner": runner}
    from bloodcell.local import containers

    plan = containers.plan(checked, state, run_id, arguments, env)
    return plan.kfp_runner(), {"runner": runner, "image": plan.image, "image_id": plan.image_id}


@contextlib.contextmanager
def _containers_fixed(docker: bool) -> Iterator[None]:
    if not docker:
        yield
        return
    from bloodcell.local import containers

    with containers.reliable_exit_codes():
        yield


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM ends the run like Ctrl-C does, so that cleanup (a task's container) runs."""

    def exit_now(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    saved = signal.signal(signal.SIGTERM, exit_now)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, saved)


def report_failure(run_id: str, task_log: runs.TaskLog, exc: Exception, state_dir: Path) -> int:
    """Name the failing step, show the end of its log and how to resume; exit status 1."""
    task = task_log.task or "unknown"
    tail = "\n".join(f"    {line}" for line in task_log.lines) or "    (no output)"
    whole = task_log.log_path(task)
    tail += f"\nthe whole log: {whole}" if whole else ""
    resume = f"python pipeline.py run --resume {run_id}"
    if str(state_dir) != DEFAULT_STATE_DIR:
        resume += f" --state-dir {state_dir}"
    print(
        f"error: run {run_id} failed in step {task} ({runs.plain(str(exc)).strip()})\n"
        f"last lines of {task}'s log:\n{tail}\n"
        f"fix the cause, then resume: {resume} (finished steps and training epochs are kept)",
        file=sys.stderr,
    )
    return 1


def finish(
    run_id: str,
    arguments: dict[str, str],
    state: Path,
    seconds: float,
    options: RunOptions,
    runner_record: dict[str, str],
) -> int:
    """Write the run summary (the report step's, plus wall time and runner), print where things are."""
    from bloodcell import storage, tracking
    from bloodcell.runstore import RunStore

    summary = RunStore(arguments["bucket"], run_id).summary()
    summary["wall_seconds"] = round(seconds, 1)
    summary.update(runner_record)
    local_dir = state / "runs" / run_id
    report_copy = storage.download_file(summary["report_uri"], local_dir / "report.html")
    summary["report_local_path"] = str(report_copy.resolve())
    summary_path = Path(options.summary) if options.summary else local_dir / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    for name, model in summary["models"].items():
        speed = model.get("inference_images_per_second")  # absent in a summary from an older image
        print(
            f"  {name:8} test accuracy {model['test_accuracy']:.2%}  macro F1 {model['macro_f1']:.4f}"
            + (f"  {speed:,.0f} images/s" if speed else "")
            + (f"  (members: {', '.join(model['members'])})" if "members" in model else "")
        )
    print(f"report: {summary['report_uri']} (local copy: {report_copy.resolve().as_uri()})")
    print(f"summary: {summary_path}")
    for line in tracking.describe_failures(summary.get("tracking_failures", {})):
        print(f"warning: MLflow logging failed in {line}")
    experiment_url = tracking.experiment_url(summary["mlflow_tracking_uri"], summary.get("mlflow_experiment_id"))
    print(
        f"MLflow UI: {experiment_url} (experiment {arguments['experiment']!r}; log in as `reader`, "
        f"password in {state / 'mlflow-users.json'}); stop services: python pipeline.py stop"
    )
    return 0


def stop(state_dir: Path, bucket: str, force: bool = False) -> int:
    """Stop the services ``run`` started and remove task containers left by runs that ended; exit status."""
    from bloodcell.local import containers
    from bloodcell.local.services import LocalServices

    state = state_dir.resolve()
    running = runs.in_progress(state)
    if running and not force:
        listing = ", ".join(f"{run} (pid {pid})" for run, pid in running.items())
        print(
            f"error: run(s) in progress: {listing}. Stopping the services now would fail them; wait for them "
            f"to end, or pass --force.",
            file=sys.stderr,
        )
        return 1
    stopped = containers.remove_containers(state, keep_runs=set() if force else set(running))
    stopped += LocalServices(state, bucket).stop()
    print("stopped: " + ", ".join(stopped) if stopped else "no local service was running")
    return 0
