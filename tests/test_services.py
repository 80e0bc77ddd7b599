"""Local services: concurrent starts share one set of processes; stop ends only recorded ones; the object
store answers only requests with its token, no web origin and its own host; MLflow needs a login, the
reader cannot write, and the server runs without MLflow's job workers."""

import io
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
from google.resumable_media.common import InvalidResponse
from google.resumable_media.requests import ResumableUpload
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from bloodcell import config, storage
from bloodcell.errors import BloodcellError
from bloodcell.local.services import (
    EMULATOR_PORT_INSIDE,
    SETUP,
    LocalServices,
    command_line,
    free_port,
    private_state_dir,
    process_start_time,
)


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
        token = storage.token_header(local.store_token())
        response = requests.post(
            upload, params={"uploadType": "media", "name": escape}, data=b"x", headers=token, timeout=30
        )
        assert not response.ok and response.status_code != 403 and not target.exists()  # the emulator refused
        kept = requests.post(
            upload, params={"uploadType": "media", "name": "a/kept.txt"}, data=b"k", headers=token, timeout=30
        )
        assert kept.ok
    finally:
        local.stop()
    restarted = LocalServices(state, "bucket", free_port(), free_port())
    try:
        url = restarted.start()["STORAGE_EMULATOR_HOST"]
        kept_again = requests.get(
            f"{url}/storage/v1/b/bucket/o/a%2Fkept.txt",
            params={"alt": "media"},
            headers=storage.token_header(restarted.store_token()),
            timeout=30,
        )
        assert kept_again.content == b"k"
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


def test_the_object_store_answers_only_requests_with_its_token_no_origin_and_its_own_host(services):
    """What a web page could send (cross-origin reads, a form's simple POST upload, the emulator's wipe, a
    DNS-rebound host) is refused; our client's requests pass. The emulator's own port is not on this
    machine's loopback."""
    url, bucket = services["env"]["STORAGE_EMULATOR_HOST"], services["bucket"]
    token = storage.token_header(services["env"][storage.STORE_TOKEN_ENV])
    listing = f"{url}/storage/v1/b/{bucket}/o"
    evil = {"Origin": "https://evil.example"}
    storage.upload_bytes(b"precious", f"gs://{bucket}/front/precious.txt")
    refused = {
        "a page's read": requests.get(listing, headers=evil, timeout=10),
        "a page's read with the token": requests.get(listing, headers={**evil, **token}, timeout=10),
        "no token": requests.get(listing, timeout=10),
        "a wrong token": requests.get(listing, headers={"Authorization": "Bearer nope"}, timeout=10),
        "another host": requests.get(listing, headers={**token, "Host": "evil.example"}, timeout=10),
        "a form's upload": requests.post(
            f"{url}/upload/storage/v1/b/{bucket}/o",
            params={"uploadType": "media", "name": "front/planted.txt"},
            headers={**evil, "Content-Type": "text/plain"},
            data=b"planted",
            timeout=10,
        ),
        "the wipe": requests.post(f"{url}/_internal/delete_all", headers=token, timeout=10),
    }
    for what, response in refused.items():
        assert response.status_code == 403, what
        assert "access-control-allow-origin" not in {k.lower() for k in response.headers}, what
        assert "bloodcell's local object store" in response.json()["error"]["message"], what
    assert requests.get(listing, headers=token, timeout=10).ok
    assert not storage.exists(f"gs://{bucket}/front/planted.txt")
    assert storage.blob(f"gs://{bucket}/front/precious.txt").download_as_bytes() == b"precious"

    gcs = next(s for s in services["services"].status() if s.name == "gcs")
    if "in a network namespace of its own" not in Path(gcs.log).read_text():
        assert not os.environ.get("CI"), "CI machines allow user namespaces: the emulator must be isolated"
        pytest.skip("this system refuses unprivileged user namespaces: the emulator is on loopback (warned)")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{EMULATOR_PORT_INSIDE}/storage/v1/b", timeout=5)


def test_resumable_uploads_in_many_chunks_reach_the_store_through_the_front(services, tmp_path):
    """Each chunk goes to the session URL the emulator returned (the front's own address) with the token."""
    data = os.urandom(3 * 256 * 1024 + 17)
    blob = storage.blob(f"gs://{services['bucket']}/front/chunked.bin")
    blob.chunk_size = 256 * 1024
    path = tmp_path / "chunked.bin"
    path.write_bytes(data)
    blob.upload_from_filename(str(path))
    assert storage.blob(f"gs://{services['bucket']}/front/chunked.bin").download_as_bytes() == data


def test_the_recovery_of_a_failed_chunk_reaches_the_store_with_the_token(services):
    """The storage client's recovery request (after a chunk fails) carries no extra headers of ours: the token
    must come from the client's credentials, or the front refuses the recovery and the upload is lost."""
    url = services["env"]["STORAGE_EMULATOR_HOST"]
    upload_url = f"{url}/upload/storage/v1/b/{services['bucket']}/o?uploadType=resumable"

    def recovery_status(transport: requests.Session) -> int:
        upload = ResumableUpload(upload_url, 256 * 1024)
        client_transport = storage.new_client()._http
        upload.initiate(client_transport, io.BytesIO(os.urandom(600_000)), {"name": "front/r.bin"}, "text/plain")
        upload.transmit_next_chunk(client_transport)
        upload._make_invalid()  # the state the client is in after a chunk's request failed
        try:
            upload.recover(transport)
        except InvalidResponse as exc:  # fake-gcs answers GCS's 308 with 200; the front's refusal is 403
            return exc.response.status_code
        return 308

    assert recovery_status(requests.Session()) == 403  # the recovery as a token in extra_headers would send it
    assert recovery_status(storage.new_client()._http) != 403


