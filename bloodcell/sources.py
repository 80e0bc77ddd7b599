"""Bring a dataset source to a local folder: http(s) download, zip, folder or ``gs://``.

An archive source (a zip: local, http(s) or ``gs://``) is identified by the SHA-256 of its bytes, checked
against ``--data-sha256`` before it is extracted; a folder source (local or a ``gs://`` prefix) by the
SHA-256 of its content (:func:`bloodcell.ingest.content_sha256`), checked by ingest before anything is stored.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import requests
from tqdm import tqdm

from bloodcell import storage
from bloodcell.config import MENDELEY_URL, MENDELEY_ZIP_BYTES
from bloodcell.errors import DataError

EXPECTED_BYTES = {MENDELEY_URL: MENDELEY_ZIP_BYTES}
CONNECT_TIMEOUT_S = 4
READ_TIMEOUT_S = 60
ATTEMPTS = 4
MAX_UNCOMPRESSED_BYTES = 20 * 2**30
MAX_COMPRESSION_RATIO = 200
MAX_MEMBERS = 200_000  # the official zip has about 17,100 files
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
OFFLINE_HINT = (
    "Download the zip elsewhere and pass it with --data /path/to/PBC_dataset_normal_DIB.zip "
    "(or an extracted folder, or a gs:// URI)."
)


def cache_dir() -> Path:
    return Path(os.environ.get("BLOODCELL_CACHE", Path.home() / ".cache" / "bloodcell"))


@dataclass(frozen=True)
class Fetched:
    folder: Path  # the dataset's files, extracted or as given
    archive_sha256: str | None  # SHA-256 of the archive's bytes; None for a folder source


def fetch(source: str, workdir: Path, expected_sha256: str = "") -> Fetched:
    """The dataset named by ``source`` in a local folder; an archive must match ``expected_sha256`` (if given)."""
    expected = parse_sha256(expected_sha256)
    archive = _local_archive(source)
    if archive is None:
        return Fetched(_local_folder(source, workdir), None)
    digest = file_sha256(archive)
    verify_sha256(source, expected, digest, f"archive {archive}")
    return Fetched(extract_zip(archive, workdir / "extracted"), digest)


def _local_archive(source: str) -> Path | None:
    """The local copy of an archive source (downloaded first); None for a folder source."""
    if source.startswith(("http://", "https://")):
        return download(source, cache_dir() / "downloads")
    if source.startswith("gs://"):
        return storage.cached_download(source, cache_dir() / "gcs") if source.endswith(".zip") else None
    path = _existing_path(source)
    if path.is_dir():
        return None
    if zipfile.is_zipfile(path) or path.suffix.lower() == ".zip":
        return path
    raise DataError(f"data source {source!r} is a file but not a zip archive; pass a zip or a folder.")


def _local_folder(source: str, workdir: Path) -> Path:
    return _fetch_gcs_prefix(source, workdir) if source.startswith("gs://") else _existing_path(source)


def _existing_path(source: str) -> Path:
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(
            f"data source {source!r} does not exist. Pass a folder of class sub-folders, a zip, "
            f"an http(s) URL or a gs:// URI (default: the official PBC zip, {MENDELEY_URL})."
        )
    return path


def parse_sha256(text: str) -> str:
    """``text`` as a lower-case hex SHA-256 digest ("" for none); a clear error for anything else."""
    digest = text.strip().lower()
    if digest and not SHA256_HEX.fullmatch(digest):
        raise DataError(
            f"--data-sha256 {text!r} is not a SHA-256 digest: expected 64 hex characters, e.g. the first "
            "word of `sha256sum data.zip`, or the source_sha256 that ingest printed."
        )
    return digest


def verify_sha256(source: str, expected: str, actual: str, what: str) -> None:
    """Stop, before anything is extracted or stored, when ``actual`` is not the pinned ``expected``."""
    if expected and actual != expected:
        raise DataError(
            f"data source {source!r}: the SHA-256 of its {what} is {actual}, but --data-sha256 expects "
            f"{expected}. Nothing was stored. Check that this is the data you pinned; if it changed on "
            "purpose, pass its new digest."
        )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download(url: str, target_dir: Path) -> Path:
    """Stream ``url`` to disk with a progress bar, resuming a partial file; retry transient errors."""
    target = download_path(url, target_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    expected = EXPECTED_BYTES.get(url)
    if target.exists() and (expected is None or target.stat().st_size == expected):
        print(f"download cache hit: {target}")
        return target
    partial = target.with_name(target.name + ".partial")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            _download_once(url, partial)
            break
        except (requests.ConnectionError, requests.Timeout) as exc:
            if _offline(exc) or attempt == ATTEMPTS:
                raise DataError(f"cannot download {url}: {_reason(exc)}. {OFFLINE_HINT}") from None
            print(f"download interrupted ({_reason(exc)}); retry {attempt}/{ATTEMPTS - 1}")
            time.sleep(2**attempt)
    size = partial.stat().st_size
    if expected is not None and size != expected:
        partial.unlink()
        raise DataError(
            f"download of {url} has {size:,} bytes, expected {expected:,}; the partial file was "
            f"removed, run again to restart. {OFFLINE_HINT}"
        )
    partial.replace(target)
    return target


def download_path(url: str, target_dir: Path) -> Path:
    """Where ``url`` is cached: a folder named by the URL's SHA-256 (two URLs never share a file), the URL's
    file name (or ``download.zip``) inside."""
    name = "pbc.zip" if url == MENDELEY_URL else PurePosixPath(urlsplit(url).path).name
    if name in ("", ".", ".."):
        name = "download.zip"
    return target_dir / hashlib.sha256(url.encode()).hexdigest()[:32] / name


def _download_once(url: str, partial: Path) -> None:
    offset = partial.stat().st_size if partial.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, stream=True, headers=headers, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) as response:
        if response.status_code == 416:  # range past the end: the file is complete
            return
        if response.status_code >= 400:
            raise DataError(f"download of {url} failed: HTTP {response.status_code} {response.reason}")
        if "text/html" in response.headers.get("Content-Type", ""):
            raise DataError(
                f"{url} returned an HTML page, not a zip archive (a login or error page?). "
                "Check the URL, or download the zip in a browser and pass its path with --data."
            )
        resumed = response.status_code == 206
        mode = "ab" if resumed else "wb"
        total = int(response.headers.get("Content-Length", 0)) + (offset if resumed else 0)
        with (
            open(partial, mode) as out,
            tqdm(
                total=total or None,
                initial=offset if resumed else 0,
                unit="B",
                unit_scale=True,
                desc=f"download {partial.name.removesuffix('.partial')}",
                mininterval=2,
            ) as bar,
        ):
            for chunk in response.iter_content(chunk_size=1 << 20):
                out.write(chunk)
                bar.update(len(chunk))


def _offline(exc: Exception) -> bool:
    text = str(exc)
    return any(
        s in text
        for s in (
            "NameResolutionError",
            "Name or service not known",
            "Temporary failure in name resolution",
            "Network is unreachable",
        )
    )


def _reason(exc: Exception) -> str:
    if _offline(exc):
        return "no network connection (the host name cannot be resolved)"
    return type(exc).__name__ + ": " + str(exc)[:200]


def extract_zip(archive: Path, dest: Path) -> Path:
    """Extract ``archive`` into ``dest`` after checking every entry; return ``dest``."""
    marker = dest / ".bloodcell-extracted"
    if marker.exists() and marker.read_text() == f"{archive.resolve()}:{archive.stat().st_size}":
        return dest
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.is_dir()]
            _check_members(archive, members)
            if dest.exists():
                shutil.rmtree(dest)
            dest.mkdir(parents=True)
            for member in tqdm(members, desc=f"extract {archive.name}", unit=" files", mininterval=2):
                zf.extract(member, dest)
    except zipfile.BadZipFile as exc:
        raise DataError(
            f"{archive} is not a readable zip archive ({exc}); it is probably truncated or corrupt. "
            f"Download it again (the official zip has {MENDELEY_ZIP_BYTES:,} bytes)."
        ) from None
    except (zipfile.LargeZipFile, EOFError, OSError) as exc:
        raise DataError(f"{archive} could not be extracted ({exc}); download it again.") from None
    marker.write_text(f"{archive.resolve()}:{archive.stat().st_size}")
    return dest


def _check_members(archive: Path, members: list[zipfile.ZipInfo]) -> None:
    if len(members) > MAX_MEMBERS:
        raise DataError(
            f"{archive} holds {len(members):,} files (limit {MAX_MEMBERS:,}): not the PBC dataset? Refusing to extract."
        )
    total = 0
    for member in members:
        name = member.filename
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise DataError(
                f"{archive} contains the unsafe entry {name!r} (an absolute path or '..' would write "
                "outside the extraction folder). Refusing to extract; use a trusted copy of the dataset."
            )
        if stat.S_ISLNK(member.external_attr >> 16):
            raise DataError(
                f"{archive} contains the symbolic link {name!r}; links in archives can point outside "
                "the extraction folder. Refusing to extract; use a trusted copy of the dataset."
            )
        total += member.file_size
        if member.compress_size and member.file_size / member.compress_size > MAX_COMPRESSION_RATIO:
            raise DataError(
                f"{archive} entry {name!r} expands {member.file_size / member.compress_size:.0f}x "
                f"(limit {MAX_COMPRESSION_RATIO}x): a zip bomb? Refusing to extract."
            )
    if total > MAX_UNCOMPRESSED_BYTES:
        raise DataError(
            f"{archive} would extract to {total / 2**30:.1f} GiB (limit "
            f"{MAX_UNCOMPRESSED_BYTES / 2**30:.0f} GiB): not the PBC dataset? Refusing to extract."
        )


def _fetch_gcs_prefix(source: str, workdir: Path) -> Path:
    """Download every object under the prefix ``source``, each to the file its name maps to."""
    prefix = source.rstrip("/") + "/"
    local = workdir / "gcs"
    pairs = [
        (uri, storage.local_path(local, uri[len(prefix) :], uri))
        for uri in storage.list_uris(prefix)
        if not uri.endswith("/")  # a zero-byte "folder" placeholder some tools create
    ]
    if not pairs:
        raise DataError(f"no objects under {source}; check the bucket and prefix.")
    storage.download_many(pairs)
    return local
