#!/usr/bin/env python3
"""The bloodcell Kubeflow pipeline and its command line.

python pipeline.py run [--profile laptop] [--data SOURCE] [--summary FILE]   # local, embedded
python pipeline.py run --runner docker [--image IMAGE] ...                    # each step in a container
python pipeline.py run --resume RUN_ID                                        # after a failure
python pipeline.py stop                                                       # stop local services
python pipeline.py compile --output pipeline.yaml
python pipeline.py submit --host URL [--profile gpu] [--experiment NAME] [--pipeline-root gs://...]
"""

import argparse
import os
import sys
import time
import uuid
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from bloodcell import config, errors, options
from components import evaluator, ingest, report, split, trainer


def place_on_cluster(
    settings: config.ClusterSettings, *data_tasks: dsl.PipelineTask, trainers: list[dsl.PipelineTask]
) -> None:
    """Resources, GPU placement, retries, user and environment of a cluster run (local runs leave them out)."""
    for task in [*data_tasks, *trainers]:
        kubernetes.use_config_map_as_env(
            task, settings.env_config_map, {name: name for name in config.STEP_ENV}, optional=True
        )
        if settings.mlflow_secret:  # "" for an MLflow without login
            kubernetes.use_secret_as_env(
                task, settings.mlflow_secret, {name: name for name in config.MLFLOW_CREDENTIAL_ENV}
            )
        kubernetes.set_security_context(
            task, run_as_user=config.IMAGE_UID, run_as_group=config.IMAGE_UID, run_as_non_root=True
        )
        task.set_env_variable(config.RUNTIME_ENV, config.CLUSTER_POD)
    for task in data_tasks:
        task.set_cpu_request(settings.data_cpu).set_cpu_limit(settings.data_cpu)
        task.set_memory_request(settings.data_memory).set_memory_limit(settings.data_memory)
    for task in trainers:
        # What is retried is the cluster's rule (manifests/kfp/patches/workflow-defaults.yaml); this sets how often.
        task.set_retry(num_retries=settings.trainer_retries, backoff_duration="60s", backoff_factor=2)
        if settings.gpu_resource:  # "" runs the trainers on CPU nodes (e.g. a kind cluster)
            task.set_accelerator_type(settings.gpu_resource).set_accelerator_limit(1)
        task.set_cpu_request(settings.trainer_cpu).set_cpu_limit(settings.trainer_cpu)
        task.set_memory_request(settings.trainer_memory).set_memory_limit(settings.trainer_memory)
        if settings.gpu_resource and settings.gpu_node_selector:
            key, _, value = settings.gpu_node_selector.partition("=")
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        if settings.gpu_resource:
            kubernetes.add_toleration(task, key=settings.gpu_toleration_key, operator="Exists", effect="NoSchedule")


def make_pipeline(
    image: str = config.DEFAULT_IMAGE,
    model_names: list[str] | None = None,
    cluster: config.ClusterSettings | None = None,
):
    """The pipeline training ``model_names`` (default: the gpu profile's), every task in ``image``; ``cluster``
    adds resources, GPU placement and retries. The model list is fixed here (a task per model); everything
    else about the profile is a run-time parameter, and a trainer fails clearly if its profile lacks its model."""
    model_names = model_names or config.PROFILES["gpu"].model_names
    evaluate = evaluator(model_names)

    @dsl.pipeline(name="bloodcell", description="Train and compare CNNs classifying blood cell images (PBC).")
    def bloodcell(
        run_id: str,
        source: str = config.MENDELEY_URL,
        bucket: str = config.DEFAULT_BUCKET,
        profile: str = "gpu",
        overrides: str = "{}",
        experiment: str = config.DEFAULT_EXPERIMENT,
        vgg16_weights: str = "imagenet",
        data_sha256: str = "",
    ):
        common = {"bucket": bucket, "profile": profile, "overrides": overrides}
        ingest_task = ingest(source=source, bucket=bucket, vgg16_weights=vgg16_weights, data_sha256=data_sha256)
        split_task = split(dataset_uri=ingest_task.outputs["Output"], **common)
        trained = {
            name: trainer(name)(
                model_name=name,
                split_uri=split_task.outputs["Output"],
                run_id=run_id,
                experiment=experiment,
                vgg16_weights=vgg16_weights,
                **common,
            ).set_display_name(f"train-{name}")
            for name in model_names
        }
        evaluate_task = evaluate(bucket=bucket, run_id=run_id, **{n: t.outputs["model"] for n, t in trained.items()})
        report_task = report(
            run_id=run_id,
            split_uri=split_task.outputs["Output"],
            experiment=experiment,
            metrics=evaluate_task.outputs["metrics"],
            **common,
        )
        tasks = [ingest_task, split_task, *trained.values(), evaluate_task, report_task]
        for task in tasks:
            task.set_container_image(image).set_env_variable("BLOODCELL_IMAGE", image)
        if cluster:
            place_on_cluster(
                cluster, ingest_task, split_task, evaluate_task, report_task, trainers=list(trained.values())
            )

    return bloodcell


