#!/usr/bin/env python3
"""Benchmark the data steps over the shared PBC images: wall time and peak memory per phase.

    .venv/bin/python benchmarks/bench_data.py [--data ../shared/datasets/PBC_dataset_normal_DIB]

Phases (each in its own process, against a fresh local GCS emulator): ingest from the folder,
ingest from a zip of it (into a second bucket, so no cache hit), split, and the decode-once array
store at 64, 128 and 224 px. Peak memory is the largest sum of RSS over the phase's process tree
(worker processes included), sampled every 50 ms. The output compares them with the targets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PHASES = {
    "ingest (folder)": "from bloodcell import ingest; print(ingest.ingest({source!r}, 'bench-folder'))",
    "ingest (zip)": "from bloodcell import ingest; print(ingest.ingest({zip!r}, 'bench-zip'))",
    "split": (
        "from bloodcell import config, split; "
        "print(split.split('gs://bench-folder/datasets/' + {hash!r}, 'bench-folder', "
        "config.resolve('laptop'), sizes=[]).counts)"
    ),
}
STORE = (
    "from bloodcell import config, split; "
    "split.split('gs://bench-folder/datasets/' + {hash!r}, 'bench-folder', config.resolve('laptop'), "
    "sizes=[{size}])"
)


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat.rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(entry))
            rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            continue
    total, stack = 0, [pid]
    while stack:
        current = stack.pop()
        total += rss.get(current, 0)
        stack += children.get(current, [])
    return total


def measure(code: str, env: dict[str, str]) -> tuple[float, int, str]:
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = process.communicate()
    done.set()
    sampler.join()
    if process.returncode:
        raise SystemExit(f"phase failed ({process.returncode}): {code}\n{out}")
    return time.perf_counter() - started, peak, out.strip().splitlines()[-1] if out.strip() else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "PBC_dataset_normal_DIB"))
    args = parser.parse_args()
    from bloodcell.local.services import LocalServices, free_port

    with tempfile.TemporaryDirectory(prefix="bloodcell-bench-") as tmp:
        services = LocalServices(Path(tmp, "state"), "bench-folder", free_port(), free_port())
        env = {**os.environ, **services.start(), "BLOODCELL_CACHE": str(Path(tmp, "cache"))}
        from bloodcell import storage

        storage.client.cache_clear()
        os.environ.update(env)
        storage.ensure_bucket("bench-zip")
        archive = Path(tmp, "PBC_dataset_normal_DIB.zip")
        started = time.perf_counter()
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
            for path in sorted(Path(args.data).rglob("*")):
                zf.write(path, Path("PBC_dataset_normal_DIB") / path.relative_to(args.data))
        print(
            f"made {archive.name}: {archive.stat().st_size / 2**20:.0f} MiB in {time.perf_counter() - started:.1f} s "
            "(not counted)"
        )
        rows = []
        try:
            seconds, peak, out = measure(PHASES["ingest (folder)"].format(source=args.data), env)
            dataset_hash = out.split("dataset_hash='")[1].split("'")[0]
            rows.append(("ingest (folder)", seconds, peak))
            seconds, peak, _ = measure(PHASES["ingest (zip)"].format(zip=str(archive)), env)
            rows.append(("ingest (zip)", seconds, peak))
            seconds, peak, _ = measure(PHASES["split"].format(hash=dataset_hash), env)
            rows.append(("split", seconds, peak))
            for size in (64, 128, 224):
                seconds, peak, _ = measure(STORE.format(hash=dataset_hash, size=size), env)
                rows.append((f"store {size}px" + (" (incl. image download)" if size == 64 else ""), seconds, peak))
        finally:
            services.stop()
            shutil.rmtree(Path(tmp, "cache"), ignore_errors=True)
    print(f"\n{'phase':<36}{'seconds':>9}{'peak MiB':>10}")
    for name, seconds, peak in rows:
        print(f"{name:<36}{seconds:>9.1f}{peak / 2**20:>10.0f}")
    ingest_split = rows[0][1] + rows[2][1]
    print(f"\ningest (folder) + split: {ingest_split:.1f} s (target <= 60 s)")
    print(f"slowest store: {max(r[1] for r in rows[3:]):.1f} s (target <= 90 s)")
    print(f"peak memory: {max(r[2] for r in rows) / 2**20:.0f} MiB (target <= 2048 MiB)")


if __name__ == "__main__":
    main()
