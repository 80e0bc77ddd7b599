"""Training through the real trainer: bucket checkpoints, and resume after a SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from unittest.mock import ANY

import pytest

from bloodcell import config, ingest, layers, split, storage
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

    from bloodcell import calibration, familiarity, modelfile

    fitted = result["calibration"]
    assert 0.05 <= fitted["temperature"] <= 20 and fitted["target_accuracy"] == 0.99
    with tempfile.TemporaryDirectory() as tmp:
        model = modelfile.load(storage.download_file(result["model_uri"], Path(tmp, "m.keras")), "test")
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


def test_vgg16_transfer_trains_the_model_its_builder_makes_in_two_phases(tmp_path):
    """With a weights file, fit_transfer trains the parts of models.vgg16_transfer's model in place: the head,
    then block 5; blocks 1-4 stay. Checkpoints in a local folder, one per phase."""
    import keras
    import numpy as np

    from bloodcell import fitting, models

    data = small_training_data()
    x = data.train[0]
    weights = tmp_path / "vgg16_notop.weights.h5"
    keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3)).save_weights(weights)
    cfg = config.TransferConfig(
        "vgg16_transfer", image_size=32, epochs=2, batch_size=8, fine_tune_epochs=1, early_stopping_patience=100
    )
    keras.utils.set_random_seed(1)
    model = models.build_model("vgg16_transfer", 3, 32, augment=False, weights=str(weights))
    before = {
        name: [w.copy() for w in model.get_layer(name).get_weights()] for name in ("vgg16_stem", "vgg16_block5", "head")
    }
    checkpoints = fitting.FolderCheckpoints(tmp_path / "checkpoints")
    history = fitting.fit_transfer(model, cfg, data.for_fitting, checkpoints)
    assert len(history["loss"]) == cfg.epochs + cfg.fine_tune_epochs
    assert (checkpoints.phase("frozen").read_state() or {}).get("epoch") == 2
    assert checkpoints.phase("fine_tune").read_state() == {"epoch": 1, "history": ANY, "done": True}

    def changed(name: str) -> bool:
        return any(
            not np.array_equal(a, b) for a, b in zip(before[name], model.get_layer(name).get_weights(), strict=True)
        )

    assert changed("head") and changed("vgg16_block5") and not changed("vgg16_stem")
    assert model.predict(x[:4], verbose=0).shape == (4, 3)


def test_vgg16_from_scratch_updates_every_layers_weights_in_training():
    """The from-scratch recipe trains the whole network in one phase: every layer's weights change."""
    import keras
    import numpy as np

    from bloodcell import fitting, recipes

    data = small_training_data()
    cfg = config.ModelConfig(
        "vgg16_from_scratch", image_size=32, epochs=2, batch_size=8, early_stopping_patience=100, width=0.125
    )
    keras.utils.set_random_seed(1)
    model = recipes.build(cfg, 3)
    before = {layer.name: [w.copy() for w in layer.get_weights()] for layer in model.layers}
    history = fitting.fit_end_to_end(model, cfg, data.for_fitting, fitting.NoCheckpoints())
    assert len(history["loss"]) == cfg.epochs

    with_weights = [layer for layer in model.layers if before[layer.name]]
    assert len([layer for layer in with_weights if layer.name.endswith(("_conv1", "_conv2", "_conv3"))]) == 13
    for layer in with_weights:
        assert layer.trainable, layer.name
        for old, new in zip(before[layer.name], layer.get_weights(), strict=True):
            assert not np.array_equal(old, new), f"{layer.name}: weights unchanged by training"
    assert model.predict(data.val[0][:4], verbose=0).shape == (4, 3)


def test_the_weights_choose_vgg16s_recipe_and_its_params_are_the_recipes_own():
    """--vgg16-weights picks the transfer or the from-scratch recipe; the MLflow params are that recipe's fields."""
    from bloodcell import fitting, recipes, train
    from bloodcell.weights import Weights

    data = small_training_data()
    entry = config.resolve("smoke", {"vgg16.scratch.width": 0.125, "vgg16.scratch.learning_rate": 3e-3}).model("vgg16")
    assert isinstance(entry, config.TransferOrScratch)
    scratch = recipes.choose(entry, Weights.parse("none"))
    assert scratch == entry.scratch and recipes.choose(entry, Weights.parse("imagenet")) == entry.transfer
    model, history = fitting.train_recipe(scratch, 3, data.for_fitting, fitting.NoCheckpoints())
    assert len(history["loss"]) == 1
    assert {"vgg16_stem", "vgg16_block5"}.isdisjoint(layer.name for layer in model.layers)
    assert isinstance(model.get_layer("augment"), layers.RandomSymmetry)
    profile = config.resolve("smoke")
    params = train.training_params(scratch, profile, "float32", "gs://b/a", data, Weights.parse("none"))
    assert params["recipe"] == "end_to_end" and params["architecture"] == "vgg16_from_scratch"
    assert params["epochs"] == 1 and params["learning_rate"] == 3e-3 and params["width"] == 0.125
    assert "RandomSymmetry" in params["augmentation"] and "fine_tune_epochs" not in params
    frozen = train.training_params(entry.transfer, profile, "float32", "gs://b/a", data, Weights.parse("imagenet"))
    assert frozen["recipe"] == "transfer" and frozen["weights"] == "imagenet"
    assert frozen["augmentation"].startswith("none") and "width" not in frozen and frozen["fine_tune_epochs"] == 1
