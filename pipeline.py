#!/usr/bin/env python3
"""The bloodcell Kubeflow pipeline and its command line.

    python pipeline.py run [--profile laptop] [--data SOURCE] [--summary FILE]   # local, embedded
    python pipeline.py run --resume RUN_ID                                        # after a failure
    python pipeline.py stop                                                       # stop local services
    python pipeline.py compile --output pipeline.yaml
    python pipeline.py submit --host URL [--profile gpu] [--experiment NAME] [--pipeline-root gs://...]
"""

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

from kfp import compiler, dsl, kubernetes

from bloodcell import config
from bloodcell.errors import BloodcellError
from components import evaluate, ingest, report, split, train_cnn1, train_cnn2, train_vgg16

TRAINERS = {"cnn1": train_cnn1, "cnn2": train_cnn2, "vgg16": train_vgg16}
STEP_ENV = ("MLFLOW_TRACKING_URI", "STORAGE_EMULATOR_HOST", "MLFLOW_TRACKING_USERNAME")


def place_on_cluster(*data_tasks: dsl.PipelineTask, trainers: list[dsl.PipelineTask]) -> None:
    """Resources, GPU placement, retries and environment for a cluster run (ignored by local runs)."""
    settings = config.ClusterSettings.from_env()
    for task in [*data_tasks, *trainers]:
        kubernetes.use_config_map_as_env(
            task, settings.env_config_map, {name: name for name in STEP_ENV}, optional=True)
        task.set_retry(num_retries=settings.retries, backoff_duration="60s", backoff_factor=2)
    for task in data_tasks:
        task.set_cpu_request(settings.data_cpu).set_cpu_limit(settings.data_cpu)
        task.set_memory_request(settings.data_memory).set_memory_limit(settings.data_memory)
    for task in trainers:
        if settings.gpu_resource:  # "" runs the trainers on CPU nodes (e.g. a kind cluster)
            task.set_accelerator_type(settings.gpu_resource).set_accelerator_limit(1)
        task.set_cpu_request(settings.trainer_cpu).set_cpu_limit(settings.trainer_cpu)
        task.set_memory_request(settings.trainer_memory).set_memory_limit(settings.trainer_memory)
        if settings.gpu_resource and settings.gpu_node_selector:
            key, _, value = settings.gpu_node_selector.partition("=")
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        if settings.gpu_resource:
            kubernetes.add_toleration(task, key=settings.gpu_toleration_key, operator="Exists", effect="NoSchedule")


def make_pipeline(for_cluster: bool = True):
    """The pipeline; ``for_cluster`` adds resources, GPU placement and retries (see :func:`place_on_cluster`)."""

    @dsl.pipeline(name="bloodcell", description="Train and compare CNNs classifying blood cell images (PBC).")
    def bloodcell(
        run_id: str,
        source: str = config.MENDELEY_URL,
        bucket: str = config.DEFAULT_BUCKET,
        profile: str = "gpu",
        overrides: str = "{}",
        experiment: str = config.DEFAULT_EXPERIMENT,
        vgg16_weights: str = "imagenet",
    ):
        common = {"bucket": bucket, "profile": profile, "overrides": overrides}
        ingest_task = ingest(source=source, bucket=bucket, vgg16_weights=vgg16_weights)
        split_task = split(dataset_uri=ingest_task.outputs["Output"], **common)
        trained = {}
        for name, component in TRAINERS.items():
            extra = {"vgg16_weights": vgg16_weights} if name == "vgg16" else {}
            trained[name] = component(
                split_uri=split_task.outputs["Output"], run_id=run_id, experiment=experiment, **common, **extra,
            )
        evaluate_task = evaluate(bucket=bucket, run_id=run_id, **{n: t.outputs["model"] for n, t in trained.items()})
        report_task = report(run_id=run_id, split_uri=split_task.outputs["Output"], experiment=experiment,
                             metrics=evaluate_task.outputs["metrics"], **common)
        if for_cluster:
            place_on_cluster(ingest_task, split_task, evaluate_task, report_task, trainers=list(trained.values()))

    return bloodcell


bloodcell_pipeline = make_pipeline(for_cluster=True)



