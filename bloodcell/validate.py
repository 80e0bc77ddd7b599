"""``bloodcell validate --model URI DIR``: does a model keep its promises on a laboratory's own labelled images?

``DIR`` holds one folder per class (named as the model's classes), as the PBC dataset does. The model
classifies every image with its own rules (:mod:`bloodcell.decisions`); the result is an HTML page in the
look of the pipeline's report and a JSON file with the same figures: accuracy, per-class precision, recall
and F1, the confusion matrix, the share unlike the training images, the share kept and its accuracy
overall and per class, the prediction sets' coverage and mean size, and a verdict.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bloodcell import decisions, evaluate, plots, predict, selective
from bloodcell.errors import BloodcellError
from bloodcell.report import TEMPLATES, per_class_rows

MIN_IMAGES = 50  # fewer labelled images say too little for a verdict
VERDICT_LEVEL = 0.95  # a promise counts as missed when even the upper 95% bound of what was measured is below it


@dataclass(frozen=True)
class Verdict:
    kind: str  # "unfamiliar" | "misses" | "keeps" | "too few"
    text: str


def verdict(measured: dict, rules: decisions.Rules) -> Verdict:
    """What a lab should do with this model, from what it achieved on the lab's labelled images."""
    n = measured["images"]
    if n < MIN_IMAGES:
        return Verdict("too few", f"only {n} readable labelled images: too few for a verdict (use {MIN_IMAGES}+).")
    unfamiliar = measured["unfamiliar_share"]
    if unfamiliar is not None and decisions.shift_warning(round(unfamiliar * n), n, rules):
        return Verdict(
            "unfamiliar",
            f"these images are unlike the training data ({unfamiliar:.0%} flagged, about {rules.flag_share:.0%} of "
            "the validation images were): do not use this model here. Train it with labelled images of this "
            "laboratory (another microscope, magnification or stain than the model knows).",
        )
    missed = missed_promises(measured, rules)
    if missed:
        text = "the model misses its promises on these images: " + "; ".join(missed) + ". Do not rely on it here."
        return Verdict("misses", text)
    kept = measured["kept_accuracy"]
    text = f"the model keeps its promises on these images: {measured['kept_share']:.1%} kept"
    text += f", {kept:.2%} of them right" if kept is not None else ""
    if measured.get("set_coverage") is not None:
        text += f"; its prediction sets hold the true class for {measured['set_coverage']:.1%}"
    return Verdict("keeps", text + ". Keep referring the cells it flags.")


def missed_promises(measured: dict, rules: decisions.Rules) -> list[str]:
    """The promises clearly missed: what was measured is unlikely under the promise (its 95% upper bound is
    below it). Kept accuracy overall and per class promised alone, and the prediction sets' coverage."""
    n, missed = measured["images"], []
    target, alpha = rules.target_accuracy, rules.set_alpha
    checks = []
    if target and measured["kept_accuracy"] is not None:
        kept = round(n * measured["kept_share"])
        checks.append(("the kept cells", measured["kept_accuracy"], kept, target))
        for (name, entry), promise in zip(measured["per_class"].items(), rules.promise, strict=True):
            if promise == selective.PROMISE_CLASS and entry["kept"]:
                checks.append((f"the kept cells called {name}", entry["kept_accuracy"], entry["kept"], target))
    if alpha and measured.get("set_coverage") is not None:
        checks.append(("the prediction sets", measured["set_coverage"], n, 1 - alpha))
    for what, value, count, promised in checks:
        if upper_bound(round(value * count), count) < promised:
            missed.append(f"{what}: {value:.2%} right, promised {promised:.1%}")
    return missed


def upper_bound(right: int, count: int) -> float:
    """One-sided Clopper-Pearson upper bound of ``right / count`` at :data:`VERDICT_LEVEL`."""
    from scipy import stats

    return 1.0 if right >= count else float(stats.beta.ppf(VERDICT_LEVEL, right + 1, count - right))


