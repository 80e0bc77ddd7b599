"""The static security scan of `make test`: checkov on what a cluster runs, bandit on our Python.

checkov (Kubernetes and Dockerfile checks) scans the rendered local and gke overlays, as
`make deploy` renders them, and both Dockerfiles; bandit scans the package, the components and
pipeline.py. Both come from their own virtual environment, .venv-scan (`make scan-venv`, which
`make test` runs first), locked by constraints-scan.txt: checkov pins packages our lock has at other
versions. Checks that do not apply are skipped in one place each, with the reason: .checkov.yaml
(`skip-check:`) and pyproject.toml (`[tool.bandit] skips`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from bloodcell import config
from conftest import MLFLOW_IMAGE, render

ROOT = Path(__file__).resolve().parents[1]
SCAN_BIN = ROOT / ".venv-scan" / "bin"
OVERLAYS = ["manifests/overlays/local", "manifests/overlays/gke"]
DOCKERFILES = ["docker/Dockerfile", "docker/mlflow.Dockerfile"]
BANDIT_TARGETS = ["bloodcell", "components", "pipeline.py"]


def scan_tool(name: str) -> str:
    """A tool of .venv-scan; without that environment: a skip on a workstation, a failure in CI."""
    path = SCAN_BIN / name
    if path.is_file() and os.access(path, os.X_OK):
        return str(path)
    message = f"{path} is missing: run `make scan-venv` (`make test` does)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def checkov_reports(files: list[Path], frameworks: list[str]) -> list[dict]:
    proc = subprocess.run(
        [
            scan_tool("checkov"),
            "--config-file",
            str(ROOT / ".checkov.yaml"),
            *(arg for f in files for arg in ("-f", str(f))),
            "--framework",
            *frameworks,
            "--output",
            "json",
            "--skip-download",  # offline: no Prisma Cloud guidelines or policies
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"},
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1: failed checks, reported below
    reports = json.loads(proc.stdout)
    return reports if isinstance(reports, list) else [reports]


def failures(report: dict) -> list[str]:
    return [
        f"{c['check_id']} {c['check_name']}: {c['resource']} ({Path(c['file_path']).name}:"
        f"{'-'.join(map(str, c['file_line_range']))})"
        for c in report["results"]["failed_checks"]
    ]


def scanned_files(report: dict) -> set[str]:
    results = report["results"]
    return {Path(c["file_path"]).name for kind in ("passed_checks", "failed_checks") for c in results[kind]}


def test_checkov_passes_on_the_rendered_overlays_and_the_dockerfiles(tmp_path):
    files = []
    for overlay in OVERLAYS:
        rendered = tmp_path / f"{Path(overlay).name}.yaml"
        rendered.write_text(yaml.safe_dump_all(render(overlay, config.DEFAULT_IMAGE, MLFLOW_IMAGE)))
        files.append(rendered)
    files += [ROOT / d for d in DOCKERFILES]
    reports = {r["check_type"]: r for r in checkov_reports(files, ["kubernetes", "dockerfile"])}
    assert set(reports) == {"kubernetes", "dockerfile"}
    for kind, report in reports.items():
        summary = report["summary"]
        assert summary["parsing_errors"] == 0, f"{kind}: checkov could not parse a file"
        assert summary["passed"] > 100, f"{kind}: {summary}"
        assert not failures(report), f"checkov ({kind}) failed:\n" + "\n".join(failures(report))
    assert scanned_files(reports["kubernetes"]) == {f.name for f in files[: len(OVERLAYS)]}
    assert scanned_files(reports["dockerfile"]) == {Path(d).name for d in DOCKERFILES}


def test_bandit_finds_nothing_of_medium_or_high_severity():
    proc = subprocess.run(
        [scan_tool("bandit"), "-r", *BANDIT_TARGETS, "-c", "pyproject.toml", "--format", "json", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode in (0, 1), proc.stderr  # 1: issues found, reported below
    report = json.loads(proc.stdout)
    assert not report["errors"], report["errors"]
    scanned = report["metrics"]["_totals"]["loc"]
    assert scanned > 1000, f"bandit scanned {scanned} lines only"
    serious = [
        f"{Path(i['filename']).as_posix()}:{i['line_number']} {i['test_id']} ({i['issue_severity']}): {i['issue_text']}"
        for i in report["results"]
        if i["issue_severity"] in ("MEDIUM", "HIGH")
    ]
    assert not serious, "bandit:\n" + "\n".join(serious)


def test_every_skip_says_why():
    """One config file each, every skipped check with its reason on the comment lines above it."""
    lines = (ROOT / ".checkov.yaml").read_text().splitlines()
    config_ = yaml.safe_load("\n".join(lines))
    assert set(config_) == {"skip-check"}, "settings go on the command line of the test, skips here"
    skipped = config_["skip-check"]
    assert len(skipped) == len(set(skipped))
    for check in skipped:
        index = next(i for i, line in enumerate(lines) if line.strip() == f"- {check}")
        assert lines[index - 1].strip().startswith("#"), f"{check}: say why it is skipped"

    pyproject = (ROOT / "pyproject.toml").read_text()
    skips = tomllib.loads(pyproject)["tool"]["bandit"]["skips"]
    for test_id in skips:
        assert re.search(rf'^\s*"{test_id}",\s*#\s*\S', pyproject, re.M), f"{test_id}: say why it is skipped"
    # High-signal checks stay on: a skip list may silence noise, never these.
    assert not set(skips) & {"B310", "B108", "B602", "B605", "B301", "B506"}


def test_the_scan_tools_are_pinned_and_locked_apart():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    scan = project["optional-dependencies"]["scan"]
    assert scan == ["checkov==3.3.30", "bandit==1.9.4"]
    lock = dict(
        line.split("==", 1) for line in (ROOT / "constraints-scan.txt").read_text().splitlines() if "==" in line
    )
    for requirement in scan:
        name, version = requirement.split("==")
        assert lock.get(name) == version, f"constraints-scan.txt must pin {requirement}"
    # Its own lock: the main one stays free of checkov's pins.
    assert not re.search(r"^(checkov|bandit)==", (ROOT / "constraints.txt").read_text(), re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test:.*\bscan-venv\b", makefile, re.M), "make test runs the scan's tools"
    assert re.search(r"^\$\(VENV_SCAN\)/\.installed: pyproject\.toml constraints-scan\.txt$", makefile, re.M)
    assert "> constraints-scan.txt" in makefile, "make lock re-locks the scan extra"