def test_mlflow_answers_only_its_own_host(services):
    url = services["env"]["MLFLOW_TRACKING_URI"]
    rebound = requests.get(f"{url}/api/2.0/mlflow/experiments/search", headers={"Host": "evil.example"}, timeout=10)
    assert rebound.status_code == 403
    assert requests.get(f"{url}/api/2.0/mlflow/experiments/search", timeout=10).status_code == 401  # the login


def test_the_reader_can_neither_take_our_registered_model_nor_write_into_our_experiment(tmp_path, monkeypatch):
    """The admin owns the pipeline's names from the start; a name the reader took under an older setup is
    taken back when the services start again."""
    local = LocalServices(tmp_path, "bucket", free_port(), free_port())
    url = local.start()["MLFLOW_TRACKING_URI"]
    try:
        users = json.loads((tmp_path / "mlflow-users.json").read_text())
        reader = _as(url, "reader", users["reader"], monkeypatch)
        with pytest.raises(MlflowException, match="RESOURCE_ALREADY_EXISTS"):
            reader.create_registered_model(config.REGISTERED_MODEL)
        experiment = reader.get_experiment_by_name(config.DEFAULT_EXPERIMENT)
        assert experiment is not None
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            reader.create_run(experiment.experiment_id)
        _assert_only_the_pipeline_registers(url, users, experiment.experiment_id, monkeypatch)

        admin = _as(url, "admin", users["admin"], monkeypatch)
        admin.delete_registered_model(config.REGISTERED_MODEL)
        _as(url, "reader", users["reader"], monkeypatch).create_registered_model(config.REGISTERED_MODEL)
        local.stop()
        local.start()
        _assert_only_the_pipeline_registers(url, users, experiment.experiment_id, monkeypatch)
    finally:
        local.stop()


def _assert_only_the_pipeline_registers(url: str, users: dict, experiment_id: str, monkeypatch) -> None:
    pipeline = _as(url, "pipeline", users["pipeline"], monkeypatch)
    run = pipeline.create_run(experiment_id)
    version = pipeline.create_model_version(
        config.REGISTERED_MODEL, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id
    )
    pipeline.set_registered_model_alias(config.REGISTERED_MODEL, "champion", version.version)
    reader = _as(url, "reader", users["reader"], monkeypatch)
    own_run = reader.create_run(reader.create_experiment(f"readers-{uuid.uuid4().hex[:6]}"))  # MLflow's rule
    refused = [
        lambda: reader.create_model_version(
            config.REGISTERED_MODEL, f"runs:/{own_run.info.run_id}/model", run_id=own_run.info.run_id
        ),
        lambda: reader.set_registered_model_alias(config.REGISTERED_MODEL, "champion", "1"),
        lambda: reader.delete_registered_model_alias(config.REGISTERED_MODEL, "champion"),
        lambda: reader.create_run(experiment_id),
    ]
    for call in refused:
        with pytest.raises(MlflowException, match="PERMISSION_DENIED|403"):
            call()
    assert reader.get_model_version_by_alias(config.REGISTERED_MODEL, "champion").version == version.version


def test_the_state_directory_is_private_and_one_that_others_could_plant_is_refused(tmp_path):
    fresh = tmp_path / "fresh"
    private_state_dir(fresh)
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    older = tmp_path / "older"
    older.mkdir(mode=0o755)
    older.chmod(0o755)
    private_state_dir(older)
    assert stat.S_IMODE(older.stat().st_mode) == 0o750  # others lose access; the user's group keeps entry
    private_state_dir(older, group=os.getgid())
    assert stat.S_IMODE(older.stat().st_mode) == 0o750 and older.stat().st_gid == os.getgid()

    planted = tmp_path / "planted"
    planted.mkdir()
    planted.chmod(0o777)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)  # fake-gcs-server"])
    try:
        record = {"name": "gcs", "pid": victim.pid, "port": 1, "url": "u", "log": "l", "marker": "fake-gcs-server"}
        (planted / "services.json").write_text(json.dumps([record]))
        with pytest.raises(BloodcellError, match=r"is writable by other users \(mode drwxrwxrwx\).*chmod go-w"):
            LocalServices(planted, "b").stop()
        assert victim.poll() is None  # never signalled
        if os.getuid() == 0:  # only root can give a folder to another user
            planted.chmod(0o700)
            os.chown(planted, 4242, -1)
            with pytest.raises(BloodcellError, match=r"belongs to another user \(uid 4242\)"):
                LocalServices(planted, "b").stop()
            assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def test_services_an_older_setup_started_are_restarted_not_reused(tmp_path):
    local = LocalServices(tmp_path, "bucket", free_port(), free_port())
    try:
        local.start()
        assert stat.S_IMODE(tmp_path.stat().st_mode) == 0o700
        for secret in ("mlflow-users.json", "store-token"):
            assert stat.S_IMODE((tmp_path / secret).stat().st_mode) == 0o600
        before = {s.name: s.pid for s in local.status()}
        records = json.loads((tmp_path / "services.json").read_text())
        assert {r["setup"] for r in records} == {SETUP}
        (tmp_path / "services.json").write_text(
            json.dumps([{**r, "setup": SETUP - 1} if r["name"] == "gcs" else r for r in records])
        )
        local.start()
        after = {s.name: s.pid for s in local.status()}
        assert after["mlflow"] == before["mlflow"] and after["gcs"] != before["gcs"]
        assert command_line(before["gcs"]) is None  # the old one was stopped
    finally:
        local.stop()
