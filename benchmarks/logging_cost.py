#!/usr/bin/env python3
"""What logging a run's models to MLflow costs: the keras flavor (before issue 26) against the pyfunc model
(``bloodcell.serving``), per model of a finished run, measured in one process against the same server.

    .venv/bin/python benchmarks/logging_cost.py --state-dir .bloodcell --run-id RUN_ID [--repeat 2]

Each model is loaded from the run store once, then logged ``--repeat`` times each way into a throwaway run
of experiment ``logging-cost`` (as user ``pipeline``); the figures are the median seconds per log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def line(name: str, seconds: dict[str, float]) -> str:
    return f"{name:8} keras {seconds['keras']:6.2f} s   pyfunc {seconds['pyfunc']:6.2f} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=".bloodcell")
    parser.add_argument("--run-id", required=True, help="a finished pipeline run of these services")
    parser.add_argument("--bucket", default="bloodcell")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    from bloodcell.local.services import client_env

    os.environ.update(client_env(Path(args.state_dir), user="pipeline"))
    import mlflow

    from bloodcell import serving, train
    from bloodcell.runstore import RunStore

    store = RunStore(args.bucket, args.run_id)
    mlflow.set_experiment("logging-cost")
    figures = {}
    with mlflow.start_run(run_name="logging-cost"):
        for name in [*store.trained_names(), "ensemble"]:
            record, model = store.require_record(name), store.load_model(name)
            timings: dict[str, list[float]] = {"keras": [], "pyfunc": []}
            for _ in range(args.repeat):
                started = time.perf_counter()
                mlflow.keras.log_model(model, name=f"{name}-keras", pip_requirements=train.pip_requirements())
                timings["keras"].append(time.perf_counter() - started)
                started = time.perf_counter()
                serving.log_model(model, record.classes, train.pip_requirements())
                timings["pyfunc"].append(time.perf_counter() - started)
            figures[name] = {way: round(statistics.median(seconds), 2) for way, seconds in timings.items()}
            print(line(name, figures[name]), flush=True)
    total = {way: round(sum(f[way] for f in figures.values()), 2) for way in ("keras", "pyfunc")}
    print(line("all", total) + f"   extra {total['pyfunc'] - total['keras']:.2f} s")
    print(json.dumps({"models": figures, "total": total, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