def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def pipeline_arguments(args: argparse.Namespace, run_id: str) -> dict[str, str]:
    overrides = config.parse_assignments(args.set or [])
    config.resolve(args.profile, overrides)  # reject a bad profile or override before anything starts
    return {
        "run_id": run_id, "source": args.data, "bucket": args.bucket, "profile": args.profile,
        "overrides": json.dumps(overrides), "experiment": args.experiment, "vgg16_weights": args.vgg16_weights,
    }


def run_local(args: argparse.Namespace) -> int:
    """Run the pipeline on this machine with local object storage and MLflow."""
    import kfp.local

    from bloodcell import local_runs, models
    from bloodcell.services import LocalServices

    state = Path(args.state_dir)
    if args.resume:
        run_id, arguments = args.resume, local_runs.load_arguments(state, args.resume)
    else:
        run_id = new_run_id()
        arguments = pipeline_arguments(args, run_id)
    weights = arguments["vgg16_weights"]
    if not weights.startswith("gs://"):
        models.check_vgg16_weights(weights)
    others = local_runs.in_progress(state)
    if run_id in others:
        raise BloodcellError(f"run {run_id} is already in progress (pid {others[run_id]}); wait for it to end")
    if others:
        print(f"note: run(s) {', '.join(others)} in progress too; this run shares their services, "
              f"its outputs go under runs/{run_id}/")
    services = LocalServices(state, arguments["bucket"], args.gcs_port, args.mlflow_port)
    os.environ.update(services.start())
    if weights.startswith("gs://"):
        models.check_vgg16_weights(weights)
    local_runs.save_arguments(state, run_id, arguments)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False), pipeline_root=str(state / "kfp"),
                   raise_on_error=True)
    started = time.perf_counter()
    print(f"run {run_id}: profile {arguments['profile']}, data {arguments['source']}"
          + (" (resumed: finished steps and epochs are kept)" if args.resume else ""))
    with local_runs.active(state, run_id), local_runs.TaskLog(sys.stdout).installed() as task_log:
        try:
            make_pipeline(for_cluster=False)(**arguments)
        except RuntimeError as exc:  # kfp.local: "Pipeline ... finished with status FAILURE. Inner task failed: ..."
            return report_failure(run_id, task_log, exc, args)
    return finish_run(run_id, arguments, state, time.perf_counter() - started, args)


def report_failure(run_id: str, task_log, exc: Exception, args: argparse.Namespace) -> int:
    """Name the failing step, show the end of its log and how to resume; exit status 1."""
    from bloodcell import local_runs

    task = task_log.task or "unknown"
    tail = "\n".join(f"    {line}" for line in task_log.lines) or "    (no output)"
    resume = f"python pipeline.py run --resume {run_id}"
    if args.state_dir != ".bloodcell":
        resume += f" --state-dir {args.state_dir}"
    print(f"error: run {run_id} failed in step {task} ({local_runs.plain(str(exc)).strip()})\n"
          f"last lines of {task}'s log:\n{tail}\n"
          f"fix the cause, then resume: {resume} (finished steps and training epochs are kept)", file=sys.stderr)
    return 1


def finish_run(run_id: str, arguments: dict[str, str], state: Path, seconds: float, args: argparse.Namespace) -> int:
    from bloodcell import storage, tracking

    bucket = arguments["bucket"]
    summary = storage.read_json(f"gs://{bucket}/runs/{run_id}/summary.json")
    summary["wall_seconds"] = round(seconds, 1)
    local_dir = state / "runs" / run_id
    report_copy = storage.download_file(summary["report_uri"], local_dir / "report.html")
    summary["report_local_path"] = str(report_copy.resolve())
    summary_path = Path(args.summary) if args.summary else local_dir / "summary.json"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    summary_path.write_text(json.dumps(summary, indent=2))
    for name, model in summary["models"].items():
        print(f"  {name:6} test accuracy {model['test_accuracy']:.2%}  macro F1 {model['macro_f1']:.4f}")
    print(f"report: {summary['report_uri']} (local copy: {report_copy})")
    print(f"summary: {summary_path}")
    for line in tracking.describe_failures(summary.get("tracking_failures", {})):
        print(f"warning: MLflow logging failed in {line}")
    experiment_url = f"{summary['mlflow_tracking_uri']}/#/experiments"
    print(f"MLflow UI: {experiment_url} (experiment {arguments['experiment']!r}); "
          f"stop services: python pipeline.py stop")
    return 0


