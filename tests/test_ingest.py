"""Ingest and split on real data and on hostile or broken input."""

from __future__ import annotations

import io
import shutil
import struct
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest
import splitfolders
from PIL import Image, UnidentifiedImageError

from bloodcell import arrays, config, ingest, sources, split
from bloodcell.errors import DataError
from conftest import UNDECODABLE, http_server, jpeg_bytes, make_dataset, make_sample, zip_with


def png_declaring(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


# -- hostile archives --------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", ["../evil.jpg", "data/../../evil.jpg", "/tmp/evil.jpg"])
def test_zip_slip_is_rejected(tmp_path, entry):
    archive = zip_with(tmp_path / "bad.zip", {"a/x.jpg": jpeg_bytes(), entry: jpeg_bytes()})
    with pytest.raises(DataError, match=r"contains the unsafe entry .*Refusing to extract"):
        sources.fetch(str(archive), tmp_path / "work")
    assert not (tmp_path / "evil.jpg").exists() and not Path("/tmp/evil.jpg").exists()
    assert not (tmp_path / "work" / "extracted").exists()


def test_zip_symlink_is_rejected(tmp_path):
    archive = zip_with(tmp_path / "link.zip", {"a/x.jpg": jpeg_bytes()}, symlinks={"a/passwd.jpg": "/etc/passwd"})
    with pytest.raises(DataError, match=r"contains the symbolic link 'a/passwd.jpg'"):
        sources.fetch(str(archive), tmp_path / "work")


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_zip_is_a_clear_error(tmp_path, cut):
    good = zip_with(tmp_path / "good.zip", {f"c{i}/x{j}.jpg": jpeg_bytes() for i in range(2) for j in range(5)})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.zip"
    truncated.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(DataError, match=r"is not a readable zip archive .*truncated or corrupt"):
        sources.fetch(str(truncated), tmp_path / "work")


def test_zip_bomb_ratio_is_rejected(tmp_path):
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.jpg", b"\0" * (50 * 2**20))
        zf.writestr("b/x.jpg", jpeg_bytes())
    with pytest.raises(DataError, match=r"expands \d+x .*zip bomb"):
        sources.fetch(str(archive), tmp_path / "work")


def test_zip_with_or_without_wrapper_folder(tmp_path):
    files = {f"{c}/{c}_{i}.jpg": jpeg_bytes() for c in ("a", "b") for i in range(2)}
    flat = zip_with(tmp_path / "flat.zip", files)
    wrapped = zip_with(tmp_path / "wrapped.zip", {f"PBC/{k}": v for k, v in files.items()})
    for archive in (flat, wrapped):
        root = ingest.find_class_root(sources.fetch(str(archive), tmp_path / archive.stem).folder)
        assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["a", "b"]


# -- broken files are quarantined, never fatal ---------------------------------------------------------
def test_broken_files_are_quarantined_with_reasons(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": 3, "b": 3})
    good = jpeg_bytes()
    (root / "a" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "a" / "empty.jpg").write_bytes(b"")
    (root / "a" / "text.jpg").write_text("not an image")
    (root / "b" / "notes.txt").write_bytes(good)
    (root / "b" / ".hidden.jpg").write_bytes(good)
    (root / "b" / "bomb.png").write_bytes(png_declaring(100_000, 100_000))
    (root / "b" / "huge.png").write_bytes(png_declaring(7_000, 7_000))
    records, quarantined = ingest.scan(root)
    reasons = {q["path"]: q["reason"] for q in quarantined}
    assert len(records) == 6
    assert reasons["a/truncated.jpg"].startswith("not a decodable image")
    assert reasons["a/empty.jpg"] == "empty file (0 bytes)"
    assert reasons["a/text.jpg"] == "not an image of an accepted format (JPEG, PNG, BMP, TIFF, WEBP)"
    assert reasons["b/notes.txt"] == "not an image file (extension '.txt')"
    assert reasons["b/.hidden.jpg"] == "hidden file"
    assert reasons["b/bomb.png"].startswith("decompression bomb")
    assert reasons["b/huge.png"] == "declares 7000x7000 pixels, over the 40,000,000 limit (decompression bomb?)"


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\nshowpage\n%%EOF\n"


def test_a_jpg_holding_postscript_is_never_opened_as_postscript(tmp_path):
    """Pillow picks a decoder by content: unrestricted, this .jpg opens as EPS (whose loading runs
    Ghostscript where installed). Ingest and predict open only image formats: it is quarantined."""
    root = make_dataset(tmp_path / "data", {"a": 2, "b": 2})
    (root / "a" / "evil.jpg").write_bytes(EPS)
    with Image.open(root / "a" / "evil.jpg") as unrestricted:
        assert unrestricted.format == "EPS"
    records, quarantined = ingest.scan(root)
    assert len(records) == 4
    assert quarantined == [
        {"path": "a/evil.jpg", "reason": "not an image of an accepted format (JPEG, PNG, BMP, TIFF, WEBP)"}
    ]
    with pytest.raises(UnidentifiedImageError):
        arrays.decode_resized(str(root / "a" / "evil.jpg"), [32])


def test_a_class_folder_that_is_a_symbolic_link_is_refused(tmp_path):
    """Its images would be ingested but left out of the folder's content digest (what --data-sha256 pins)."""
    root = make_dataset(tmp_path / "data", {"a": 2, "b": 2})
    elsewhere = make_dataset(tmp_path / "elsewhere", {"c": 2})
    (root / "c").symlink_to(elsewhere / "c")
    with pytest.raises(DataError, match=r"c is a symbolic link \(to .*elsewhere/c\): class folders must be real"):
        ingest.scan(root)


def test_a_linked_image_is_quarantined_and_the_digest_covers_what_is_ingested(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": 2, "b": 2})
    digest = ingest.content_sha256(root)
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes((1, 2, 3)))
    (root / "a" / "linked.jpg").symlink_to(outside)
    records, quarantined = ingest.scan(root)
    assert len(records) == 4 and quarantined == [{"path": "a/linked.jpg", "reason": "symbolic link (not followed)"}]
    assert ingest.content_sha256(root) == digest


def test_duplicates_are_kept_once(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": 2, "b": 2})
    shutil.copy(root / "a" / "a_0.jpg", root / "a" / "copy.jpg")
    records, _ = ingest.scan(root)
    kept, duplicates = ingest.drop_duplicates(records)
    assert len(kept) == 4
    assert duplicates == [{"path": "a/copy.jpg", "duplicate_of": "a/a_0.jpg"}]


# -- unusable datasets ----------------------------------------------------------------------------
def test_empty_class_folder_is_named(tmp_path):
    root = make_dataset(tmp_path / "data", {"a": 3, "b": 3})
    (root / "c").mkdir()
    (root / "c" / "broken.jpg").write_bytes(b"junk")
    records, quarantined = ingest.scan(root)
    with pytest.raises(DataError, match=r"no usable image in .*: c/ \(1 files quarantined\)"):
        ingest.check_classes(root, records, quarantined)


def test_fewer_than_two_classes(tmp_path):
    root = make_dataset(tmp_path / "data", {"only": 3})
    with pytest.raises(DataError, match=r"found 1 class folder\(s\) in .*needs at least two classes"):
        ingest.find_class_root(root)


def test_class_too_small_for_every_split(tmp_path):
    images = [{"label": "big", "path": f"big/{i}.jpg"} for i in range(40)]
    images += [{"label": "tiny", "path": f"tiny/{i}.jpg"} for i in range(3)]
    with pytest.raises(DataError, match=r"too small to appear in every split .*tiny: train 1, val 1, calibration 0"):
        split.assign(images, (0.65, 0.05, 0.15, 0.15), 777)


def test_the_split_keeps_the_original_test_images_and_carves_val_from_training():
    """test and calibration are split-folders' 70/15/15 test and val (the original work's), and train + val
    its train; val takes the same share of every class."""
    images = [
        {"label": label, "path": f"{label}/{i:04d}.jpg"} for label, n in (("a", 300), ("b", 120)) for i in range(n)
    ]
    four = split.assign(images, (0.65, 0.05, 0.15, 0.15), 777)
    paths = {s: {i["path"] for i in four[s]} for s in four}
    assert set().union(*paths.values()) == {i["path"] for i in images}
    assert sum(map(len, paths.values())) == len(images)  # each image in one subset
    with tempfile.TemporaryDirectory() as tmp:
        source, output = Path(tmp, "in"), Path(tmp, "out")
        for image in images:
            (source / image["label"]).mkdir(parents=True, exist_ok=True)
            (source / image["path"]).touch()
        splitfolders.ratio(str(source), str(output), seed=777, ratio=(0.7, 0.15, 0.15), move=True)
        original = {
            s: {f"{p.parent.name}/{p.name}" for p in (output / s).glob("*/*")} for s in ("train", "val", "test")
        }
    assert paths["test"] == original["test"] and paths["calibration"] == original["val"]
    assert paths["train"] | paths["val"] == original["train"]
    counts = split.counts_of(four)["val"]
    assert counts == {"a": round(210 * 0.05 / 0.7), "b": round(84 * 0.05 / 0.7)}


def test_missing_source(tmp_path):
    with pytest.raises(DataError, match=r"data source '/nonexistent/pbc' does not exist"):
        sources.fetch("/nonexistent/pbc", tmp_path)


def test_plain_file_that_is_not_a_zip(tmp_path):
    path = tmp_path / "data.tar"
    path.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="is a file but not a zip archive"):
        sources.fetch(str(path), tmp_path / "work")


def test_url_returning_html(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    page = b"<html><body>Please log in</body></html>"
    with (
        http_server({"/data.zip": (page, "text/html; charset=utf-8")}) as base,
        pytest.raises(DataError, match=r"returned an HTML page, not a zip archive"),
    ):
        sources.fetch(f"{base}/data.zip", tmp_path / "work")


def test_offline_download_fails_fast_with_a_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("BLOODCELL_CACHE", str(tmp_path / "cache"))
    started = time.monotonic()
    with pytest.raises(DataError, match=r"cannot download .*--data /path/to/PBC_dataset_normal_DIB.zip"):
        sources.fetch(config.MENDELEY_URL, tmp_path / "work")
    assert time.monotonic() - started < 10


# -- real data -------------------------------------------------------------------------------------
def test_real_sample_quarantines_the_undecodable_file(shared_data, tmp_path):
    root = make_sample(shared_data, tmp_path / "PBC_dataset_normal_DIB", 5)
    records, quarantined = ingest.scan(root)
    assert quarantined == [{"path": UNDECODABLE, "reason": "hidden file"}]
    assert len(records) == 40
    assert {r.label for r in records} == {
        "basophil",
        "eosinophil",
        "erythroblast",
        "ig",
        "lymphocyte",
        "monocyte",
        "neutrophil",
        "platelet",
    }
    assert all(350 <= r.width <= 370 and 350 <= r.height <= 370 for r in records)


def test_the_undecodable_file_fails_to_decode_even_when_not_hidden(shared_data, tmp_path):
    copy = tmp_path / "DS_169665.jpg"
    shutil.copy(shared_data / UNDECODABLE, copy)
    reason = ingest.check_image(str(copy))
    assert reason == "not an image of an accepted format (JPEG, PNG, BMP, TIFF, WEBP)"  # a Finder .DS_Store


def test_ingest_then_split_is_cached_and_deterministic(services, sample_dataset):
    bucket = services["bucket"]
    first = ingest.ingest(str(sample_dataset), bucket)
    content = ingest.content_sha256(ingest.find_class_root(sample_dataset))
    again = ingest.ingest(str(sample_dataset), bucket, expected_sha256=content)  # a folder is pinned by its content
    assert (first.images, first.quarantined, first.cache_hit) == (240, 1, False)
    assert again.cache_hit and again.dataset_hash == first.dataset_hash
    assert (first.source_sha256, again.source_sha256, first.source_sha256_of) == (content, content, "folder content")
    profile = config.resolve("smoke")
    one = split.split(first.dataset_uri, bucket, profile)
    two = split.split(first.dataset_uri, bucket, profile)
    assert one == two
    assert one.counts["train"]["basophil"] == 15 and one.counts["val"]["basophil"] == 1
    assert one.counts["calibration"]["basophil"] == 3 and one.counts["test"]["platelet"] == 5
    from bloodcell import arrays, storage

    assignment = storage.read_json(one.split_uri + "/split.json")
    paths = [{i["path"] for i in assignment[s]} for s in ("train", "val", "calibration", "test")]
    assert sum(map(len, paths)) == len(set().union(*paths))  # no image in two subsets
    x, y = arrays.load(one.array_uris[96], "train")
    assert x.shape == (120, 96, 96, 3) and x.dtype.name == "uint8" and len(y) == 120
