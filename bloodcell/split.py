"""Split: a stratified, deterministic train/val/calibration/test split (split-folders) and decode-once arrays.

split-folders makes three parts (train and val together, calibration, test: 70/15/15 by default, as the
original work's train/val/test); val is then carved from the first part, per class. So test and calibration
are the original work's test and validation images, and the models train on the rest but val.

Outputs, keyed by the split key (dataset hash + ratio + seed + sampling):
``gs://<bucket>/splits/<key>/split.json`` and ``counts.json``, and per image size
``gs://<bucket>/arrays/<key>/<size>/`` (see :mod:`bloodcell.arrays`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import splitfolders

from bloodcell import arrays, ingest, storage
from bloodcell.config import SUBSETS, Profile
from bloodcell.errors import DataError


@dataclass(frozen=True)
class SplitResult:
    split_uri: str
    counts: dict[str, dict[str, int]]
    array_uris: dict[int, str]


def split(dataset_uri: str, bucket: str, profile: Profile, sizes: list[int] | None = None) -> SplitResult:
    """Split the dataset at ``dataset_uri`` and build its arrays for ``sizes`` (default: the profile's)."""
    manifest = ingest.read_manifest(dataset_uri)
    key = split_key(manifest["dataset_hash"], profile)
    split_uri = f"gs://{bucket}/splits/{key}"
    split_json = storage.join(split_uri, "split.json")
    assignment = storage.read_json_if_present(split_json)
    if assignment is not None:
        print(f"cache hit: split {key} is already in {split_uri}")
    else:
        images = sample(manifest["images"], profile.max_images_per_class, profile.seed)
        assignment = assign(images, profile.split_ratio, profile.seed)
        assignment["classes"] = manifest["classes"]
        assignment["dataset_uri"] = dataset_uri
        storage.write_json(counts_of(assignment), storage.join(split_uri, "counts.json"))
        storage.write_json(assignment, split_json)  # last: marks the split complete
    counts = counts_of(assignment)
    _print_counts(counts)
    sizes = profile.image_sizes() if sizes is None else sizes
    array_uris = arrays.build(assignment, dataset_uri, {size: arrays_uri(split_uri, size) for size in sizes})
    return SplitResult(split_uri, counts, array_uris)


def arrays_uri(split_uri: str, size: int) -> str:
    """Where :func:`split` stores the arrays of ``split_uri`` at ``size`` pixels."""
    bucket, name = storage.split_uri(split_uri)
    return f"gs://{bucket}/arrays/{name.rstrip('/').rsplit('/', 1)[-1]}/{size}"


def dataset_of(split_uri: str) -> str:
    """The dataset a split was made of."""
    return storage.read_json(storage.join(split_uri, "split.json"))["dataset_uri"]


def read_counts(split_uri: str) -> dict[str, dict[str, int]]:
    """Images per subset and class."""
    return storage.read_json(storage.join(split_uri, "counts.json"))


def key_of(split_uri: str) -> str:
    """The split key of a split's location (which dataset and split recipe: which test set)."""
    return split_uri.rstrip("/").rsplit("/", 1)[-1]


def split_key(dataset_hash: str, profile: Profile) -> str:
    recipe = json.dumps([dataset_hash, profile.split_ratio, profile.seed, profile.max_images_per_class])
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def sample(images: list[dict], per_class: int, seed: int) -> list[dict]:
    """At most ``per_class`` images of each class, chosen deterministically; 0 keeps all."""
    if not per_class:
        return images
    by_class: dict[str, list[dict]] = {}
    for image in sorted(images, key=lambda i: i["path"]):
        by_class.setdefault(image["label"], []).append(image)
    # A reproducible sample, not a secret.
    rng = random.Random(seed)  # nosec B311
    chosen = []
    for label in sorted(by_class):
        group = by_class[label]
        chosen += sorted(rng.sample(group, min(per_class, len(group))), key=lambda i: i["path"])
    return chosen


def assign(images: list[dict], ratio: tuple[float, ...], seed: int) -> dict[str, Any]:
    """Run ``splitfolders.ratio`` over placeholder files (train+val, calibration, test), read back which image
    went where, then carve val from the first part (:func:`carve`)."""
    train, val, calibration, test = ratio
    by_token = {}
    with tempfile.TemporaryDirectory(prefix="bloodcell-split-") as tmp:
        source, output = Path(tmp, "in"), Path(tmp, "out")
        for image in images:
            token = image["path"].split("/", 1)[1].replace("/", "__")
            by_token[(image["label"], token)] = image
            (source / image["label"]).mkdir(parents=True, exist_ok=True)
            (source / image["label"] / token).touch()
        with contextlib.redirect_stderr(io.StringIO()):
            splitfolders.ratio(str(source), str(output), seed=seed, ratio=(train + val, calibration, test), move=True)
        parts = {
            subset: sorted(
                (by_token[(p.parent.name, p.name)] for p in (output / folder).glob("*/*")),
                key=lambda i: i["path"],
            )
            for subset, folder in (("first", "train"), ("calibration", "val"), ("test", "test"))
        }
    assignment = {**carve(parts.pop("first"), val / (train + val), seed), **parts}
    _check_every_class_in_every_subset(assignment, ratio)
    return {subset: assignment[subset] for subset in SUBSETS}


def carve(images: list[dict], share: float, seed: int) -> dict[str, list[dict]]:
    """``images`` split into train and val, ``share`` of each class (rounded, at least one) in val, chosen
    reproducibly."""
    by_class: dict[str, list[dict]] = {}
    for image in sorted(images, key=lambda i: i["path"]):
        by_class.setdefault(image["label"], []).append(image)
    rng = random.Random(seed)  # nosec B311 - a reproducible split, not a secret
    val = []
    for label in sorted(by_class):
        group = by_class[label]
        val += rng.sample(group, max(1, round(share * len(group))) if len(group) > 1 else 0)
    chosen = {image["path"] for image in val}
    return {
        "train": [i for i in sorted(images, key=lambda i: i["path"]) if i["path"] not in chosen],
        "val": sorted(val, key=lambda i: i["path"]),
    }


def counts_of(assignment: dict) -> dict[str, dict[str, int]]:
    return {s: dict(sorted(Counter(i["label"] for i in assignment[s]).items())) for s in SUBSETS}


def _check_every_class_in_every_subset(assignment: dict, ratio: tuple[float, ...]) -> None:
    counts = counts_of(assignment)
    labels = sorted(set().union(*(c.keys() for c in counts.values())))
    needed = max(3, int(1 / min(ratio)) + 1)
    short = [label for label in labels if any(counts[s].get(label, 0) == 0 for s in SUBSETS)]
    if short:
        detail = "; ".join(
            f"{label}: " + ", ".join(f"{s} {counts[s].get(label, 0)}" for s in SUBSETS) for label in short
        )
        raise DataError(
            f"class(es) too small to appear in every split with ratio {'/'.join(map(str, ratio))}: "
            f"{detail}. Each class needs about {needed} images or more: add images, or raise "
            "--set max_images_per_class (0 keeps every image)."
        )


def _print_counts(counts: dict[str, dict[str, int]]) -> None:
    labels = sorted(set().union(*(c.keys() for c in counts.values())))
    width = max(len(label) for label in labels)
    print(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SUBSETS))
    for label in labels:
        print(f"{label:<{width}}  " + "  ".join(f"{counts[s].get(label, 0):>6}" for s in SUBSETS))
