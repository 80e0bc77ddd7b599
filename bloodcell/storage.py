"""Object storage (Google Cloud Storage, or a local emulator via ``STORAGE_EMULATOR_HOST``).

Everything the workflow produces lands in a bucket under ``gs://`` URIs. Writes of multi-object
results finish with a small marker object, written last, so a reader never takes a half-written
result as complete.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import storage
from google.cloud.storage import transfer_manager

# The storage client's own retry predicate: it has no public name, and ours must add to it.
from google.cloud.storage.retry import DEFAULT_RETRY
from google.oauth2 import credentials as oauth2

from bloodcell import compat
from bloodcell.config import STORE_TOKEN_ENV
from bloodcell.errors import DISK_FULL_ERRNOS, LOCAL_STORE_ENV, StorageError, disk_full_error

FULL_BELOW_BYTES = 64 * 2**20


def local_store_full() -> bool:
    """Whether the local emulator's data folder is (nearly) out of space: its 5xx are then not transient."""
    root = os.environ.get(LOCAL_STORE_ENV)
    if not root:
        return False
    try:
        return shutil.disk_usage(root).free < FULL_BELOW_BYTES
    except OSError:
        return False


def _retryable(exc: BaseException) -> bool:
    return compat.storage_should_retry(exc) and not local_store_full()


RETRY = DEFAULT_RETRY.with_predicate(_retryable).with_deadline(300)


def set_retry_deadline(seconds: float) -> None:
    """How long requests retry: pipeline steps ride out minutes of outage, interactive commands answer in seconds."""
    global RETRY
    RETRY = RETRY.with_deadline(seconds)


UPLOAD_WORKERS = 8  # the client keeps 10 pooled connections per host


@functools.lru_cache(maxsize=1)
def client() -> storage.Client:
    """This process's storage client (:func:`new_client`, made once)."""
    return new_client()


def new_client() -> storage.Client:
    """A storage client; talks to the emulator when ``STORAGE_EMULATOR_HOST`` is set, with its token when
    ``BLOODCELL_STORE_TOKEN`` is (the local store's front refuses requests without it)."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        token = os.environ.get(STORE_TOKEN_ENV)
        return storage.Client(
            project=os.environ.get("GOOGLE_CLOUD_PROJECT", "bloodcell-local"),
            # A bearer token as credentials reaches every request, resumable-upload recovery included.
            credentials=oauth2.Credentials(token) if token else None,
        )
    return storage.Client()


def token_header(token: str | None) -> dict[str, str]:
    """The header that carries the local store's token, for requests made without the storage client."""
    return {"Authorization": f"Bearer {token}"} if token else {}


def split_uri(uri: str) -> tuple[str, str]:
    """``gs://bucket/a/b`` -> ``("bucket", "a/b")``."""
    if not uri.startswith("gs://"):
        raise StorageError(f"expected a gs://bucket/path URI, got {uri!r}")
    bucket, _, name = uri[5:].partition("/")
    if not bucket:
        raise StorageError(f"URI {uri!r} names no bucket")
    return bucket, name


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def blob(uri: str) -> storage.Blob:
    split_uri(uri)  # a clear error for what is not gs://bucket/name
    return storage.Blob.from_uri(uri, client=client())


def ensure_bucket(name: str) -> None:
    """Create ``name`` if it does not exist (the emulator starts empty)."""

    def create() -> None:
        # ingest's first storage call: RETRY, the steps' budget, so a new pod's dropped first packets are retried.
        with contextlib.suppress(gexc.Conflict):
            client().create_bucket(name, retry=RETRY)

    _call(f"gs://{name}", create)


def exists(uri: str) -> bool:
    return _call(uri, lambda: blob(uri).exists(retry=RETRY))


def size(uri: str) -> int:
    """The object's size in bytes."""

    def fetch() -> int:
        target = blob(uri)
        target.reload(retry=RETRY)
        return int(target.size or 0)

    return _call(uri, fetch)


def upload_file(path: str | Path, uri: str, content_type: str | None = None) -> str:
    _call(uri, lambda: blob(uri).upload_from_filename(str(path), content_type=content_type, retry=RETRY))
    return uri


def create_if_absent(data: bytes | str, uri: str) -> bool:
    """Atomically create ``uri`` holding ``data``; False when it already exists (someone else won)."""

    def create() -> bool:
        try:
            blob(uri).upload_from_string(data, if_generation_match=0, retry=RETRY)
            return True
        except gexc.PreconditionFailed:
            return False

    return _call(uri, create)


def upload_bytes(data: bytes | str, uri: str, content_type: str = "application/octet-stream") -> str:
    _call(uri, lambda: blob(uri).upload_from_string(data, content_type=content_type, retry=RETRY))
    return uri


def write_json(obj: Any, uri: str) -> str:
    return upload_bytes(json.dumps(obj, indent=2, sort_keys=True), uri, "application/json")


def read_bytes(uri: str) -> bytes:
    return _call(uri, lambda: blob(uri).download_as_bytes(retry=RETRY))


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def read_bytes_if_present(uri: str) -> bytes | None:
    """``uri``'s bytes, or None when there is no such object: one request, where exists-then-read is two."""

    def read() -> bytes | None:
        try:
            return blob(uri).download_as_bytes(retry=RETRY)
        except gexc.NotFound:
            return None

    return _call(uri, read)


def read_json_if_present(uri: str) -> Any | None:
    data = read_bytes_if_present(uri)
    return None if data is None else json.loads(data)


