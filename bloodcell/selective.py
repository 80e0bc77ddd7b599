"""What a model promises about the cells it keeps: per-class refer thresholds and prediction sets.

Both are fitted on the **calibration split**, which no other choice reads (early stopping, the combined
model's members, the temperature and the familiarity check use the validation split), so their
guarantees hold for new cells from the same source.

**Refer thresholds per predicted class** (Mondrian). For each class, the cells the model calls that
class are kept from a confidence threshold on; the threshold is the lowest of a fixed grid
(:data:`CONFIDENCE_GRID`, fixed before any data is read) such that it and every grid value above it
pass a one-sided Clopper-Pearson test of "the kept cells are at least ``target`` accurate" at
``level`` (fixed-sequence testing from the most confident end: stopping at the first failure makes
the thresholds of one class a family of tests valid without correction; the sequence begins where the
kept cells are enough for the test to pass at all). A class whose calibration cells cannot support the
promise alone joins the others in that case in one pooled group with one threshold, promised for the
group's kept cells together; if even the group cannot be promised, its cells are always referred. The
promises are made together: each of the (classes + 1) tests runs at ``1 - (1 - level) / (classes + 1)``
(Bonferroni), so that with confidence ``level`` every promise holds at once, not just each on its own.

**Prediction sets** (split conformal, class-conditional): class ``y`` is in an image's set when its
probability is at least the threshold fitted on the calibration cells of class ``y``, so whatever the
true class, the set holds it with probability at least ``1 - alpha``. That needs about ``1 / alpha``
calibration cells of the class; a class with fewer is in every set (the promise kept, the sets larger).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

# Candidate refer thresholds, most confident first: 1 - e^(-k/20) for k = 400 .. 1 (1 - 2e-9 .. 0.049).
CONFIDENCE_GRID = 1.0 - np.exp(-np.arange(400, 0, -1) / 20.0)
DEFAULT_LEVEL = 0.95
DEFAULT_SET_ALPHA = 0.01
NEVER_KEPT = float(np.nextafter(1.0, 2.0))  # a threshold no probability reaches
PROMISE_CLASS, PROMISE_GROUP, PROMISE_NONE = "class", "group", "none"


def accuracy_lower_bound(right: np.ndarray | int, kept: np.ndarray | int, level: float) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of the accuracy ``right / kept`` at confidence ``level``."""
    right, kept = np.asarray(right), np.asarray(kept)
    bound = stats.beta.ppf(1 - level, right, kept - right + 1)
    return np.where(right > 0, np.nan_to_num(bound), 0.0)


def cells_needed(target: float, level: float) -> int:
    """The fewest kept cells whose bound can reach ``target`` at all (all of them right)."""
    return math.ceil(math.log(1 - level) / math.log(target))


def certified_threshold(confidence: np.ndarray, correct: np.ndarray, target: float, level: float) -> float | None:
    """The lowest :data:`CONFIDENCE_GRID` value at which the kept cells (confidence >= it) reach ``target``
    accuracy with confidence ``level``, by fixed-sequence testing from the most confident end; None when
    the first test fails (or the cells are too few for any)."""
    needed = cells_needed(target, level)
    order = np.argsort(-confidence, kind="stable")
    right = np.concatenate([[0], np.cumsum(correct[order])])
    sorted_confidence = confidence[order]
    kept = np.searchsorted(-sorted_confidence, -CONFIDENCE_GRID, side="right")  # cells >= each grid value
    chosen = None
    for threshold, n in zip(CONFIDENCE_GRID, kept, strict=True):
        if n < needed:
            continue  # too few cells for any test to pass: the sequence has not begun
        if accuracy_lower_bound(right[n], n, level) < target:
            break
        chosen = float(threshold)
    return chosen


