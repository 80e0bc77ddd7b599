"""From a model's outputs to its answers: class, refer (and why), prediction set, familiarity.

One place for the rule every reader of a model applies (``predict``, ``validate``, evaluate, the shift
benchmark): a cell is referred to a person when its calibrated confidence is below its predicted class's
threshold (``low confidence``) or when it is unlike the training images (``unlike the training images``).
The rules come from the model file itself: its :class:`~bloodcell.calibration.Calibration` layer and its
familiarity layer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from bloodcell import calibration, familiarity, feeding, selective
from bloodcell.layers import SYMMETRIES, DihedralImages

IMAGES_PER_BATCH = 128  # images a model sees per forward pass (the combined model: 16 inputs x 8 symmetries)
ANSWER_BATCH = 64  # images per forward pass when answering (predict, the served model): a smaller peak memory

LOW_CONFIDENCE = "low confidence"
UNFAMILIAR = "unlike the training images"
# A batch this large whose unfamiliar share is above both bounds gets the shift warning.
WARNING_MIN_IMAGES = 20
WARNING_MIN_SHARE = 0.20
WARNING_RATIO = 3.0


@dataclass(frozen=True)
class Rules:
    """What a loaded model says about referring, prediction sets and familiarity."""

    refer_below: np.ndarray  # per class
    promise: list[str]  # per class; all PROMISE_NONE without calibration
    target_accuracy: float | None
    set_min_probability: np.ndarray | None  # None: the model predates prediction sets
    set_alpha: float | None
    familiarity_threshold: float | None  # None: the model predates the familiarity check
    flag_share: float | None
    calibrated: bool
    temperature: float | None = None

    @classmethod
    def of(cls, model: keras.Model) -> Rules:
        n_classes = int(model.outputs[0].shape[-1])
        layer = calibration.calibration_layer(model)
        check = familiarity.familiarity_layer(model)
        refer = np.broadcast_to(np.asarray(layer.refer_below if layer else 0.0, np.float64), (n_classes,))
        promise = (layer.promise if layer and layer.promise else None) or [
            selective.PROMISE_GROUP if layer else selective.PROMISE_NONE
        ] * n_classes
        sets = layer.set_min_probability if layer else None
        return cls(
            refer_below=np.array(refer),
            promise=list(promise),
            target_accuracy=layer.target_accuracy if layer else None,
            set_min_probability=np.asarray(sets, np.float64) if sets else None,
            set_alpha=layer.set_alpha if layer else None,
            familiarity_threshold=check.threshold if check else None,
            flag_share=check.flag_share if check else None,
            calibrated=layer is not None,
            temperature=layer.temperature if layer else None,
        )


@dataclass(frozen=True)
class Outputs:
    """A model's outputs for some images."""

    uncalibrated: np.ndarray  # (N, K)
    probabilities: np.ndarray  # (N, K), calibrated
    familiarity: np.ndarray | None  # (N,), None without the check


def scoring_model(model: keras.Model) -> keras.Model:
    """One pass giving the uncalibrated and calibrated probabilities and, if the model has it, the
    familiarity score."""
    outputs = [calibration.uncalibrated_output(model), model.outputs[0]]
    if familiarity.familiarity_layer(model) is not None:
        outputs.append(model.outputs[1])
    return keras.Model(model.inputs, outputs)


def outputs_of(scoring: keras.Model, x: np.ndarray, batch_size: int) -> Outputs:
    """:func:`scoring_model`'s outputs for ``x``."""
    parts = feeding.predict_outputs(scoring, x, batch_size)
    return Outputs(parts[0], parts[1], parts[2].reshape(-1) if len(parts) > 2 else None)


@dataclass(frozen=True)
class Decisions:
    """Per image: the predicted class, whether it is kept or referred and why, and its prediction set."""

    predicted: np.ndarray  # (N,) class index
    confidence: np.ndarray  # (N,) calibrated probability of the predicted class
    confident: np.ndarray  # (N,) bool: at or above its class's refer threshold
    familiar: np.ndarray | None  # (N,) bool; None without the check
    sets: np.ndarray | None  # (N, K) bool; None without prediction sets

    @property
    def refer(self) -> np.ndarray:
        return ~self.confident if self.familiar is None else ~self.confident | ~self.familiar

    @property
    def kept(self) -> np.ndarray:
        return ~self.refer

    def reason(self, i: int) -> str | None:
        """Why image ``i`` is referred (both reasons joined by "; "), None when it is kept."""
        reasons = [LOW_CONFIDENCE] if not self.confident[i] else []
        if self.familiar is not None and not self.familiar[i]:
            reasons.append(UNFAMILIAR)
        return "; ".join(reasons) or None


def decide(rules: Rules, outputs: Outputs) -> Decisions:
    probabilities = outputs.probabilities
    familiar = None
    if outputs.familiarity is not None and rules.familiarity_threshold is not None:
        familiar = outputs.familiarity <= rules.familiarity_threshold
    sets = None
    if rules.set_min_probability is not None:
        sets = selective.prediction_sets(probabilities, rules.set_min_probability)
    return Decisions(
        predicted=probabilities.argmax(axis=1),
        confidence=probabilities.max(axis=1),
        confident=selective.kept_mask(probabilities, rules.refer_below)
        if rules.calibrated
        else np.ones(len(probabilities), bool),
        familiar=familiar,
        sets=sets,
    )


