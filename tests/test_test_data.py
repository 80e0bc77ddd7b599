"""Where the suite finds the real images, and the one line it gives when it finds none."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import ROOT, SHARED_DATA


def run_pytest(tmp_path, **env: str) -> subprocess.CompletedProcess:
    """A small pytest session (tests that need no images) with ``env``."""
    isolated = {k: v for k, v in os.environ.items() if k != "BLOODCELL_TEST_DATA"}
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_code_shape.py"],
        cwd=ROOT,
        env={**isolated, "BLOODCELL_CACHE": str(tmp_path / "cache"), **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_a_missing_data_folder_is_one_line_not_a_failure_per_test(tmp_path):
    missing = tmp_path / "nowhere"
    done = run_pytest(tmp_path, BLOODCELL_TEST_DATA=str(missing))
    assert done.returncode != 0
    errors = [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("ERROR")]
    assert errors == [
        f"ERROR: the tests read the real PBC images and BLOODCELL_TEST_DATA={missing} is not a folder: run "
        "`make test-data` (downloads the official 281 MB zip once; needs the network) or set "
        "BLOODCELL_TEST_DATA=/path/to/PBC_dataset_normal_DIB (one sub-folder per class)."
    ]
    assert "passed" not in done.stdout and "failed" not in done.stdout


def test_the_folder_named_by_the_setting_is_used(tmp_path):
    done = run_pytest(tmp_path, BLOODCELL_TEST_DATA=str(SHARED_DATA))
    assert done.returncode == 0, done.stdout[-2000:]
    assert "4 passed" in done.stdout


def test_without_any_images_it_says_what_to_do_and_finds_what_make_test_data_unpacked(tmp_path, monkeypatch):
    import conftest

    monkeypatch.delenv("BLOODCELL_TEST_DATA", raising=False)
    monkeypatch.setattr(conftest, "BESIDE_THE_CHECKOUT", tmp_path / "no-shared")  # a clone elsewhere
    monkeypatch.setattr(conftest, "DOWNLOADED_LOCATION", tmp_path / "cache" / "test-data" / "location")
    assert conftest.find_test_data() == (None, "no PBC images found")
    unpacked = tmp_path / "cache" / "test-data" / "extracted" / "PBC_dataset_normal_DIB"
    unpacked.mkdir(parents=True)
    conftest.DOWNLOADED_LOCATION.write_text(str(unpacked))
    assert conftest.find_test_data() == (unpacked, "")
