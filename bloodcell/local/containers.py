"""Pipeline steps in containers on this machine's Docker engine (``pipeline.py run --runner docker``).

Each task runs through kfp's local ``DockerRunner`` in the pipeline image, as the image's
non-root user, with a read-only root filesystem, no capabilities and the host's network (so
it reaches the local object store and MLflow server on 127.0.0.1). Local paths the run needs
(a data folder or zip, a weights file) are bind-mounted read-only at the same path; the
pipeline root and a download cache under the state directory are mounted writable.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bloodcell import compat, config, weights
from bloodcell.errors import BloodcellError
from bloodcell.local import services

IMAGE_UID = config.IMAGE_UID
LABEL_RUN = "org.bloodcell.run-id"
LABEL_STATE = "org.bloodcell.state-dir"
ENGINE_TIMEOUT_S = 10
PROBE_TIMEOUT_S = 60
# Run in the image (and, for comparison, here): whether bloodcell and kfp are installed, and a digest
# of the bloodcell and components sources, to tell an image built from other sources than this checkout.
PROBE = """
import hashlib, importlib.metadata as md, importlib.util as iu, json, pathlib
digest, found = hashlib.sha256(), {}
for name in ("bloodcell", "components"):
    spec = iu.find_spec(name)
    found[name] = bool(spec)
    root = pathlib.Path(spec.origin).parent if spec and spec.origin else None
    for path in sorted(root.rglob("*.py")) if root else []:
        digest.update(f"{name}/{path.relative_to(root).as_posix()}".encode() + b"\\0" + path.read_bytes())
def version(dist):
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None
print(json.dumps({"packages": found, "bloodcell": version("bloodcell"), "kfp": version("kfp"),
                  "source_digest": digest.hexdigest()}))
"""


@dataclass(frozen=True)
class ContainerPlan:
    """How this run's tasks are run in containers: the image, and ``containers.run`` arguments for kfp."""

    image: str
    image_id: str
    run_args: dict[str, Any] = field(default_factory=dict)

    def kfp_runner(self):
        import kfp.local

        return kfp.local.DockerRunner(**self.run_args)


def engine():
    """A client of the local Docker engine, or a clear error within seconds when there is none."""
    import docker

    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT_S)
        client.ping()
    except docker.errors.DockerException as exc:
        where = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise BloodcellError(
            f"cannot reach a Docker engine at {where} ({_first_line(exc)}): start Docker (e.g. "
            "`sudo systemctl start docker`), set DOCKER_HOST, or run the steps as local processes "
            "with --runner subprocess"
        ) from None
    return client


def image_id(client, image: str) -> str:
    """The local ID of ``image``; a clear error when the engine does not have it (nothing is pulled)."""
    import docker

    try:
        return client.images.get(image).id
    except docker.errors.ImageNotFound:
        raise BloodcellError(
            f"image {image!r} is not in the local Docker engine: build it with `make image` "
            f"(or `make image IMAGE={image}`), or name another with --image"
        ) from None


