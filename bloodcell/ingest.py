"""Ingest: check every image of a dataset source and store the accepted ones in the bucket.

Output, content-addressed by the dataset hash: ``gs://<bucket>/datasets/<hash>/images/...`` and
``.../manifest.json`` (written last: its presence means the dataset is complete). The manifest records
the source's SHA-256 (:mod:`bloodcell.sources`: of an archive's bytes, or of a folder's content), which
``--data-sha256`` pins.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from bloodcell import sources, storage
from bloodcell.arrays import IMAGE_FORMATS, open_image
from bloodcell.errors import DataError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
MAX_PIXELS = 40_000_000  # ~6300x6300; PBC images are ~360x363
UPLOAD_BATCH = 512


@dataclass(frozen=True)
class ImageRecord:
    label: str
    path: str  # relative to the class root, posix
    sha256: str
    width: int
    height: int
    bytes: int


@dataclass(frozen=True)
class IngestResult:
    dataset_uri: str
    dataset_hash: str
    images: int
    classes: list[str]
    quarantined: int
    duplicates: int
    cache_hit: bool
    source_sha256: str = ""  # of the archive's bytes, or of the folder's content (source_sha256_of says which)
    source_sha256_of: str = ""


def ingest(source: str, bucket: str, workdir: str | Path | None = None, expected_sha256: str = "") -> IngestResult:
    """Fetch ``source``, check and de-duplicate its images, and store them under ``bucket``.

    ``expected_sha256`` (``--data-sha256``) pins the source: a mismatch stops before anything is stored.
    """
    with tempfile.TemporaryDirectory(prefix="bloodcell-ingest-", dir=workdir) as tmp:
        fetched = sources.fetch(source, Path(tmp), expected_sha256)
        root = find_class_root(fetched.folder)
        content = content_sha256(root)
        pin = _source_pin(source, fetched, content, expected_sha256)
        pointer_uri = f"gs://{bucket}/sources/{content[:32]}.json"
        known = _known_dataset(pointer_uri, pin)
        if known:
            return known
        records, quarantined = scan(root)
        records, duplicates = drop_duplicates(records)
        check_classes(root, records, quarantined)
        dataset_hash = hash_records(records)
        dataset_uri = f"gs://{bucket}/datasets/{dataset_hash}"
        _print_left_out(quarantined, duplicates)
        cache_hit = storage.exists(manifest_uri(dataset_uri))
        if cache_hit:
            print(f"cache hit: dataset {dataset_hash} is already in {dataset_uri}")
        else:
            upload_images(root, records, dataset_uri)
            manifest = {
                "dataset_hash": dataset_hash,
                "source": source,
                **pin,
                "classes": sorted({r.label for r in records}),
                "images": [asdict(r) for r in records],
                "quarantined": quarantined,
                "duplicates": duplicates,
            }
            storage.write_json(manifest, manifest_uri(dataset_uri))
        storage.write_json({"dataset_uri": dataset_uri, "source": source, **pin}, pointer_uri)
    classes = sorted({r.label for r in records})
    print(
        f"dataset {dataset_hash}: {len(records)} images in {len(classes)} classes, "
        f"{len(quarantined)} quarantined, {len(duplicates)} duplicates dropped"
    )
    return IngestResult(
        dataset_uri, dataset_hash, len(records), classes, len(quarantined), len(duplicates), cache_hit, **pin
    )


def _source_pin(source: str, fetched: sources.Fetched, content: str, expected_sha256: str) -> dict[str, str]:
    """The source's digest and what it is of; a folder's is checked here (an archive's was, before extracting)."""
    if fetched.archive_sha256:
        pin = {"source_sha256": fetched.archive_sha256, "source_sha256_of": "archive"}
    else:
        sources.verify_sha256(source, sources.parse_sha256(expected_sha256), content, "folder content")
        pin = {"source_sha256": content, "source_sha256_of": "folder content"}
    print(f"source {source}: sha256 {pin['source_sha256']} ({pin['source_sha256_of']}; pin it with --data-sha256)")
    return pin


def content_sha256(root: Path) -> str:
    """SHA-256 of every file's relative path and bytes under ``root`` (symbolic links left out): the same
    files, the same digest. A folder source's ``source_sha256``; its first 32 characters name its pointer.

    Precisely: SHA-256 over, for each file in sorted order, its posix path relative to ``root``, a NUL
    byte, and the 32-byte SHA-256 of its bytes.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def manifest_uri(dataset_uri: str) -> str:
    """Where a dataset's manifest is (written last: the dataset is complete)."""
    return storage.join(dataset_uri, "manifest.json")


def read_manifest(dataset_uri: str) -> dict:
    return storage.read_json(manifest_uri(dataset_uri))


def hash_of(dataset_uri: str) -> str:
    """The content hash a dataset is stored under (``gs://<bucket>/datasets/<hash>``)."""
    return dataset_uri.rstrip("/").rsplit("/", 1)[-1]


def _known_dataset(pointer_uri: str, pin: dict[str, str]) -> IngestResult | None:
    """The stored dataset these exact files produced before, if its manifest is complete."""
    pointer = storage.read_json_if_present(pointer_uri)
    if pointer is None:
        return None
    dataset_uri = pointer["dataset_uri"]
    stored = storage.read_json_if_present(manifest_uri(dataset_uri))
    if stored is None:
        return None
    _print_left_out(stored["quarantined"], stored["duplicates"])
    print(f"cache hit: these files were ingested before as dataset {stored['dataset_hash']} ({dataset_uri})")
    return IngestResult(
        dataset_uri,
        stored["dataset_hash"],
        len(stored["images"]),
        stored["classes"],
        len(stored["quarantined"]),
        len(stored["duplicates"]),
        True,
        **pin,
    )


def _print_left_out(quarantined: list[dict], duplicates: list[dict]) -> None:
    for item in quarantined:
        print(f"quarantined {item['path']}: {item['reason']}")
    for item in duplicates:
        print(f"duplicate {item['path']}: same bytes as {item['duplicate_of']}, kept once")


def find_class_root(path: Path) -> Path:
    """The folder whose sub-folders are the classes, descending through single wrapper folders."""
    current = path
    for _ in range(8):
        entries = [e for e in current.iterdir() if not _ignored(e.name)]
        folders = [e for e in entries if e.is_dir()]
        files = [e for e in entries if e.is_file()]
        if len(folders) == 1 and not files and any(e.is_dir() for e in folders[0].iterdir() if not _ignored(e.name)):
            current = folders[0]  # a wrapper folder around the class folders
            continue
        if len(folders) < 2:
            names = ", ".join(f"{f.name}/" for f in folders) or "none"
            raise DataError(
                f"found {len(folders)} class folder(s) in {current} ({names}); a dataset needs at least "
                "two classes, one sub-folder per class holding its images (e.g. basophil/, eosinophil/)."
            )
        return current
    raise DataError(f"{path} nests single folders too deeply to find the class folders.")


def _ignored(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def scan(root: Path, workers: int | None = None) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Decode every file under the class folders of ``root``; return accepted and quarantined files."""
    candidates, quarantined = [], []
    for class_dir in sorted(d for d in root.iterdir() if d.is_dir() and not _ignored(d.name)):
        if class_dir.is_symlink():
            raise DataError(
                f"{class_dir} is a symbolic link (to {class_dir.resolve()}): class folders must be real folders "
                "inside the data folder, so that its content digest (--data-sha256, the cache) covers every image "
                "ingested. Copy the images into it, or pass the folder they are in."
            )
        for path in sorted(p for p in class_dir.rglob("*") if not p.is_dir()):
            relative = path.relative_to(root).as_posix()
            reason = _quick_reject(path)
            if reason:
                quarantined.append({"path": relative, "reason": reason})
            else:
                candidates.append((class_dir.name, relative, str(path)))
    records = []
    with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        checked = pool.map(check_image, [c[2] for c in candidates], chunksize=64)
        for (label, relative, _), result in tqdm(
            zip(candidates, checked, strict=True),
            total=len(candidates),
            desc="decode-check",
            unit=" img",
            mininterval=2,
        ):
            if isinstance(result, str):
                quarantined.append({"path": relative, "reason": result})
            else:
                records.append(ImageRecord(label, relative, *result))
    return records, quarantined


def _quick_reject(path: Path) -> str | None:
    if path.is_symlink():
        return "symbolic link (not followed)"
    if any(_ignored(part) for part in path.parts[-1:]):
        return "hidden file"
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file (extension {path.suffix or 'none'!r})"
    if path.stat().st_size == 0:
        return "empty file (0 bytes)"
    return None


def check_image(path: str) -> tuple[str, int, int, int] | str:
    """``(sha256, width, height, bytes)`` when ``path`` decodes fully, else the reason it does not."""
    data = Path(path).read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with open_image(path) as img:
                width, height = img.size
                if width * height > MAX_PIXELS:
                    return f"declares {width}x{height} pixels, over the {MAX_PIXELS:,} limit (decompression bomb?)"
                img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return f"decompression bomb: {exc}"
    except UnidentifiedImageError:
        return f"not an image of an accepted format ({', '.join(IMAGE_FORMATS)})"
    except Exception as exc:
        return f"not a decodable image ({type(exc).__name__}: {exc})"
    return hashlib.sha256(data).hexdigest(), width, height, len(data)


def drop_duplicates(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[dict[str, str]]]:
    """Keep the first of each set of byte-identical images."""
    seen: dict[str, ImageRecord] = {}
    kept, duplicates = [], []
    for record in records:
        first = seen.setdefault(record.sha256, record)
        if first is record:
            kept.append(record)
        else:
            duplicates.append(
                {
                    "path": record.path,
                    "duplicate_of": first.path,
                    **({"conflicting_label": first.label} if first.label != record.label else {}),
                }
            )
    return kept, duplicates


def check_classes(root: Path, records: list[ImageRecord], quarantined: list[dict[str, str]]) -> None:
    """Every class folder must keep at least one image, and there must be two classes."""
    counts = {d.name: 0 for d in root.iterdir() if d.is_dir() and not _ignored(d.name)}
    for record in records:
        counts[record.label] += 1
    empty = sorted(name for name, n in counts.items() if n == 0)
    if empty:
        rejected = {name: sum(q["path"].startswith(name + "/") for q in quarantined) for name in empty}
        detail = ", ".join(f"{name}/ ({rejected[name]} files quarantined)" for name in empty)
        raise DataError(
            f"class folder(s) with no usable image in {root}: {detail}. Add images to them or remove the folders."
        )


def hash_records(records: list[ImageRecord]) -> str:
    """Content hash of a dataset: classes, paths and image bytes."""
    listing = json.dumps(sorted((r.label, r.path, r.sha256) for r in records))
    return hashlib.sha256(listing.encode()).hexdigest()[:16]


def upload_images(root: Path, records: list[ImageRecord], dataset_uri: str) -> None:
    pairs = [(root / r.path, storage.join(dataset_uri, "images", r.path)) for r in records]
    with tqdm(total=len(pairs), desc="upload", unit=" img", mininterval=2) as bar:
        for start in range(0, len(pairs), UPLOAD_BATCH):
            batch = pairs[start : start + UPLOAD_BATCH]
            storage.upload_many(batch)
            bar.update(len(batch))
