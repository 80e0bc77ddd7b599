#!/usr/bin/env python3
"""Throughput and latency of the MLflow scoring server on loopback, beside ``bloodcell predict`` (prints figures).

    .venv/bin/python benchmarks/bench_serving.py [--state-dir .bloodcell] \
        [--model models:/bloodcell-classifier@champion] [--data ../shared/datasets/PBC_dataset_normal_DIB] \
        [--batches 1,8,64] [--requests 50] [--seconds 60] [--url http://127.0.0.1:PORT] [--json serving.json]

Starts ``mlflow models serve -m MODEL --env-manager local`` on 127.0.0.1 (one worker, MLflow's default) against
the registry of the local services ``pipeline.py run`` started with ``--state-dir``, as user ``reader`` (or the
services that MLFLOW_TRACKING_URI and STORAGE_EMULATOR_HOST name), unless ``--url`` names a server already
running. A fixed sample of JPEGs, spread over the class folders of ``--data``, is read once into memory. Per batch
size (images per request): one warm-up request, then one client sending requests one after another, as a lab's
software would, until ``--requests`` or ``--seconds`` is reached: requests/s, images/s, p50 and p99 latency, and
whether every answer was HTTP 200 with one answer per image. Then the same sample through ``bloodcell predict
--model MODEL --json`` once (a fresh process: loading the model included), and whether its classes agree with
the server's for the whole sample in one request.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodcell.local import services  # noqa: E402

INPUT_COLUMN = "image"  # bloodcell.serving.INPUT_COLUMN (importing that module loads Keras into this client)

START_TIMEOUT_S = 300
REQUEST_TIMEOUT_S = 300
PREDICT_TIMEOUT_S = 900
LOG_TAIL_CHARS = 3000


def sample_images(folder: Path, count: int) -> list[Path]:
    """``count`` JPEGs spread evenly over the class folders of ``folder`` and within each, in a fixed order."""
    folders = sorted(d for d in folder.iterdir() if d.is_dir())
    per_folder = [sorted(p for p in d.iterdir() if is_jpeg(p)) for d in folders]
    per_folder = [files for files in per_folder if files]
    if not per_folder:
        sys.exit(f"no class folders with JPEGs under {folder}")
    per_class = -(-count // len(per_folder))
    picked = [files[:: max(1, len(files) // per_class)][:per_class] for files in per_folder]
    interleaved = [files[i] for i in range(per_class) for files in picked if i < len(files)]
    if len(interleaved) < count:
        sys.exit(f"{folder} has only {len(interleaved)} JPEGs for a sample of {count}")
    return interleaved[:count]


def is_jpeg(path: Path) -> bool:
    """A visible ``.jpg``/``.jpeg`` file (the dataset holds a hidden macOS ``.DS_*.jpg`` that is no image)."""
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in (".jpg", ".jpeg")


def client_env(state_dir: Path) -> dict[str, str]:
    """This environment, with the local services of ``state_dir`` (as ``reader``) unless it names services itself,
    and this interpreter's folder first on PATH (MLflow starts ``uvicorn`` from PATH)."""
    env = dict(os.environ)
    if not (env.get("MLFLOW_TRACKING_URI") or env.get("STORAGE_EMULATOR_HOST")):
        env |= services.client_env(state_dir)
    if not env.get("MLFLOW_TRACKING_URI"):
        sys.exit(f"no MLflow server: none recorded in {state_dir} and MLFLOW_TRACKING_URI is not set")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    return env


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-LOG_TAIL_CHARS:] if log.exists() else "(no log)"


def wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout_s: float) -> float:
    """Seconds until ``GET /ping`` answers 200; exits with the log's tail if the server ends or takes too long."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        if process.poll() is not None:
            sys.exit(
                f"the scoring server ended (exit {process.returncode}) before answering; its log ends:\n{log_tail(log)}"
            )
        with contextlib.suppress(requests.RequestException):
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.perf_counter() - started
        time.sleep(1)
    sys.exit(f"the scoring server did not answer /ping within {timeout_s:.0f} s; its log ends:\n{log_tail(log)}")


@contextlib.contextmanager
def scoring_server(model_uri: str, port: int, env: dict[str, str]) -> Iterator[tuple[str, float]]:
    """``mlflow models serve`` of ``model_uri`` on 127.0.0.1:``port`` in a session of its own: its URL and the
    seconds it took to answer; its whole process group is ended on leaving."""
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local"]
    with tempfile.TemporaryDirectory(prefix="bloodcell-serve-bench-") as tmp:
        log = Path(tmp, "serve.log")
        with log.open("w") as output:
            process = subprocess.Popen(
                [*command, "--host", "127.0.0.1", "--port", str(port)],
                cwd=ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:
                url = f"http://127.0.0.1:{port}"
                yield url, round(wait_until_up(url, process, log, START_TIMEOUT_S), 2)
            finally:
                stop(process)


def stop(process: subprocess.Popen) -> None:
    """End ``process``'s process group: SIGTERM, then SIGKILL after 30 s."""
    for sent in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sent)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
            return


