"""Every step in its real container (``pytest -m containers``; `make test-containers`).

Needs a Docker engine and the pipeline image (`make image`; `BLOODCELL_TEST_IMAGE` names another).
Checks the image itself, the compiled pipeline's command for one component run in it, and the smoke
pipeline with ``--runner docker``: seven containers of that image, as uid 10001 on a read-only root
filesystem, with the same results in the bucket and MLflow as a run of local processes; then the
bad cases, a failing step, a killed trainer resumed, and ``stop`` after a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bloodcell import config, storage
from bloodcell.local import containers
from conftest import ROOT, SMOKE_MODELS, UNDECODABLE, PipelineRun, mlflow_login, plain, smoke_args, store_login

pytestmark = pytest.mark.containers
IMAGE = os.environ.get("BLOODCELL_TEST_IMAGE") or config.DEFAULT_IMAGE
TASKS = ["ingest", "split", "train-cnn1", "train-cnn2", "train-vgg16", "evaluate", "report"]


@pytest.fixture(scope="module")
def engine():
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except docker.errors.DockerException as exc:
        pytest.fail(f"these tests need a Docker engine ({exc}); README 'Run in containers' says how to start one")
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"image {IMAGE} is missing: build it with `make image`")
    yield client
    client.close()


def our_containers(client, state: Path) -> list:
    return client.containers.list(all=True, filters={"label": f"{containers.LABEL_STATE}={state.resolve()}"})


def pipeline(*args: str, env: dict | None = None, timeout: float = 900) -> tuple[subprocess.CompletedProcess, str]:
    process = subprocess.run(
        [sys.executable, "pipeline.py", *args],
        cwd=ROOT,
        env=env or os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return process, plain(process.stdout + process.stderr)


# --- the image -------------------------------------------------------------------------------


def test_image_runs_its_commands_as_its_user_on_a_read_only_root(engine):
    isolation = containers.isolation(containers.container_gid())
    usage = engine.containers.run(IMAGE, ["bloodcell", "--help"], remove=True, **isolation).decode()
    assert usage.startswith("usage: bloodcell")
    probe = (
        "import os, bloodcell, kfp, mlflow, keras, tensorflow; "
        "print(os.getuid(), bloodcell.__version__, keras.backend.backend(), tensorflow.__version__)"
    )
    facts = engine.containers.run(IMAGE, ["python", "-c", probe], remove=True, **isolation).decode().split()
    assert facts[:3] == ["10001", "0.1.0", "tensorflow"], facts
    import docker

    with pytest.raises(docker.errors.ContainerError, match="Read-only file system"):
        engine.containers.run(IMAGE, ["touch", "/opt/venv/x"], remove=True, **isolation)
    limited = engine.containers.create(IMAGE, ["true"], **isolation)
    try:  # a runaway step stops at its own memory and process limits
        host = limited.attrs["HostConfig"]
        assert host["Memory"] == host["MemorySwap"] == docker.utils.parse_bytes(config.CONTAINER_MEMORY)
        assert host["PidsLimit"] == config.CONTAINER_PIDS
    finally:
        limited.remove()


def test_compiled_component_command_runs_in_the_image(engine, services, sample_dataset, tmp_path):
    """exec-ingest's command and args from pipeline.yaml, executor input filled in as a cluster launcher would."""
    from docker.types import Mount

    compiled = tmp_path / "pipeline.yaml"
    subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(compiled)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        env={**os.environ, "BLOODCELL_IMAGE": IMAGE},
    )
    spec = next(yaml.safe_load_all(compiled.read_text()))
    container = spec["deploymentSpec"]["executors"]["exec-ingest"]["container"]
    assert container["image"] == IMAGE
    outputs = tmp_path / "outputs"
    containers.shared_folder(outputs, containers.container_gid())
    executor_input = {
        "inputs": {
            "parameterValues": {"source": str(sample_dataset), "bucket": services["bucket"], "vgg16_weights": "none"}
        },
        "outputs": {
            "parameters": {"Output": {"outputFile": str(outputs / "Output")}},
            "artifacts": {
                "stats": {
                    "artifacts": [
                        {
                            "name": "stats",
                            "type": {"schemaTitle": "system.Metrics"},
                            "uri": str(outputs / "stats"),
                            "metadata": {},
                        }
                    ]
                }
            },
            "outputFile": str(outputs / "executor_output.json"),
        },
    }
    args = [json.dumps(executor_input) if a == "{{$}}" else a for a in container["args"]]
    passed = (*config.STEP_ENV, *config.STORE_CREDENTIAL_ENV)  # as the local runner gives a container
    env = {name: services["env"][name] for name in passed if name in services["env"]}
    env |= {variable["name"]: variable["value"] for variable in container["env"]}  # the image, "cluster pod"
    mounts = [
        Mount(str(sample_dataset), str(sample_dataset), type="bind", read_only=True),
        Mount(str(outputs), str(outputs), type="bind"),
    ]
    log = engine.containers.run(
        IMAGE,
        [*container["command"], *args],
        remove=True,
        environment=env,
        mounts=mounts,
        **containers.isolation(containers.container_gid()),
    ).decode()
    assert f"step ingest: uid 10001, in a cluster pod (read-only root filesystem), image {IMAGE}" in log
    result = json.loads((outputs / "executor_output.json").read_text())
    assert result["parameterValues"]["Output"].startswith(f"gs://{services['bucket']}/datasets/")
    stats = result["artifacts"]["stats"]["artifacts"][0]["metadata"]
    assert stats["images"] == 240 and stats["quarantined"] == 1
    assert stats["runtime"]["uid"] == 10001 and stats["runtime"]["read_only_root"] is True


