"""The whole pipeline, smoke profile, on shared images, against real local services."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bloodcell import shifts
from bloodcell.local.services import client_env
from conftest import ROOT, SHARED_DATA, UNDECODABLE, mlflow_login, plain, smoke_args, store_login

pytestmark = pytest.mark.integration
TASKS = ["ingest", "split", "train-cnn1", "train-cnn2", "train-vgg16", "evaluate", "report"]
SUMMARY_KEYS = {
    "run_id",
    "profile",
    "mlflow_tracking_uri",
    "mlflow_experiment",
    "mlflow_parent_run_id",
    "bucket",
    "report_uri",
    "models",
}


@pytest.fixture()
def clients(smoke_run, monkeypatch):
    summary = smoke_run["summary"]
    services = json.loads((smoke_run["state"] / "services.json").read_text())
    gcs = next(s["url"] for s in services if s["name"] == "gcs")
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs)
    for name, value in {**mlflow_login(smoke_run["state"], "reader"), **store_login(smoke_run["state"])}.items():
        monkeypatch.setenv(name, value)
    from mlflow.tracking import MlflowClient

    from bloodcell import storage

    return storage.new_client(), MlflowClient(summary["mlflow_tracking_uri"])


def test_all_seven_tasks_succeed(smoke_run):
    assert smoke_run["process"].returncode == 0, smoke_run["log"][-5000:]
    logs = smoke_run["state"] / "runs" / smoke_run["summary"]["run_id"] / "logs"
    run_log = (logs / "run.log").read_text()
    for task in TASKS:
        assert f"Task '{task}' finished with status SUCCESS" in run_log
        assert re.search(rf"^done {task} in \d+ s: \S", smoke_run["log"], re.M), task
    assert "Pipeline 'bloodcell' finished with status SUCCESS" in run_log
    assert f"quarantined {UNDECODABLE}: hidden file" in (logs / "ingest.log").read_text()


def test_the_console_shows_tasks_and_epochs_and_the_logs_keep_everything(smoke_run):
    """A line when each task starts and ends (wall time, key result), one per training epoch; kfp's and the
    steps' whole output in the run's logs folder, each task's in its own file."""
    console = [line for line in smoke_run["process"].stdout.splitlines() if line.strip()]
    assert len(console) < 40, "\n".join(console)
    ingested = r"^done ingest in \d+ s: \d+ images in 8 classes, 1 quarantined, \d+ duplicates dropped$"
    assert re.search(ingested, smoke_run["log"], re.M)
    assert re.search(
        r"^done split in \d+ s: train \d+ / val \d+ / calibration \d+ / test \d+ images$", smoke_run["log"], re.M
    )
    assert re.search(
        r"^  train-cnn1 epoch 1/1  loss \S+  accuracy \S+  val_accuracy \S+  \d+ s$", smoke_run["log"], re.M
    )
    assert re.search(r"^done evaluate in \d+ s: test accuracy cnn1 [\d.]+%", smoke_run["log"], re.M)
    logs = smoke_run["state"] / "runs" / smoke_run["summary"]["run_id"] / "logs"
    assert {path.stem for path in logs.glob("*.log")} == {"run", *TASKS}
    assert "Executing task 'train-cnn1'" in (logs / "run.log").read_text()
    assert "training cnn1: " in (logs / "train-cnn1.log").read_text()
    assert "executor_input" not in smoke_run["process"].stdout
    # The runner itself never loads TensorFlow: its start-up lines would be the only noise left on the console.
    assert "absl::InitializeLog" not in smoke_run["log"] and "oneDNN" not in smoke_run["log"]


def test_every_step_says_it_ran_as_a_local_process(smoke_run):
    """The runner that starts a step says how; a machine that is itself a container (CI) changes nothing."""
    run_log = (smoke_run["state"] / "runs" / smoke_run["summary"]["run_id"] / "logs" / "run.log").read_text()
    for step in ("ingest", "split", "train", "evaluate", "report"):
        assert re.search(rf"step {step}: uid \d+, local process$", run_log, re.M), step
    outputs = list((smoke_run["state"] / "kfp").glob("*/*/executor_output.json"))
    facts = [
        artifact["metadata"]["runtime"]
        for output in outputs
        for artifacts in json.loads(output.read_text()).get("artifacts", {}).values()
        for artifact in artifacts["artifacts"]
        if "runtime" in artifact["metadata"]
    ]
    assert len(facts) >= len(TASKS)
    assert all(f["started_as"] == "local process" and not f["container"] and f["image"] == "" for f in facts)


