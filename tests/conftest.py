"""Shared fixtures: the real PBC images in ../shared, and real local services on free ports."""

from __future__ import annotations

import contextlib
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bloodcell import storage
from bloodcell.services import LocalServices, MlflowUsers, free_port

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (ROOT / ".." / "shared" / "datasets" / "PBC_dataset_normal_DIB").resolve()
UNDECODABLE = "neutrophil/.DS_169665.jpg"


@contextlib.contextmanager
def http_server(routes: dict[str, tuple[bytes, str]]) -> Iterator[str]:
    """A plain HTTP server on 127.0.0.1 answering ``path -> (body, content type)``; yields its base URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body, content_type = routes[self.path]
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


def mlflow_login(state: Path, user: str = "pipeline") -> dict[str, str]:
    """The local MLflow login of the services in ``state`` (created now if they have not started yet)."""
    users = MlflowUsers.load_or_create(state / "mlflow-users.json")
    return {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": getattr(users, user)}


def store_login(state: Path) -> dict[str, str]:
    """The local object store's token of the services in ``state`` (created now if they have not started)."""
    return {storage.STORE_TOKEN_ENV: LocalServices(state, "").store_token()}


def found(pattern: str, text: str, flags: int = 0) -> re.Match:
    """The first match of ``pattern`` in ``text``; fails the test (showing the text's end) when none."""
    match = re.search(pattern, text, flags)
    assert match, f"no match for {pattern!r} in:\n{text[-3000:]}"
    return match


def plain(text: str) -> str:
    """``text`` without terminal colour codes (kfp colours task names)."""
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


class PipelineRun:
    """``python pipeline.py run`` in the background, its output collected line by line."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "pipeline.py", "run", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(plain(line).rstrip("\n"))

    def wait_for(self, pattern: str, timeout: float = 300) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                found = re.search(pattern, line)
                if found:
                    return found
            if self.process.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.2)
        raise AssertionError(f"no line matching {pattern!r}; output:\n" + "\n".join(self.lines[-40:]))

    def finish(self, timeout: float = 900) -> tuple[int, str]:
        returncode = self.process.wait(timeout=timeout)
        self._reader.join(timeout=30)
        return returncode, "\n".join(self.lines)


@pytest.fixture(autouse=True)
def keras_dtype_policy() -> Iterator[None]:
    """Training sets Keras' global mixed-precision policy; restore it so no test depends on which ran before."""
    import keras

    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared PBC images are missing: expected {SHARED_DATA}")
    return SHARED_DATA


def make_sample(shared: Path, target: Path, per_class: int) -> Path:
    """Copy the first ``per_class`` images of each class (sorted) plus the real undecodable file."""
    for class_dir in sorted(d for d in shared.iterdir() if d.is_dir()):
        out = target / class_dir.name
        out.mkdir(parents=True)
        for image in sorted(p for p in class_dir.iterdir() if not p.name.startswith("."))[:per_class]:
            shutil.copy(image, out / image.name)
    shutil.copy(shared / UNDECODABLE, target / UNDECODABLE)
    return target


@pytest.fixture(scope="session")
def sample_dataset(shared_data: Path, tmp_path_factory) -> Path:
    """A stratified sample of the shared data: 30 images per class and the undecodable file."""
    return make_sample(shared_data, tmp_path_factory.mktemp("sample") / "PBC_dataset_normal_DIB", 30)


@pytest.fixture(scope="session")
def services(tmp_path_factory):
    """A real fake-gcs-server and MLflow server for this test session."""
    from bloodcell.services import LocalServices

    state = tmp_path_factory.mktemp("state")
    local = LocalServices(state, "bloodcell-test", free_port(), free_port())
    env = local.start()
    saved = {k: os.environ.get(k) for k in [*env, "BLOODCELL_CACHE"]}
    os.environ.update(env)
    os.environ["BLOODCELL_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    from bloodcell import storage

    storage.client.cache_clear()
    yield {"state": state, "bucket": "bloodcell-test", "env": env, "services": local}
    local.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    storage.client.cache_clear()
