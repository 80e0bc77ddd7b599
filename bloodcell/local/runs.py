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
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from tqdm import tqdm

from bloodcell import compat
from bloodcell.errors import BloodcellError
from bloodcell.local.services import command_line, process_start_time
from bloodcell.steps import RESULT_PREFIX

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
    """A stdout for the local runner: it keeps the last lines of the task running now and, given a logs folder,
    writes every line to ``run.log`` and each task's lines to ``<task>.log``.

    kfp's local runner executes one task at a time and announces each with "Executing task 'name'", so the
    lines after the last announcement belong to the task that runs (and, if it fails, failed). ``verbose``
    passes everything through as kfp prints it; otherwise the console gets a line when a task starts and
    ends (its wall time and key result), a line per training epoch, and warnings and errors.
    """

    def __init__(self, out: TextIO, keep: int = 30, logs: Path | None = None, verbose: bool = True):
        self.out = out
        self.task: str | None = None
        self.lines: collections.deque[str] = collections.deque(maxlen=keep)
        self.verbose = verbose or logs is None
        self.logs = logs
        self._partial = ""
        self._files: dict[str, TextIO] = {}
        self._console = TaskConsole(out)

    def write(self, text: str) -> int:
        if self.verbose:
            self.out.write(text)
        self._partial += text
        *complete, self._partial = self._partial.split("\n")
        for line in complete:
            self._line(plain(line).rstrip())
        return len(text)

    def _line(self, clean: str) -> None:
        self._log("run", clean)
        started = compat.TASK_START.search(clean)
        if started:
            self.task = started.group(1)
            self.lines.clear()
            if not self.verbose:
                self._console.started(self.task)
            return
        ended = compat.TASK_END.search(clean)
        if self.task:
            self._log(self.task, clean)
        if ended and not self.verbose:
            self._console.ended(ended.group(1), ended.group(2))
        elif clean.strip():
            self.lines.append(clean)
            if not self.verbose:
                self._console.line(self.task, clean.strip())

    def _log(self, name: str, line: str) -> None:
        if self.logs is None:
            return
        if name not in self._files:
            self.logs.mkdir(parents=True, exist_ok=True)
            self._files[name] = (self.logs / f"{name}.log").open("a", encoding="utf-8")
        self._files[name].write(line + "\n")
        self._files[name].flush()

    def log_path(self, task: str) -> Path | None:
        return self.logs / f"{task}.log" if self.logs is not None else None

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def close_logs(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()

    @contextlib.contextmanager
    def installed(self) -> Iterator[TaskLog]:
        saved, sys.stdout = sys.stdout, self
        try:
            yield self
        finally:
            sys.stdout = saved
            self.close_logs()


EPOCH_START = re.compile(r"^Epoch (\d+)/(\d+)$")
EPOCH_END = re.compile(r"^\d+/\d+ - (\d+)s - .*/step - (.*)$")  # Keras' one line per epoch (verbose=2)
SHOWN = re.compile(r"^(warning|note): ")  # our own (absl's and Python's warnings stay in the logs)


class TaskConsole:
    """What a person watching a run sees: tasks starting and ending, training epochs, warnings and errors.

    On a terminal (``live``) the running task's epochs are a progress bar (tqdm) redrawn in place, with the
    last epoch's metrics and an ETA; elsewhere (a log, CI) each epoch is a line.
    """

    def __init__(self, out: TextIO, live: bool | None = None):
        self.out = out
        self.live = out.isatty() if live is None else live
        self.bar: tqdm | None = None
        self.started_at: dict[str, float] = {}
        self.result: dict[str, str] = {}
        self.epoch: tuple[int, int] | None = None
        self.epoch_seconds: list[float] = []

    def started(self, task: str) -> None:
        self.started_at[task] = time.monotonic()
        self.epoch, self.epoch_seconds = None, []
        self._print(f"start {task}")
        if self.live:
            self.bar = tqdm(desc=f"  {task}", unit="epoch", file=self.out, leave=False, dynamic_ncols=True)

    def ended(self, task: str, status: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        seconds = time.monotonic() - self.started_at.get(task, time.monotonic())
        outcome = "done" if status == "SUCCESS" else status.lower()
        result = self.result.get(task, "")
        self._print(f"{outcome} {task} in {seconds:.0f} s" + (f": {result}" if result else ""))

    def line(self, task: str | None, text: str) -> None:
        if task and text.startswith(RESULT_PREFIX):
            self.result[task] = text.removeprefix(RESULT_PREFIX)
        elif match := EPOCH_START.match(text):
            self.epoch = (int(match.group(1)), int(match.group(2)))
            if self.bar is not None:
                self.bar.total = self.epoch[1]
                self.bar.refresh()
        elif (match := EPOCH_END.match(text)) and task:
            self._epoch_done(task, float(match.group(1)), match.group(2))
        elif SHOWN.match(text) or text.startswith("error in step"):
            self._print(f"  {task or 'run'}: {text}")

    def _epoch_done(self, task: str, seconds: float, metrics: str) -> None:
        done, total = self.epoch or (1, 1)  # Keras announces no epoch when a fit has only one
        self.epoch = None
        self.epoch_seconds.append(seconds)
        named = dict(part.split(": ", 1) for part in metrics.split(" - ") if ": " in part)
        shown = "  ".join(f"{k} {named[k]}" for k in ("loss", "accuracy", "val_accuracy") if k in named)
        if self.bar is not None:  # tqdm's own rate and ETA; a trainer's phases restart the count
            self.bar.total, self.bar.n = total, done
            self.bar.set_postfix_str(shown, refresh=False)
            self.bar.refresh()
            return
        left = (total - done) * sum(self.epoch_seconds) / len(self.epoch_seconds)
        eta = f"  ETA {left / 60:.0f} min" if left >= 60 else (f"  ETA {left:.0f} s" if left else "")
        self._print(f"  {task} epoch {done}/{total}  {shown}  {seconds:.0f} s{eta}")

    def _print(self, text: str) -> None:
        if self.bar is not None:
            tqdm.write(text, file=self.out)  # above the bar, which is redrawn below
            return
        self.out.write(text + "\n")
        self.out.flush()
