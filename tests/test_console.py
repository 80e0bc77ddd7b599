"""The local runner's console: on a terminal the running task's epochs are one live progress bar; in a log
(CI, a file) one line per epoch; the task's log file keeps everything either way."""

from __future__ import annotations

import io
from pathlib import Path

from bloodcell.local import runs

EPOCHS = [
    f"12/12 - {seconds}s - 400ms/step - accuracy: 0.{n} - loss: 1.{n} - val_accuracy: 0.{n + 1} - val_loss: 1.0"
    for n, seconds in ((5, 5), (6, 4), (7, 4))
]
TASK = [
    "Executing task 'train-cnn1'",
    *(line for k, epoch in enumerate(EPOCHS, start=1) for line in (f"Epoch {k}/3", epoch)),
    "bloodcell result: cnn1: 3 epochs in 13 s (900 images/s)",
    "Task 'train-cnn1' finished with status SUCCESS",
]


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def shown(out: io.StringIO, tmp_path: Path) -> str:
    log = runs.TaskLog(out, logs=tmp_path, verbose=False)
    for line in TASK:
        log.write(line + "\n")
    log.close_logs()
    assert (tmp_path / "train-cnn1.log").read_text().splitlines() == TASK[1:]  # the log keeps every line
    return out.getvalue()


def test_in_a_log_each_epoch_is_a_line(tmp_path):
    text = shown(io.StringIO(), tmp_path)
    lines = text.splitlines()
    assert lines[0] == "start train-cnn1" and lines[-1].startswith("done train-cnn1 in ")
    assert lines[-1].endswith(": cnn1: 3 epochs in 13 s (900 images/s)")
    assert [line.split("  ")[1] for line in lines[1:-1]] == [
        "train-cnn1 epoch 1/3",
        "train-cnn1 epoch 2/3",
        "train-cnn1 epoch 3/3",
    ]
    assert "\r" not in text


def test_on_a_terminal_the_epochs_are_one_live_bar(tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    text = shown(Terminal(), tmp_path)
    assert "epoch 1/3  loss" not in text  # no line per epoch
    redraws = [part for part in text.split("\r") if "train-cnn1" in part and "/3" in part]
    assert redraws, text
    assert any("3/3" in part and "val_accuracy 0.8" in part for part in redraws), redraws
    assert "start train-cnn1\n" in text and "done train-cnn1 in " in text
