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


def test_vgg16_trains_the_model_its_builder_makes_in_two_phases(services):
    """fit_vgg16 trains the parts of models.vgg16's model in place: the head, then block 5; blocks 1-4 stay."""
    import keras
    import numpy as np

    from bloodcell import models, train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24, dtype=np.int32) % 3
    data = train.TrainingData(["a", "b", "c"], (x[:16], y[:16]), (x[16:], y[16:]))
    cfg = config.ModelConfig(image_size=32, epochs=2, batch_size=8, fine_tune_epochs=1, early_stopping_patience=100)
    keras.utils.set_random_seed(1)
    model = models.build_model("vgg16", 3, 32, augment=False, weights=None)
    before = {
        name: [w.copy() for w in model.get_layer(name).get_weights()] for name in ("vgg16_stem", "vgg16_block5", "head")
    }
    history = train.fit_vgg16(model, cfg, data, f"gs://{services['bucket']}/vgg16-phases-{time.time_ns()}")
    assert len(history["loss"]) == cfg.epochs + cfg.fine_tune_epochs

    def changed(name: str) -> bool:
        return any(
            not np.array_equal(a, b) for a, b in zip(before[name], model.get_layer(name).get_weights(), strict=True)
        )

    assert changed("head") and changed("vgg16_block5") and not changed("vgg16_stem")
    assert model.predict(x[:4], verbose=0).shape == (4, 3)
