#!/usr/bin/env python3
"""Render a run's report and the MLflow UI in headless Chromium and save the screenshots (not a test).

    .venv/bin/python benchmarks/screenshots.py --state-dir .bloodcell --summary summary.json --out shots/

Needs Debian's ``chromium`` package (``apt-get install chromium``) and the local services of
``pipeline.py run`` still running. The MLflow UI is reached through a small local proxy that signs every
request in as the read-only ``reader`` user (Chromium drops credentials written into a URL for the
UI's own API calls). Writes ``report.png``, ``mlflow-experiment.png``, ``mlflow-run-<model>.png``.
"""

from __future__ import annotations

import argparse
import http.server
import json
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodcell import storage, tracking  # noqa: E402
from bloodcell.local import services  # noqa: E402


def signing_proxy(target: str, user: str, password: str) -> http.server.ThreadingHTTPServer:
    """A local HTTP server forwarding GET and POST requests to ``target`` with a basic-auth header added."""

    class Forward(http.server.BaseHTTPRequestHandler):
        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            response = requests.request(
                self.command,
                target + self.path,
                data=self.rfile.read(length) if length else None,
                headers={k: self.headers[k] for k in ("Content-Type", "Accept") if self.headers.get(k)},
                auth=(user, password),
                timeout=60,
            )
            self.send_response(response.status_code)
            for key in ("Content-Type", "Cache-Control"):
                if response.headers.get(key):
                    self.send_header(key, response.headers[key])
            self.send_header("Content-Length", str(len(response.content)))
            self.end_headers()
            self.wfile.write(response.content)

        do_GET = do_POST = _forward

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def screenshot(url: str, out: Path, width: int = 1500, height: int = 2200, wait_ms: int = 15000) -> Path:
    """``url`` rendered by headless Chromium, after ``wait_ms`` of page time for scripts to draw."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("chromium is not installed: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium,
                "--headless=new",
                "--no-sandbox",  # runs as root in CI containers
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                f"--virtual-time-budget={wait_ms}",
                f"--screenshot={out}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    print(f"{out}: {url}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--state-dir", default=str(ROOT / ".bloodcell"))
    parser.add_argument("--summary", required=True, help="the run summary JSON (`pipeline.py run --summary`)")
    parser.add_argument("--out", default="screenshots")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = json.loads(Path(args.summary).read_text())
    env = services.client_env(Path(args.state_dir))
    if not env.get("MLFLOW_TRACKING_PASSWORD"):
        sys.exit(f"no MLflow login recorded under {args.state_dir}: pass the state directory of the run")

    import os

    os.environ.update(env)
    storage.client.cache_clear()
    with tempfile.TemporaryDirectory() as tmp:
        report = storage.download_file(summary["report_uri"], Path(tmp, "report.html"))
        screenshot(report.as_uri(), out / "report.png", height=9000, wait_ms=3000)

    proxy = signing_proxy(env["MLFLOW_TRACKING_URI"], env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"])
    base = f"http://127.0.0.1:{proxy.server_address[1]}"
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(env["MLFLOW_TRACKING_URI"]).get_experiment_by_name(summary["mlflow_experiment"])
        page = tracking.experiment_url(base, experiment.experiment_id)  # the link `pipeline.py run` prints
        screenshot(page, out / "mlflow-experiment.png", height=1200)
        for name, row in summary["models"].items():
            if row.get("mlflow_run_id"):
                url = page.replace("?", f"/runs/{row['mlflow_run_id']}?")
                screenshot(url, out / f"mlflow-run-{name}.png", height=1800)
    finally:
        proxy.shutdown()


if __name__ == "__main__":
    main()
