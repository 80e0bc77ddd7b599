"""Calibrated confidence, the "refer to a person" thresholds and the prediction sets.

Each model ends in a :class:`Calibration` layer: its probabilities divided by a temperature in log
space (temperature scaling, fitted on the validation split), the confidence below which a cell the model
calls class c is referred to a hematologist, per class, and the per-class thresholds of its prediction
sets (both fitted on the calibration split: :mod:`bloodcell.selective`). They live in the layer's config,
so the ``.keras`` file carries them wherever it goes: the bucket, MLflow, the registry, ``predict``.
:func:`calibrate` also chooses the familiarity check's threshold (:mod:`bloodcell.familiarity`).

The measures: expected calibration error (equal-width confidence bins), negative log-likelihood,
Brier score, and selective prediction (accuracy when only the most confident cells are kept).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np
from scipy import optimize

from bloodcell import familiarity, selective
from bloodcell.layers import DEFAULT_FLAG_SHARE, TINY, Calibration

ECE_BINS = 15
LAYER_NAME = "calibration"
DEFAULT_TARGET_ACCURACY = 0.99
REPORTED_COVERAGES = (1.0, 0.95, 0.9)
REPORTED_TARGETS = (0.99, 0.995)


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    return np.log(np.clip(np.asarray(probabilities, dtype=np.float64), TINY, 1.0))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same as dividing the logits by T (log p differs from them by a constant per row)."""
    return softmax(log_probabilities(probabilities) / temperature)


