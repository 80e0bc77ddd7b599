"""``bloodcell <step>``: every pipeline step as a plain command, runnable without kfp.

Object storage and MLflow come from the environment (``STORAGE_EMULATOR_HOST`` for a local
emulator, ``MLFLOW_TRACKING_URI``), exactly as in the pipeline's containers. Each step prints
its result as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bloodcell import errors, options
from bloodcell.errors import BloodcellError

# predict and compare answer a person: a service that does not answer is reported within seconds.
INTERACTIVE_STORAGE_WAIT_S = 8
SERVED_MODEL = "models:/bloodcell-classifier@champion"
INTERACTIVE_MLFLOW_SETTINGS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "8",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a model's few files: the bar only adds noise
}


def _common(parser: argparse.ArgumentParser, run: bool = True, profile: bool = True) -> None:
    options.add_bucket(parser)
    if run:
        parser.add_argument("--run-id", required=True, help="pipeline run id (groups the run's outputs)")
    if profile:
        options.add_profile(parser, "laptop")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloodcell", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="step", required=True)
    _add_data_steps(commands)
    _add_model_steps(commands)
    _add_tool_commands(commands)
    return parser


def _add_data_steps(commands: argparse._SubParsersAction) -> None:
    """The ingest and split steps (called with keyword arguments, as every step)."""

    p = commands.add_parser("ingest", help="check and store a dataset source (and that the VGG16 weights can be had)")
    options.add_data(p, positional=True)
    _common(p, run=False, profile=False)
    options.add_vgg16_weights(p)
    options.add_data_sha256(p)
    p.set_defaults(
        handler=lambda a: _steps().ingest(
            source=a.source, bucket=a.bucket, vgg16_weights=a.vgg16_weights, data_sha256=a.data_sha256
        )
    )

    p = commands.add_parser("split", help="split an ingested dataset and build its arrays")
    p.add_argument("dataset_uri", help="gs://<bucket>/datasets/<hash> (printed by ingest)")
    _common(p, run=False)
    p.set_defaults(
        handler=lambda a: _steps().split(
            dataset_uri=a.dataset_uri, bucket=a.bucket, profile=a.profile, overrides=options.overrides(a)
        )
    )


def _add_model_steps(commands: argparse._SubParsersAction) -> None:
    """The train, evaluate and report steps."""
    p = commands.add_parser("train", help="train one model")
    p.add_argument("model", help="a model of the profile (config.PROFILES), e.g. cnn1")
    p.add_argument("split_uri", help="gs://<bucket>/splits/<key> (printed by split)")
    _common(p)
    options.add_experiment(p)
    options.add_mlflow_parent_run(p)
    options.add_vgg16_weights(p)
    p.set_defaults(
        handler=lambda a: _steps().train(
            model=a.model,
            split_uri=a.split_uri,
            bucket=a.bucket,
            run_id=a.run_id,
            profile=a.profile,
            overrides=options.overrides(a),
            experiment=a.experiment,
            mlflow_parent_run_id=a.mlflow_parent_run_id,
            vgg16_weights=a.vgg16_weights,
        )
    )

    p = commands.add_parser("evaluate", help="evaluate a run's models on the test split")
    _common(p, profile=False)
    p.add_argument("--models", nargs="+", help="default: every model the run trained")
    p.set_defaults(handler=lambda a: _steps().evaluate(bucket=a.bucket, run_id=a.run_id, model_names=a.models))

    p = commands.add_parser("report", help="build a run's comparison report")
    p.add_argument("split_uri")
    _common(p)
    options.add_experiment(p)
    options.add_mlflow_parent_run(p)
    p.add_argument("--models", nargs="+", help="default: every model the run trained")
    p.set_defaults(
        handler=lambda a: _steps().report(
            bucket=a.bucket,
            run_id=a.run_id,
            split_uri=a.split_uri,
            profile=a.profile,
            experiment=a.experiment,
            mlflow_parent_run_id=a.mlflow_parent_run_id,
            overrides=options.overrides(a),
            model_names=a.models,
        )
    )


def _add_tool_commands(commands: argparse._SubParsersAction) -> None:
    """compare, predict and validate: for a person at a terminal."""
    p = commands.add_parser("compare", help="table of models across pipeline runs (from MLflow), best first")
    options.add_experiment(p)
    p.add_argument("--last", type=int, default=10, help="how many recent pipeline runs (default 10)")
    p.add_argument("--json", action="store_true")
    _local_services_option(p)
    p.set_defaults(handler=_interactive(_compare))

    p = commands.add_parser("predict", help="classify image files or folders with a trained model")
    p.add_argument("paths", nargs="+")
    p.add_argument("--model", required=True, help="models:/..., gs://.../model.keras or a local .keras file")
    p.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="treat each image's folder name as its true class; print accuracy and macro F1",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output: per image the class, calibrated probabilities and refer flag",
    )
    p.add_argument(
        "--explain",
        metavar="DIR",
        help="write a Grad-CAM overlay PNG per image under DIR (DIR/<image folder>/<image name>.png)",
    )
    _local_services_option(p)
    p.set_defaults(handler=_interactive(_predict))

    p = commands.add_parser(
        "validate",
        help="check a model on labelled images of your own (one folder per class) before trusting it on them",
    )
    p.add_argument("folder", help="a folder with one sub-folder per class, named as the model's classes")
    p.add_argument("--model", required=True, help="models:/..., gs://.../model.keras or a local .keras file")
    p.add_argument("--output", default="validation", help="where validation.html and .json go (default validation/)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON instead of a summary")
    _local_services_option(p)
    p.set_defaults(handler=_interactive(_validate))

    p = commands.add_parser(
        "serve", help="serve a registered model with MLflow's scoring server (POST /invocations, base64 images)"
    )
    p.add_argument("--model", default=SERVED_MODEL, help=f"an MLflow model URI (default {SERVED_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="where to listen (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=5024)
    _local_services_option(p)
    p.set_defaults(handler=_interactive(_serve))


def _local_services_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("BLOODCELL_STATE_DIR", ".bloodcell"),
        help="when neither MLFLOW_TRACKING_URI nor STORAGE_EMULATOR_HOST is set, use the local services "
        "`pipeline.py run` started with this state directory, as user `reader` (default .bloodcell)",
    )


def _interactive(handler: Callable[[argparse.Namespace], Any]) -> Callable[[argparse.Namespace], Any]:
    """``handler`` for a person at a terminal: local services found, unreachable ones named in seconds."""

    def run(args: argparse.Namespace) -> Any:
        from bloodcell import storage

        _use_local_services(Path(args.state_dir))
        with_model = handler in (_predict, _validate, _serve)
        _check_services_answer(
            check_mlflow=not with_model or args.model.startswith(("models:/", "runs:/")),
            check_storage=with_model and not Path(args.model).is_file(),
        )
        storage.set_retry_deadline(INTERACTIVE_STORAGE_WAIT_S)
        for name, value in INTERACTIVE_MLFLOW_SETTINGS.items():
            os.environ.setdefault(name, value)
        try:
            return handler(args)
        except Exception as exc:
            error = _mlflow_error(exc)
            if error is None:
                raise
            raise error from None

    return run


def _use_local_services(state_dir: Path) -> None:
    if os.environ.get("MLFLOW_TRACKING_URI") or os.environ.get("STORAGE_EMULATOR_HOST"):
        return  # the user chose the services
    from bloodcell.local.services import client_env

    found = client_env(state_dir)
    if found:
        os.environ.update(found)
        named = ", ".join(f"{k}={v}" for k, v in found.items() if "PASSWORD" not in k and "TOKEN" not in k)
        print(f"using the local services of {state_dir}: {named}", file=sys.stderr)


def _check_services_answer(*, check_mlflow: bool, check_storage: bool) -> None:
    """Name the service that does not answer, in seconds and before loading TensorFlow."""
    import requests

    checks = {}
    if check_storage:
        checks["object storage"] = (os.environ.get("STORAGE_EMULATOR_HOST"), "/storage/v1/b")
    if check_mlflow:
        checks["MLflow"] = (os.environ.get("MLFLOW_TRACKING_URI"), "/health")
        if not checks["MLflow"][0]:
            raise BloodcellError(
                "no MLflow server is set and none runs here: set MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/"
                "_PASSWORD), or pass --state-dir of a `python pipeline.py run` whose services run."
            )
    for service, (url, path) in checks.items():
        if not url or not url.startswith(("http://", "https://")):
            continue  # real GCS, or a file store: nothing to probe
        try:
            requests.get(url.rstrip("/") + path, timeout=3)
        except requests.RequestException:
            raise BloodcellError(
                f"{service} does not answer at {url}: start it (locally, `python pipeline.py run` starts it) "
                f"or point {'MLFLOW_TRACKING_URI' if service == 'MLflow' else 'STORAGE_EMULATOR_HOST'} elsewhere."
            ) from None


def _mlflow_error(exc: Exception) -> BloodcellError | None:
    """A one-line error for MLflow's failures a user can fix (what to set), None for anything else."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return None
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "unset"
    text = str(exc)
    if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in text.lower():
        first = text.splitlines()[0][:200]
        return BloodcellError(
            f"not in MLflow at {uri}: {first}. Check the URI (`bloodcell compare` lists the runs' models) or set "
            "MLFLOW_TRACKING_URI to the server that logged it."
        )
    if "403" in text or "PERMISSION_DENIED" in text:
        from bloodcell import registry

        return registry.not_readable("the requested model or run")
    if "401" in text or "UNAUTHENTICATED" in text:
        return BloodcellError(
            f"MLflow at {uri} refused the login: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(locally: user reader, password in .bloodcell/mlflow-users.json)."
        )
    if "Max retries exceeded" in text or "Connection" in text or "timed out" in text.lower():
        return BloodcellError(
            f"MLflow does not answer at {uri}: start it (locally: python pipeline.py run starts it) "
            "or set MLFLOW_TRACKING_URI."
        )
    return None


