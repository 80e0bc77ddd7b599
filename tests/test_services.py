"""Local services: concurrent starts share one set of processes; stop ends only recorded ones; MLflow
needs a login, the reader cannot write, and the server runs without MLflow's job workers."""

import json
import os
import stat
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bloodcell.services import LocalServices, command_line, free_port, process_start_time


def test_concurrent_starts_share_the_services_and_stop_cleans_stale_records(tmp_path):
    ports = (free_port(), free_port())
    starters = [LocalServices(tmp_path, "bucket", *ports) for _ in range(2)]
    try:
        with ThreadPoolExecutor(2) as pool:
            first, second = pool.map(lambda s: s.start(), starters)
        assert first == second
        recorded = json.loads((tmp_path / "services.json").read_text())
        assert sorted(s["name"] for s in recorded) == ["gcs", "mlflow"]
    finally:
        stopped = starters[0].stop()
    assert len(stopped) == 2
    (tmp_path / "services.json").write_text(json.dumps([{**recorded[0], "pid": 999999}]))
    assert starters[1].stop() == []  # a stale pid is dropped, never signalled
    assert not (tmp_path / "services.json").exists()


def _as(url: str, user: str, password: str, monkeypatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    return MlflowClient(url)


def test_mlflow_needs_a_login_and_the_reader_cannot_write(services, monkeypatch):
    url = services["env"]["MLFLOW_TRACKING_URI"]
    assert requests.get(f"{url}/api/2.0/mlflow/experiments/search", params={"max_results": 5}).status_code == 401
    assert requests.get(f"{url}/health").ok  # probes need no login
    users = json.loads((services["state"] / "mlflow-users.json").read_text())
    assert stat.S_IMODE((services["state"] / "mlflow-users.json").stat().st_mode) == 0o600

    pipeline = _as(url, "pipeline", users["pipeline"], monkeypatch)
    experiment_id = pipeline.create_experiment(f"auth-{uuid.uuid4().hex[:6]}")
    run = pipeline.create_run(experiment_id)
    pipeline.log_metric(run.info.run_id, "accuracy", 0.9)
    model_name = f"auth-model-{uuid.uuid4().hex[:6]}"
    pipeline.create_registered_model(model_name)
    version = pipeline.create_model_version(model_name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    pipeline.set_registered_model_alias(model_name, "champion", version.version)

    reader = _as(url, "reader", users["reader"], monkeypatch)
    assert reader.get_metric_history(run.info.run_id, "accuracy")[0].value == 0.9  # what `compare` reads
    assert reader.get_model_version_by_alias(model_name, "champion").version == version.version
    refused = [
        lambda: reader.create_model_version(model_name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id),
        lambda: reader.set_registered_model_alias(model_name, "champion", version.version),
        lambda: reader.log_metric(run.info.run_id, "accuracy", 1.0),
    ]
    for call in refused:
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            call()

    with pytest.raises(MlflowException, match="401|[Uu]nauthorized|credentials"):
        _as(url, "pipeline", "wrong-password", monkeypatch).get_experiment(experiment_id)


def test_mlflow_server_runs_without_its_job_workers(services):
    """MLflow's default job runner adds ~7 processes of ~260 MB each; ours is the server and one worker."""
    mlflow_service = next(s for s in services["services"].status() if s.name == "mlflow")
    tree = _process_tree(mlflow_service.pid)
    commands = [command_line(pid) or "" for pid in tree]
    assert len(tree) <= 2, commands
    assert not any("huey" in c for c in commands), commands


def _process_tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *(p for child in children for p in _process_tree(int(child)))]


def test_object_store_cannot_write_outside_its_folder_and_keeps_objects_across_restarts(tmp_path):
    """fake-gcs-server stores an object named ../../x outside its folder; confined, the upload fails."""
    target = tmp_path / "outside" / "x.zip"
    target.parent.mkdir()
    state = tmp_path / "state"
    local = LocalServices(state, "bucket", free_port(), free_port())
    try:
        url = local.start()["STORAGE_EMULATOR_HOST"]
        (gcs,) = [s for s in local.status() if s.name == "gcs"]
        if not gcs.confined:
            assert not os.environ.get("CI"), "CI machines have Landlock: the object store must be confined"
            pytest.skip("no Landlock on this system: the object store runs unconfined (warned at start)")
        escape = "../" * (len((state / "gcs" / "bucket").parts) + 2) + str(target).lstrip("/")
        upload = f"{url}/upload/storage/v1/b/bucket/o"
        response = requests.post(upload, params={"uploadType": "media", "name": escape}, data=b"x", timeout=30)
        assert not response.ok and not target.exists()
        kept = requests.post(upload, params={"uploadType": "media", "name": "a/kept.txt"}, data=b"k", timeout=30)
        assert kept.ok
    finally:
        local.stop()
    restarted = LocalServices(state, "bucket", free_port(), free_port())
    try:
        url = restarted.start()["STORAGE_EMULATOR_HOST"]
        assert (
            requests.get(f"{url}/storage/v1/b/bucket/o/a%2Fkept.txt", params={"alt": "media"}, timeout=30).content
            == b"k"
        )
    finally:
        restarted.stop()


def test_a_recorded_service_whose_pid_now_belongs_to_a_later_process_is_left_alone(tmp_path):
    """Same pid and command line, another start time: a reused pid, never signalled."""
    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)  # fake-gcs-server"], start_new_session=True
    )
    try:
        started = process_start_time(sleeper.pid)
        assert started is not None
        record = {"name": "gcs", "pid": sleeper.pid, "port": 1, "url": "", "log": "", "marker": "fake-gcs-server"}
        (tmp_path / "services.json").write_text(json.dumps([{**record, "start_time": started + 1}]))
        assert LocalServices(tmp_path, "bucket").stop() == []
        assert sleeper.poll() is None
        (tmp_path / "services.json").write_text(json.dumps([{**record, "start_time": started}]))
        assert LocalServices(tmp_path, "bucket").stop() == [f"gcs (pid {sleeper.pid})"]
        assert sleeper.wait(timeout=15) is not None
    finally:
        sleeper.kill()
        sleeper.wait()
