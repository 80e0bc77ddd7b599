"""Print pins for the packages of a pip install report that a lock file does not pin yet.

    python docker/lock_extra.py REPORT.json constraints.txt >> constraints.txt

Used by `make lock` for the gpu extra (its CUDA wheels are ranges in TensorFlow's metadata).
"""

import json
import re
import sys

TOOLS = {"pip", "setuptools", "wheel"}  # unpinned, as `pip freeze` leaves them


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main(report_path: str, lock_path: str) -> None:
    with open(lock_path) as lock:
        pinned = {normalized(line.split("==")[0]) for line in lock if "==" in line}
    with open(report_path) as report:
        resolved = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.load(report)["install"]}
    extra = sorted(
        f"{name}=={version}"
        for name, version in resolved.items()
        if normalized(name) not in pinned | TOOLS and normalized(name) != "bloodcell"
    )
    if extra:
        print("# the gpu extra only (make image-gpu)")
        print("\n".join(extra))


if __name__ == "__main__":
    main(*sys.argv[1:3])
