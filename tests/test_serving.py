"""The registered model served by MLflow's own scoring server (``bloodcell serve``, which runs ``mlflow models
serve``), for real: the smoke run's registered version, served against the local registry, answers as
``bloodcell predict`` does, and refuses bad requests with a 400 that says what to send, then keeps serving."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests

from bloodcell import serving
from bloodcell.local.services import LocalServices, client_env
from conftest import ROOT, SHARED_DATA, free_port

LIMIT = serving.MAX_IMAGES_PER_REQUEST
IMAGES = sorted(SHARED_DATA.glob("*/*.jpg"))[::1500][:6]  # a few real cells of different classes


def request_body(column: str, values: list[str]) -> dict:
    return {"dataframe_split": {"columns": [column], "data": [[value] for value in values]}}


def encoded(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_bomb(width: int = 40_000, height: int = 40_000) -> bytes:
    """A tiny PNG file whose header claims ``width`` x ``height`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def served(smoke_run) -> Iterator[dict]:
    """``mlflow models serve`` of the smoke run's registered version on a free loopback port."""
    assert smoke_run["process"].returncode == 0, smoke_run["log"][-3000:]
    state, summary = smoke_run["state"], smoke_run["summary"]
    model_uri = f"models:/bloodcell-classifier/{summary['registry']['version']}"
    # The run's services again, if a test stopped them (test_pipeline_local's `stop`): its registry persists.
    LocalServices(state, summary["bucket"], free_port(), free_port()).start()
    env = {**smoke_run["env"], **client_env(state)}  # for bloodcell predict: what `serve` finds, as reader
    port = free_port()
    log = (state / "serve.log").open("w")
    process = subprocess.Popen(  # `bloodcell serve` (make serve): the local services found from --state-dir
        [sys.executable, "-m", "bloodcell.cli", "serve", "--model", model_uri, "--port", str(port)]
        + ["--state-dir", str(state)],
        cwd=ROOT,
        env=smoke_run["env"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                break
        except requests.RequestException:
            time.sleep(1)
    yield {"url": url, "process": process, "env": env, "model_uri": model_uri, "log": state / "serve.log"}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    log.close()


def invocations(served: dict, body: dict | bytes) -> requests.Response:
    kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
    return requests.post(
        f"{served['url']}/invocations", headers={"Content-Type": "application/json"}, timeout=120, **kwargs
    )


def test_the_served_model_answers_as_bloodcell_predict_does(served):
    assert served["process"].poll() is None, Path(served["log"]).read_text()[-3000:]
    response = invocations(served, request_body("image", [encoded(path.read_bytes()) for path in IMAGES]))
    assert response.status_code == 200, response.text[:2000]
    answers = response.json()["predictions"]
    command = [sys.executable, "-m", "bloodcell.cli", "predict", "--model", served["model_uri"], "--json"]
    local = subprocess.run(
        [*command, *map(str, IMAGES)], cwd=ROOT, env=served["env"], capture_output=True, text=True, timeout=300
    )
    assert local.returncode == 0, local.stderr[-3000:]
    predicted = json.loads(local.stdout.strip().splitlines()[-1])["predictions"]
    assert len(answers) == len(predicted) == len(IMAGES)
    for answer, expected in zip(answers, predicted, strict=True):
        assert set(answer) == set(expected) - {"path", "explanation"}  # one output schema
        assert answer["class"] == expected["class"] and answer["refer"] == expected["refer"]
        assert answer["refer_reason"] == expected["refer_reason"]
        assert answer["prediction_set"] == expected["prediction_set"]
        classes = sorted(expected["probabilities"])
        np.testing.assert_allclose(
            [answer["probabilities"][c] for c in classes], [expected["probabilities"][c] for c in classes], atol=1e-6
        )


@pytest.mark.parametrize(
    "name, body, message",
    [
        ("not an image", request_body("image", [encoded(b"just some text")]), r"image 0 cannot be read as an image"),
        ("not base64", request_body("image", ["%%% not base64 %%%"]), r"image 0 is not base64 text"),
        ("empty", request_body("image", []), r"the request has no images"),
        ("a PNG bomb", request_body("image", [encoded(png_bomb())]), r"image 0 .*DecompressionBomb"),
        (
            "wrong column",
            request_body("picture", [encoded(b"x")]),
            r"send the images as base64-encoded files in one column named 'image'",
        ),
        (
            "too many",
            request_body("image", ["x"] * (LIMIT + 1)),
            rf"the request has {LIMIT + 1} images; send at most {LIMIT}",
        ),
    ],
)
def test_a_bad_request_gets_a_400_that_says_why_first_and_the_server_keeps_serving(served, name, body, message):
    import re

    response = invocations(served, body)
    assert response.status_code == 400, (name, response.status_code, response.text[:500])
    error = response.json()
    assert re.match(message, error["message"]), error["message"][:500]  # ours first, no echo of the request
    assert len(error["message"]) < 600
    again = invocations(served, request_body("image", [encoded(IMAGES[0].read_bytes())]))
    assert again.status_code == 200 and len(again.json()["predictions"]) == 1