def test_run_container_returns_the_real_exit_status(engine, tmp_path):
    """kfp's own runner reported some fast failing containers as exit 0 (kubeflow/pipelines#13332)."""
    labels = {containers.LABEL_STATE: str(tmp_path)}
    statuses = [containers.run_container(engine, IMAGE, ["sh", "-c", "exit 3"], {}, labels=labels) for _ in range(10)]
    assert statuses == [3] * 10
    assert containers.run_container(engine, IMAGE, ["true"], {}, labels=labels) == 0
    assert our_containers(engine, tmp_path) == []


# --- the pipeline in containers ----------------------------------------------------------------


class ContainerEvents:
    """Docker's events for the containers of one state directory, collected in the background."""

    def __init__(self, client, state: Path):
        self.events: list[dict] = []
        self._stream = client.events(
            decode=True,
            since=int(time.time()) - 1,
            filters={"type": "container", "label": f"{containers.LABEL_STATE}={state.resolve()}"},
        )
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        try:
            for event in self._stream:
                self.events.append(event)
        except Exception:  # the stream is closed by stop()
            pass

    def stop(self) -> list[dict]:
        time.sleep(1)
        self._stream.close()
        self._thread.join(timeout=10)
        return self.events


def executor_outputs(pipeline_root: Path) -> dict[str, dict]:
    """``{task: executor_output.json}`` of the one kfp run under ``pipeline_root``."""
    return {path.parent.name: json.loads(path.read_text()) for path in pipeline_root.glob("*/executor_output.json")}


@pytest.fixture(scope="module")
def runs(engine, sample_dataset, tmp_path_factory):
    """The smoke pipeline in containers, then again as local processes with the same services."""
    state = tmp_path_factory.mktemp("containers-state")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for name in ("STORAGE_EMULATOR_HOST", storage.STORE_TOKEN_ENV, "MLFLOW_TRACKING_URI", "BLOODCELL_CACHE"):
        env.pop(name, None)
    common = smoke_args(sample_dataset, state, "--verbose")
    events = ContainerEvents(engine, state)
    started = time.monotonic()
    docker_run, docker_log = pipeline(
        "run", *common, "--runner", "docker", "--image", IMAGE, "--summary", str(state / "docker.json"), env=env
    )
    docker_seconds = time.monotonic() - started
    seen = events.stop()
    roots = sorted((state / "kfp").iterdir())
    started = time.monotonic()
    local_run, local_log = pipeline("run", *common, "--summary", str(state / "local.json"), env=env)
    local_seconds = time.monotonic() - started
    print(
        f"smoke pipeline: {docker_seconds:.0f} s in containers, {local_seconds:.0f} s as local processes "
        "(services already running for the second)"
    )
    summaries = {
        key: json.loads((state / f"{key}.json").read_text()) if (state / f"{key}.json").exists() else {}
        for key in ("docker", "local")
    }
    yield {
        "state": state,
        "env": env,
        "events": seen,
        "docker": (docker_run, docker_log),
        "local": (local_run, local_log),
        "pipeline_root": roots[0] if len(roots) == 1 else None,
        "summaries": summaries,
    }
    pipeline("stop", "--state-dir", str(state), env=env, timeout=120)


