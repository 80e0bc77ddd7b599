#!/usr/bin/env python3
"""Throughput of the local object store as the steps use it (prints figures).

    .venv/bin/python benchmarks/object_store.py [--objects 2000] [--size 25000] [--large 4] [--rounds 2]

Starts the local services in a scratch state directory, then uploads and downloads ``--objects`` files of
``--size`` bytes (ingest's images are 20-30 kB) with the pipeline's own ``storage.upload_many`` /
``download_many`` (8 threads), and ``--large`` files of 50 MB (split's arrays). Run it from a checkout of
another version (``PYTHONPATH=. python /path/to/object_store.py``: it uses only ``LocalServices`` and those two
functions) to compare versions on one machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from bloodcell import storage
from bloodcell.local import services


def timed_round_trip(folder: Path, count: int, size: int, prefix: str) -> tuple[float, float]:
    """Seconds to upload then download ``count`` random files of ``size`` bytes."""
    source, target = folder / f"{prefix}-up", folder / f"{prefix}-down"
    source.mkdir()
    target.mkdir()
    files = []
    for index in range(count):
        path = source / f"{index}.bin"
        path.write_bytes(os.urandom(size))
        files.append((path, f"gs://bench/{prefix}/{index}.bin"))
    started = time.perf_counter()
    storage.upload_many(files)
    uploaded = time.perf_counter() - started
    started = time.perf_counter()
    storage.download_many([(uri, target / path.name) for path, uri in files])
    return uploaded, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--size", type=int, default=25_000)
    parser.add_argument("--large", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="bloodcell-store-bench-"))
    local = services.LocalServices(state, "bench", services.free_port(), services.free_port())
    os.environ.update(local.start())
    try:
        for round_ in range(args.rounds):
            up, down = timed_round_trip(state, args.objects, args.size, f"small{round_}")
            print(
                f"round {round_ + 1}: {args.objects} x {args.size:,} B: upload {args.objects / up:.0f}/s, "
                f"download {args.objects / down:.0f}/s"
            )
            up, down = timed_round_trip(state, args.large, 50_000_000, f"large{round_}")
            print(
                f"round {round_ + 1}: {args.large} x 50 MB: upload {args.large * 50 / up:.0f} MB/s, "
                f"download {args.large * 50 / down:.0f} MB/s"
            )
    finally:
        local.stop()


if __name__ == "__main__":
    main()