def measures(y_true: np.ndarray, decisions: Decisions, classes: list[str]) -> dict:
    """What the decisions achieve on labelled images: shares referred (by reason) and kept, kept accuracy
    overall and per predicted class, prediction sets' coverage (overall and per true class) and size."""
    n = len(y_true)
    correct = decisions.predicted == y_true
    kept = decisions.kept
    result: dict = {
        "images": int(n),
        "unfamiliar_share": float((~decisions.familiar).mean()) if decisions.familiar is not None else None,
        "low_confidence_share": float((~decisions.confident).mean()) if n else 0.0,
        "kept_share": float(kept.mean()) if n else 0.0,
        "kept_accuracy": float(correct[kept].mean()) if kept.any() else None,
        "per_class": {},
    }
    for c, name in enumerate(classes):
        called = decisions.predicted == c
        entry = {
            "predicted": int(called.sum()),
            "kept": int((called & kept).sum()),
            "kept_share": float(kept[called].mean()) if called.any() else None,
            "kept_accuracy": float(correct[called & kept].mean()) if (called & kept).any() else None,
            "cells": int((y_true == c).sum()),
            "recall_kept": float((correct & kept)[y_true == c].mean()) if (y_true == c).any() else None,
        }
        if decisions.sets is not None:
            entry["set_coverage"] = float(decisions.sets[y_true == c, c].mean()) if (y_true == c).any() else None
        result["per_class"][name] = entry
    if decisions.sets is not None and n:
        result["set_coverage"] = float(decisions.sets[np.arange(n), y_true].mean())
        result["set_mean_size"] = float(decisions.sets.sum(axis=1).mean())
        result["set_singleton_share"] = float((decisions.sets.sum(axis=1) == 1).mean())
    return result


def shift_warning(unfamiliar: int, images: int, rules: Rules) -> str | None:
    """The warning for a batch with far more unfamiliar images than validation had, or None."""
    if rules.flag_share is None or images < WARNING_MIN_IMAGES:
        return None
    share = unfamiliar / images
    if share <= max(WARNING_MIN_SHARE, WARNING_RATIO * rules.flag_share):
        return None
    return (
        f"{share:.0%} of these {images} images look unlike the training images (about {rules.flag_share:.0%} of "
        "the validation images did): another microscope, magnification or stain? The classes are not reliable "
        "here. Validate the model on labelled images of this laboratory first (bloodcell validate --model URI "
        "DIR), or train it with them."
    )


def inference_batch(model: keras.Model, images_per_batch: int = IMAGES_PER_BATCH) -> int:
    """Input images per batch so that each member sees at most ``images_per_batch`` images (TTA: 8 per input)."""
    with_tta = any(isinstance(layer, DihedralImages) for layer in model.layers)
    return max(1, images_per_batch // SYMMETRIES) if with_tta else images_per_batch


@dataclass
class Prediction:
    """One image's answer: class, calibrated probabilities, whether a person should look at it and why."""

    path: str
    label: str  # the predicted class
    confidence: float  # its calibrated probability
    probabilities: dict[str, float]  # calibrated, per class
    refer: bool  # a person should look at this cell (low confidence or unlike the training images)
    refer_reason: str | None  # decisions.LOW_CONFIDENCE, decisions.UNFAMILIAR, both joined by "; ", or None
    familiar: bool | None  # like the training images; None for a model without the familiarity check
    familiarity: float | None  # its score (higher: less familiar); flagged above the model's threshold
    prediction_set: list[str] | None  # the classes that hold the true one with probability >= 1 - alpha
    promise: str  # what the model promises for cells it calls this class (selective.PROMISE_*)
    explanation: str | None = None  # the Grad-CAM overlay's path (with --explain)

    def answer(self) -> dict[str, Any]:
        """The answer as every interface gives it (``predict --json``, the MLflow model, the service): class,
        confidence, probabilities per class, refer and why, familiarity, prediction set, promise."""
        fields = asdict(self)
        del fields["path"], fields["explanation"]
        return {"class": fields.pop("label"), **fields}

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, **self.answer(), "explanation": self.explanation}


def answer_images(
    scoring: keras.Model, rules: Rules, images: np.ndarray, names: list[str], classes: list[str]
) -> tuple[Outputs, list[Prediction]]:
    """The outputs of the model behind ``scoring`` (:func:`scoring_model`) for ``images`` and each
    image's answer under its ``rules``."""
    outputs = outputs_of(scoring, images, inference_batch(scoring, ANSWER_BATCH))
    return outputs, answers(names, outputs, decide(rules, outputs), classes, rules)


def answers(
    paths: list[str],
    outputs: Outputs,
    decided: Decisions,
    classes: list[str],
    rules: Rules,
) -> list[Prediction]:
    result = []
    for i, path in enumerate(paths):
        row = outputs.probabilities[i]
        index = int(decided.predicted[i])
        result.append(
            Prediction(
                path=str(path),
                label=classes[index],
                confidence=float(row[index]),
                probabilities={c: round(float(p), 6) for c, p in zip(classes, row, strict=True)},
                refer=bool(decided.refer[i]),
                refer_reason=decided.reason(i),
                familiar=None if decided.familiar is None else bool(decided.familiar[i]),
                familiarity=None if outputs.familiarity is None else round(float(outputs.familiarity[i]), 6),
                prediction_set=None
                if decided.sets is None
                else [c for c, inside in zip(classes, decided.sets[i], strict=True) if inside],
                promise=rules.promise[index],
            )
        )
    return result