def test_a_trainer_logs_one_progress_line_per_epoch_when_not_on_a_terminal(smoke_run):
    run_log = (smoke_run["state"] / "runs" / smoke_run["summary"]["run_id"] / "logs" / "run.log").read_text()
    progress = re.findall(r"/step\b", run_log)
    assert len(progress) == 3  # the smoke profile trains each model one epoch (Keras then prints no "Epoch 1/1")


def test_summary_has_the_promised_keys(smoke_run):
    summary = smoke_run["summary"]
    assert set(summary) >= SUMMARY_KEYS
    assert summary["profile"] == "smoke"
    assert set(summary["models"]) == {"cnn1", "cnn2", "vgg16", "ensemble"}
    for model in summary["models"].values():
        assert {"test_accuracy", "macro_f1", "model_uri", "mlflow_run_id", "inference_images_per_second"} <= set(model)
        assert 0 <= model["test_accuracy"] <= 1 and model["model_uri"].startswith("models:/m-")
    combined = summary["models"]["ensemble"]
    assert combined["members"] and set(combined["members"]) <= {"cnn1", "cnn2", "vgg16"}
    assert set(combined["tta"]) == set(combined["members"])
    assert f"  ensemble test accuracy {combined['test_accuracy']:.2%}" in smoke_run["log"]


def test_models_and_report_are_in_the_bucket(smoke_run, clients):
    gcs, _ = clients
    summary = smoke_run["summary"]
    names = {b.name for b in gcs.list_blobs(summary["bucket"], prefix=f"runs/{summary['run_id']}/")}
    for model in ("cnn1", "cnn2", "vgg16", "ensemble"):
        assert f"runs/{summary['run_id']}/models/{model}/model.keras" in names
        assert f"runs/{summary['run_id']}/metrics/{model}.json" in names
    report = gcs.bucket(summary["bucket"]).blob(summary["report_uri"].split("/", 3)[3]).download_as_text()
    table = report.split('<h2 id="comparison">', 1)[1].split("</table>", 1)[0]
    assert all(f"<td>{m}" in table for m in ("cnn1", "cnn2", "vgg16", "ensemble"))
    assert '<p id="ensemble">ensemble is ' in report and "chosen on the validation split" in report
    assert report.count("data:image/png;base64,") >= 5


def test_mlflow_parent_run_has_a_nested_run_per_model_with_test_accuracy(smoke_run, clients):
    _, mlflow_client = clients
    summary = smoke_run["summary"]
    parent = mlflow_client.get_run(summary["mlflow_parent_run_id"])
    assert parent.data.tags["bloodcell.pipeline_run_id"] == summary["run_id"]
    assert parent.info.status == "FINISHED"
    children = mlflow_client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(r.data.tags["bloodcell.model"] for r in children) == ["cnn1", "cnn2", "ensemble", "vgg16"]
    for child in children:
        assert "test_accuracy" in child.data.metrics and "test_inference_images_per_second" in child.data.metrics
        assert child.data.params["image_size"]
        if child.data.tags["bloodcell.model"] == "ensemble":  # not trained: its choices, made on validation
            assert child.data.params["members"] and "val_accuracy" in child.data.metrics
        else:
            assert "accuracy" in child.data.metrics and "val_loss" in child.data.metrics
        # calibration, fitted on validation, and its test figures
        params = child.data.params
        assert float(params["calibration_temperature"]) > 0 and "refer_below_basophil" in params
        assert params["promise_basophil"] in ("class", "group", "none") and "set_min_probability_ig" in params
        assert float(params["calibration_familiarity_threshold"]) > 0
        for metric in ("test_unfamiliar_share", "test_kept_share", "test_set_coverage", "test_set_mean_size"):
            assert metric in child.data.metrics, metric
        assert "test_set_coverage_ig" in child.data.metrics  # per true class; kept shares per predicted class:
        assert any(key.startswith("test_kept_share_") for key in child.data.metrics)
        for metric in ("test_ece", "test_ece_before", "test_nll", "test_brier", "test_accuracy_at_coverage_90"):
            assert metric in child.data.metrics, metric
        assert "test_coverage_at_accuracy_99" in child.data.metrics and "val_ece_after" in child.data.metrics
    registered = smoke_run["summary"]["registry"]
    assert not registered["promoted"] and "smoke-profile run never takes the alias" in registered["reason"]
    version = mlflow_client.get_model_version("bloodcell-classifier", registered["version"])
    assert float(version.tags["calibration_temperature"]) > 0 and "calibration_promised_classes" in version.tags
    assert "calibration_unfamiliar_share" in version.tags and "calibration_set_coverage" in version.tags


