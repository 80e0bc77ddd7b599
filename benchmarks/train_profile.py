"""Train some models of a profile through the real steps on this machine; print accuracy and time.

Used to measure the gpu profile's cnn1 and cnn2 (128 px) on a CPU when no GPU is at hand:

    .venv/bin/python benchmarks/train_profile.py --profile gpu --models cnn2 cnn1 \
        --data ../shared/datasets/PBC_dataset_normal_DIB

It starts its own object store and MLflow server under ``--state-dir`` (other ports than the
default local run, so it can run beside one), then runs ``bloodcell ingest``, ``split``, ``train``
for each model in turn and ``evaluate``. Every step's log goes to ``<state-dir>/<step>.log``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodcell import config  # noqa: E402
from bloodcell.local.services import LocalServices  # noqa: E402


def step(name: str, args: list[str], log_dir: Path) -> dict:
    """Run ``bloodcell <args>``, tee its output to a log, return its last-line JSON."""
    log_path = log_dir / f"{name}.log"
    started = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(
            [sys.executable, "-m", "bloodcell.cli", *args], stdout=log, stderr=subprocess.STDOUT, cwd=ROOT
        )
    seconds = time.perf_counter() - started
    lines = log_path.read_text().strip().splitlines()
    if proc.returncode != 0:
        sys.exit(f"step {name} failed (exit {proc.returncode}); last lines of {log_path}:\n" + "\n".join(lines[-15:]))
    print(f"{name}: {seconds:.0f} s", flush=True)
    result = json.loads(lines[-1])
    result["seconds"] = round(seconds, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="gpu", choices=list(config.PROFILES))
    parser.add_argument("--models", nargs="+", default=["cnn1", "cnn2"], help="models of the profile")
    parser.add_argument("--data", default="../shared/datasets/PBC_dataset_normal_DIB")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--state-dir", default=".bloodcell-bench")
    parser.add_argument("--bucket", default="bloodcell-bench")
    parser.add_argument("--output", help="write the figures as JSON here")
    args = parser.parse_args()

    state = Path(args.state_dir).resolve()
    services = LocalServices(state, args.bucket, gcs_port=9031, mlflow_port=5031)
    os.environ.update(services.start())
    profile_args = ["--profile", args.profile] + [f"--set={item}" for item in args.set]
    # Build arrays only for the sizes the chosen models need.
    profile = config.resolve(args.profile, config.parse_assignments(args.set))
    size = min(profile.model(args.models[0]).image_sizes())
    size_args = [
        f"--set={key}={size}"
        for key in profile.flat_params()
        if key.endswith(".image_size") and key.split(".")[0] not in args.models
    ]
    run_id = time.strftime("bench-%Y%m%d-%H%M%S")
    bucket = ["--bucket", args.bucket]
    try:
        ingest = step("ingest", ["ingest", args.data, "--vgg16-weights", "none", *bucket], state)
        split = step("split", ["split", ingest["dataset_uri"], *bucket, *profile_args, *size_args], state)
        trained = {
            name: step(
                f"train-{name}",
                [
                    "train",
                    name,
                    split["split_uri"],
                    "--run-id",
                    run_id,
                    "--vgg16-weights",
                    "none",
                    *bucket,
                    *profile_args,
                ],
                state,
            )
            for name in args.models
        }
        evaluated = step("evaluate", ["evaluate", "--run-id", run_id, "--models", *args.models, *bucket], state)
    finally:
        services.stop()
    figures = {"profile": args.profile, "overrides": args.set, "run_id": run_id, "models": {}}
    for name in args.models:
        metrics = evaluated[name]
        figures["models"][name] = {
            "test_accuracy": metrics["accuracy"],
            "macro_f1": metrics["macro_f1"],
            "epochs": metrics["epochs"],
            "image_size": metrics["image_size"],
            "train_step_seconds": trained[name]["seconds"],
        }
        print(
            f"{name}: test accuracy {metrics['accuracy']:.2%} after {metrics['epochs']} epochs, "
            f"train step {trained[name]['seconds'] / 60:.1f} min"
        )
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