def request_body(encoded: list[str]) -> bytes:
    return json.dumps({"dataframe_split": {"columns": [INPUT_COLUMN], "data": [[e] for e in encoded]}}).encode()


def post(session: requests.Session, url: str, body: bytes) -> tuple[float, requests.Response]:
    """Seconds for one ``POST /invocations`` (the whole answer received) and the answer."""
    started = time.perf_counter()
    response = session.post(
        f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=REQUEST_TIMEOUT_S
    )
    return time.perf_counter() - started, response


def answers(response: requests.Response, expected: int) -> list[dict] | None:
    """The answers of a 200 response with one per image, else None."""
    if response.status_code != 200:
        return None
    predictions = response.json().get("predictions")
    return predictions if isinstance(predictions, list) and len(predictions) == expected else None


def batch_of(encoded: list[str], size: int, index: int) -> list[str]:
    """The ``index``-th request's ``size`` images: the sample in turn, wrapping round."""
    return [encoded[(index * size + k) % len(encoded)] for k in range(size)]


def measure_batch(session: requests.Session, url: str, encoded: list[str], size: int, args: argparse.Namespace) -> dict:
    """One warm-up request, then requests one after another until ``--requests`` or ``--seconds``."""
    warmup_s, response = post(session, url, request_body(batch_of(encoded, size, 0)))
    if answers(response, size) is None:
        sys.exit(f"the warm-up request of {size} images got HTTP {response.status_code}: {response.text[:1000]}")
    latencies, failed, first_failure = [], 0, None
    started = time.perf_counter()
    while len(latencies) < args.requests and time.perf_counter() - started < args.seconds:
        body = request_body(batch_of(encoded, size, len(latencies) + 1))
        seconds, response = post(session, url, body)
        latencies.append(seconds)
        if answers(response, size) is None:
            failed += 1
            first_failure = first_failure or f"HTTP {response.status_code}: {response.text[:300]}"
    wall = time.perf_counter() - started
    ms = np.asarray(latencies) * 1000
    return {
        "images_per_request": size,
        "requests": len(latencies),
        "images": len(latencies) * size,
        "seconds": round(wall, 3),
        "requests_per_second": round(len(latencies) / wall, 3),
        "images_per_second": round(len(latencies) * size / wall, 2),
        "p50_ms": round(float(np.percentile(ms, 50)), 1),
        "p99_ms": round(float(np.percentile(ms, 99)), 1),
        "warmup_ms": round(warmup_s * 1000, 1),
        "all_answered": failed == 0,
        "failed": failed,
        "first_failure": first_failure,
    }


def serve_and_measure(args: argparse.Namespace, env: dict[str, str], encoded: list[str], batches: list[int]) -> dict:
    """Figures per batch size and the server's answers for the whole sample in one request."""
    if args.url:
        server = contextlib.nullcontext((args.url.rstrip("/"), None))
    else:
        server = scoring_server(args.model, args.port or services.free_port(), env)
    with server as (url, start_seconds), requests.Session() as session:
        print(f"scoring server at {url}" + (f", answering after {start_seconds:.1f} s" if start_seconds else ""))
        figures = []
        for size in batches:
            figures.append(measure_batch(session, url, encoded, size, args))
            print(f"  {size} images per request: {figures[-1]['requests']} requests", flush=True)
        _, response = post(session, url, request_body(encoded))
        whole = answers(response, len(encoded))
    if whole is None:
        sys.exit(f"the request of the whole sample got HTTP {response.status_code}: {response.text[:1000]}")
    return {"url": url, "server_start_seconds": start_seconds, "batches": figures, "sample_answers": whole}


