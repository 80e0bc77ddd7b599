"""A new step pod's first packets (kubernetes-sigs/kind#3875, kubernetes-sigs/kube-network-policies#171).

On kind, for the first moments of a new pod, the network policy in front of MLflow and the object store may drop
its packets until it has learned the pod: connect() waits while the kernel resends the SYN, a connection is
refused or hangs, a DNS lookup times out. A step's first storage read and write and its first MLflow call (its
:class:`~bloodcell.tracking.Tracker`) must ride that out within their budgets (``storage.RETRY``'s deadline,
``BLOODCELL_MLFLOW_WAIT_S``) instead of failing the step or giving up on tracking.

Each case is a fresh process (a new step: new clients, new connection pools) that makes those first calls through
the real bloodcell functions to the suite's real local services (fake-gcs-server behind its token front, MLflow
with its login), through a TCP proxy that fails new connections for ``WINDOW_S`` seconds and then forwards them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
WINDOW_S = 3.0  # how long the new "pod"'s connections fail
BACKLOG = 128
# drop: nothing is accepted and the accept queue is full, so the kernel drops the SYNs (a network policy's drop:
#       connect() waits while the client's kernel resends them);
# reset: connections are accepted and reset at once;
# hang: connections are accepted and never answered, then closed when the window ends;
# dns: the services' host name does not resolve (each lookup hangs to the window's end, then fails: EAI_AGAIN).
MODES = ("drop", "reset", "hang", "dns")
FLAKY_NAME = "first-packets.test"
RESULT = "first-packets result: "


class FlakyProxy:
    """A TCP proxy on 127.0.0.1 to one HTTP service that fails new connections during a window (:meth:`fail_for`).

    The services answer only their own ``Host`` (a DNS-rebinding guard), so the proxy rewrites it, and asks for
    ``Connection: close`` so that each connection carries one request and the rest is piped as it comes.
    """

    def __init__(self, upstream_url: str):
        parts = urlsplit(upstream_url)
        self.upstream = (parts.hostname, parts.port)
        self.upstream_host = parts.netloc.encode()
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=BACKLOG)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.mode, self.until = "forward", 0.0
        self.filler: socket.socket | None = None
        self.held: list[socket.socket] = []
        self.failed = 0  # connections reset or held unanswered
        self.forwarded = 0
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def fail_for(self, mode: str, seconds: float) -> None:
        with self.lock:
            self.mode, self.until = mode, time.monotonic() + seconds
            if mode == "drop":
                self.listener.listen(0)  # the first queued connection fills the queue: later SYNs are dropped
                self.filler = socket.create_connection(("127.0.0.1", self.port))

    def close(self) -> None:
        self.closed = True
        self.thread.join(timeout=5)
        with self.lock:
            self._end_window()
        self.listener.close()

    def _end_window(self) -> None:
        if self.filler is not None:
            self.listener.listen(BACKLOG)
            self.filler.close()
            self.filler = None
        for conn in self.held:
            conn.close()
        self.held.clear()
        self.mode = "forward"

    def _serve(self) -> None:
        while not self.closed:
            with self.lock:
                if self.mode != "forward" and time.monotonic() >= self.until:
                    self._end_window()
                dropping = self.mode == "drop"
            if dropping:
                time.sleep(0.02)
                continue
            if not select.select([self.listener], [], [], 0.02)[0]:
                continue
            with self.lock:
                if self.mode == "drop":
                    continue  # a window began meanwhile: the queued connections are the kernel's to drop
                conn, _ = self.listener.accept()
                mode = self.mode
                if mode == "reset":
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # close sends RST
                    conn.close()
                elif mode == "hang":
                    self.held.append(conn)
                self.failed += mode != "forward"
            if mode == "forward":
                threading.Thread(target=self._forward, args=(conn,), daemon=True).start()

    def _forward(self, client: socket.socket) -> None:
        upstream = None
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return  # e.g. the drop window's filler
                head += chunk
            head, body = head.split(b"\r\n\r\n", 1)
            request, *headers = head.split(b"\r\n")
            kept = [h for h in headers if h.split(b":", 1)[0].strip().lower() not in (b"host", b"connection")]
            upstream = socket.create_connection(self.upstream)
            upstream.sendall(
                b"\r\n".join([request, b"Host: " + self.upstream_host, b"Connection: close", *kept])
                + b"\r\n\r\n"
                + body
            )
            self.forwarded += 1
            requests_in = threading.Thread(target=_pipe, args=(client, upstream), daemon=True)
            requests_in.start()
            _pipe(upstream, client)
            requests_in.join(timeout=2)
        except OSError:
            pass
        finally:
            client.close()
            if upstream is not None:
                upstream.close()


def _pipe(source: socket.socket, target: socket.socket) -> None:
    with contextlib.suppress(OSError):
        while data := source.recv(65536):
            target.sendall(data)
        target.shutdown(socket.SHUT_WR)


# -- the step: a fresh process -----------------------------------------------------------------------------------
def flaky_dns(until: float) -> None:
    """Until ``until``, a lookup of FLAKY_NAME hangs to then and fails as a timed-out one does; then it is 127.0.0.1."""
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):
        if host == FLAKY_NAME:
            if time.monotonic() < until:
                time.sleep(max(0.0, until - time.monotonic()))
                raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
            host = "127.0.0.1"
        return real(host, *args, **kwargs)

    socket.getaddrinfo = getaddrinfo


def step(mode: str) -> dict:
    """A step's first calls, all at once when told to go (with its settings, on stdin): a storage read, a storage
    write, the Tracker's start and its first MLflow call. What each gave (or raised) and how long it took."""
    from bloodcell import storage, tracking
    from bloodcell.runstore import RunStore

    print("ready", flush=True)
    go = json.loads(sys.stdin.readline())
    started = time.monotonic()
    os.environ.update(go["env"])
    if mode == "dns":
        flaky_dns(started + WINDOW_S)
    read_uri, write_uri, experiment = go["read_uri"], go["write_uri"], go["experiment"]
    store = RunStore(urlsplit(read_uri).netloc, go["run_id"])

    def first_mlflow_call() -> dict:
        tracker = tracking.Tracker(store, "first-packets")
        found = tracker.call("find the experiment", tracking.experiment_id, experiment)
        return {"down": tracker.down, "failures": tracker.failures, "experiment_id": found}

    calls = {
        "storage bucket": lambda: storage.ensure_bucket(store.bucket),  # ingest's first call
        "storage read": lambda: storage.read_json(read_uri),
        "storage write": lambda: storage.write_json({"written_by": mode}, write_uri),
        "mlflow": first_mlflow_call,
    }
    results: dict[str, dict] = {}

    def timed(name: str) -> None:
        try:
            results[name] = {"ok": True, "value": calls[name]()}
        except Exception as exc:  # reported to the test, which fails on it
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        results[name]["seconds"] = time.monotonic() - started

    threads = [threading.Thread(target=timed, args=(name,)) for name in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


# -- the test ----------------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def keras_dtype_policy() -> None:
    """Nothing here trains: not conftest's fixture of that name, which imports Keras (seconds)."""


@pytest.fixture(scope="module")
def outcomes(request) -> dict[str, dict]:
    """Each mode's step, run at once (fresh processes), each behind its own proxies: {mode: results and proxies}.

    The steps start (import) while the services start, and get their settings when told to go.
    """
    runs: dict[str, dict[str, Any]] = {mode: {"child": _start_step(mode)} for mode in MODES}
    try:
        services = request.getfixturevalue("services")
        from bloodcell import storage

        prefix = f"gs://{services['bucket']}/first-packets/{uuid.uuid4().hex[:8]}"
        for mode, run in runs.items():
            storage.write_json({"read_by": mode}, f"{prefix}/{mode}/input.json")
            env = services["env"]
            run["proxies"] = {
                "storage": FlakyProxy(env["STORAGE_EMULATOR_HOST"]),
                "mlflow": FlakyProxy(env["MLFLOW_TRACKING_URI"]),
            }
            host = FLAKY_NAME if mode == "dns" else "127.0.0.1"
            run["go"] = {
                "env": {
                    **env,
                    "STORAGE_EMULATOR_HOST": f"http://{host}:{run['proxies']['storage'].port}",
                    "MLFLOW_TRACKING_URI": f"http://{host}:{run['proxies']['mlflow'].port}",
                },
                "read_uri": f"{prefix}/{mode}/input.json",
                "write_uri": f"{prefix}/{mode}/output.json",
                "run_id": f"first-packets-{mode}",
                "experiment": f"first-packets-{prefix.rsplit('/', 1)[-1]}-{mode}",
            }
        for mode, run in runs.items():
            child = run["child"]
            assert child.stdout and child.stdin
            while (line := child.stdout.readline()) and line.strip() != "ready":
                pass
            if mode != "dns":
                for proxy in run["proxies"].values():
                    proxy.fail_for(mode, WINDOW_S)
            child.stdin.write(json.dumps(run["go"]) + "\n")
            child.stdin.flush()
        for run in runs.values():
            out, err = run["child"].communicate(timeout=_budget("storage read") + 60)
            line = next((x for x in out.splitlines() if x.startswith(RESULT)), None)
            assert line, f"the step printed no result; its output:\n{out[-3000:]}\n{err[-3000:]}"
            run["results"] = json.loads(line[len(RESULT) :])
    finally:
        for run in runs.values():
            if run["child"].poll() is None:
                run["child"].kill()
            for proxy in run.get("proxies", {}).values():
                proxy.close()
    return runs


def _start_step(mode: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, mode],
        cwd=ROOT,
        env={**os.environ, "NO_PROXY": "*"},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _budget(call: str) -> float:
    """How long a step allows this first call: MLflow's wait, or the storage retries' deadline.

    How soon after the window a call succeeds is printed, not asserted: the storage client's back-off is jittered
    (google-api-core), so a single retry may sleep 15 s on a busy machine (CI saw 17 s).
    """
    from bloodcell import storage, tracking

    return tracking.wait_timeout() if call == "mlflow" else float(storage.RETRY.deadline)


@pytest.mark.parametrize("mode", MODES)
def test_a_steps_first_storage_and_mlflow_calls_ride_out_dropped_first_packets(outcomes, mode):
    from mlflow.tracking import MlflowClient

    from bloodcell import storage

    run, results = outcomes[mode], outcomes[mode]["results"]
    timings = ", ".join(f"{name} {r['seconds']:.1f} s" for name, r in results.items())
    print(f"{mode}: connections failed for {WINDOW_S:.0f} s; first calls succeeded after {timings}")
    for name, result in results.items():
        assert result["ok"], f"{mode}: the step's first {name} failed: {result['error']}"
        # It waited for the window (so it met it), and then succeeded within its budget.
        assert WINDOW_S - 0.5 <= result["seconds"] < _budget(name), f"{mode}: {name} took {result['seconds']:.1f} s"
    assert results["storage read"]["value"] == {"read_by": mode}
    assert storage.read_json(run["go"]["write_uri"]) == {"written_by": mode}
    tracked = results["mlflow"]["value"]
    assert tracked["down"] is False and tracked["failures"] == {}, f"{mode}: tracking gave up: {tracked}"
    experiment = MlflowClient().get_experiment_by_name(run["go"]["experiment"])
    assert experiment and tracked["experiment_id"] == experiment.experiment_id
    if mode in ("reset", "hang"):  # the proxies did fail the step's first connections
        assert all(proxy.failed for proxy in run["proxies"].values()), {k: p.failed for k, p in run["proxies"].items()}
    assert all(proxy.forwarded for proxy in run["proxies"].values())


if __name__ == "__main__":
    print(RESULT + json.dumps(step(sys.argv[1]), default=str), flush=True)
    os._exit(0)  # done: no interpreter teardown
