"""The MLflow tracker: a step's final logging waits out a short tracking-server outage."""

import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import mlflow
import pytest

from bloodcell import tracking
from bloodcell.runstore import RunStore


@pytest.fixture
def health_server():
    """An HTTP tracking URI whose /health answers 503 until ``healthy`` is set, then 200."""
    healthy = threading.Event()

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if healthy.is_set() else 503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{server.server_port}")  # wins over the environment
    yield healthy
    mlflow.set_tracking_uri(previous)
    server.shutdown()


def test_await_server_waits_for_a_returning_server_and_gives_up_after_its_bound(services, health_server):
    store = RunStore(services["bucket"], f"tracker-{time.time_ns()}")
    tracker = tracking.Tracker(store, "train-cnn1", wait_s=0)
    assert tracker.down
    assert tracker.call("log the model", lambda: "logged") is None  # skipped while down

    threading.Timer(2, health_server.set).start()
    started = time.monotonic()
    assert tracker.await_server(wait_s=60)
    assert 1 < time.monotonic() - started < 30
    assert tracker.call("log the model", lambda: "logged") == "logged"
    failures = {f["what"]: f for f in tracking.recorded_failures(store)["train-cnn1"]}
    assert failures["connect"]["recovered"] is False and failures["log the model"]["recovered"] is True

    health_server.clear()
    assert tracker.call("log results", lambda: 1 / 0) is None  # a failed call marks the server down
    started = time.monotonic()
    assert not tracker.await_server(wait_s=2)
    assert time.monotonic() - started < 10
    assert tracker.await_server(wait_s=0) is False


def test_experiment_opens_on_training_runs_and_runs_show_their_dataset(services):
    """The UI opens a tagged experiment on its runs (not GenAI traces) and lists each run's dataset."""
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(services["env"]["MLFLOW_TRACKING_URI"])
    name = f"kind-{uuid.uuid4().hex[:8]}"
    experiment = tracking.experiment_id(name)
    client = MlflowClient()
    assert client.get_experiment(experiment).tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.create_run(experiment).info.run_id
    for _ in range(2):  # several steps log it; the run keeps one input
        tracking.log_dataset(parent, "PBC_dataset_normal_DIB", "0123456789abcdef", "gs://b/datasets/0123456789abcdef")
    child = tracking.model_run(name, "pipeline-run", parent, "cnn1")
    for run_id in (parent, child):
        inputs = client.get_run(run_id).inputs
        assert inputs is not None
        (dataset_input,) = inputs.dataset_inputs
        assert (dataset_input.dataset.name, dataset_input.dataset.digest) == (
            "PBC_dataset_normal_DIB",
            "0123456789abcdef",
        )
        assert {t.key: t.value for t in dataset_input.tags}["mlflow.data.context"] == "training"
