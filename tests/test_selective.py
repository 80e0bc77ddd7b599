"""Per-class refer thresholds and conformal prediction sets, on synthetic data whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from bloodcell import calibration, selective
from conftest import sampled_labels


def synthetic(rng: np.random.Generator, n: int, sharpness: np.ndarray, prior: np.ndarray):
    """Calibrated probabilities over ``len(prior)`` classes and labels drawn from them: class c's images are
    confidently of class c in proportion to ``sharpness[c]`` (harder classes get flatter probabilities)."""
    k = len(prior)
    own = rng.choice(k, size=n, p=prior)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), own] += sharpness[own] * rng.gamma(2.0, 1.0, size=n)
    probabilities = calibration.softmax(logits)
    return probabilities, sampled_labels(rng, probabilities)


PRIOR = np.array([0.45, 0.4, 0.05, 0.05, 0.05])  # two large classes, three small ones
SHARPNESS = np.array([6.0, 5.0, 6.0, 6.0, 6.0])


def test_the_fixed_sequence_stops_at_the_first_threshold_whose_bound_fails():
    # 400 right at confidence 0.999, then one wrong at 0.99, then 400 right at 0.98
    confidence = np.concatenate([np.full(400, 0.999), [0.99], np.full(400, 0.98)])
    correct = np.concatenate([np.ones(400, bool), [False], np.ones(400, bool)])
    threshold = selective.certified_threshold(confidence, correct, 0.99, 0.95)
    # below 0.99 the kept cells (801, 1 wrong) would pass too, but the sequence stopped at 0.99 (401, 1 wrong)
    assert selective.accuracy_lower_bound(400, 401, 0.95) < 0.99 < selective.accuracy_lower_bound(800, 801, 0.95)
    assert threshold is not None and 0.99 < threshold <= 0.999
    assert selective.certified_threshold(confidence[:200], correct[:200], 0.99, 0.95) is None  # too few cells
    assert selective.cells_needed(0.99, 0.95) == 299


def test_per_class_thresholds_meet_their_target_on_new_data_and_small_classes_are_pooled():
    rng = np.random.default_rng(7)
    target = 0.99
    p_cal, y_cal = synthetic(rng, 6000, SHARPNESS, PRIOR)
    rule = selective.refer_rule(y_cal, p_cal, target)
    each = selective.test_level(0.95, len(PRIOR))  # every promise at once: Bonferroni over the 6 tests
    assert each == pytest.approx(1 - 0.05 / 6)
    assert rule.promise[:2] == [selective.PROMISE_CLASS] * 2  # the large classes: promised alone
    assert rule.promise[2:] == [selective.PROMISE_GROUP] * 3  # 300 cells each: too few alone, enough together
    # on the calibration data itself every promise holds with its bound
    kept = selective.kept_mask(p_cal, rule.thresholds)
    predicted = p_cal.argmax(axis=1)
    for c, promise in enumerate(rule.promise):
        mine = kept & (predicted == c)
        if promise == selective.PROMISE_CLASS:
            right = int((y_cal[mine] == c).sum())
            assert selective.accuracy_lower_bound(right, int(mine.sum()), each) >= target
    group = kept & np.isin(predicted, [c for c, p in enumerate(rule.promise) if p == selective.PROMISE_GROUP])
    right = int((y_cal[group] == predicted[group]).sum())
    assert selective.accuracy_lower_bound(right, int(group.sum()), each) >= target
    # and on a large fresh sample from the same source, each promised class reaches the target
    p_new, y_new = synthetic(rng, 200_000, SHARPNESS, PRIOR)
    kept_new, predicted_new = selective.kept_mask(p_new, rule.thresholds), p_new.argmax(axis=1)
    for c, promise in enumerate(rule.promise):
        mine = kept_new & (predicted_new == c)
        if promise == selective.PROMISE_CLASS:
            assert (y_new[mine] == c).mean() >= target
    pooled = kept_new & np.isin(predicted_new, [c for c, p in enumerate(rule.promise) if p == selective.PROMISE_GROUP])
    assert (y_new[pooled] == predicted_new[pooled]).mean() >= target
    assert kept_new.mean() > 0.5


def test_the_refer_promise_fails_in_at_most_about_five_percent_of_calibration_draws():
    """Validity of the 95% bound: over many calibration sets, how often the promised class's accuracy on new
    cells falls below the target (it should be rare: at most 5%, and fixed-sequence testing keeps it so)."""
    rng = np.random.default_rng(11)
    target, prior, sharpness = 0.95, np.array([0.6, 0.4]), np.array([2.5, 2.0])
    p_new, y_new = synthetic(rng, 200_000, sharpness, prior)
    predicted_new, confidence_new = p_new.argmax(axis=1), p_new.max(axis=1)
    failures = trials = 0
    for _ in range(200):
        p_cal, y_cal = synthetic(rng, 1500, sharpness, prior)
        mine = p_cal.argmax(axis=1) == 0
        threshold = selective.certified_threshold(
            p_cal.max(axis=1)[mine], (y_cal == 0)[mine], target, selective.DEFAULT_LEVEL
        )
        if threshold is None:
            continue
        kept = (predicted_new == 0) & (confidence_new >= threshold)
        trials += 1
        failures += (y_new[kept] == 0).mean() < target
    assert trials > 150 and failures / trials <= 0.08


def test_conformal_sets_hold_each_class_with_the_promised_probability():
    rng = np.random.default_rng(3)
    alpha = 0.05
    coverage = []
    for _ in range(20):
        p_cal, y_cal = synthetic(rng, 3000, SHARPNESS, PRIOR)
        rule = selective.set_rule(y_cal, p_cal, alpha)
        p_new, y_new = synthetic(rng, 20_000, SHARPNESS, PRIOR)
        sets = selective.prediction_sets(p_new, rule.min_probability)
        coverage.append([sets[y_new == c, c].mean() for c in range(len(PRIOR))])
    per_class = np.mean(coverage, axis=0)  # exchangeable data: each class's coverage at least 1 - alpha on average
    assert (per_class >= 1 - alpha - 0.005).all() and (per_class <= 1 - alpha + 0.03).all()


def test_a_class_with_too_few_calibration_cells_is_in_every_set():
    rng = np.random.default_rng(4)
    p_cal, y_cal = synthetic(rng, 3000, SHARPNESS, PRIOR)
    few = np.flatnonzero(y_cal == 4)[:50]
    keep = np.concatenate([np.flatnonzero(y_cal != 4), few])
    rule = selective.set_rule(y_cal[keep], p_cal[keep], 0.01)  # 50 cells < 99 needed for alpha = 0.01
    assert selective.cells_for_sets(0.01) == 99
    assert rule.min_probability[4] == 0.0 and rule.calibration_cells[4] == 50
    assert selective.prediction_sets(p_cal, rule.min_probability)[:, 4].all()
    assert all(m > 0 for m in rule.min_probability[:4])


@pytest.mark.parametrize("target", [0.9, 0.99])
def test_calibrate_fits_temperature_on_validation_and_the_rules_on_calibration(target):
    rng = np.random.default_rng(2)
    p, y = synthetic(rng, 6000, SHARPNESS, PRIOR)
    scores = rng.normal(size=6000)
    val, cal = slice(0, 2000), slice(2000, None)
    fitted = calibration.calibrate((y[val], p[val], scores[val]), (y[cal], p[cal], scores[cal]), target, 0.05, 0.1)
    assert fitted.temperature == pytest.approx(calibration.fit_temperature(y[val], p[val]))
    assert fitted.flagged_share == pytest.approx(0.1, abs=0.01) and fitted.flag_share == 0.1
    familiar = scores[cal] <= fitted.familiarity_threshold
    expected = selective.refer_rule(
        y[cal][familiar], calibration.apply_temperature(p[cal], fitted.temperature)[familiar], target
    )
    assert fitted.refer_below == expected.thresholds and fitted.promise == expected.promise
    assert len(fitted.set_min_probability) == len(PRIOR) and fitted.set_alpha == 0.05
