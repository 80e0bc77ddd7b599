"""Decode-once array store: uint8 ``.npy`` files per split and image size, memory-mappable.

Layout under ``gs://<bucket>/arrays/<split key>/<size>/``: ``{train,val,test}_x.npy``
(N x size x size x 3, uint8), ``{train,val,test}_y.npy`` (int32 class indices), ``meta.json`` and
``_COMPLETE`` (written last). Reading needs numpy only, no TensorFlow.
"""

from __future__ import annotations

import os
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image
from tqdm import tqdm

from bloodcell import sources, storage
from bloodcell.config import SUBSETS
from bloodcell.errors import DataError

COMPLETE = "_COMPLETE"


def build(assignment: dict, dataset_uri: str, targets: dict[int, str]) -> dict[int, str]:
    """Write the arrays for every ``size -> uri`` in ``targets`` that is not stored yet."""
    missing = {size: uri for size, uri in targets.items() if not storage.exists(storage.join(uri, COMPLETE))}
    for size in sorted(set(targets) - set(missing)):
        print(f"cache hit: {size}px arrays in {targets[size]}")
    if not missing:
        return targets
    classes = assignment["classes"]
    local_images = _download_images(assignment, dataset_uri)
    sizes = sorted(missing)
    with (
        tempfile.TemporaryDirectory(prefix="bloodcell-arrays-") as tmp,
        ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool,
    ):
        for subset in SUBSETS:
            items = assignment[subset]
            writers = {
                size: NpyWriter(Path(tmp, f"{size}_{subset}_x.npy"), (len(items), size, size, 3)) for size in sizes
            }
            paths = [str(_image_path(local_images, item, dataset_uri)) for item in items]
            decoded = pool.map(decode_resized, paths, [sizes] * len(paths), chunksize=32)
            for images in tqdm(
                decoded,
                total=len(paths),
                unit=" img",
                mininterval=2,
                desc=f"arrays {subset} {'/'.join(map(str, sizes))}px",
            ):
                for size, image in zip(sizes, images, strict=True):
                    writers[size].write(image)
            labels = np.array([classes.index(item["label"]) for item in items], dtype=np.int32)
            for size, writer in writers.items():
                writer.close()
                np.save(Path(tmp, f"{size}_{subset}_y.npy"), labels)
        for size, uri in missing.items():
            for subset in SUBSETS:
                storage.upload_file(Path(tmp, f"{size}_{subset}_x.npy"), storage.join(uri, f"{subset}_x.npy"))
                storage.upload_file(Path(tmp, f"{size}_{subset}_y.npy"), storage.join(uri, f"{subset}_y.npy"))
            meta = {"classes": classes, "size": size, "counts": {s: len(assignment[s]) for s in SUBSETS}}
            storage.write_json(meta, storage.join(uri, "meta.json"))
            storage.upload_bytes(b"", storage.join(uri, COMPLETE))
            print(f"stored {size}px arrays in {uri}")
    return targets


class NpyWriter:
    """Write a uint8 ``.npy`` file row by row, so memory stays flat however large the array."""

    def __init__(self, path: Path, shape: tuple[int, ...]):
        self.file = open(path, "wb")  # noqa: SIM115 - closed by close(), which also checks the row count
        self.shape = shape
        self.rows = 0
        np.lib.format.write_array_header_1_0(
            self.file,
            {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape},
        )

    def write(self, row: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(row, dtype=np.uint8).tobytes())
        self.rows += 1

    def close(self) -> None:
        self.file.close()
        if self.rows != self.shape[0]:
            raise RuntimeError(f"{self.file.name}: wrote {self.rows} rows, expected {self.shape[0]}")


# The formats we decode. Pillow otherwise picks the decoder by content among all it knows: a ``.jpg`` holding
# PostScript opens as EPS, and loading it runs Ghostscript where that is installed.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "TIFF", "WEBP")


def open_image(path: str | Path | BinaryIO) -> Image.Image:
    """``Image.open`` limited to :data:`IMAGE_FORMATS` (``UnidentifiedImageError`` for anything else)."""
    return Image.open(path, formats=IMAGE_FORMATS)


def decode_resized(path: str | BinaryIO, sizes: list[int]) -> list[np.ndarray]:
    """Decode ``path`` (a file name or an open binary file) once and resize it to each square size (RGB, uint8)."""
    with open_image(path) as img:
        img.draft("RGB", (max(sizes), max(sizes)))  # JPEG: decode at a reduced scale when possible
        rgb = img.convert("RGB")
    return [np.asarray(rgb.resize((s, s), Image.Resampling.BILINEAR)) for s in sizes]


def _download_images(assignment: dict, dataset_uri: str) -> Path:
    """Local copies of the split's images (cached by dataset hash)."""
    local = storage.local_path(sources.cache_dir() / "images", dataset_uri.rstrip("/").rsplit("/", 1)[-1], dataset_uri)
    items = [item for subset in SUBSETS for item in assignment[subset]]
    paths = [
        (storage.join(dataset_uri, "images", item["path"]), _image_path(local, item, dataset_uri)) for item in items
    ]
    pairs = [(uri, path) for (uri, path), item in zip(paths, items, strict=True) if not _matches(path, item["bytes"])]
    for start in tqdm(range(0, len(pairs), 512), desc="download images", unit=" batch", disable=not pairs):
        storage.download_many(pairs[start : start + 512])
    return local


def _image_path(local: Path, item: dict, dataset_uri: str) -> Path:
    """Where a split item's image is kept; a name that would lead outside ``local`` is refused."""
    return storage.local_path(local, item["path"], storage.join(dataset_uri, "images", item["path"]))


def _matches(path: Path, size: int) -> bool:
    return path.exists() and path.stat().st_size == size


def load(arrays_uri: str, subset: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one subset: x memory-mapped uint8 (N, H, W, 3), y int32 class indices."""
    cache = sources.cache_dir() / "arrays"
    x = np.load(storage.cached_download(storage.join(arrays_uri, f"{subset}_x.npy"), cache), mmap_mode="r")
    y = np.load(storage.cached_download(storage.join(arrays_uri, f"{subset}_y.npy"), cache))
    return x, y


def meta(arrays_uri: str) -> dict:
    if not storage.exists(storage.join(arrays_uri, COMPLETE)):
        raise DataError(f"no complete arrays at {arrays_uri}; run `bloodcell split` first.")
    return storage.read_json(storage.join(arrays_uri, "meta.json"))