def predict(smoke_run, model: str, *args: str, uri: str | None = None) -> dict:
    """``bloodcell predict --model <the run's model, or uri> --json ARGS`` as user reader; its JSON result."""
    summary = smoke_run["summary"]
    env = {**smoke_run["env"], **client_env(smoke_run["state"])}
    model_uri = uri or summary["models"][model]["model_uri"]
    command = [sys.executable, "-m", "bloodcell.cli", "predict", "--model", model_uri, "--json", *args]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def test_predict_loads_a_logged_model(smoke_run):
    images = [str(SHARED_DATA / "basophil" / name) for name in sorted(os.listdir(SHARED_DATA / "basophil"))[:3]]
    result = predict(smoke_run, "cnn1", *images, str(SHARED_DATA / UNDECODABLE))
    assert len(result["predictions"]) == 3
    assert result["unreadable"][0]["path"].endswith(UNDECODABLE)
    assert all(
        p["class"]
        in {"basophil", "eosinophil", "erythroblast", "ig", "lymphocyte", "monocyte", "neutrophil", "platelet"}
        for p in result["predictions"]
    )


def test_predict_takes_the_combined_model_like_any_model(smoke_run):
    images = [str(path) for folder in sorted(SHARED_DATA.iterdir()) for path in sorted(folder.glob("*.jpg"))[-2:]]
    result = predict(smoke_run, "ensemble", "--labels-from-folders", *images)
    assert len(result["predictions"]) == len(images) == 16 and 0 <= result["accuracy"] <= 1
    assert result["first_prediction_seconds"] > 0  # measured; its speed is benchmarks/bench_serving.py's to check


def test_predict_gives_calibrated_probabilities_refer_flags_and_explanations(smoke_run, tmp_path):
    images = [str(path) for folder in sorted(SHARED_DATA.iterdir()) for path in sorted(folder.glob("*.jpg"))[:1]]
    result = predict(smoke_run, "cnn2", "--labels-from-folders", "--explain", str(tmp_path / "why"), *images)
    assert result["calibrated"] and result["temperature"] > 0 and 0 <= result["referred"] <= len(images)
    for item in result["predictions"]:
        assert abs(sum(item["probabilities"].values()) - 1) < 1e-4 and item["class"] in item["probabilities"]
        low = item["confidence"] < result["refer_below"][item["class"]]
        reasons = [r for r, on in (("low confidence", low), ("unlike the training images", not item["familiar"])) if on]
        assert item["refer"] == bool(reasons) and item["refer_reason"] == ("; ".join(reasons) or None)
        assert isinstance(item["familiarity"], float) and item["promise"] in ("class", "group", "none")
        assert set(item["prediction_set"]) <= set(item["probabilities"])
        overlay = Path(item["explanation"])
        assert overlay.is_file() and overlay.parent.name == Path(item["path"]).parent.name
        assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_warns_on_a_shifted_batch_and_not_on_a_familiar_one(smoke_run, tmp_path):
    source = tmp_path / "lab"
    for folder in sorted(d for d in SHARED_DATA.iterdir() if d.is_dir()):
        (source / folder.name).mkdir(parents=True)
        for image in sorted(folder.glob("*.jpg"))[40:43]:  # 24 images the smoke run never saw
            shutil.copy(image, source / folder.name / image.name)
    familiar = predict(smoke_run, "cnn2", str(source))
    assert len(familiar["predictions"]) == 24 and familiar["warning"] is None
    assert familiar["unfamiliar"] <= 4 and familiar["familiarity_check"]
    assert shifts.write_shifted(source, tmp_path / "gray", "grayscale") == 24
    shifted = predict(smoke_run, "cnn2", str(tmp_path / "gray"))
    assert shifted["unfamiliar"] > 12 and "look unlike the training images" in shifted["warning"]
    assert all(p["refer"] for p in shifted["predictions"] if not p["familiar"])


