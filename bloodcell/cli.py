"""``bloodcell <step>``: every pipeline step as a plain command, runnable without kfp.

Object storage and MLflow come from the environment (``STORAGE_EMULATOR_HOST`` for a local
emulator, ``MLFLOW_TRACKING_URI``), exactly as in the pipeline's containers. Each step prints
its result as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys

from bloodcell import config, errors, options


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
    steps = parser.add_subparsers(dest="step", required=True)

    p = steps.add_parser("ingest", help="check and store a dataset source (and that the VGG16 weights can be had)")
    options.add_data(p, positional=True)
    _common(p, run=False, profile=False)
    options.add_vgg16_weights(p)
    options.add_data_sha256(p)
    p.set_defaults(handler=lambda a: _steps().ingest(a.source, a.bucket, a.vgg16_weights, a.data_sha256))

    p = steps.add_parser("split", help="split an ingested dataset and build its arrays")
    p.add_argument("dataset_uri", help="gs://<bucket>/datasets/<hash> (printed by ingest)")
    _common(p, run=False)
    p.set_defaults(handler=lambda a: _steps().split(a.dataset_uri, a.bucket, a.profile, options.overrides(a)))

    p = steps.add_parser("train", help="train one model")
    p.add_argument("model", choices=list(config.MODEL_NAMES))
    p.add_argument("split_uri", help="gs://<bucket>/splits/<key> (printed by split)")
    _common(p)
    options.add_experiment(p)
    options.add_mlflow_parent_run(p)
    options.add_vgg16_weights(p)
    p.set_defaults(
        handler=lambda a: _steps().train(
            a.model,
            a.split_uri,
            a.bucket,
            a.run_id,
            a.profile,
            options.overrides(a),
            a.experiment,
            a.mlflow_parent_run_id,
            a.vgg16_weights,
        )
    )

    p = steps.add_parser("evaluate", help="evaluate a run's models on the test split")
    _common(p, profile=False)
    p.add_argument("--models", nargs="+", default=list(config.MODEL_NAMES))
    p.set_defaults(handler=lambda a: _steps().evaluate(a.bucket, a.run_id, a.models))

    p = steps.add_parser("report", help="build a run's comparison report")
    p.add_argument("split_uri")
    _common(p)
    options.add_experiment(p)
    options.add_mlflow_parent_run(p)
    p.add_argument("--models", nargs="+", default=list(config.MODEL_NAMES))
    p.set_defaults(
        handler=lambda a: _steps().report(
            a.bucket,
            a.run_id,
            a.split_uri,
            a.profile,
            a.experiment,
            a.mlflow_parent_run_id,
            options.overrides(a),
            a.models,
        )
    )

    p = steps.add_parser("compare", help="table of models across pipeline runs (from MLflow), best first")
    options.add_experiment(p)
    p.add_argument("--last", type=int, default=10, help="how many recent pipeline runs (default 10)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_compare)

    p = steps.add_parser("predict", help="classify image files or folders with a trained model")
    p.add_argument("paths", nargs="+")
    p.add_argument("--model", required=True, help="models:/..., gs://.../model.keras or a local .keras file")
    p.add_argument(
        "--labels-from-folders",
        action="store_true",
        help="treat each image's folder name as its true class; print accuracy and macro F1",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(handler=_predict)
    return parser


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

    predict.main(args.model, args.paths, args.labels_from_folders, args.json)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from bloodcell import tracking

    tracking.configure_client()
    with errors.exits_on_user_error():
        result = args.handler(args)
    if result is not None:
        print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