def validate(model_uri: str, folder: str, output: Path) -> dict[str, Any]:
    """Classify the labelled images under ``folder`` with ``model_uri``; write ``validation.html`` and
    ``validation.json`` into ``output``; the figures and the verdict."""
    started = time.perf_counter()
    model, classes = predict.load(model_uri)
    classes = classes or [f"class_{i}" for i in range(int(model.outputs[0].shape[-1]))]
    files = predict.image_files([folder])
    check_folders(files, classes, folder)
    result = predict.classify(model, classes, files, started=started)
    y_true = predict.true_labels(result.predictions, classes)
    if not len(y_true):
        raise BloodcellError(f"no readable image under {folder}: nothing to validate")
    metrics = evaluate.classification_metrics(y_true, result.outputs.probabilities, classes)
    answers = evaluate.answers_summary(y_true, result.rules, result.outputs, classes)
    found = verdict(answers, result.rules)
    report = {
        "model": model_uri,
        "folder": str(folder),
        "verdict": found.kind,
        "verdict_text": found.text,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "classes": classes,
        "answers": answers,
        "familiarity_check": result.rules.familiarity_threshold is not None,
        "unreadable": result.unreadable,
        "seconds": round(time.perf_counter() - started, 2),
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "validation.json").write_text(json.dumps(report, indent=1))
    (output / "validation.html").write_text(render(report, {**metrics, "model": model.name, "answers": answers}))
    return report


def check_folders(files: list[Path], classes: list[str], folder: str) -> None:
    """Every image's folder must name one of the model's classes: that is how its true class is known."""
    unknown = sorted({p.parent.name for p in files} - set(classes))
    if unknown:
        raise BloodcellError(
            f"{folder}: folder(s) {', '.join(unknown)} name no class of this model, so their images have no known "
            f"true class. Put each image in a folder named after its class, one of: {', '.join(classes)}."
        )
    if not files:
        raise BloodcellError(f"{folder} holds no image ({', '.join(sorted(predict.IMAGE_SUFFIXES))}) in class folders")


def render(report: dict[str, Any], result: dict[str, Any]) -> str:
    figures = {
        "confusion": plots.confusion_matrices({result["model"]: result}),
        "answers": plots.per_class_answers(result, "these labelled images"),
    }
    embedded = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in figures.items()}
    answers = report["answers"]
    per_class_metrics = [
        [c, f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['f1-score']:.3f}", str(int(m["support"]))]
        for c, m in report["per_class"].items()
    ]
    rows = per_class_rows(result)
    return TEMPLATES.get_template("validate.html.j2").render(
        report=report,
        answers=answers,
        figures=embedded,
        metric_rows=per_class_metrics,
        answer_columns=list(rows[0]) if rows else [],
        answer_rows=[list(r.values()) for r in rows],
        share=lambda v, d=1: "-" if v is None else f"{v:.{d}%}",
        n_images=int(np.sum(report["confusion_matrix"])),
    )


def print_result(report: dict[str, Any], output: Path) -> None:
    answers = report["answers"]
    print(f"{answers['images']} images: accuracy {report['accuracy']:.2%}, macro F1 {report['macro_f1']:.4f}")
    unfamiliar = answers["unfamiliar_share"]
    line = "unlike the training images " + ("-" if unfamiliar is None else f"{unfamiliar:.1%}")
    line += f"; kept {answers['kept_share']:.1%}"
    if answers["kept_accuracy"] is not None:
        line += f" at {answers['kept_accuracy']:.2%}"
    if answers.get("set_coverage") is not None:
        line += f"; prediction sets hold the true class for {answers['set_coverage']:.1%}"
        line += f" (mean size {answers['set_mean_size']:.2f})"
    print(line)
    print(f"verdict: {report['verdict_text']}")
    print(f"report: {output / 'validation.html'} (figures: {output / 'validation.json'})")
