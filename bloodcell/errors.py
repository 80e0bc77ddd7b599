"""Errors that carry a message a user can act on (what, where, how to fix), and the one place that
turns them into a line on stderr and exit status 2 for every entry point (``pipeline.py``, the
``bloodcell`` command and each pipeline step)."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

USER_ERROR_EXIT = 2
# Kubernetes makes this file's text the container's termination message, which Argo's retry rule reads
# (manifests/kfp/patches/workflow-defaults.yaml): a step whose accelerator failed starts with this mark.
TERMINATION_LOG = Path("/dev/termination-log")
RETRYABLE_FAILURE = "bloodcell: retryable failure"
# Words of a CUDA/XLA runtime failure in an error of the framework (not of our code or data).
_DEVICE_FAILURE_WORDS = ("CUDA", "cuDNN", "cuBLAS", "NCCL", "GPU", "device")
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
LOCAL_STORE_ENV = "BLOODCELL_LOCAL_STORE"  # the local emulator's data folder (set by `pipeline.py run`)


class BloodcellError(Exception):
    """A failure explained for the user; entry points print it without a traceback."""


class ConfigError(BloodcellError):
    """A profile name, setting or override that cannot be applied."""


class DataError(BloodcellError):
    """The input data cannot be used as given."""


class StorageError(BloodcellError):
    """Object storage refused or lost a request."""


class DiskFullError(BloodcellError):
    """A local disk (state directory, cache or temporary folder) has no space left."""


def user_message(exc: BaseException) -> str | None:
    """What to tell the user about ``exc``, or None when it is a bug (which keeps its traceback)."""
    if isinstance(exc, BloodcellError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return str(disk_full_error(exc.filename))
    return None


@contextlib.contextmanager
def exits_on_user_error(prefix: str = "error") -> Iterator[None]:
    """An error the user can act on becomes ``<prefix>: <message>`` on stderr and exit status 2."""
    try:
        yield
    except Exception as exc:
        message = user_message(exc)
        if message is None:
            raise
        print(f"{prefix}: {message}", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None


def is_device_failure(exc: BaseException) -> bool:
    """The accelerator (or its driver) failed rather than the step: worth another try on a healthy one. An
    out-of-memory error is not (the same batch fails again)."""
    tf = sys.modules.get("tensorflow")  # only a step that loaded TensorFlow can have had its GPU fail
    if tf is None or not isinstance(exc, tf.errors.OpError) or isinstance(exc, tf.errors.ResourceExhaustedError):
        return False
    if isinstance(exc, (tf.errors.InternalError, tf.errors.UnavailableError)):
        return True
    return any(word in str(exc) for word in _DEVICE_FAILURE_WORDS)


@contextlib.contextmanager
def retryable_on_device_failure(log: Path | None = None) -> Iterator[None]:
    """A device failure is marked retryable in the pod's termination message (where there is one: in a
    Kubernetes container), then raised as it was."""
    log = log or TERMINATION_LOG
    try:
        yield
    except Exception as exc:
        if is_device_failure(exc) and log.exists():
            first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            with contextlib.suppress(OSError):
                log.write_text(f"{RETRYABLE_FAILURE}: {type(exc).__name__}: {first_line}"[:1024])
        raise


def disk_full_error(path: str | Path | None, what: str = "") -> DiskFullError:
    """A clear error for a full disk: which folder, how much is free, what to do."""
    candidates = (
        [Path(path)] if path else [Path(p) for p in (os.environ.get(LOCAL_STORE_ENV), tempfile.gettempdir()) if p]
    )
    places = []
    for place in candidates:
        probe = next((p for p in [place, *place.parents] if p.exists()), place)
        try:
            free = f"{shutil.disk_usage(probe).free / 2**20:.1f} MiB free"
        except OSError:
            free = "free space unknown"
        places.append(f"{place} ({free})")
    return DiskFullError(
        f"no space left on device{' ' + what if what else ''}: {' or '.join(places)}. Free space there, or put "
        "the folder on a larger disk (--state-dir for the local services' data, BLOODCELL_CACHE for downloads, "
        "TMPDIR for temporary files), then resume the run. Objects already in the bucket are intact: an upload "
        "is committed only when complete."
    )