def run_predict(model_uri: str, files: list[Path], env: dict[str, str]) -> dict:
    """``bloodcell predict --json`` of ``files`` in a fresh process: its wall time and its own timings."""
    command = [sys.executable, "-m", "bloodcell.cli", "predict", "--model", model_uri, "--json", *map(str, files)]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PREDICT_TIMEOUT_S)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(f"bloodcell predict failed (exit {done.returncode}):\n{done.stderr[-LOG_TAIL_CHARS:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {
        "images": len(result["predictions"]),
        "process_seconds": round(wall, 2),
        "seconds": result["seconds"],
        "first_prediction_seconds": result["first_prediction_seconds"],
        "images_per_second": round(len(files) / result["seconds"], 2),
        "answers": result["predictions"],
    }


def agreement(served: list[dict], predicted: list[dict]) -> dict:
    """How many images got the same class from both, and the largest difference of a class probability."""
    pairs = list(zip(served, predicted, strict=True))
    same = sum(s["class"] == p["class"] for s, p in pairs)
    difference = max(abs(s["probabilities"][c] - p["probabilities"][c]) for s, p in pairs for c in p["probabilities"])
    return {"images": len(pairs), "same_class": same, "max_probability_difference": float(difference)}


def print_table(result: dict) -> None:
    print(f"\n{'images/request':>14}{'requests':>10}{'req/s':>9}{'images/s':>10}{'p50 ms':>10}{'p99 ms':>10}  all 200")
    for row in result["batches"]:
        print(
            f"{row['images_per_request']:>14}{row['requests']:>10}{row['requests_per_second']:>9.2f}"
            f"{row['images_per_second']:>10.1f}{row['p50_ms']:>10.1f}{row['p99_ms']:>10.1f}  "
            f"{'yes' if row['all_answered'] else 'NO: ' + str(row['first_failure'])}"
        )
    predict, agreed = result["predict"], result["agreement"]
    print(
        f"\nbloodcell predict, {predict['images']} images: {predict['process_seconds']:.1f} s as a process, "
        f"{predict['seconds']:.1f} s by its own clock ({predict['images_per_second']:.1f} images/s, model loading "
        f"included), first prediction after {predict['first_prediction_seconds']} s"
    )
    print(
        f"same class as the server: {agreed['same_class']} of {agreed['images']} images "
        f"(probabilities differ by at most {agreed['max_probability_difference']:.1e})"
    )
    if result["server_start_seconds"] is not None:
        print(f"scoring server answered /ping after {result['server_start_seconds']:.1f} s")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=".bloodcell", help="local services of a `pipeline.py run`")
    parser.add_argument("--model", default="models:/bloodcell-classifier@champion")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "PBC_dataset_normal_DIB"))
    parser.add_argument("--batches", default="1,8,64", help="images per request, comma-separated")
    parser.add_argument("--images", type=int, help="sample size (default: the largest batch)")
    parser.add_argument("--requests", type=int, default=50, help="at most this many requests per batch size")
    parser.add_argument("--seconds", type=float, default=60, help="at most this long per batch size")
    parser.add_argument("--port", type=int, help="the server's port (default: a free one)")
    parser.add_argument("--url", help="a scoring server already running (of the same --model): start none")
    parser.add_argument("--json", metavar="FILE", help="write the figures as JSON here")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batches.split(",")]
    if min(args.batch_sizes) < 1:
        parser.error("--batches: at least 1 image per request")
    args.images = args.images or max(args.batch_sizes)
    return args


def main() -> None:
    args = parse_args()
    env = client_env(Path(args.state_dir).resolve())
    files = sample_images(Path(args.data), args.images)
    encoded = [base64.b64encode(path.read_bytes()).decode() for path in files]
    print(f"{len(files)} images from {args.data}, model {args.model}, {os.cpu_count()} CPUs")
    served = serve_and_measure(args, env, encoded, args.batch_sizes)
    predict = run_predict(args.model, files, env)
    result = {
        "model": args.model,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "sample": {"images": len(files), "bytes": sum(p.stat().st_size for p in files), "data": args.data},
        "limits": {"requests": args.requests, "seconds": args.seconds},
        "url": served["url"],
        "server_start_seconds": served["server_start_seconds"],
        "batches": served["batches"],
        "predict": {k: v for k, v in predict.items() if k != "answers"},
        "agreement": agreement(served["sample_answers"], predict["answers"]),
    }
    print_table(result)
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