def test_stored_logged_and_registered_copies_answer_identically(smoke_run):
    """The bucket's model.keras, its MLflow logged model and its registered version carry the same checks:
    identical familiarity scores, prediction sets and refer flags."""
    images = [str(path) for folder in sorted(SHARED_DATA.iterdir()) for path in sorted(folder.glob("*.jpg"))[:2]]
    best = smoke_run["summary"]["best_model"]
    row = smoke_run["summary"]["models"][best]
    answers = [
        predict(smoke_run, best, *images, uri=uri)["predictions"]
        for uri in (
            row["bucket_model_uri"],
            row["model_uri"],
            f"models:/bloodcell-classifier/{smoke_run['summary']['registry']['version']}",
        )
    ]
    keys = ("familiar", "familiarity", "prediction_set", "refer", "refer_reason", "probabilities")
    first = [{k: p[k] for k in keys} for p in answers[0]]
    assert all([{k: p[k] for k in keys} for p in other] == first for other in answers[1:])
    assert all(p["familiarity"] is not None and p["prediction_set"] is not None for p in answers[0])


def test_stop_ends_only_the_services_it_started(smoke_run):
    services = json.loads((smoke_run["state"] / "services.json").read_text())
    process = subprocess.run(
        [sys.executable, "pipeline.py", "stop", "--state-dir", str(smoke_run["state"])],
        cwd=ROOT,
        env=smoke_run["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0
    for service in services:
        assert f"{service['name']} (pid {service['pid']})" in process.stdout
        status = Path(f"/proc/{service['pid']}/status")
        assert not status.exists() or "zombie" in status.read_text().lower()


def test_a_failing_step_fails_the_run_with_its_name_and_reason(tmp_path):
    env = {**os.environ, "BLOODCELL_CACHE": str(tmp_path / "cache")}
    command = [sys.executable, "pipeline.py", "run", *smoke_args(tmp_path / "missing", tmp_path / "state")]
    try:
        process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run(
            [sys.executable, "pipeline.py", "stop", "--state-dir", str(tmp_path / "state")],
            cwd=ROOT,
            env=env,
            capture_output=True,
            timeout=120,
        )
    log = plain(process.stdout + process.stderr)
    assert process.returncode == 1
    assert f"error in step ingest: data source '{tmp_path / 'missing'}' does not exist" in log
    assert "Inner task failed: 'ingest'" in log
    assert "Traceback" not in log
    # the run's own verdict, on stderr: the failing step, the end of its log, how to resume
    verdict = plain(process.stderr)
    assert "failed in step ingest" in verdict
    tail = verdict.split("last lines of ingest's log:", 1)[1]
    assert "error in step ingest: data source" in tail
    assert "python pipeline.py run --resume " in tail


def test_unavailable_imagenet_weights_stop_the_run_within_seconds(tmp_path):
    env = {**os.environ, "KERAS_HOME": str(tmp_path / "keras")}
    command = [
        sys.executable,
        "pipeline.py",
        "run",
        "--profile",
        "smoke",
        "--data",
        str(SHARED_DATA),
        "--vgg16-weights",
        "imagenet",
        "--state-dir",
        str(tmp_path / "state"),
    ]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert process.returncode == 2
    assert "VGG16 ImageNet weights are not cached and cannot be downloaded" in process.stderr
    assert "--vgg16-weights none" in process.stderr and "VGG16_WEIGHTS=" in process.stderr
    assert not (tmp_path / "state").exists()  # nothing was started
