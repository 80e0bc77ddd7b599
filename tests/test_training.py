"""Training through the real trainer: bucket checkpoints, and resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bloodcell import config, ingest, split, storage
from conftest import ROOT

EPOCHS = 30


@pytest.fixture(scope="module")
def smoke_split(services, sample_dataset):
    dataset = ingest.ingest(str(sample_dataset), services["bucket"])
    return split.split(dataset.dataset_uri, services["bucket"], config.resolve("smoke"), sizes=[48]).split_uri


def train_command(split_uri: str, bucket: str, run_id: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "bloodcell.cli",
        "train",
        "cnn1",
        split_uri,
        "--bucket",
        bucket,
        "--run-id",
        run_id,
        "--profile",
        "smoke",
        "--set",
        f"cnn1.epochs={EPOCHS}",
        "--set",
        "cnn1.early_stopping_patience=1000",
        "--experiment",
        "test-resume",
    ]


def test_killed_trainer_resumes_from_its_checkpoint(services, smoke_split):
    bucket, run_id = services["bucket"], f"resume-{time.time_ns()}"
    state_uri = f"gs://{bucket}/runs/{run_id}/checkpoints/cnn1/main/state.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        train_command(smoke_split, bucket, run_id),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    killed_after = 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if storage.exists(state_uri):
            killed_after = storage.read_json(state_uri)["epoch"]
            if killed_after >= 2:
                process.send_signal(signal.SIGKILL)
                break
        time.sleep(0.2)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the trainer finished before it could be killed"
    assert 2 <= killed_after < EPOCHS

    resumed = subprocess.run(
        train_command(smoke_split, bucket, run_id), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["epochs"] == EPOCHS
    history = storage.read_json(f"gs://{bucket}/runs/{run_id}/models/cnn1/history.json")
    assert len(history["loss"]) == len(history["val_accuracy"]) == EPOCHS
    state = storage.read_json(state_uri)
    assert state["done"] and state["epoch"] == EPOCHS