def cluster_pipeline(profile: str = "gpu"):
    """The pipeline as a cluster runs it, training ``profile``'s models: image and placement from ``BLOODCELL_*``
    (see ClusterSettings)."""
    settings = config.ClusterSettings.from_env()
    return make_pipeline(settings.image, config.resolve(profile).model_names, settings)


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


def pipeline_arguments(args: argparse.Namespace, run_id: str) -> dict[str, str]:
    overrides = options.overrides(args)
    config.resolve(args.profile, overrides)  # reject a bad profile or override before anything starts
    return {
        "run_id": run_id,
        "source": args.data,
        "bucket": args.bucket,
        "profile": args.profile,
        "overrides": overrides,
        "experiment": args.experiment,
        "vgg16_weights": args.vgg16_weights,
        "data_sha256": args.data_sha256,
    }


def run_local(args: argparse.Namespace) -> int:
    """Run the pipeline on this machine with local object storage and MLflow (bloodcell.local.runner)."""
    from bloodcell.local import runner

    run_options = runner.RunOptions(
        state_dir=Path(args.state_dir),
        runner=args.runner,
        image=args.image,
        summary=args.summary,
        gcs_port=args.gcs_port,
        mlflow_port=args.mlflow_port,
        resume=args.resume,
        verbose=args.verbose,
    )
    if args.resume:
        return runner.run(make_pipeline, run_options)
    run_id = new_run_id()
    return runner.run(make_pipeline, run_options, pipeline_arguments(args, run_id), run_id)


def stop_local(args: argparse.Namespace) -> int:
    from bloodcell.local import runner

    return runner.stop(Path(args.state_dir), args.bucket, args.force)


def compile_pipeline(args: argparse.Namespace) -> int:
    compiler.Compiler().compile(cluster_pipeline(args.profile), args.output)
    print(f"wrote {args.output}")
    return 0


def submit(args: argparse.Namespace) -> int:
    import kfp

    run_id = new_run_id()
    client = kfp.Client(host=args.host)
    run = client.create_run_from_pipeline_func(
        cluster_pipeline(args.profile),
        arguments=pipeline_arguments(args, run_id),
        run_name=f"bloodcell-{run_id}",
        experiment_name=args.experiment,
        pipeline_root=args.pipeline_root,
        # Our own account (manifests), not KFP's shared pipeline-runner, which may read Secrets in `kubeflow`.
        service_account=config.ClusterSettings.from_env().service_account or None,
    )
    print(f"submitted run {run_id}: {args.host.rstrip('/')}/#/runs/details/{run.run_id}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pipeline.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def run_options(sub: argparse.ArgumentParser, default_profile: str) -> None:
        options.add_profile(sub, default_profile)
        options.add_data(sub)
        options.add_data_sha256(sub)
        options.add_vgg16_weights(sub)
        options.add_experiment(sub)
        options.add_bucket(sub)

    run = commands.add_parser("run", help="run the whole pipeline locally (embedded services)")
    run_options(run, "laptop")
    run.add_argument("--summary", help="write the run summary JSON here")
    run.add_argument(
        "--verbose",
        action="store_true",
        help="show everything kfp and the steps print (default: a line per task "
        "and per training epoch; the rest goes to <state-dir>/runs/<run id>/logs/)",
    )
    run.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="rerun a failed or interrupted run with its original arguments: finished steps are "
        "reused and trainers continue from their last checkpoint",
    )
    run.add_argument(
        "--runner",
        choices=["subprocess", "docker"],
        help="run each step as a local process (default) or in a container of --image (a resumed run keeps its own)",
    )
    run.add_argument(
        "--image", help=f"image for --runner docker (default {config.DEFAULT_IMAGE}; `make image` builds it)"
    )
    run.add_argument("--state-dir", default=".bloodcell", help="local services' state (default .bloodcell/)")
    run.add_argument("--gcs-port", type=int, default=int(os.environ.get("BLOODCELL_GCS_PORT", 9023)))
    run.add_argument("--mlflow-port", type=int, default=int(os.environ.get("BLOODCELL_MLFLOW_PORT", 5023)))
    run.set_defaults(handler=run_local)

    stop = commands.add_parser("stop", help="stop the local services started by `run`")
    stop.add_argument("--state-dir", default=".bloodcell")
    options.add_bucket(stop)
    stop.add_argument("--force", action="store_true", help="stop the services even while a run is in progress")
    stop.set_defaults(handler=stop_local)

    comp = commands.add_parser("compile", help="write the compiled pipeline (kfp IR YAML)")
    comp.add_argument("--output", default="pipeline.yaml")
    comp.add_argument("--profile", default="gpu", help="whose models get a trainer task (default gpu)")
    comp.set_defaults(handler=compile_pipeline)

    sub = commands.add_parser("submit", help="compile and submit to a Kubeflow Pipelines cluster")
    run_options(sub, "gpu")
    sub.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    sub.add_argument("--pipeline-root", help="kfp artifact root, e.g. gs://<bucket>/kfp (default: the cluster's)")
    sub.set_defaults(handler=submit)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with errors.exits_on_user_error():
        return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