def nll(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes."""
    rows = np.arange(len(y_true))
    return float(-log_probabilities(probabilities)[rows, y_true].mean())


def brier(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared distance between the probabilities and the one-hot truth, summed over classes."""
    onehot = np.eye(probabilities.shape[1])[y_true]
    return float(((np.asarray(probabilities, dtype=np.float64) - onehot) ** 2).sum(axis=1).mean())


def fit_temperature(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """The temperature minimizing the negative log-likelihood of ``probabilities`` (searched in log space)."""
    logp = log_probabilities(probabilities)
    rows = np.arange(len(y_true))

    def loss(log_t: float) -> float:
        scaled = logp / np.exp(log_t)
        scaled -= scaled.max(axis=1, keepdims=True)
        return float(-(scaled[rows, y_true] - np.log(np.exp(scaled).sum(axis=1))).mean())

    found = optimize.minimize_scalar(loss, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))


@dataclass(frozen=True)
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    confidence: float  # mean confidence of its predictions (0 when empty)
    accuracy: float


def reliability(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Predictions grouped by confidence into ``bins`` equal-width bins (lower, upper], the first [0, 1/bins]."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    result = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        result.append(
            ReliabilityBin(
                float(edges[b]),
                float(edges[b + 1]),
                count,
                float(confidence[members].mean()) if count else 0.0,
                float(correct[members].mean()) if count else 0.0,
            )
        )
    return result


def ece(y_true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) x |accuracy - mean confidence|."""
    n = len(y_true)
    return float(sum(b.count / n * abs(b.accuracy - b.confidence) for b in reliability(y_true, probabilities, bins)))


def _kept_counts(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeping the k most confident predictions: (k, how many of them are right, the k-th's confidence), only
    at k where the next prediction is less confident (ties are kept or referred together)."""
    confidence = probabilities.max(axis=1)
    order = np.argsort(-confidence, kind="stable")
    right = np.cumsum(probabilities.argmax(axis=1)[order] == y_true[order])
    sorted_confidence = confidence[order]
    kept = np.arange(1, len(order) + 1)
    group_ends = np.append(sorted_confidence[1:] < sorted_confidence[:-1], True)
    return kept[group_ends], right[group_ends], sorted_confidence[group_ends]


def risk_coverage(y_true: np.ndarray, probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Keeping the k most confident predictions: (coverage k/n, accuracy of those kept, the k-th's confidence)."""
    kept, right, threshold = _kept_counts(y_true, probabilities)
    return kept / len(y_true), right / kept, threshold


def accuracy_at_coverage(y_true: np.ndarray, probabilities: np.ndarray, coverage: float) -> float:
    """Accuracy of the ``coverage`` most confident share of the predictions."""
    confidence = probabilities.max(axis=1)
    keep = max(1, int(round(coverage * len(y_true))))
    order = np.argsort(-confidence, kind="stable")[:keep]
    return float((probabilities[order].argmax(axis=1) == y_true[order]).mean())


def coverage_for_accuracy(
    y_true: np.ndarray, probabilities: np.ndarray, target: float, confidence: float | None = None
) -> tuple[float, float]:
    """The largest coverage whose kept predictions reach ``target`` accuracy (with ``confidence``: whose
    accuracy's lower confidence bound does), and the confidence threshold that keeps them (predictions with
    confidence >= it). Coverage 0 and a threshold above 1 when none does."""
    kept, right, threshold = _kept_counts(y_true, probabilities)
    accuracy = right / kept if confidence is None else selective.accuracy_lower_bound(right, kept, confidence)
    reaching = np.flatnonzero(accuracy >= target)
    if not len(reaching):
        return 0.0, float(np.nextafter(1.0, 2.0))
    best = reaching[-1]
    return float(kept[best] / len(y_true)), float(threshold[best])


@dataclass(frozen=True)
class Calibrated:
    """A model's calibration and promises: the temperature (fitted on the validation split), the refer
    thresholds per predicted class and the prediction-set thresholds (fitted on the calibration split)."""

    temperature: float
    refer_below: list[float]  # per predicted class: less confident predictions go to a person
    promise: list[str]  # per predicted class: selective.PROMISE_CLASS, PROMISE_GROUP or PROMISE_NONE
    target_accuracy: float  # what the kept predictions reach, with `level` confidence, where promised
    level: float
    set_min_probability: list[float]  # per class: in an image's prediction set when its probability reaches it
    set_alpha: float
    set_calibration_cells: list[int]  # per class, the calibration cells its set threshold was fitted on
    cal_kept_share: float  # share of the familiar calibration cells kept
    familiarity_threshold: float  # scores above it are unlike the training images
    flag_share: float  # the share of familiar cells the threshold was chosen to flag
    flagged_share: float  # the share of the validation and calibration cells it flags
    val_ece_before: float
    val_ece_after: float
    val_nll_before: float
    val_nll_after: float

    def params(self) -> dict:
        return asdict(self)

    def describe(self, classes: list[str]) -> str:
        promised = selective.promised_classes(self.refer_rule(), classes)
        alone, group, none = (", ".join(promised[k]) for k in selective.PROMISE_KINDS)
        text = (
            f"Calibrated on the validation split: temperature {self.temperature:.2f}. On the calibration split, per "
            f"predicted class, a confidence threshold below which cells are referred to a person; the cells kept reach "
            f"{self.target_accuracy:.1%} accuracy (all these promises together with {self.level:.0%} confidence) "
            f"for each class alone: {alone or 'none'}; for these classes together: {group or 'none'}"
        )
        text += f"; always referred: {none}" if none else ""
        return text + (
            f" ({self.cal_kept_share:.1%} of the familiar calibration cells kept). Prediction sets hold the true "
            f"class with probability >= {1 - self.set_alpha:.0%} whatever it is."
        )

    def refer_rule(self) -> selective.ReferRule:
        return selective.ReferRule(self.refer_below, self.promise, self.target_accuracy, self.level)


def calibrate(
    validation: tuple[np.ndarray, np.ndarray, np.ndarray],
    calibration_cells: tuple[np.ndarray, np.ndarray, np.ndarray],
    target_accuracy: float,
    set_alpha: float = selective.DEFAULT_SET_ALPHA,
    flag_share: float = DEFAULT_FLAG_SHARE,
) -> Calibrated:
    """Fit a model's rules from (labels, uncalibrated probabilities, familiarity scores) of the validation
    and calibration splits: the temperature on validation; the familiarity threshold on both (the share
    ``flag_share`` of them above it); the refer rule on the familiar calibration cells; the set rule on
    every calibration cell."""
    y_val, p_val, s_val = validation
    y_cal, p_cal, s_cal = calibration_cells
    temperature = fit_temperature(y_val, p_val)
    calibrated_val = apply_temperature(p_val, temperature)
    calibrated_cal = apply_temperature(p_cal, temperature)
    scores = np.concatenate([s_val, s_cal])
    threshold = familiarity.flag_threshold(scores, flag_share)
    familiar = s_cal <= threshold
    rule = selective.refer_rule(y_cal[familiar], calibrated_cal[familiar], target_accuracy)
    sets = selective.set_rule(y_cal, calibrated_cal, set_alpha)
    kept = selective.kept_mask(calibrated_cal[familiar], rule.thresholds)
    return Calibrated(
        temperature=temperature,
        refer_below=rule.thresholds,
        promise=rule.promise,
        target_accuracy=target_accuracy,
        level=rule.level,
        set_min_probability=sets.min_probability,
        set_alpha=set_alpha,
        set_calibration_cells=sets.calibration_cells,
        cal_kept_share=float(kept.mean()) if len(kept) else 0.0,
        familiarity_threshold=threshold,
        flag_share=flag_share,
        flagged_share=float((scores > threshold).mean()),
        val_ece_before=ece(y_val, p_val),
        val_ece_after=ece(y_val, calibrated_val),
        val_nll_before=nll(y_val, p_val),
        val_nll_after=nll(y_val, calibrated_val),
    )


def coverage_key(target: float) -> str:
    """``coverage_at_accuracy_99`` for 0.99, ``coverage_at_accuracy_99_5`` for 0.995."""
    return "coverage_at_accuracy_" + f"{target * 100:g}".replace(".", "_")


def quality(y_true: np.ndarray, uncalibrated: np.ndarray, calibrated: np.ndarray) -> dict:
    """Calibration and selective-prediction measures of one model on one split (the report's and MLflow's)."""
    result: dict = {
        "ece_before": ece(y_true, uncalibrated),
        "ece": ece(y_true, calibrated),
        "nll_before": nll(y_true, uncalibrated),
        "nll": nll(y_true, calibrated),
        "brier_before": brier(y_true, uncalibrated),
        "brier": brier(y_true, calibrated),
        "reliability_before": [asdict(b) for b in reliability(y_true, uncalibrated)],
        "reliability": [asdict(b) for b in reliability(y_true, calibrated)],
    }
    for coverage in REPORTED_COVERAGES:
        result[f"accuracy_at_coverage_{round(coverage * 100)}"] = accuracy_at_coverage(y_true, calibrated, coverage)
    for target in REPORTED_TARGETS:
        result[coverage_key(target)] = coverage_for_accuracy(y_true, calibrated, target)[0]
    curve_coverage, curve_accuracy, _ = risk_coverage(y_true, calibrated)
    step = max(1, len(curve_coverage) // 200)  # enough points for a plot
    result["risk_coverage"] = {
        "coverage": curve_coverage[::step].round(4).tolist() + [float(curve_coverage[-1])],
        "accuracy": curve_accuracy[::step].round(4).tolist() + [float(curve_accuracy[-1])],
    }
    return result


def calibration_layer_for(calibrated: Calibrated) -> Calibration:
    """The :class:`Calibration` layer carrying ``calibrated``."""
    return Calibration(
        calibrated.temperature,
        calibrated.refer_below,
        calibrated.target_accuracy,
        calibrated.promise,
        calibrated.level,
        calibrated.set_min_probability,
        calibrated.set_alpha,
        name=LAYER_NAME,
        dtype="float32",
    )


def calibration_layer(model: keras.Model) -> Calibration | None:
    """The model's calibration layer; None for a model trained before calibration existed."""
    found = [layer for layer in model.layers if isinstance(layer, Calibration)]
    return found[-1] if found else None


def uncalibrated_output(model: keras.Model) -> keras.KerasTensor:
    """The probabilities before the calibration layer (the model's first output without one)."""
    layer = calibration_layer(model)
    return model.outputs[0] if layer is None else layer.input