def stop_local(args: argparse.Namespace) -> int:
    from bloodcell import local_runs
    from bloodcell.services import LocalServices

    running = local_runs.in_progress(Path(args.state_dir))
    if running and not args.force:
        listing = ", ".join(f"{run} (pid {pid})" for run, pid in running.items())
        print(f"error: run(s) in progress: {listing}. Stopping the services now would fail them; wait for them "
              f"to end, or pass --force.", file=sys.stderr)
        return 1
    stopped = LocalServices(args.state_dir, args.bucket).stop()
    print("stopped: " + ", ".join(stopped) if stopped else "no local service was running")
    return 0


def compile_pipeline(args: argparse.Namespace) -> int:
    compiler.Compiler().compile(bloodcell_pipeline, args.output)
    print(f"wrote {args.output}")
    return 0


def submit(args: argparse.Namespace) -> int:
    import kfp

    run_id = new_run_id()
    client = kfp.Client(host=args.host)
    run = client.create_run_from_pipeline_func(
        bloodcell_pipeline, arguments=pipeline_arguments(args, run_id), run_name=f"bloodcell-{run_id}",
        experiment_name=args.experiment, pipeline_root=args.pipeline_root,
    )
    print(f"submitted run {run_id}: {args.host.rstrip('/')}/#/runs/details/{run.run_id}")
    return 0


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="pipeline.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def run_options(sub: argparse.ArgumentParser, default_profile: str) -> None:
        sub.add_argument("--profile", default=default_profile, choices=list(config.PROFILES))
        sub.add_argument("--data", default=config.MENDELEY_URL,
                         help="folder, zip, http(s) URL or gs:// URI (default: the official PBC zip)")
        sub.add_argument("--set", action="append", metavar="KEY=VALUE",
                         help="override a profile setting, e.g. --set cnn1.epochs=5 (repeatable)")
        sub.add_argument("--vgg16-weights", default=os.environ.get("VGG16_WEIGHTS") or "imagenet",
                         help="imagenet | none | path or gs:// URI of a no-top weights file")
        sub.add_argument("--experiment", default=config.DEFAULT_EXPERIMENT)
        sub.add_argument("--bucket", default=config.DEFAULT_BUCKET)

    run = commands.add_parser("run", help="run the whole pipeline locally (embedded services)")
    run_options(run, "laptop")
    run.add_argument("--summary", help="write the run summary JSON here")
    run.add_argument("--resume", metavar="RUN_ID",
                     help="rerun a failed or interrupted run with its original arguments: finished steps are "
                          "reused and trainers continue from their last checkpoint")
    run.add_argument("--state-dir", default=".bloodcell", help="local services' state (default .bloodcell/)")
    run.add_argument("--gcs-port", type=int, default=int(os.environ.get("BLOODCELL_GCS_PORT", 9023)))
    run.add_argument("--mlflow-port", type=int, default=int(os.environ.get("BLOODCELL_MLFLOW_PORT", 5023)))
    run.set_defaults(handler=run_local)

    stop = commands.add_parser("stop", help="stop the local services started by `run`")
    stop.add_argument("--state-dir", default=".bloodcell")
    stop.add_argument("--bucket", default=config.DEFAULT_BUCKET)
    stop.add_argument("--force", action="store_true", help="stop the services even while a run is in progress")
    stop.set_defaults(handler=stop_local)

    comp = commands.add_parser("compile", help="write the compiled pipeline (kfp IR YAML)")
    comp.add_argument("--output", default="pipeline.yaml")
    comp.set_defaults(handler=compile_pipeline)

    sub = commands.add_parser("submit", help="compile and submit to a Kubeflow Pipelines cluster")
    run_options(sub, "gpu")
    sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sub.add_argument("--pipeline-root", help="kfp artifact root, e.g. gs://<bucket>/kfp (default: the cluster's)")
    sub.set_defaults(handler=submit)
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return args.handler(args)
    except (BloodcellError, config.ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from bloodcell import storage

        if exc.errno not in storage.DISK_FULL_ERRNOS:
            raise
        print(f"error: {storage.disk_full_error(exc.filename)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