def download_file(uri: str, path: str | Path) -> Path:
    """Download ``uri`` to ``path`` atomically (a partial download never sits at ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Each download its own partial file: two runs may fill the same cache entry at once (same bytes).
    partial = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        _call(uri, lambda: blob(uri).download_to_filename(str(partial), retry=RETRY))
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def local_path(root: str | Path, relative: str, origin: str) -> Path:
    """``root/relative`` for an object name (or part of one), refused unless it stays inside ``root``.

    Object names are free text: ``/etc/x``, ``a/../../x``, ``a//b`` or ``a/./b`` would write outside
    ``root`` or onto another object's file, so empty, ``.`` and ``..`` segments are errors.
    """
    segments = relative.split("/")
    if not relative or "\0" in relative or any(s in ("", ".", "..") for s in segments):
        raise StorageError(
            f"refusing {origin}: its name {relative!r} is absolute or has an empty, '.' or '..' segment (or a NUL "
            f"byte), so it does not name a file inside {root}. Rename it (e.g. gs://bucket/a/b, not gs://bucket//a "
            "or gs://bucket/a/../b)."
        )
    base = Path(root).resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base) or path == base:  # e.g. through a symbolic link inside ``root``
        raise StorageError(f"refusing {origin}: it maps to {path}, outside {base}. Remove the symbolic link there.")
    return path


def cached_download(uri: str, cache_dir: str | Path) -> Path:
    """Download ``uri`` under ``cache_dir`` unless an identical copy is there: the cached file's own MD5 is
    compared with the object's each time (a cache shared with containers is group-writable: a stamp beside the
    file would vouch for whatever the file became)."""
    bucket, name = split_uri(uri)
    target = local_path(cache_dir, f"{bucket}/{name}", uri)
    remote = blob(uri)
    _call(uri, lambda: remote.reload(retry=RETRY))
    if remote.md5_hash and target.is_file() and file_md5(target) == remote.md5_hash:
        return target
    download_file(uri, target)
    return target


def file_md5(path: Path) -> str:
    """The base64 MD5 of ``path``'s bytes, as GCS gives an object's ``md5_hash``."""
    digest = hashlib.md5(usedforsecurity=False)  # what GCS gives as an object's md5_hash
    with open(path, "rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


def list_uris(prefix_uri: str) -> list[str]:
    bucket, prefix = split_uri(prefix_uri)
    blobs = _call(prefix_uri, lambda: list(client().list_blobs(bucket, prefix=prefix, retry=RETRY)))
    return [f"gs://{bucket}/{b.name}" for b in blobs]


def upload_many(files: Iterable[tuple[Path, str]], workers: int = UPLOAD_WORKERS) -> None:
    """Upload ``(local_path, gs_uri)`` pairs concurrently; raise on the first failure."""
    pairs = [(str(path), blob(uri)) for path, uri in files]
    if not pairs:
        return
    results = transfer_manager.upload_many(
        pairs,
        max_workers=workers,
        worker_type=transfer_manager.THREAD,
        upload_kwargs={"retry": RETRY},
        raise_exception=False,
    )
    for (path, target), result in zip(pairs, results, strict=True):
        if isinstance(result, Exception):
            uri = f"gs://{target.bucket.name}/{target.name}"
            _raise_if_local_store_full(uri, result)
            raise StorageError(f"upload of {path} to {uri} failed: {result}") from result


def download_many(pairs: list[tuple[str, Path]], workers: int = UPLOAD_WORKERS) -> None:
    """Download ``(gs_uri, local_path)`` pairs concurrently; raise on the first failure."""
    jobs = []
    for uri, path in pairs:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        jobs.append((blob(uri), str(path)))
    results = transfer_manager.download_many(
        jobs,
        max_workers=workers,
        worker_type=transfer_manager.THREAD,
        download_kwargs={"retry": RETRY},
        raise_exception=False,
    )
    for (uri, _), result in zip(pairs, results, strict=True):
        if isinstance(result, Exception):
            if isinstance(result, OSError) and result.errno in DISK_FULL_ERRNOS:
                raise disk_full_error(result.filename, f"while downloading {uri}") from result
            raise StorageError(f"download of {uri} failed: {result}") from result


def _call(uri: str, action: Any) -> Any:
    try:
        return action()
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise disk_full_error(exc.filename, f"while transferring {uri}") from exc
        _raise_if_local_store_full(uri, exc)
        raise StorageError(
            f"cannot reach object storage for {uri}: {exc}. "
            f"Check STORAGE_EMULATOR_HOST ({os.environ.get('STORAGE_EMULATOR_HOST') or 'unset'}) "
            "or your GCS credentials."
        ) from exc
    except gexc.NotFound as exc:
        raise StorageError(f"not found in object storage: {uri}") from exc
    except gexc.RetryError as exc:
        where = os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"
        raise StorageError(
            f"object storage ({where}) does not answer for {uri}: gave up after retrying ({exc.cause}). "
            "Start it (locally: python pipeline.py run starts it) or check STORAGE_EMULATOR_HOST."
        ) from exc
    except Exception as exc:  # API errors, exhausted retries, the client's InvalidResponse
        _raise_if_local_store_full(uri, exc)
        raise StorageError(f"object storage request for {uri} failed: {exc}") from exc


def _raise_if_local_store_full(uri: str, exc: BaseException) -> None:
    if local_store_full():
        raise disk_full_error(os.environ[LOCAL_STORE_ENV], f"writing {uri} to the local object store") from exc
