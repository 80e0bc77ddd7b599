"""How the combined model's members are chosen on the validation split, from their probabilities alone
(numpy and scikit-learn; :mod:`bloodcell.ensemble` computes the probabilities and builds the model)."""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np
from sklearn import metrics as skm

SELECTION_RULE = (
    "on the validation split: per member, the resize method with the best accuracy, and test-time "
    "augmentation (8 symmetries) if it raises accuracy; then the set of members whose average has the best "
    "accuracy (ties: fewer members, lower log loss)"
)


@dataclass(frozen=True)
class Score:
    """Validation accuracy and log loss of some probabilities."""

    accuracy: float
    log_loss: float

    @classmethod
    def of(cls, y_true: np.ndarray, probabilities: np.ndarray) -> Score:
        labels = list(range(probabilities.shape[1]))
        return cls(
            float(skm.accuracy_score(y_true, probabilities.argmax(axis=1))),
            float(skm.log_loss(y_true, np.clip(probabilities, 1e-7, 1), labels=labels)),
        )


def choose_tta(by_symmetry: dict[str, np.ndarray], y_val: np.ndarray) -> dict[str, dict]:
    """Per member: its validation score without and with test-time augmentation, and whether to use it.

    TTA costs 8x the inference, so a member keeps it only if it raises validation accuracy.
    """
    choices = {}
    for name, probabilities in by_symmetry.items():
        plain, averaged = Score.of(y_val, probabilities[0]), Score.of(y_val, probabilities.mean(axis=0))
        choices[name] = {"plain": asdict(plain), "tta": asdict(averaged), "use": averaged.accuracy > plain.accuracy}
    return choices


def choose_members(member_probabilities: dict[str, np.ndarray], y_val: np.ndarray) -> list[dict]:
    """Every non-empty set of members, scored by the validation accuracy of their average; best first.

    Ties go to the smaller set (cheaper, and no evidence the extra member helps), then to the lower
    validation log loss.
    """
    names = list(member_probabilities)
    candidates = []
    for size in range(1, len(names) + 1):
        for subset in itertools.combinations(names, size):
            average = np.mean([member_probabilities[n] for n in subset], axis=0)
            candidates.append({"members": list(subset), **asdict(Score.of(y_val, average))})
    return sorted(candidates, key=lambda c: (-c["accuracy"], len(c["members"]), c["log_loss"]))


def describe(members: list[str], tta: dict[str, bool], resize: dict[str, str | None]) -> str:
    """What the combined model is, e.g. ``the average of cnn2 (averaged over the 8 symmetries) and vgg16
    (shrunk by area)`` (for the log, the report and the summary)."""

    def branch(name: str) -> str:
        parts = [
            f"shrunk by {resize[name]}" if resize[name] else "",
            "averaged over the 8 symmetries" if tta[name] else "",
        ]
        return name + (f" ({', '.join(p for p in parts if p)})" if any(parts) else "")

    if len(members) == 1:
        return f"{branch(members[0])} alone"
    return f"the average of {', '.join(branch(n) for n in members[:-1])} and {branch(members[-1])}"
