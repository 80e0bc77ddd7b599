#!/usr/bin/env python3
"""``make test-data``: download the official PBC zip once, unpack it into the cache, and point the suite at it.

    .venv/bin/python tests/get_test_data.py

The zip (Mendeley Data snkd93bnjr, 281,366,219 bytes; the size is checked, and its SHA-256 printed) goes to
``$BLOODCELL_CACHE/downloads`` (default ``~/.cache/bloodcell``), is unpacked (bounded like every zip bloodcell
reads) into ``$BLOODCELL_CACHE/test-data``, and the class folder's location is written to
``$BLOODCELL_CACHE/test-data/location``, where the suite looks when neither ``BLOODCELL_TEST_DATA`` is set
nor ``../shared/datasets/PBC_dataset_normal_DIB`` exists.
"""

from __future__ import annotations

import sys
from pathlib import Path

from bloodcell import ingest, sources
from bloodcell.config import MENDELEY_URL
from bloodcell.errors import BloodcellError


def location_file() -> Path:
    """Where the unpacked class folder's location is recorded (the suite's conftest reads it)."""
    return sources.cache_dir() / "test-data" / "location"


def main() -> int:
    cache = sources.cache_dir()
    try:
        archive = sources.download(MENDELEY_URL, cache / "downloads")
        print(f"{archive}: SHA-256 {sources.file_sha256(archive)}")
        folder = ingest.find_class_root(sources.extract_zip(archive, cache / "test-data" / "extracted"))
    except BloodcellError as exc:
        print(
            f"error: {exc} For the tests: unpack it and set BLOODCELL_TEST_DATA=/path/to/PBC_dataset_normal_DIB.",
            file=sys.stderr,
        )
        return 2
    location_file().write_text(str(folder))
    print(f"test images: {folder} (make test finds them there; or set BLOODCELL_TEST_DATA={folder})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
