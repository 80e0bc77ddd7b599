"""Fault injection (run with `make test-faults` / `pytest -m faults`): slower, real processes.

Each test runs real services (fake-gcs-server, MLflow server) and real steps or whole pipeline
runs on a sample of the shared images, injects one fault, and checks the outcome and the
bucket's contents before and after. Timings are printed (``-s``) for the fault table.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from bloodcell import config, ingest, split, storage
from bloodcell.local.services import LocalServices, free_port
from conftest import ROOT, SMOKE_MODELS, PipelineRun, found, mlflow_login, smoke_args, store_login, train_command

pytestmark = pytest.mark.faults
IMMUTABLE = ("datasets/", "sources/", "splits/", "arrays/")  # content-addressed: written once, never changed


def snapshot(bucket: str) -> dict[str, str]:
    """``{object name: md5}`` of every object in ``bucket``."""
    return {b.name: b.md5_hash for b in storage.client().list_blobs(bucket)}


def assert_readable(bucket: str, names: list[str]) -> None:
    """Every object is whole: JSON parses, arrays and models open."""
    for name in names:
        data = storage.read_bytes(f"gs://{bucket}/{name}")
        if name.endswith(".json"):
            json.loads(data)
        elif name.endswith(".npy"):
            np.load(io.BytesIO(data), allow_pickle=False)
        elif name.endswith(".keras"):
            assert data[:2] == b"PK", name  # a complete zip archive starts and ends with its records
            assert b"PK\x05\x06" in data[-4096:], f"{name} is truncated"


@pytest.fixture()
def local_pipeline(tmp_path, sample_dataset, monkeypatch):
    """Arguments for smoke pipeline runs with their own state and ports; the test reads their bucket."""
    gcs_port, mlflow_port = free_port(), free_port()
    state = tmp_path / "state"
    args = smoke_args(
        sample_dataset, state, "--bucket", "faults", "--verbose", gcs_port=gcs_port, mlflow_port=mlflow_port
    )
    state.mkdir()
    for name, value in {**mlflow_login(state), **store_login(state)}.items():
        monkeypatch.setenv(name, value)
    env = {**os.environ, "BLOODCELL_CACHE": str(tmp_path / "cache")}
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{gcs_port}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{mlflow_port}")
    storage.client.cache_clear()
    yield {"args": args, "env": env, "state": state, "ports": (gcs_port, mlflow_port)}
    subprocess.run(
        [sys.executable, "pipeline.py", "stop", "--force", "--state-dir", str(state)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    storage.client.cache_clear()


def kill_trainer(model: str) -> list[int]:
    """SIGKILL the kfp local task process(es) training ``model`` (component ``train``, ``model_name`` input)."""
    killed = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        executor_input = next((arg for arg in cmdline if arg.startswith(b"{")), b"{}")
        try:
            parameters = json.loads(executor_input)["inputs"]["parameterValues"]
        except (ValueError, KeyError):
            continue
        if b"--function_to_execute" in cmdline and b"train" in cmdline and parameters.get("model_name") == model:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
    return killed


def checkpoint_epoch(uri: str) -> int:
    try:
        return storage.read_json(uri)["epoch"] if storage.exists(uri) else 0
    except storage.StorageError:
        return 0


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


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
    command = train_command(split_uri, "faults", run_id, 25)
    trainer = subprocess.Popen(
        command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.monotonic() + 300

    def epochs_done() -> int:
        return storage.read_json(state_uri)["epoch"] if storage.exists(state_uri) else 0

    while time.monotonic() < deadline and epochs_done() < 2:
        time.sleep(0.2)
    before = snapshot("faults")
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
    after = snapshot("faults")
    for name, md5 in before.items():
        if name.startswith(IMMUTABLE):
            assert after.get(name) == md5, f"{name} changed or vanished during the outage"
    assert_readable("faults", sorted(after))
    print(
        f"object store down {recovered_after:.1f} s; trainer finished all 25 epochs; "
        f"{len(before)} objects before, {len(after)} after, all readable, none of the data changed"
    )


def run_step(*args: str, timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    process = subprocess.run(
        [sys.executable, "-m", "bloodcell.cli", *args],
        cwd=ROOT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return process, time.monotonic() - started


def test_mlflow_down_when_steps_start(own_services, monkeypatch):
    local, split_uri = own_services
    mlflow_service = next(s for s in local.status() if s.name == "mlflow")
    os.killpg(mlflow_service.pid, signal.SIGKILL)
    monkeypatch.setenv("BLOODCELL_MLFLOW_WAIT_S", "5")
    run_id = f"faults-{time.time_ns()}"
    common = ["--bucket", "faults", "--run-id", run_id]
    train, train_seconds = run_step("train", "cnn1", split_uri, *common, "--profile", "smoke", "--set", "cnn1.epochs=3")
    assert train.returncode == 0, train.stderr[-3000:]
    assert "MLflow: connect failed" in train.stdout
    evaluate, evaluate_seconds = run_step("evaluate", *common, "--models", "cnn1")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    report, report_seconds = run_step("report", split_uri, *common, "--profile", "smoke", "--models", "cnn1")
    assert report.returncode == 0, report.stderr[-3000:]
    assert max(train_seconds, evaluate_seconds, report_seconds) < 300  # bounded: nobody waits forever

    run_uri = f"gs://faults/runs/{run_id}"
    info = storage.read_json(f"{run_uri}/models/cnn1/train.json")
    assert info["mlflow_run_id"] is None and info["epochs"] == 3
    assert storage.exists(f"{run_uri}/models/cnn1/model.keras")
    assert storage.read_json(f"{run_uri}/metrics/cnn1.json")["accuracy"] > 0
    summary = storage.read_json(f"{run_uri}/summary.json")
    assert set(summary["tracking_failures"]) == {"train-cnn1", "evaluate", "report"}
    assert summary["tracking_failures"]["train-cnn1"][0]["what"] == "connect"
    page = storage.read_bytes(f"{run_uri}/report/report.html").decode()
    assert "MLflow logging failed" in page and "train-cnn1: connect (not logged" in page
    assert "Registering the best model in MLflow failed: cnn1 has no MLflow model" in page
    print(
        f"MLflow down from the start: train {train_seconds:.0f} s, evaluate {evaluate_seconds:.0f} s, "
        f"report {report_seconds:.0f} s, all exit 0; the report lists the failed logging"
    )


def test_mlflow_outage_during_training_is_backfilled(own_services):
    local, split_uri = own_services
    run_id = f"faults-{time.time_ns()}"
    epochs = 60
    command = train_command(split_uri, "faults", run_id, epochs)
    trainer = subprocess.Popen(
        command, cwd=ROOT, env=os.environ.copy(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    state_uri = f"gs://faults/runs/{run_id}/checkpoints/cnn1/main/state.json"
    wait_until(lambda: checkpoint_epoch(state_uri) >= 2, 300, "two epochs")
    mlflow_service = next(s for s in local.status() if s.name == "mlflow")
    os.killpg(mlflow_service.pid, signal.SIGKILL)
    killed_at_epoch = checkpoint_epoch(state_uri)
    outage_started = time.monotonic()
    time.sleep(5)
    local.start()  # same port, same database
    outage = time.monotonic() - outage_started
    back_at_epoch = checkpoint_epoch(state_uri)
    output, _ = trainer.communicate(timeout=900)
    assert trainer.returncode == 0, output[-3000:]
    assert back_at_epoch > killed_at_epoch + 1, "the outage did not span an epoch; make the run longer"

    info = storage.read_json(f"gs://faults/runs/{run_id}/models/cnn1/train.json")
    assert info["epochs"] == epochs and info["mlflow_model_uri"].startswith("models:/")
    failures = storage.read_json(f"gs://faults/runs/{run_id}/tracking_failures/train-cnn1.json")["failures"]
    per_epoch = next(f for f in failures if f["what"] == "log per-epoch metrics")
    assert per_epoch["recovered"] is True
    history = MlflowClient().get_metric_history(info["mlflow_run_id"], "val_loss")
    assert sorted(m.step for m in history) == list(range(epochs))  # no gap: epochs of the outage backfilled
    assert MlflowClient().get_run(info["mlflow_run_id"]).info.status == "FINISHED"
    print(
        f"MLflow down {outage:.1f} s from epoch {killed_at_epoch} to {back_at_epoch}: training went on, "
        f"{per_epoch['count']} logging attempts failed, all {epochs} epochs backfilled"
    )


def test_killed_trainer_resumes_when_the_run_is_resumed(local_pipeline):
    epochs = 30
    run = PipelineRun(
        [*local_pipeline["args"], "--set", f"cnn1.epochs={epochs}", "--set", "cnn1.early_stopping_patience=1000"],
        local_pipeline["env"],
    )
    run_id = run.wait_for(r"^run (\S+): profile smoke").group(1)
    state_uri = f"gs://faults/runs/{run_id}/checkpoints/cnn1/main/state.json"
    wait_until(lambda: checkpoint_epoch(state_uri) >= 3, 600, "three epochs of cnn1")
    before = snapshot("faults")
    assert kill_trainer("cnn1")
    killed_at = time.monotonic()
    returncode, output = run.finish()
    epoch_at_kill = checkpoint_epoch(state_uri)
    assert returncode == 1, output[-3000:]
    assert "failed in step train-cnn1" in output
    assert f"python pipeline.py run --resume {run_id}" in output
    assert re.search(r"last lines of train-cnn1's log:\n\s+\S", output)
    assert_readable("faults", sorted(snapshot("faults")))

    resume = subprocess.run(
        [
            sys.executable,
            "pipeline.py",
            "run",
            "--resume",
            run_id,
            *local_pipeline["args"][local_pipeline["args"].index("--state-dir") :],
        ],
        cwd=ROOT,
        env=local_pipeline["env"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    recovered = time.monotonic() - killed_at
    log = resume.stdout + resume.stderr
    assert resume.returncode == 0, log[-3000:]
    assert "cache hit: these files were ingested before" in log
    assert "cache hit: split" in log
    assert f"resuming from gs://faults/runs/{run_id}/checkpoints/cnn1/main at epoch {epoch_at_kill + 1}/{epochs}" in log
    history = storage.read_json(f"gs://faults/runs/{run_id}/models/cnn1/history.json")
    assert len(history["loss"]) == epochs  # as many epochs as an uninterrupted run
    assert storage.read_json(f"gs://faults/runs/{run_id}/summary.json")["run_id"] == run_id
    after = snapshot("faults")
    for name, md5 in before.items():
        if name.startswith(IMMUTABLE):
            assert after[name] == md5, f"{name} was rewritten"
    print(
        f"trainer killed after epoch {epoch_at_kill}; resumed run finished {recovered:.0f} s after the kill "
        f"with {epochs} epochs; ingest and split were cache hits"
    )


def test_two_runs_at_once_both_complete(local_pipeline):
    runs = [PipelineRun(local_pipeline["args"], local_pipeline["env"]) for _ in range(2)]
    outcomes = [run.finish() for run in runs]
    for returncode, output in outcomes:
        assert returncode == 0, output[-3000:]
    run_ids = [found(r"^run (\S+): profile smoke", output, re.M).group(1) for _, output in outcomes]
    assert run_ids[0] != run_ids[1]
    names = snapshot("faults")
    for run_id in run_ids:
        assert storage.read_json(f"gs://faults/runs/{run_id}/summary.json")["run_id"] == run_id
        for model in SMOKE_MODELS:
            info = storage.read_json(f"gs://faults/runs/{run_id}/models/{model}/train.json")
            assert info["mlflow_run_id"] and info["model_uri"].startswith(f"gs://faults/runs/{run_id}/")
    per_run = [n for n in names if n.startswith("runs/")]
    assert all(n.split("/")[1] in run_ids for n in per_run)  # every run object sits under its own run
    assert_readable("faults", sorted(names))
    experiment = mlflow.get_experiment_by_name(config.DEFAULT_EXPERIMENT)
    assert experiment is not None
    parents = MlflowClient().search_runs([experiment.experiment_id], "tags.`bloodcell.role` = 'pipeline'")
    assert sorted(p.data.tags["bloodcell.pipeline_run_id"] for p in parents) == sorted(run_ids)
    for parent in parents:
        children = MlflowClient().search_runs(
            [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        models = sorted(c.data.tags["bloodcell.model"] for c in children)  # the trained ones and their combination
        assert models == sorted([*SMOKE_MODELS, config.ENSEMBLE_NAME]) and parent.info.status == "FINISHED"
    print(f"two runs at once: {run_ids} both exit 0, two parent runs with four model runs each")


def test_stop_is_refused_during_a_run_and_cleans_up_after_a_crash(local_pipeline):
    run = PipelineRun(
        [*local_pipeline["args"], "--set", "cnn1.epochs=500", "--set", "cnn1.early_stopping_patience=1000"],
        local_pipeline["env"],
    )
    run_id = run.wait_for(r"^run (\S+): profile smoke").group(1)
    run.wait_for(r"training cnn1")
    state = local_pipeline["state"]
    stop = [sys.executable, "pipeline.py", "stop", "--state-dir", str(state)]
    refused = subprocess.run(stop, cwd=ROOT, env=local_pipeline["env"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and f"run(s) in progress: {run_id}" in refused.stderr
    second = subprocess.run(
        [sys.executable, "pipeline.py", "run", "--resume", run_id, "--state-dir", str(state)],
        cwd=ROOT,
        env=local_pipeline["env"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert second.returncode == 2 and f"run {run_id} is already in progress" in second.stderr

    os.killpg(run.process.pid, signal.SIGKILL)  # the runner and its task; services run in their own sessions
    run.finish()
    services = json.loads((state / "services.json").read_text())
    assert all(Path(f"/proc/{s['pid']}").exists() for s in services)
    started = time.monotonic()
    stopped = subprocess.run(stop, cwd=ROOT, env=local_pipeline["env"], capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0, stopped.stderr
    assert f"removed the stale record of run {run_id}" in stopped.stdout
    for service in services:
        assert f"{service['name']} (pid {service['pid']})" in stopped.stdout
        assert (
            not Path(f"/proc/{service['pid']}").exists()
            or "zombie" in Path(f"/proc/{service['pid']}/status").read_text().lower()
        )
    assert not list((state / "active").glob("*.json"))
    print(
        f"stop refused during run {run_id}; after SIGKILL of the runner, stop cleaned the stale record and "
        f"ended {len(services)} services in {time.monotonic() - started:.1f} s"
    )


def mount_small_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here (needs root): {mounted.stderr.strip()}")


def test_disk_full_in_the_state_directory(local_pipeline, monkeypatch):
    state = local_pipeline["state"]
    mount_small_tmpfs(state, "40m")
    for name, value in {**mlflow_login(state), **store_login(state)}.items():  # the mount hid the first ones
        monkeypatch.setenv(name, value)
    storage.client.cache_clear()
    try:
        run = PipelineRun(local_pipeline["args"], local_pipeline["env"])
        run_id = run.wait_for(r"^run (\S+): profile smoke").group(1)
        returncode, output = run.finish()
        assert returncode == 1, output[-3000:]
        failed_step = found(r"failed in step (\S+)", output).group(1)
        error_line = re.search(r"error in step \w+: no space left on device.*", output)
        assert error_line, output[-3000:]
        assert f"{state / 'gcs'} (" in output and "MiB free" in output  # names the full folder
        assert f"python pipeline.py run --resume {run_id}" in output
        before = snapshot("faults")
        assert_readable("faults", sorted(before))  # nothing stored is truncated or damaged

        subprocess.run(["mount", "-o", "remount,size=1g", str(state)], check=True)
        started = time.monotonic()
        resume = subprocess.run(
            [
                sys.executable,
                "pipeline.py",
                "run",
                "--resume",
                run_id,
                *local_pipeline["args"][local_pipeline["args"].index("--state-dir") :],
            ],
            cwd=ROOT,
            env=local_pipeline["env"],
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert resume.returncode == 0, (resume.stdout + resume.stderr)[-3000:]
        after = snapshot("faults")
        for name, md5 in before.items():
            if name.startswith(IMMUTABLE) or "/models/" in name:
                assert after[name] == md5, f"{name} changed"
        assert_readable("faults", sorted(after))
        print(
            f"state directory full (40 MiB) in step {failed_step}: clear error; {len(before)} objects intact; "
            f"after freeing space the resumed run completed in {time.monotonic() - started:.0f} s\n"
            f"  {error_line.group(0)}"
        )
    finally:
        subprocess.run(
            [sys.executable, "pipeline.py", "stop", "--force", "--state-dir", str(state)],
            cwd=ROOT,
            env=local_pipeline["env"],
            capture_output=True,
            timeout=120,
        )
        subprocess.run(["umount", "-l", str(state)], capture_output=True)