@dataclass(frozen=True)
class ReferRule:
    """Per predicted class: the confidence below which its cells are referred, and what is promised."""

    thresholds: list[float]  # per class; NEVER_KEPT when every cell of that class is referred
    promise: list[str]  # per class: PROMISE_CLASS (alone), PROMISE_GROUP (pooled) or PROMISE_NONE
    target_accuracy: float
    level: float

    def params(self) -> dict:
        return asdict(self)


def test_level(level: float, n_classes: int) -> float:
    """The confidence of each of the (``n_classes`` + 1) tests behind a model's promises (Bonferroni)."""
    return 1 - (1 - level) / (n_classes + 1)


def refer_rule(y_true: np.ndarray, probabilities: np.ndarray, target: float, level: float = DEFAULT_LEVEL) -> ReferRule:
    """Fit the per-class refer thresholds on calibration cells (``probabilities``: calibrated); with
    confidence ``level`` every promise made holds."""
    n_classes = probabilities.shape[1]
    each = test_level(level, n_classes)
    predicted, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    correct = predicted == y_true
    thresholds, promise = [NEVER_KEPT] * n_classes, [PROMISE_NONE] * n_classes
    for c in range(n_classes):
        mine = predicted == c
        found = certified_threshold(confidence[mine], correct[mine], target, each)
        if found is not None:
            thresholds[c], promise[c] = found, PROMISE_CLASS
    pooled = [c for c in range(n_classes) if promise[c] != PROMISE_CLASS]
    if pooled:
        members = np.isin(predicted, pooled)
        found = certified_threshold(confidence[members], correct[members], target, each)
        for c in pooled:
            thresholds[c], promise[c] = (found, PROMISE_GROUP) if found is not None else (NEVER_KEPT, PROMISE_NONE)
    return ReferRule(thresholds, promise, target, level)


def kept_mask(probabilities: np.ndarray, thresholds: list[float] | np.ndarray) -> np.ndarray:
    """Which predictions reach their predicted class's refer threshold."""
    predicted = probabilities.argmax(axis=1)
    return probabilities.max(axis=1) >= np.asarray(thresholds, dtype=np.float64)[predicted]


@dataclass(frozen=True)
class SetRule:
    """Class-conditional conformal prediction sets: class ``y`` is in the set when p_y >= min_probability[y]."""

    min_probability: list[float]  # 0.0 for a class with too few calibration cells: it is in every set
    alpha: float
    calibration_cells: list[int]  # per class

    def params(self) -> dict:
        return asdict(self)


def set_rule(y_true: np.ndarray, probabilities: np.ndarray, alpha: float = DEFAULT_SET_ALPHA) -> SetRule:
    """Fit the per-class set thresholds on calibration cells: for class ``y``, the ceil((n + 1)(1 - alpha))-th
    smallest of 1 - p_y over its n cells, as a minimum probability."""
    minimum, counts = [], []
    for c in range(probabilities.shape[1]):
        scores = np.sort(1.0 - probabilities[y_true == c, c].astype(np.float64))
        rank = math.ceil((len(scores) + 1) * (1 - alpha))
        minimum.append(0.0 if rank > len(scores) else float(1.0 - scores[rank - 1]))
        counts.append(int(len(scores)))
    return SetRule(minimum, alpha, counts)


def prediction_sets(probabilities: np.ndarray, min_probability: list[float] | np.ndarray) -> np.ndarray:
    """Boolean (N, K): which classes are in each image's set."""
    return probabilities.astype(np.float64) >= np.asarray(min_probability, dtype=np.float64)[None, :]


def cells_for_sets(alpha: float) -> int:
    """The fewest calibration cells of a class for its set threshold to exist."""
    return math.ceil(1 / alpha) - 1


def promised_classes(rule: ReferRule, classes: list[str]) -> dict[str, list[str]]:
    """Class names by what is promised for them."""
    return {kind: [c for c, p in zip(classes, rule.promise, strict=True) if p == kind] for kind in PROMISE_KINDS}


PROMISE_KINDS = (PROMISE_CLASS, PROMISE_GROUP, PROMISE_NONE)
