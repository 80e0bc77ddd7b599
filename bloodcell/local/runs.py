"""Bookkeeping of local pipeline runs: which are in progress, their arguments, their tasks' logs.

``<state>/runs/<run_id>/arguments.json`` keeps a run's arguments (and ``runner.json`` how its steps
run) so ``run --resume RUN_ID`` repeats it exactly; ``<state>/active/<run_id>.json`` marks a run in
progress (its pid, checked against the process's command line and start time, so a crashed run's
record is recognised as stale even when its pid has been reused).
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from bloodcell import compat
from bloodcell.errors import BloodcellError
from bloodcell.local.services import command_line, process_start_time

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def plain(text: str) -> str:
    """``text`` without terminal colour codes."""
    return ANSI.sub("", text)


def save_arguments(state_dir: Path, run_id: str, arguments: dict[str, str]) -> None:
    path = state_dir / "runs" / run_id / "arguments.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(arguments, indent=2))


def load_arguments(state_dir: Path, run_id: str) -> dict[str, str]:
    path = state_dir / "runs" / run_id / "arguments.json"
    if not path.is_file():
        known = sorted(p.parent.name for p in (state_dir / "runs").glob("*/arguments.json"))
        raise BloodcellError(
            f"no local run {run_id!r} in {state_dir}/runs to resume; runs there: {', '.join(known[-5:]) or 'none'}"
        )
    return json.loads(path.read_text())


def save_runner(state_dir: Path, run_id: str, runner: dict[str, str]) -> None:
    """How the run's steps run (``{"runner": "docker", "image": ..., "image_id": ...}``), for ``--resume``."""
    (state_dir / "runs" / run_id / "runner.json").write_text(json.dumps(runner, indent=2))


def load_runner(state_dir: Path, run_id: str) -> dict[str, str]:
    path = state_dir / "runs" / run_id / "runner.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def in_progress(state_dir: Path) -> dict[str, int]:
    """Runs in progress under ``state_dir``: ``{run_id: pid}``. Records of dead runs are removed."""
    running = {}
    for record in sorted((state_dir / "active").glob("*.json")):
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError):
            saved = {}
        if not isinstance(saved, dict):
            saved = {}
        if is_recorded_process(saved):
            running[record.stem] = saved["pid"]
        else:
            record.unlink(missing_ok=True)
            print(f"removed the stale record of run {record.stem} (process {saved.get('pid', 0)} is gone or reused)")
    return running


def is_recorded_process(saved: dict) -> bool:
    """Whether the live process ``saved["pid"]`` is the one recorded: same command line and start time.

    A pid is reused once its process ends; the start time tells a new process from the recorded one
    even when their command lines are the same. Records without one (older versions) check the command line.
    """
    pid = saved.get("pid")
    if not isinstance(pid, int) or pid <= 0 or command_line(pid) != saved.get("cmdline"):
        return False
    recorded, live = saved.get("start_time"), process_start_time(pid)
    return recorded is None or live is None or recorded == live


@contextlib.contextmanager
def active(state_dir: Path, run_id: str) -> Iterator[None]:
    """Mark ``run_id`` as in progress for the duration of the block."""
    record = state_dir / "active" / f"{run_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    record.write_text(
        json.dumps({"pid": pid, "run_id": run_id, "cmdline": command_line(pid), "start_time": process_start_time(pid)})
    )
    try:
        yield
    finally:
        record.unlink(missing_ok=True)


class TaskLog(io.TextIOBase):
    """A stdout that passes everything through and keeps the last lines of the task running now.

    kfp's local runner executes one task at a time and announces each with "Executing task
    'name'", so the lines after the last announcement belong to the task that failed.
    """

    def __init__(self, out: TextIO, keep: int = 30):
        self.out = out
        self.task: str | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._partial = ""

    def write(self, text: str) -> int:
        self.out.write(text)
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            clean = plain(line).rstrip()
            started = compat.TASK_START.search(clean)
            if started:
                self.task = started.group(1)
                self.lines.clear()
            elif clean.strip():
                self.lines.append(clean)
        return len(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    @contextlib.contextmanager
    def installed(self) -> Iterator[TaskLog]:
        saved, sys.stdout = sys.stdout, self
        try:
            yield self
        finally:
            sys.stdout = saved
