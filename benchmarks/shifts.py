#!/usr/bin/env python3
"""How each model of a run answers images unlike its training images (not a test; prints figures).

    .venv/bin/python benchmarks/shifts.py --summary summary.json --data ../shared/datasets/PBC_dataset_normal_DIB \
        [--state-dir .bloodcell] [--images 600] [--non-cells 100] [--json shifts.json]

A stratified sample of the run's test split, untouched and under each shift of :mod:`bloodcell.shifts`
(stain: hue and HED; a 2x zoom; blur; grayscale; JPEG at quality 10), and images that are no cells (noise,
flat colour, checkerboard, a drawn scene). Each image goes the way ``bloodcell predict`` reads a file: the
shifted image encoded (PNG; JPEG for the JPEG shift) and decoded by the same function. Per model and
condition: accuracy, share flagged unfamiliar, share referred (for either reason), share kept and the
accuracy of the kept cells. Needs the run's local services (``pipeline.py run`` leaves them running).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bloodcell import decisions, predict, shifts, storage  # noqa: E402
from bloodcell.arrays import decode_resized  # noqa: E402
from bloodcell.local import services  # noqa: E402
from bloodcell.runstore import RunStore  # noqa: E402

# The bar: these shifts should be flagged or referred (at least this share) ...
MUST_REFER = ("hue", "stain", "zoom", "grayscale", *shifts.NON_CELLS)
REFER_AT_LEAST = 0.90
# ... and on every shift, the cells kept should be this accurate, unless at most this share is kept.
KEPT_ACCURACY_AT_LEAST, OR_KEPT_AT_MOST = 0.97, 0.10


def encoded(image: Image.Image, as_jpeg: bool) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=shifts.JPEG_QUALITY) if as_jpeg else image.save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def conditions(paths: list[Path], sizes: list[int], non_cells: int) -> dict[str, dict[int, np.ndarray]]:
    """Per condition, the images at each model size, decoded as ``predict`` decodes a file."""
    result: dict[str, dict[int, list[np.ndarray]]] = {"untouched": {s: [] for s in sizes}}
    result.update({name: {s: [] for s in sizes} for name in (*shifts.CELL_SHIFTS, *shifts.NON_CELLS)})
    for path in paths:
        for size, image in zip(sizes, decode_resized(str(path), sizes), strict=True):
            result["untouched"][size].append(image)
        with Image.open(path) as original:
            rgb = original.convert("RGB")
        for name, shift in shifts.CELL_SHIFTS.items():
            if name == "jpeg":  # the shift is the file's compression: encode once, at quality 10
                decoded = decode_resized(encoded(rgb, as_jpeg=True), sizes)
            else:
                decoded = decode_resized(encoded(shift(rgb), as_jpeg=False), sizes)
            for size, image in zip(sizes, decoded, strict=True):
                result[name][size].append(image)
    for kind in shifts.NON_CELLS:
        for image in shifts.non_cell_images(kind, non_cells, seed=1):
            for size, array in zip(sizes, decode_resized(encoded(image, as_jpeg=False), sizes), strict=True):
                result[kind][size].append(array)
    return {name: {s: np.stack(v) for s, v in by_size.items()} for name, by_size in result.items()}


def measure(model, images: np.ndarray, labels: np.ndarray | None) -> dict[str, float | None]:
    rules = decisions.Rules.of(model)
    outputs = decisions.outputs_of(decisions.scoring_model(model), images, decisions.inference_batch(model, 64))
    decided = decisions.decide(rules, outputs)
    kept = decided.kept
    right = (decided.predicted == labels) if labels is not None else None
    return {
        "images": len(images),
        "accuracy": float(right.mean()) if right is not None else None,
        "flagged": float((~decided.familiar).mean()) if decided.familiar is not None else None,
        "referred": float(decided.refer.mean()),
        "kept": float(kept.mean()),
        "kept_accuracy": float(right[kept].mean()) if right is not None and kept.any() else None,
    }


def passes(condition: str, row: dict) -> bool | None:
    if condition == "untouched":
        return None
    ok = row["kept"] <= OR_KEPT_AT_MOST or (
        row["kept_accuracy"] is None or row["kept_accuracy"] >= KEPT_ACCURACY_AT_LEAST
    )
    if row["accuracy"] is None:  # no cells: nothing kept may be right
        ok = row["kept"] <= OR_KEPT_AT_MOST
    if condition in MUST_REFER:
        ok = ok and row["referred"] >= REFER_AT_LEAST
    return ok


def stratified(items: list[dict], count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[dict]] = {}
    for item in items:
        by_class.setdefault(item["label"], []).append(item)
    share = min(1.0, count / len(items))
    chosen = []
    for label in sorted(by_class):
        group = by_class[label]
        chosen += [group[i] for i in sorted(rng.permutation(len(group))[: max(1, round(share * len(group)))])]
    return chosen


@dataclass(frozen=True)
class RunImages:
    """A run's evaluated models and, per condition, a stratified test sample at each model's size."""

    metrics: dict[str, dict]  # per model: its evaluate metrics (model_uri, image_size, ...)
    arrays_uri: str  # the split's arrays at one size (any trainer's)
    classes: list[str]
    labels: np.ndarray  # the sample's true classes
    images: dict[str, dict[int, np.ndarray]]  # condition -> size -> (N, size, size, 3) uint8


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--summary", required=True, help="the run summary JSON (pipeline.py run --summary)")
    parser.add_argument("--data", required=True, help="the image folder the run ingested")
    parser.add_argument("--state-dir", default=".bloodcell", help="the run's state directory (its local services)")
    parser.add_argument("--images", type=int, default=600, help="test images sampled (stratified)")
    parser.add_argument("--non-cells", type=int, default=100, help="images of each non-cell kind")
    parser.add_argument("--json", help="also write the figures here")


def run_images(args: argparse.Namespace) -> RunImages:
    """What :func:`add_run_arguments` names: the run's models and the sampled images under every condition."""
    if not os.environ.get("STORAGE_EMULATOR_HOST"):
        os.environ.update(services.client_env(Path(args.state_dir)) or {})
    summary = json.loads(Path(args.summary).read_text())
    store = RunStore.at(summary["run_uri"])
    metrics = {n: storage.read_json(store.metrics_uri(n)) for n in summary["models"]}
    arrays_uri = store.require_record("cnn1").arrays_uri
    bucket, name = storage.split_uri(arrays_uri)
    split = storage.read_json(f"gs://{bucket}/splits/{name.split('/')[1]}/split.json")
    classes = split["classes"]
    chosen = stratified(split["test"], args.images, seed=0)
    labels = np.array([classes.index(item["label"]) for item in chosen])
    sizes = sorted({int(m["image_size"]) for m in metrics.values()})
    started = time.perf_counter()
    images = conditions([Path(args.data, item["path"]) for item in chosen], sizes, args.non_cells)
    print(f"{len(chosen)} test images and {args.non_cells} of each non-cell kind, {len(images)} conditions, "
          f"prepared in {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    return RunImages(metrics, arrays_uri, classes, labels, images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser)
    args = parser.parse_args()
    run = run_images(args)
    results: dict[str, dict[str, dict]] = {}
    for model_name, result in run.metrics.items():
        model, _ = predict.load(result["model_uri"])
        size = int(model.input_shape[1])
        results[model_name] = {}
        for condition, by_size in run.images.items():
            cell = condition not in shifts.NON_CELLS
            row = measure(model, by_size[size], run.labels if cell else None)
            row["passes"] = passes(condition, row)
            results[model_name][condition] = row
            print(format_row(model_name, condition, row), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    failed = [f"{m}/{c}" for m, rows in results.items() for c, r in rows.items() if r["passes"] is False]
    print(f"bar: >= {REFER_AT_LEAST:.0%} flagged or referred for {', '.join(MUST_REFER)}; kept cells >= "
          f"{KEPT_ACCURACY_AT_LEAST:.0%} accurate or <= {OR_KEPT_AT_MOST:.0%} kept on every shift")  # fmt: skip
    print("all conditions meet the bar" if not failed else f"below the bar: {', '.join(failed)}")


def format_row(model: str, condition: str, row: dict) -> str:
    def share(value: float | None) -> str:
        return "    -" if value is None else f"{value:6.1%}"

    verdict = {None: "", True: "ok", False: "BELOW THE BAR"}[row["passes"]]
    return (
        f"{model:9} {condition:12} accuracy {share(row['accuracy'])}  flagged {share(row['flagged'])}  referred "
        f"{share(row['referred'])}  kept {share(row['kept'])}  kept accuracy {share(row['kept_accuracy'])}  {verdict}"
    )


if __name__ == "__main__":
    main()
