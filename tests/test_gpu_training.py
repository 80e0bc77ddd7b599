"""benchmarks/gpu_training.py: the split it carries to a bare GPU machine, and its training run."""

from __future__ import annotations

import argparse
import importlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bloodcell import config, ingest, split

ROOT = Path(__file__).resolve().parents[1]


def test_export_carries_the_pipelines_split_and_trains_from_it(sample_dataset: Path, tmp_path: Path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # importable by name: its process pool pickles functions
    gpu_training = importlib.import_module("gpu_training")
    exported = tmp_path / "split.npz"
    gpu_training.export(sample_dataset, exported, "smoke", size=64, quality=90)

    records, quarantined = ingest.scan(sample_dataset)
    records, _ = ingest.drop_duplicates(records)
    profile = config.resolve("smoke")
    expected = split.assign([asdict(r) for r in records], profile.split_ratio, profile.seed)
    classes, by_size = gpu_training.load(exported, sizes=[48])
    subsets = by_size[48]
    assert classes == sorted({r.label for r in records})
    assert [q["path"] for q in quarantined] == ["neutrophil/.DS_169665.jpg"]
    for subset in config.SUBSETS:
        x, y = subsets[subset]
        assert x.shape == (len(expected[subset]), 48, 48, 3) and x.dtype == np.uint8
        assert y.tolist() == [classes.index(item["label"]) for item in expected[subset]]
        assert x.std() > 10  # real pictures, not blank decodes

    results_file = tmp_path / "results.json"
    args = argparse.Namespace(
        data=exported, profile="smoke", models="cnn1", epochs=1, limit=0, set=["cnn1.batch_size=16"], json=results_file
    )
    (result,) = gpu_training.run(args)
    assert result["model"] == "cnn1" and result["epochs"] == 1 and result["batch_size"] == 16
    assert result["image_size"] == 48 and 0 <= result["test_accuracy"] <= 1 and result["images_per_second"] > 0
    assert json.loads(results_file.read_text()) == [result]
