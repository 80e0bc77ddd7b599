"""Adding a model is one edit: an entry in a profile's ``models`` (with its builder registered). Shown through
``BLOODCELL_EXTENSIONS``, which adds the entry from a module outside the package: the smoke pipeline then
trains a fourth model, evaluates it, combines it, reports it and logs it to MLflow, with no other change."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, mlflow_login, plain, smoke_args, store_login

EXTENSION = """
import dataclasses

import keras
from keras import layers

from bloodcell import config, models


@models.register("tiny", min_size=16, description="one 3x3 convolution")
def tiny(n_classes: int, image_size: int, augment: bool = True, blur_sigma: float = 0.0) -> keras.Model:
    images = keras.Input((image_size, image_size, 3), dtype="uint8", name="image")
    x = layers.Conv2D(4, 3, activation="relu")(layers.Rescaling(1 / 255)(images))
    x = layers.GlobalAveragePooling2D()(layers.MaxPooling2D(2)(x))
    return keras.Model(images, layers.Dense(n_classes, activation="softmax", name="probabilities")(x), name="tiny")


# The one edit: the model and its settings, in the profile.
smoke = config.PROFILES["smoke"]
config.PROFILES["smoke"] = dataclasses.replace(
    smoke, models={**smoke.models, "tiny": config.ModelConfig("tiny", image_size=48, epochs=1, batch_size=32)}
)
"""


@pytest.fixture(scope="module")
def four_model_run(sample_dataset, tmp_path_factory):
    state = tmp_path_factory.mktemp("four-models")
    (state / "extension").mkdir()
    (state / "extension" / "tiny_model.py").write_text(textwrap.dedent(EXTENSION))
    env = {
        **os.environ,
        "BLOODCELL_CACHE": str(state / "cache"),
        "BLOODCELL_EXTENSIONS": "tiny_model",
        "PYTHONPATH": os.pathsep.join([str(state / "extension"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.pop("STORAGE_EMULATOR_HOST", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    summary_path = state / "summary.json"
    command = [sys.executable, "pipeline.py", "run", *smoke_args(sample_dataset, state, "--summary", str(summary_path))]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    yield {
        "process": process,
        "log": plain(process.stdout + process.stderr),
        "summary": json.loads(summary_path.read_text()) if summary_path.exists() else {},
        "state": state,
    }
    subprocess.run([sys.executable, "pipeline.py", "stop", "--state-dir", str(state)], cwd=ROOT, env=env, timeout=120)


def test_a_fourth_model_trains_is_evaluated_reported_and_logged(four_model_run, monkeypatch):
    assert four_model_run["process"].returncode == 0, four_model_run["log"][-5000:]
    assert "done train-tiny" in four_model_run["log"]
    summary = four_model_run["summary"]
    assert set(summary["models"]) == {"cnn1", "cnn2", "vgg16", "tiny", "ensemble"}
    tiny = summary["models"]["tiny"]
    assert 0 <= tiny["test_accuracy"] <= 1 and tiny["bucket_model_uri"].endswith("/models/tiny/model.keras")

    state = four_model_run["state"]
    services = json.loads((state / "services.json").read_text())
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", next(s["url"] for s in services if s["name"] == "gcs"))
    for name, value in {**mlflow_login(state, "reader"), **store_login(state)}.items():
        monkeypatch.setenv(name, value)
    from mlflow.tracking import MlflowClient

    from bloodcell import storage

    report = storage.new_client().bucket(summary["bucket"]).blob(summary["report_uri"].split("/", 3)[3])
    table = report.download_as_text().split('<h2 id="comparison">', 1)[1].split("</table>", 1)[0]
    assert "<td>tiny" in table
    client = MlflowClient(summary["mlflow_tracking_uri"])
    children = client.search_runs(
        [summary["mlflow_experiment_id"]],
        filter_string=f"tags.mlflow.parentRunId = '{summary['mlflow_parent_run_id']}'",
    )
    logged = {run.data.tags["bloodcell.model"]: run for run in children}
    assert set(logged) == {"cnn1", "cnn2", "vgg16", "tiny", "ensemble"}
    assert "test_accuracy" in logged["tiny"].data.metrics and logged["tiny"].data.params["architecture"] == "tiny"