def _steps():
    from bloodcell import steps

    return steps


def _compare(args: argparse.Namespace) -> list | None:
    from bloodcell import comparison

    rows = comparison.compare(args.experiment, args.last)
    if args.json:
        return rows
    print(comparison.format_table(rows))
    return None


def _predict(args: argparse.Namespace) -> None:
    from bloodcell import predict

    predict.main(args.model, args.paths, args.labels_from_folders, args.json, args.explain)


def _serve(args: argparse.Namespace) -> None:
    """Replace this process by ``mlflow models serve`` of ``args.model`` (in this environment: its requirements
    are this package's)."""
    from bloodcell import serving

    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", args.model, "--env-manager", "local"]
    command += ["--host", args.host, "--port", str(args.port)]
    # MLflow starts its server as `uvicorn` from PATH: this interpreter's.
    os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    print(
        f"serving {args.model} at http://{args.host}:{args.port}/invocations: POST "
        f'{{"dataframe_split": {{"columns": ["{serving.INPUT_COLUMN}"], "data": [["<base64 image file>"], ...]}}}} '
        f"(at most {serving.MAX_IMAGES_PER_REQUEST} images a request)",
        file=sys.stderr,
        flush=True,
    )
    os.execv(sys.executable, command)  # nosec B606 - our own interpreter and arguments


def _validate(args: argparse.Namespace) -> dict | None:
    from bloodcell import validate

    report = validate.validate(args.model, args.folder, Path(args.output))
    if args.json:
        return report
    validate.print_result(report, Path(args.output))
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with errors.exits_on_user_error():
        result = args.handler(args)
    if result is not None:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
