"""``bloodcell validate``: its verdicts, its pages and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from bloodcell import cli, decisions, selective, shifts, validate
from conftest import SHARED_DATA, checked_model, tiny_model

RULES = decisions.Rules(
    np.full(3, 0.5), [selective.PROMISE_CLASS, "group", "group"], 0.99, np.full(3, 0.1), 0.01, 1.0, 0.05, True, 1.0
)


def measured(images: int, unfamiliar: float, kept_accuracy: float, set_coverage: float = 0.99) -> dict:
    per_class = {
        name: {"kept": images // 3, "kept_accuracy": kept_accuracy, "predicted": images // 3} for name in "abc"
    }
    return {
        "images": images,
        "unfamiliar_share": unfamiliar,
        "kept_share": 0.9,
        "kept_accuracy": kept_accuracy,
        "set_coverage": set_coverage,
        "per_class": per_class,
    }


def test_verdicts_follow_what_was_measured():
    assert validate.verdict(measured(30, 0.0, 1.0), RULES).kind == "too few"
    unlike = validate.verdict(measured(400, 0.6, 1.0), RULES)
    assert unlike.kind == "unfamiliar" and "do not use this model here" in unlike.text
    assert validate.verdict(measured(400, 0.05, 0.995), RULES).kind == "keeps"
    assert validate.verdict(measured(400, 0.05, 0.985), RULES).kind == "keeps"  # 98.5% of 360: not clearly below
    missed = validate.verdict(measured(2000, 0.05, 0.95), RULES)
    assert missed.kind == "misses" and "the kept cells called a" in missed.text  # a is promised alone
    assert validate.verdict(measured(2000, 0.05, 1.0, set_coverage=0.9), RULES).kind == "misses"


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    checked_model(tiny_model(), images, rng.integers(0, 3, 64)).save(path)
    (path.parent / "train.json").write_text(json.dumps({"classes": ["basophil", "eosinophil", "monocyte"]}))
    return path


def labelled(target: Path, per_class: int) -> Path:
    for name in ("basophil", "eosinophil", "monocyte"):
        (target / name).mkdir(parents=True)
        for image in sorted((SHARED_DATA / name).glob("*.jpg"))[:per_class]:
            shutil.copy(image, target / name / image.name)
    return target


def test_validate_writes_a_page_and_figures_and_a_shifted_copy_reads_as_unlike(model_file, tmp_path, capsys):
    folder = labelled(tmp_path / "lab", 20)
    report = validate.validate(str(model_file), str(folder), tmp_path / "out")
    page = (tmp_path / "out" / "validation.html").read_text()
    saved = json.loads((tmp_path / "out" / "validation.json").read_text())
    assert saved["verdict"] == report["verdict"] and report["answers"]["images"] == 60
    assert 'id="verdict"' in page and "Confusion matrix" in page and page.count("data:image/png;base64,") == 2
    assert set(report["per_class"]) == {"basophil", "eosinophil", "monocyte"}
    assert 0 <= report["answers"]["unfamiliar_share"] <= 1 and report["answers"]["set_coverage"] is not None
    assert shifts.write_shifted(folder, tmp_path / "flat", "grayscale") == 60
    assert sorted(p.suffix for p in (tmp_path / "flat").rglob("*.*"))[0] == ".png"
    assert (
        cli.main(["validate", "--model", str(model_file), str(tmp_path / "flat"), "--output", str(tmp_path / "o2")])
        == 0
    )
    out = capsys.readouterr().out
    assert "verdict:" in out and str(tmp_path / "o2" / "validation.html") in out


def test_folders_that_name_no_class_are_refused_with_the_classes_to_use(model_file, tmp_path):
    folder = labelled(tmp_path / "lab", 2)
    (folder / "neutrophils").mkdir()
    shutil.copy(next((SHARED_DATA / "neutrophil").glob("*.jpg")), folder / "neutrophils" / "x.jpg")
    with pytest.raises(Exception, match=r"folder\(s\) neutrophils name no class of this model.*basophil, eosinophil"):
        validate.validate(str(model_file), str(folder), tmp_path / "out")
