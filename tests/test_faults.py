"""Fault injection (run with `make test-faults` / `pytest -m faults`): slower, real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bloodcell import config, ingest, split, storage
from bloodcell.services import LocalServices, free_port

from conftest import ROOT

pytestmark = pytest.mark.faults


@pytest.fixture()
def own_services(tmp_path, sample_dataset, monkeypatch):
    """Services of this test alone (the test restarts them), with a smoke split ready."""
    local = LocalServices(tmp_path / "state", "faults", free_port(), free_port())
    env = local.start()
    for key, value in {**env, "BLOODCELL_CACHE": str(tmp_path / "cache")}.items():
        monkeypatch.setenv(key, value)
    storage.client.cache_clear()
    dataset = ingest.ingest(str(sample_dataset), "faults")
    split_uri = split.split(dataset.dataset_uri, "faults", config.resolve("smoke"), sizes=[48]).split_uri
    yield local, split_uri
    local.stop()
    storage.client.cache_clear()


def test_object_store_restart_during_training_loses_nothing(own_services):
    local, split_uri = own_services
    run_id = f"faults-{time.time_ns()}"
    state_uri = f"gs://faults/runs/{run_id}/checkpoints/cnn1/main/state.json"
    command = [sys.executable, "-m", "bloodcell.cli", "train", "cnn1", split_uri, "--bucket", "faults", "--run-id",
               run_id, "--profile", "smoke", "--set", "cnn1.epochs=25", "--set", "cnn1.early_stopping_patience=1000"]
    trainer = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    def epochs_done() -> int:
        return storage.read_json(state_uri)["epoch"] if storage.exists(state_uri) else 0

    while time.monotonic() < deadline and epochs_done() < 2:
        time.sleep(0.2)
    gcs = next(s for s in local.status() if s.name == "gcs")
    os.killpg(gcs.pid, signal.SIGKILL)
    outage_started = time.monotonic()
    time.sleep(5)
    local.start()  # same port, same filesystem root
    recovered_after = time.monotonic() - outage_started
    output, _ = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, output[-3000:]
    result = json.loads(output.strip().splitlines()[-1])
    assert result["epochs"] == 25
    history = storage.read_json(f"gs://faults/runs/{run_id}/models/cnn1/history.json")
    assert len(history["loss"]) == 25
    assert storage.exists(f"gs://faults/runs/{run_id}/models/cnn1/model.keras")
    assert storage.read_json(state_uri)["done"]
    print(f"object store down {recovered_after:.1f} s; trainer finished all 25 epochs")
