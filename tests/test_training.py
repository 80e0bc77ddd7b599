"""Training through the real trainer: bucket checkpoints, and resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from bloodcell import config, ingest, split, storage
from conftest import ROOT, train_command

EPOCHS = 30


@pytest.fixture(scope="module")
def smoke_split(services, sample_dataset):
    dataset = ingest.ingest(str(sample_dataset), services["bucket"])
    return split.split(dataset.dataset_uri, services["bucket"], config.resolve("smoke"), sizes=[48]).split_uri


def test_killed_trainer_resumes_from_its_checkpoint(services, smoke_split):
    bucket, run_id = services["bucket"], f"resume-{time.time_ns()}"
    state_uri = f"gs://{bucket}/runs/{run_id}/checkpoints/cnn1/main/state.json"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        train_command(smoke_split, bucket, run_id, EPOCHS, "--experiment", "test-resume"),
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
        train_command(smoke_split, bucket, run_id, EPOCHS, "--experiment", "test-resume"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["epochs"] == EPOCHS
    history = storage.read_json(f"gs://{bucket}/runs/{run_id}/models/cnn1/history.json")
    assert len(history["loss"]) == len(history["val_accuracy"]) == EPOCHS
    state = storage.read_json(state_uri)
    assert state["done"] and state["epoch"] == EPOCHS
    assert_stored_model_is_calibrated(result)


def assert_stored_model_is_calibrated(result: dict) -> None:
    """The stored model ends in the calibration fitted on validation, recorded in its training record."""
    import tempfile
    from pathlib import Path

    from bloodcell import calibration, familiarity, predict

    fitted = result["calibration"]
    assert 0.05 <= fitted["temperature"] <= 20 and fitted["target_accuracy"] == 0.99
    with tempfile.TemporaryDirectory() as tmp:
        model = predict.load_keras(storage.download_file(result["model_uri"], Path(tmp, "m.keras")), "test")
    layer = calibration.calibration_layer(model)
    assert layer is not None and (layer.temperature, layer.refer_below) == (
        fitted["temperature"],
        fitted["refer_below"],
    )
    check = familiarity.familiarity_layer(model)  # the second output: the familiarity check
    assert check is not None and check.threshold == fitted["familiarity_threshold"] and len(model.outputs) == 2
    assert len(fitted["set_min_probability"]) == len(fitted["promise"]) == model.outputs[0].shape[-1]


def small_training_data():
    import numpy as np

    from bloodcell import train

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(24, 32, 32, 3), dtype=np.uint8)
    y = np.arange(24, dtype=np.int32) % 3
    return train.TrainingData(["a", "b", "c"], (x[:16], y[:16]), (x[16:], y[16:]), (x[16:], y[16:]))


def test_vgg16_trains_the_model_its_builder_makes_in_two_phases(services, tmp_path):
    """With a weights file, fit_vgg16 trains the parts of models.vgg16's model in place: the head, then block 5;
    blocks 1-4 stay."""
    import keras
    import numpy as np

    from bloodcell import models, recipes, train

    data = small_training_data()
    x = data.train[0]
    weights = tmp_path / "vgg16_notop.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    assert recipes.vgg16_path(str(weights)) == "frozen_then_fine_tune"
    cfg = config.ModelConfig(image_size=32, epochs=2, batch_size=8, fine_tune_epochs=1, early_stopping_patience=100)
    keras.utils.set_random_seed(1)
    model = models.build_model("vgg16", 3, 32, augment=False, weights=str(weights))
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


def test_vgg16_with_none_updates_every_layers_weights_in_training(services):
    """--vgg16-weights none trains the whole network from scratch in one phase: every layer's weights change."""
    import keras
    import numpy as np

    from bloodcell import models, recipes, train

    data = small_training_data()
    assert recipes.vgg16_path("none") == "from_scratch"
    cfg = recipes.scratch_config(
        config.ModelConfig(
            image_size=32, epochs=1, batch_size=8, early_stopping_patience=100, scratch_width=0.125, scratch_epochs=2
        )
    )
    keras.utils.set_random_seed(1)
    model = models.build_model("vgg16", 3, 32, weights=None, width=cfg.scratch_width)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}
    history = train.fit_vgg16_from_scratch(
        model, cfg, data, f"gs://{services['bucket']}/vgg16-scratch-{time.time_ns()}"
    )
    assert len(history["loss"]) == cfg.scratch_epochs

    with_weights = [layer for layer in model.layers if before[layer.name]]
    assert len([layer for layer in with_weights if layer.name.endswith(("_conv1", "_conv2", "_conv3"))]) == 13
    for layer in with_weights:
        assert layer.trainable, layer.name
        for old, new in zip(before[layer.name], layer.get_weights(), strict=True):
            assert not np.array_equal(old, new), f"{layer.name}: weights unchanged by training"
    assert model.predict(data.val[0][:4], verbose=0).shape == (4, 3)


def test_vgg16_path_is_chosen_by_the_weights_and_logged(services):
    """fit_model picks the path from --vgg16-weights; the MLflow params name it and the true choices."""
    from bloodcell import models, train

    data = small_training_data()
    cfg = config.ModelConfig(
        image_size=32, epochs=1, batch_size=8, scratch_width=0.125, scratch_epochs=1, scratch_learning_rate=3e-3
    )
    model, history = train.fit_model(
        "vgg16", cfg, data, f"gs://{services['bucket']}/vgg16-path-{time.time_ns()}", "none"
    )
    assert len(history["loss"]) == 1
    assert {"vgg16_stem", "vgg16_block5"}.isdisjoint(layer.name for layer in model.layers)
    assert isinstance(model.get_layer("augment"), models.RandomSymmetry)
    profile = config.resolve("smoke")
    params = train.training_params("vgg16", cfg, profile, "float32", "gs://b/a", data, "none")
    assert params["vgg16_path"] == "from_scratch" and params["batch_norm"] is True
    assert params["epochs"] == 1 and params["learning_rate"] == 3e-3 and params["scratch_width"] == 0.125
    assert "RandomSymmetry" in params["augmentation"]
    frozen = train.training_params("vgg16", cfg, profile, "float32", "gs://b/a", data, "imagenet")
    assert frozen["vgg16_path"] == "frozen_then_fine_tune" and frozen["augmentation"].startswith("none")
