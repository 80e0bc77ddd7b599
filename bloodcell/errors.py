"""Errors that carry a message a user can act on (what, where, how to fix), and the one place that
turns them into a line on stderr and exit status 2 for every entry point (``pipeline.py``, the
``bloodcell`` command and each pipeline step)."""

from __future__ import annotations

import contextlib
import errno
import sys
from collections.abc import Iterator

USER_ERROR_EXIT = 2
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


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
        from bloodcell import storage  # storage imports this module

        return str(storage.disk_full_error(exc.filename))
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
