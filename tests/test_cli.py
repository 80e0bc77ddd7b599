"""`bloodcell predict` and `compare` for a person: they find the local services `pipeline.py run` started
when the environment names none, and a service that does not answer is named in one line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from bloodcell.local.services import LocalServices, free_port
from conftest import ROOT, SHARED_DATA


@pytest.fixture
def local_services(tmp_path):
    state = tmp_path / "state"
    local = LocalServices(state, "bloodcell", free_port(), free_port())
    local.start()
    yield state
    local.stop()


def bloodcell(*args: str, state) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "STORAGE_EMULATOR"))}
    command = [sys.executable, "-m", "bloodcell.cli", *args, "--state-dir", str(state)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    return done.returncode, done.stdout, "\n".join(errors)


def stop(state, name: str) -> None:
    (service,) = [s for s in json.loads((state / "services.json").read_text()) if s["name"] == name]
    os.killpg(service["pid"], signal.SIGTERM)
    os.waitpid(service["pid"], 0)  # our child (the fixture started it): gone once reaped


def test_compare_finds_the_local_services_with_no_variables_set(local_services):
    code, out, errors = bloodcell("compare", "--json", state=local_services)
    assert code == 0 and not errors
    assert json.loads(out.splitlines()[-1]) == []


def test_a_model_that_is_not_there_is_one_line(local_services):
    image = next((SHARED_DATA / "basophil").glob("*.jpg"))
    code, _, errors = bloodcell(
        "predict", "--model", "gs://bloodcell/runs/x/models/cnn1/model.keras", str(image), state=local_services
    )
    assert code == 2 and errors.count("\n") == 0 and "not found in object storage: gs://bloodcell/runs/x/" in errors


def test_an_unknown_registry_model_is_one_line_naming_it(local_services):
    image = next((SHARED_DATA / "basophil").glob("*.jpg"))
    code, _, errors = bloodcell("predict", "--model", "models:/m-0123456789abcdef", str(image), state=local_services)
    # MLflow's auth answers 403 for a model id it does not know: say both possibilities, not "permission denied"
    assert code == 2 and errors.count("\n") == 0 and "not found or not readable" in errors, errors
    assert "models:/m-0123456789abcdef" in errors and "for user reader" in errors and "bloodcell compare" in errors


@pytest.mark.parametrize(
    "service, message", [("gcs", "object storage does not answer"), ("mlflow", "MLflow does not answer")]
)
def test_a_stopped_service_is_named_in_one_line(local_services, service, message):
    stop(local_services, service)
    image = next((SHARED_DATA / "basophil").glob("*.jpg"))
    for command in (["predict", "--model", "models:/m-0123456789abcdef", str(image)], ["compare"]):
        if service == "gcs" and command[0] == "compare":
            continue  # compare reads MLflow only
        code, _, errors = bloodcell(*command, state=local_services)
        assert code == 2 and errors.count("\n") == 0 and message in errors, errors


def test_without_services_or_settings_compare_says_what_to_set(tmp_path):
    code, _, errors = bloodcell("compare", state=tmp_path / "nothing")
    assert code == 2 and "set MLFLOW_TRACKING_URI" in errors


def test_a_full_disk_while_filling_the_model_artifact_is_the_train_steps_one_line(tmp_path, monkeypatch, capsys):
    """The train component stores its Model artifact after the step: a full disk there reads like the step's."""
    import errno
    from types import SimpleNamespace

    from bloodcell import errors, steps, storage

    def no_space(uri, path):
        raise errors.disk_full_error(tmp_path, f"while transferring {uri}") from OSError(errno.ENOSPC, "full")

    monkeypatch.setattr(storage, "download_file", no_space)
    artifact = SimpleNamespace(path=str(tmp_path / "model"), metadata={})
    with pytest.raises(SystemExit) as exit_info:
        steps.fill_model_artifact(artifact, {"model_uri": "gs://b/runs/r/models/cnn1/model.keras"})
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error in step train: no space left on device")
