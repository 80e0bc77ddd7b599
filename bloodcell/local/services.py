"""Local services for the embedded run: a GCS emulator and an MLflow tracking server.

Both run as background processes on 127.0.0.1, with their state under one directory
(default ``.bloodcell/``). Their pids are recorded in ``services.json`` so that ``stop`` ends
exactly the processes started here, and nothing else.

Any local user, and any web page the user opens, can reach a loopback port. So the object store answers
only requests that carry the state directory's token (``store-token``, mode 0600), through
:mod:`bloodcell.local.store_front`, with the emulator itself in a network namespace of its own; and MLflow runs
behind its login (the basic-auth app): the steps log as user ``pipeline``, people browse as ``reader``,
``admin`` manages users. Their generated passwords are in ``mlflow-users.json`` (mode 0600).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import secrets
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from bloodcell import compat, errors, mlflow_access, storage
from bloodcell.errors import BloodcellError
from bloodcell.local import sandbox
from bloodcell.mlflow_access import PIPELINE_USER, READER_USER

START_TIMEOUT_S = 60
ADMIN_USER = "admin"
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
    confined: bool = False  # may write only beneath its state folder (bloodcell.local.sandbox)
    start_time: int | None = None  # with the pid, tells our process from a later one given the same pid
    setup: int = 0  # how it was started (SETUP); a service started otherwise is restarted, not reused


AUTH_CACHE_TTL_S = 300
# What each service's command line and settings are, as a number: raised whenever they change (the object
# store's token front, MLflow's allowed hosts), so that a service an older bloodcell started is replaced.
SETUP = 3
STORE_TOKEN_FILE = "store-token"
EMULATOR_PORT_INSIDE = 4443  # the emulator's port in its own network namespace


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
        private_state_dir(self.state_dir)
        with open(self.state_dir / "services.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            return self._start_locked()

    def _start_locked(self) -> dict[str, str]:
        services = {s.name: s for s in self._running()}
        for service in list(services.values()):
            outdated = service.setup != SETUP or (service.name == "gcs" and service.confined != _can_confine())
            if outdated:
                print(f"restarting the local {service.name} service: an older setup started it", file=sys.stderr)
                _terminate(service.pid)
                del services[service.name]
        if "gcs" not in services:
            services["gcs"] = self._start_gcs()
        env = {
            "STORAGE_EMULATOR_HOST": services["gcs"].url,
            storage.STORE_TOKEN_ENV: self.store_token(),
            errors.LOCAL_STORE_ENV: str(self.state_dir / "gcs"),
        }
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

    def store_token(self) -> str:
        """The object store's token for this state directory (created once, mode 0600)."""
        return _secret_file(self.state_dir / STORE_TOKEN_FILE, lambda: secrets.token_urlsafe(32))

    def _ensure_bucket(self, url: str) -> None:
        """Create the bucket in the emulator (its JSON API) without touching this process's environment."""
        response = requests.post(
            f"{url}/storage/v1/b",
            params={"project": "bloodcell-local"},
            json={"name": self.bucket},
            headers=storage.token_header(self.store_token()),
            timeout=30,
        )
        if response.status_code not in (200, 409):
            raise BloodcellError(
                f"cannot create bucket {self.bucket!r} in the emulator at {url}: "
                f"HTTP {response.status_code} {response.text[:200]}"
            )

    # -- starting -----------------------------------------------------------------------------
    def _start_gcs(self) -> Service:
        """fake-gcs-server behind :mod:`bloodcell.local.store_front` on the store's port; the emulator in a network
        namespace of its own where the system allows one, else on another loopback port (with a warning)."""

        root = self.state_dir / "gcs"
        scratch = self.state_dir / "gcs-tmp"
        for folder in (root, scratch):
            folder.mkdir(exist_ok=True)
        url = f"http://127.0.0.1:{self.gcs_port}"
        isolated = _can_isolate()
        inner_port = EMULATOR_PORT_INSIDE if isolated else free_port()
        emulator = [
            str(compat.emulator_binary()),
            *("-scheme", "http", "-host", "127.0.0.1", "-port", str(inner_port)),
            *("-backend", "filesystem", "-filesystem-root", str(root)),
            # The URLs it hands out (resumable uploads, media links) must lead back through the front.
            *("-public-host", f"127.0.0.1:{self.gcs_port}", "-external-url", url),
            *("-log-level", "warn"),
        ]
        confined = _can_confine()
        if confined:
            # It stores an object named ../../x outside its folder: confined, such an upload fails.
            writable = [str(root), str(scratch), os.devnull]
            emulator = [
                sys.executable,
                "-m",
                "bloodcell.local.sandbox",
                *(f"--writable={w}" for w in writable),
                "--",
                *emulator,
            ]
        listening = self._listen(self.gcs_port)
        front = [
            *(sys.executable, "-m", "bloodcell.local.store_front", "--listen-fd", str(listening.fileno())),
            *("--token-file", str(self.state_dir / STORE_TOKEN_FILE), "--inner-port", str(inner_port)),
            *(["--isolated"] if isolated else []),
            "--",
            *emulator,
        ]
        command = [*UNSHARE, "--", *front] if isolated else front
        self.store_token()
        with listening:
            service = self._spawn(
                "gcs",
                command,
                self.gcs_port,
                url,
                "bloodcell.local.store_front",
                env={"TMPDIR": str(scratch)},
                confined=confined,
                listening=listening,
            )
        self._wait(service, f"{url}/storage/v1/b", headers=storage.token_header(self.store_token()))
        return service

    def _listen(self, port: int) -> socket.socket:
        try:
            return socket.create_server(("127.0.0.1", port))
        except OSError as exc:
            raise BloodcellError(
                f"port {port} on 127.0.0.1 is taken by a process this state directory did not start "
                f"({self.state_dir}): {exc.strerror}. Stop it, or pick other ports with --gcs-port/--mlflow-port."
            ) from exc

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
            # Only its own address as Host (no DNS rebinding; MLflow's default also admits private networks'
            # addresses). Its CORS rules refuse state-changing calls from other than localhost origins.
            "--allowed-hosts",
            f"127.0.0.1:{self.mlflow_port},localhost:{self.mlflow_port}",
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
        listening: socket.socket | None = None,
    ) -> Service:
        """Start ``command``; with ``listening`` (its port already bound here), the child inherits the socket."""
        if listening is None and _port_answers(port):
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
                pass_fds=(listening.fileno(),) if listening else (),
            )
        service = Service(
            name, process.pid, port, url, str(log), marker, confined, process_start_time(process.pid), SETUP
        )
        self._save([*self._load(), service])
        self._processes[name] = process
        return service

    def _wait(self, service: Service, health_url: str, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._processes[service.name].poll() is not None:
                raise BloodcellError(f"{service.name} exited while starting; see its log {service.log}")
            try:
                if requests.get(health_url, headers=headers, timeout=2).ok:
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
        trusted_state_dir(self.state_dir)  # the record says which processes `stop` may signal
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
        made = _secret_file(path, lambda: json.dumps(asdict(cls(*(secrets.token_urlsafe(24) for _ in range(4))))))
        return cls(**json.loads(made))

    def ensure_on_server(self, url: str) -> None:
        """Create ``pipeline`` (may edit every experiment and registered model) and ``reader`` (default: read);
        claim the pipeline's experiment and registered model for them (:func:`mlflow_access.claim`)."""
        admin = mlflow_access.Admin(url, ADMIN_USER, self.admin)
        try:
            for username, password in ((PIPELINE_USER, self.pipeline), (READER_USER, self.reader)):
                body = {"username": username, "password": password}
                admin.call("POST", "2.0/mlflow/users/create", body, ok=(mlflow_access.ALREADY_EXISTS,))
            for resource_type in ("experiment", "registered_model"):
                grant = {"username": PIPELINE_USER, "resource_type": resource_type, "resource_id": "*"}
                admin.call(
                    "POST",
                    "3.0/mlflow/users/permissions/grant",
                    {**grant, "permission": "EDIT"},
                    ok=(mlflow_access.ALREADY_EXISTS,),
                )
            mlflow_access.claim(admin)
        except BloodcellError as exc:
            raise BloodcellError(
                f"{exc}. If the state directory's mlflow-users.json was replaced, delete its mlflow-auth.db too "
                "(users are recreated; runs are kept)."
            ) from None


def trusted_state_dir(path: Path) -> None:
    """Refuse a state directory another user owns or may write: its records (which processes ``stop``
    signals), passwords and token would be theirs to choose."""
    info = path.stat()
    if info.st_uid != os.getuid():
        raise BloodcellError(
            f"state directory {path} belongs to another user (uid {info.st_uid}): its records and passwords "
            "cannot be trusted. Use a --state-dir of your own."
        )
    if info.st_mode & 0o022:
        raise BloodcellError(
            f"state directory {path} is writable by other users (mode {stat.filemode(info.st_mode)}): they "
            f"could plant its records and passwords. Run `chmod go-w {path}` if it is yours, or use a new --state-dir."
        )


def private_state_dir(path: Path, group: int | None = None) -> None:
    """Create ``path`` (mode 0700) or check it (:func:`trusted_state_dir`), and leave other users no access.
    With ``group``, that group may enter and read it (the containers' user reaches its shared folders through
    it); a group that may already enter keeps that (a run in containers may be using it)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    trusted_state_dir(path)
    if group is not None and path.stat().st_gid != group:
        os.chown(path, -1, group)  # only root gets here: a user's own folders have the user's group
    mode = stat.S_IMODE(path.stat().st_mode)
    wanted = (mode & 0o750) | (0o750 if group is not None else 0o700)
    if mode != wanted:
        path.chmod(wanted)


def _secret_file(path: Path, make: Callable[[], str]) -> str:
    """The text of ``path``, written first from ``make()`` with mode 0600 (no moment when another user could
    read it) when it does not exist."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another process made it first: read theirs
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(make())
    return path.read_text()


def client_env(state_dir: Path, user: str = READER_USER) -> dict[str, str]:
    """What a client needs to use the local services ``pipeline.py run`` started in ``state_dir``.

    Recorded services count even when they have stopped, so that the client can say which one does not
    answer; no login when the users file is missing or not readable.
    """
    recorded = {s.name: s for s in LocalServices(state_dir, "").recorded()}
    env = {}
    if "gcs" in recorded:
        env["STORAGE_EMULATOR_HOST"] = recorded["gcs"].url
        with contextlib.suppress(OSError):
            env[storage.STORE_TOKEN_ENV] = (Path(state_dir) / STORE_TOKEN_FILE).read_text().strip()
    if "mlflow" in recorded:
        env["MLFLOW_TRACKING_URI"] = recorded["mlflow"].url
        with contextlib.suppress(OSError, ValueError, TypeError):
            users = MlflowUsers(**json.loads((Path(state_dir) / "mlflow-users.json").read_text()))
            env |= {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": getattr(users, user)}
    return env


UNSHARE = ("unshare", "--user", "--map-root-user", "--net")


@functools.lru_cache(maxsize=1)
def _can_isolate() -> bool:
    """Whether this system lets us start the emulator in a user and network namespace of its own."""
    probe = [
        *UNSHARE,
        "--",
        sys.executable,
        "-c",
        "from bloodcell.local import store_front; store_front.bring_loopback_up()",
    ]
    try:
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = str(exc)
    else:
        if done.returncode == 0:
            return True
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    print(
        f"warning: the local object store's emulator runs on a loopback port of this machine ({reason}): its "
        "front refuses requests without the token, but a web page could find the emulator's own port. Allow "
        "unprivileged user namespaces to isolate it (Ubuntu 23.10+: sysctl kernel.apparmor_restrict_"
        "unprivileged_userns=0; in a container: run it with the right to create them).",
        file=sys.stderr,
    )
    return False


def _can_confine() -> bool:
    try:
        missing = sandbox.partial_confinement(sandbox.abi_version())
        if missing:
            print(f"warning: the local object store is only partly confined: {missing}.", file=sys.stderr)
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
        fields = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2, the command name, is in parentheses and may hold spaces: count fields after its ")".
    return int(fields.rsplit(")", 1)[1].split()[19])


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