def test_every_task_runs_in_a_container_of_the_image(runs, engine):
    process, log = runs["docker"]
    assert process.returncode == 0, log[-5000:]
    assert f"steps in containers of {IMAGE}" in log
    for task in TASKS:
        assert f"Task '{task}' finished with status SUCCESS" in log
    assert f"quarantined {UNDECODABLE}: hidden file" in log
    image_id = engine.images.get(IMAGE).id
    summary = runs["summaries"]["docker"]
    assert summary["runner"] == "docker" and summary["image"] == IMAGE and summary["image_id"] == image_id

    ours = [e for e in runs["events"] if e["Actor"]["Attributes"].get(containers.LABEL_RUN) == summary["run_id"]]
    created = {e["id"]: e["Actor"]["Attributes"] for e in ours if e.get("Action") == "create"}
    died = {e["id"]: e["Actor"]["Attributes"].get("exitCode") for e in ours if e.get("Action") == "die"}
    assert len(created) == len(TASKS), runs["events"]
    assert {attributes["image"] for attributes in created.values()} == {IMAGE}
    assert all(died.get(container) == "0" for container in created)
    assert our_containers(engine, runs["state"]) == []  # each removed after its task

    outputs = executor_outputs(runs["pipeline_root"])
    assert sorted(outputs) == sorted(TASKS)
    for task, output in outputs.items():
        metadata = [a["metadata"] for artifacts in output["artifacts"].values() for a in artifacts["artifacts"]]
        facts = next(m["runtime"] for m in metadata if "runtime" in m)
        assert facts["uid"] == containers.IMAGE_UID, task
        assert facts["container"] is True and facts["read_only_root"] is True, task
        assert facts["image"] == IMAGE and facts["image_id"] == image_id, task
        assert facts["started_as"] == "container", task


def test_containers_give_the_results_of_local_processes(runs, monkeypatch):
    from mlflow.tracking import MlflowClient

    for key in ("docker", "local"):
        assert runs[key][0].returncode == 0, runs[key][1][-5000:]
    docker, local = runs["summaries"]["docker"], runs["summaries"]["local"]
    assert local["runner"] == "subprocess" and "image_id" not in local
    assert set(docker) == set(local) | {"image", "image_id"}
    assert set(docker["models"]) == set(local["models"]) == {*SMOKE_MODELS, config.ENSEMBLE_NAME}

    state = runs["state"]  # others get nothing; the containers' group enters the state and writes its shared folders
    assert stat.S_IMODE(state.stat().st_mode) == 0o750 and state.stat().st_gid == containers.container_gid()
    for shared in ("kfp", "container-cache"):
        assert stat.S_IMODE((state / shared).stat().st_mode) == 0o2770
    services = json.loads((state / "services.json").read_text())
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", next(s["url"] for s in services if s["name"] == "gcs"))
    for name, value in store_login(runs["state"]).items():
        monkeypatch.setenv(name, value)
    bucket = storage.new_client().bucket(docker["bucket"])

    def run_objects(run_id: str) -> set[str]:
        return {
            b.name.replace(run_id, "RUN")
            for b in bucket.list_blobs(prefix=f"runs/{run_id}/")
            if "/checkpoints/" not in b.name
        }

    assert run_objects(docker["run_id"]) == run_objects(local["run_id"])
    for model in SMOKE_MODELS:  # the same data, split and training settings reached both
        trained = [
            json.loads(bucket.blob(f"runs/{s['run_id']}/models/{model}/train.json").download_as_text())
            for s in (docker, local)
        ]
        assert trained[0]["arrays_uri"] == trained[1]["arrays_uri"]
        assert trained[0]["epochs"] == trained[1]["epochs"]
    assert "cache hit: these files were ingested before" in runs["local"][1]

    for name, value in mlflow_login(runs["state"], "reader").items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(docker["mlflow_tracking_uri"])
    children = {}
    for summary in (docker, local):
        parent = client.get_run(summary["mlflow_parent_run_id"])
        assert parent.info.status == "FINISHED"
        nested = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        children[summary["runner"]] = {r.data.tags["bloodcell.model"]: r for r in nested}
    for model in SMOKE_MODELS:
        in_container, in_process = children["docker"][model], children["subprocess"][model]
        assert set(in_container.data.metrics) == set(in_process.data.metrics)
        ignore = {"input_pipeline"}
        assert {k: v for k, v in in_container.data.params.items() if k not in ignore} == {
            k: v for k, v in in_process.data.params.items() if k not in ignore
        }


# --- what goes wrong -------------------------------------------------------------------------------