def probe_here() -> dict[str, Any]:
    """:data:`PROBE`'s result for this checkout (run by this interpreter, as the image runs it)."""
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    if done.returncode != 0:
        raise BloodcellError(f"could not inspect the Python packages: {done.stderr.strip()[-300:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def container_gid() -> int:
    """The group the containers run with: this user's, so that both can manage the shared folders (never root's)."""
    return os.getgid() or IMAGE_UID


def isolation(gid: int) -> dict[str, Any]:
    """``containers.run`` arguments every task (and the image check) runs with."""
    return {
        "user": f"{IMAGE_UID}:{gid}",
        "read_only": True,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "network_mode": "host",
        "init": True,
        # A runaway step stops at its own limits, not the machine's (no swap beyond the memory limit).
        "mem_limit": config.CONTAINER_MEMORY,
        "memswap_limit": config.CONTAINER_MEMORY,
        "pids_limit": config.CONTAINER_PIDS,
        # The container's own /tmp, a tmpfs: nothing on the host.
        "tmpfs": {"/tmp": "rw,nosuid,nodev", "/home/bloodcell": f"rw,nosuid,nodev,uid={IMAGE_UID},gid={gid}"},  # nosec B108
    }


def check(image: str) -> ContainerPlan:
    """Within seconds: a Docker engine answers, it has ``image``, and the image can run the steps.

    Starts the image once as the steps will be started (user, read-only root, network) and checks it
    holds bloodcell and kfp; warns when it was built from other sources than this checkout.
    """
    import docker

    client = engine()
    with contextlib.closing(client):
        found_id = image_id(client, image)
        try:
            output = client.containers.run(
                image, ["python3", "-c", PROBE], remove=True, stdout=True, stderr=True, **isolation(container_gid())
            )
            inside = json.loads(output.decode().strip().splitlines()[-1])
        except (docker.errors.ContainerError, docker.errors.APIError, ValueError, IndexError) as exc:
            raise BloodcellError(
                f"image {image!r} cannot run the pipeline's steps (python3 in it failed: {_first_line(exc)}): "
                "build the pipeline image with `make image`"
            ) from None
    missing = [name for name, found in inside["packages"].items() if not found] or ([] if inside["kfp"] else ["kfp"])
    if missing:
        raise BloodcellError(
            f"image {image!r} does not contain the {' and '.join(missing)} package(s) the steps need: "
            "build the pipeline image with `make image` (BASE_IMAGE= selects its base)"
        )
    if inside["source_digest"] != probe_here()["source_digest"]:
        print(
            f"warning: image {image!r} holds other bloodcell sources than this checkout (bloodcell "
            f"{inside['bloodcell']}): its steps run the image's code; `make image` rebuilds it",
            file=sys.stderr,
        )
    return ContainerPlan(image, found_id)


def plan(
    checked: ContainerPlan, state_dir: Path, run_id: str, arguments: dict[str, str], env: dict[str, str]
) -> ContainerPlan:
    """``checked`` with the arguments for kfp's DockerRunner: mounts, environment, labels."""
    from docker.types import Mount

    gid = container_gid()
    services.private_state_dir(state_dir, gid)
    kfp_root, cache = state_dir / "kfp", state_dir / "container-cache"
    for folder in (kfp_root, cache):
        shared_folder(folder, gid)
    copy_cached_weights(cache / "keras")
    mounts = [
        Mount(target=str(path), source=str(path), type="bind", read_only=True) for path in input_paths(arguments, gid)
    ]
    mounts.append(Mount(target=str(cache), source=str(cache), type="bind"))
    environment = {
        **{
            name: env[name]
            for name in (*config.STEP_ENV, *config.MLFLOW_CREDENTIAL_ENV, *config.STORE_CREDENTIAL_ENV)
            if env.get(name)
        },
        **{name: os.environ[name] for name in config.PASSED_ENV if os.environ.get(name)},
        "BLOODCELL_CACHE": str(cache),
        "KERAS_HOME": str(cache / "keras"),
        "BLOODCELL_IMAGE": checked.image,
        "BLOODCELL_IMAGE_ID": checked.image_id,
        config.RUNTIME_ENV: config.CONTAINER,
    }
    run_args = {
        **isolation(gid),
        "environment": environment,
        "mounts": mounts,
        "labels": {LABEL_RUN: run_id, LABEL_STATE: str(state_dir)},
    }
    return ContainerPlan(checked.image, checked.image_id, run_args)


def local_inputs(arguments: dict[str, str]) -> dict[str, Path]:
    """The local files and folders the steps read, by argument: the data source and a VGG16 weights file."""
    source = arguments.get("source", "")
    found = {"source": Path(source)} if source and "://" not in source else {}
    weights_file = weights.Weights.parse(arguments.get("vgg16_weights")).local_file
    return {**found, "vgg16_weights": weights_file} if weights_file else found


def input_paths(arguments: dict[str, str], gid: int) -> list[Path]:
    """The local inputs (:func:`local_inputs`) that exist, checked readable by the containers' user."""
    paths = []
    for key, path in local_inputs(arguments).items():
        if not path.is_absolute():
            raise BloodcellError(f"{key} {str(path)!r} must be an absolute path for containers")
        if path.exists():
            readable_by_containers(path, gid)
            paths.append(path)
    return paths


def absolute_paths(arguments: dict[str, str]) -> dict[str, str]:
    """``arguments`` with local paths made absolute (a container resolves relative paths elsewhere)."""
    local = {key: str(path.expanduser().resolve()) for key, path in local_inputs(arguments).items()}
    return {**arguments, **local}


def readable_by_containers(path: Path, gid: int) -> None:
    """Fail clearly when the containers' user (uid 10001, group ``gid``) cannot read ``path``."""
    info = path.stat()
    needed = 0o5 if path.is_dir() else 0o4
    others = info.st_mode & 0o7
    group = (info.st_mode >> 3) & 0o7 if info.st_gid == gid else 0
    if others & needed != needed and group & needed != needed:
        raise BloodcellError(
            f"{path} is not readable by the containers' user (uid {IMAGE_UID}, group {gid}): "
            f"`chmod -R o+rX {path}`, or run the steps as local processes with --runner subprocess"
        )


def shared_folder(path: Path, gid: int) -> None:
    """Create ``path`` writable by the containers' user through group ``gid`` (setgid, so new files keep it);
    other users get no access."""
    path.mkdir(parents=True, exist_ok=True)
    if path.stat().st_gid != gid:
        os.chown(path, -1, gid)  # only root gets here: a user's own folders already have the user's group
    path.chmod(0o2770)


def copy_cached_weights(keras_home: Path) -> None:
    """Give the containers this machine's cached ImageNet weights (if any) instead of downloading them again."""
    cached = weights.cached_imagenet()
    target = keras_home / "models" / weights.VGG16_NOTOP_FILE
    if cached and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        partial.write_bytes(Path(cached).read_bytes())
        partial.replace(target)


def run_container(client, image: str, command: list[str], volumes: dict[str, Any], **run_args) -> int:
    """Run one task's container to the end, streaming its log; return its real exit status.

    Replaces kfp's ``run_docker_container``, whose ``auto_remove`` lets the engine delete a
    container before its status is read and then reports success (kubeflow/pipelines#13332; measured
    here: 4 of 20 failing containers reported as exit 0). The container is removed afterwards, also
    when this process is interrupted.
    """
    import docker

    container = client.containers.run(image=image, command=command, volumes=volumes, detach=True, **run_args)
    try:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pending = ""
        for chunk in container.logs(stream=True, follow=True):
            pending += decoder.decode(chunk)
            *lines, pending = pending.split("\n")
            for line in lines:
                print(line)
        if pending:
            print(pending)
        return int(container.wait()["StatusCode"])
    finally:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            container.remove(force=True)


def reliable_exit_codes() -> contextlib.AbstractContextManager[None]:
    """Within the block, kfp's DockerRunner runs containers with :func:`run_container` (exit status read first)."""
    return compat.docker_runner_calling(run_container)


def remove_containers(state_dir: Path, keep_runs: Collection[str] = ()) -> list[str]:
    """Remove this state directory's task containers, except those of ``keep_runs``; describe each removed."""
    import docker

    try:
        client = docker.from_env(timeout=ENGINE_TIMEOUT_S)
        found = client.containers.list(all=True, filters={"label": f"{LABEL_STATE}={state_dir}"})
    except docker.errors.DockerException:
        return []  # no engine, so no containers of ours
    removed = []
    with contextlib.closing(client):
        for container in found:
            run_id = container.labels.get(LABEL_RUN, "?")
            if run_id not in keep_runs:
                with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
                    container.remove(force=True)
                    removed.append(f"container {container.short_id} of run {run_id}")
    return removed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1][:300] if text else type(exc).__name__