def bad_case(tmp_path, data: Path, extra: list[str], env: dict | None = None) -> tuple[int, str, float]:
    state = tmp_path / "state"
    started = time.monotonic()
    process, _ = pipeline("run", *smoke_args(data, state, "--runner", "docker", *extra), env=env, timeout=120)
    seconds = time.monotonic() - started
    assert not (state / "services.json").exists(), "nothing may start before the image is checked"
    errors = [line for line in process.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in process.stderr, process.stderr[-3000:]
    return process.returncode, errors[0], seconds


def test_no_docker_engine_stops_the_run_before_anything_starts(tmp_path, sample_dataset):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-engine.sock"}
    code, error, seconds = bad_case(tmp_path, sample_dataset, [], env)
    assert code == 2 and "cannot reach a Docker engine" in error and "--runner subprocess" in error
    print(f"no engine: exit {code} in {seconds:.1f} s: {error}")


def test_a_missing_image_stops_the_run_before_anything_starts(engine, tmp_path, sample_dataset):
    code, error, seconds = bad_case(tmp_path, sample_dataset, ["--image", "bloodcell-missing:0"])
    assert code == 2 and "is not in the local Docker engine: build it with `make image`" in error
    print(f"missing image: exit {code} in {seconds:.1f} s: {error}")


@pytest.fixture(scope="module")
def image_without_bloodcell(engine):
    """The Debian base image when it was built (make base-image), else our image with the package removed."""
    import docker

    base = os.environ.get("BLOODCELL_TEST_BASE_IMAGE", "bloodcell-base:bookworm")
    try:
        engine.images.get(base)
        yield base
        return
    except docker.errors.ImageNotFound:
        pass
    stripped = "bloodcell-test-without-package:0"
    container = engine.containers.run(
        IMAGE,
        ["sh", "-c", "rm -rf /opt/venv/lib/python3*/site-packages/bloodcell"],
        user="0",
        entrypoint=[],
        detach=True,
    )
    container.wait()
    container.commit(*stripped.split(":"))
    container.remove()
    yield stripped
    engine.images.remove(stripped, force=True)


def test_an_image_without_our_package_stops_the_run_before_anything_starts(
    tmp_path, sample_dataset, image_without_bloodcell
):
    code, error, seconds = bad_case(tmp_path, sample_dataset, ["--image", image_without_bloodcell])
    assert code == 2 and "build the pipeline image with `make image`" in error
    print(f"image {image_without_bloodcell}: exit {code} in {seconds:.1f} s: {error}")


def test_a_failing_step_fails_the_run_and_leaves_no_container(engine, tmp_path):
    state = tmp_path / "state"
    missing = tmp_path / "missing"
    try:
        process, log = pipeline("run", *smoke_args(missing, state, "--runner", "docker", "--image", IMAGE), timeout=600)
        assert process.returncode == 1, log[-3000:]
        assert f"error in step ingest: data source '{missing}' does not exist" in log
        verdict = plain(process.stderr)
        assert "failed in step ingest" in verdict and "python pipeline.py run --resume " in verdict
        assert our_containers(engine, state) == []
    finally:
        pipeline("stop", "--state-dir", str(state), timeout=120)


@contextlib.contextmanager
def training_in_a_container(tmp_path: Path, data: Path, epoch: int) -> Iterator[tuple[PipelineRun, str, Path]]:
    """A docker run whose cnn1 trains 40 epochs, from its epoch ``epoch`` on; stopped (--force) afterwards."""
    state = tmp_path / "state"
    run = PipelineRun(
        smoke_args(
            data,
            state,
            "--verbose",
            "--runner",
            "docker",
            "--image",
            IMAGE,
            "--set",
            "cnn1.epochs=40",
            "--set",
            "cnn1.early_stopping_patience=1000",
        ),
        {**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        run_id = run.wait_for(r"^run (\S+): profile smoke").group(1)
        run.wait_for(rf"Epoch {epoch}/40", timeout=600)
        yield run, run_id, state
    finally:
        pipeline("stop", "--force", "--state-dir", str(state), timeout=120)


def test_a_killed_trainer_container_is_reported_and_resumed(engine, tmp_path, sample_dataset):
    with training_in_a_container(tmp_path, sample_dataset, epoch=3) as (run, run_id, state):
        running = [c for c in our_containers(engine, state) if c.status == "running"]
        assert len(running) == 1  # the local runner runs one task at a time: the trainer
        running[0].kill()
        code, output = run.finish()
        assert code == 1, output[-3000:]
        assert "failed in step train-cnn1" in output and f"python pipeline.py run --resume {run_id}" in output
        resume, log = pipeline("run", "--resume", run_id, "--state-dir", str(state), "--verbose", timeout=900)
        assert resume.returncode == 0, log[-3000:]
        assert "steps in containers of" in log  # the run's own runner, without --runner again
        assert "cache hit: split" in log and re.search(r"resuming from gs://\S+/checkpoints/cnn1/main at epoch", log)
        assert json.loads((state / "runs" / run_id / "summary.json").read_text())["runner"] == "docker"
        assert our_containers(engine, state) == []


def test_stop_removes_the_container_of_a_crashed_run(engine, tmp_path, sample_dataset):
    with training_in_a_container(tmp_path, sample_dataset, epoch=2) as (run, run_id, state):
        os.killpg(run.process.pid, signal.SIGKILL)  # the run dies; its task container goes on
        run.finish()
        orphans = [c for c in our_containers(engine, state) if c.status == "running"]
        assert len(orphans) == 1
        process, log = pipeline("stop", "--state-dir", str(state), timeout=120)
        assert process.returncode == 0, log
        assert f"container {orphans[0].short_id} of run {run_id}" in log
        assert our_containers(engine, state) == []
