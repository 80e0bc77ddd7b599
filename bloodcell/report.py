"""Report: one self-contained HTML file (figures embedded) and a Markdown version comparing a run's models.

Stored as ``<run_uri>/report/report.html`` and ``report.md`` (+ ``plots/*.png``), logged to the
MLflow parent run; the run summary goes to ``<run_uri>/summary.json``. The pages are rendered from
the Jinja2 templates in ``bloodcell/templates``; the figures come from :mod:`bloodcell.plots`.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass
from typing import Any

import jinja2
import mlflow
from tabulate import tabulate

from bloodcell import ingest, plots, registry, selective, split, tracking
from bloodcell.config import ENSEMBLE_NAME, SUBSETS
from bloodcell.runstore import RunStore

SECTIONS = [
    ("comparison", "Model comparison"),
    ("calibration", "Calibration: how far to trust the confidence"),
    ("selective", "Referring the least confident cells to a person"),
    ("answers", "Knowing when not to answer: unfamiliar images, promises per class, prediction sets"),
    ("per_class_f1", "Per-class F1"),
    ("confusion", "Confusion matrices"),
    ("curves", "Training curves"),
    ("misclassified", "Misclassified test images"),
    ("explanations", "What the best model looks at (Grad-CAM)"),
]
MARKDOWN_MARKUP = re.compile(r"([\\`*_\[\]<>|~])")


def markdown_text(value: object) -> str:
    """``value`` as plain text in Markdown: one line, its markup characters escaped (class and file names come
    from the data, and could otherwise open links, images or HTML in a viewer)."""
    return MARKDOWN_MARKUP.sub(r"\\\1", " ".join(str(value).split()))


def markdown_code(value: object) -> str:
    """``value`` as one inline code span, fenced by more backticks than it holds in a row (CommonMark)."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


TEMPLATES = jinja2.Environment(
    loader=jinja2.PackageLoader("bloodcell", "templates"),
    autoescape=jinja2.select_autoescape(["html.j2"]),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
TEMPLATES.filters.update(md=markdown_text, code=markdown_code)


@dataclass(frozen=True)
class Report:
    html_uri: str
    markdown_uri: str
    summary: dict
    html: str
    markdown: str


def best_model(results: dict[str, dict]) -> str:
    """The model with the highest test accuracy (then macro F1)."""
    return max(results, key=lambda n: (results[n]["accuracy"], results[n]["macro_f1"]))


def build_report(
    store: RunStore, split_uri: str, results: dict[str, dict], summary: dict, tracker: tracking.Tracker | None = None
) -> Report:
    """Render, store and log the report of ``results`` (evaluation results by model name).

    Histories and dataset counts come from the bucket; MLflow failures of any step (recorded there)
    are listed in the report and the summary. ``summary["registry"]`` is the registry outcome.
    """
    tracker = tracker or tracking.Tracker(store, "report")
    results = dict(sorted(results.items(), key=lambda item: -item[1]["accuracy"]))  # every plot: best first
    histories = training_histories(store, results)
    counts = split.read_counts(split_uri)
    manifest = ingest.read_manifest(split.dataset_of(split_uri))
    best = best_model(results)
    figures = {
        "comparison": plots.comparison(results, best),
        "confusion": plots.confusion_matrices(results),
        "per_class_f1": plots.per_class_f1(results),
        "curves": plots.training_curves(histories),
        "misclassified": plots.misclassified(results[best]),
    }
    if all("calibration" in r for r in results.values()):  # runs evaluated before calibration existed have none
        figures["calibration"] = plots.reliability_diagrams(results)
        figures["selective"] = plots.accuracy_coverage(results)
        figures["explanations"] = plots.explanations(results[best])
    if results[best].get("answers"):
        figures["answers"] = plots.per_class_answers(results[best])
    for name, png in figures.items():
        store.write_report_file(f"plots/{name}.png", png, "image/png")
    summary = {**summary, "tracking_failures": tracking.recorded_failures(store)}
    context = page_context(results, counts, manifest, best, summary, list(figures))
    page = render_html(context, figures)
    markdown = render_markdown(context)
    html_uri = store.write_report_file("report.html", page, "text/html")
    markdown_uri = store.write_report_file("report.md", markdown, "text/markdown")
    summary = {
        **summary,
        "report_uri": html_uri,
        "report_markdown_uri": markdown_uri,
        "best_model": best,
        "models": {n: summary_row(r) for n, r in results.items()},
    }
    parent = summary.get("mlflow_parent_run_id")
    if parent:
        tracker.attempt(
            "log the report to the parent run", _log_report, parent, page, markdown, results, manifest, best
        )
        tracker.attempt("close the parent run", tracking.finish, parent)
    if tracker.failures:  # the report's own MLflow calls above, added without listing the bucket again
        summary["tracking_failures"] = {**summary["tracking_failures"], "report": list(tracker.failures.values())}
    store.write_summary(summary)
    return Report(html_uri, markdown_uri, summary, page, markdown)


def training_histories(store: RunStore, results: dict[str, dict]) -> dict[str, dict]:
    """The training history of each trained model (the combined model has none: it is not trained)."""
    histories = {name: store.history(name) for name in results}
    return {name: history for name, history in histories.items() if history is not None}


def summary_row(result: dict) -> dict[str, Any]:
    """A model's entry in the run summary; the combined model's also names its members."""
    row = {
        "test_accuracy": result["accuracy"],
        "macro_f1": result["macro_f1"],
        "inference_images_per_second": result["inference_images_per_second"],
        "model_uri": result["mlflow_model_uri"],
        "bucket_model_uri": result["model_uri"],
        "mlflow_run_id": result["mlflow_run_id"],
    }
    quality = result.get("calibration") or {}
    row.update({key: quality[key] for key in SUMMARY_CALIBRATION if key in quality})
    answers = result.get("answers") or {}
    row.update({key: answers[key] for key in SUMMARY_ANSWERS if key in answers})
    if answers.get("promise"):
        row["promised_classes"] = [c for c, p in answers["promise"].items() if p == selective.PROMISE_CLASS]
    if result["model"] == ENSEMBLE_NAME:
        row.update({key: result[key] for key in ("members", "description", "tta", "resize", "val_accuracy")})
    return row


SUMMARY_CALIBRATION = (
    "temperature",
    "ece_before",
    "ece",
    "nll_before",
    "nll",
    "accuracy_at_coverage_90",
    "coverage_at_accuracy_99",
)
SUMMARY_ANSWERS = (
    "refer_below",
    "kept_share",
    "kept_accuracy",
    "unfamiliar_share",
    "low_confidence_share",
    "set_coverage",
    "set_mean_size",
)


def _log_report(parent: str, page: str, markdown: str, results: dict, manifest: dict, best: str) -> None:
    with mlflow.start_run(run_id=parent):
        mlflow.log_text(page, "report/report.html")
        mlflow.log_text(markdown, "report/report.md")
        mlflow.log_metrics({f"{n}_test_accuracy": r["accuracy"] for n, r in results.items()})
        mlflow.log_metrics(
            {
                "images": len(manifest["images"]),
                "quarantined": len(manifest["quarantined"]),
                "duplicates": len(manifest["duplicates"]),
            }
        )
        mlflow.set_tag("best_model", best)


def comparison_rows(results: dict[str, dict], best: str) -> list[dict[str, str]]:
    """One row per model, best test accuracy first, formatted for reading."""
    ordered = sorted(results.values(), key=lambda r: -r["accuracy"])
    return [
        {
            "model": r["model"] + (" (best)" if r["model"] == best else ""),
            "test accuracy": f"{r['accuracy']:.2%}",
            "macro F1": f"{r['macro_f1']:.4f}",
            "ROC AUC (ovr)": f"{r['roc_auc_ovr']:.4f}",
            "params": f"{r['params']:,}",
            "input": f"{r['image_size']}px",
            "epochs": str(r["epochs"]) if r["model"] != ENSEMBLE_NAME else "-",
            "training time": _duration(r["train_seconds"]),
            "inference images/s": f"{r['inference_images_per_second']:,.0f}",
            "size": f"{r['model_size_bytes'] / 2**20:.1f} MiB",
        }
        for r in ordered
    ]


def describe_ensemble(results: dict[str, dict]) -> str:
    """What the combined model is and how it was chosen, in a sentence ("" without one)."""
    if ENSEMBLE_NAME not in results:
        return ""
    r = results[ENSEMBLE_NAME]
    return (
        f"{ENSEMBLE_NAME} is {r['description']}: one model file taking {r['image_size']}px images, each "
        f"member shrinking them inside. How it combines them was chosen on the validation split (validation "
        f"accuracy {r['val_accuracy']:.2%}), never on test; its training time is the time it took to choose "
        f"and build it."
    )


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def dataset_table(counts: dict) -> tuple[list[str], list[list[str]]]:
    """Images per class and subset, with totals."""
    subsets = [s for s in SUBSETS if s in counts]
    classes = sorted(set().union(*(c.keys() for c in counts.values())))
    body = [
        [c, *(str(counts[s].get(c, 0)) for s in subsets), str(sum(counts[s].get(c, 0) for s in subsets))]
        for c in classes
    ]
    body.append(
        ["total", *(str(sum(counts[s].values())) for s in subsets), str(sum(sum(counts[s].values()) for s in subsets))]
    )
    return ["class", *subsets, "all"], body


def left_out(manifest: dict) -> list[dict[str, str]]:
    """Files the ingest left out: quarantined ones and duplicates, with the reason."""
    return manifest.get("quarantined", []) + [
        {
            "path": d["path"],
            "reason": f"duplicate of {d['duplicate_of']}"
            + (f" (a different class: kept as {d['conflicting_label']})" if d.get("conflicting_label") else ""),
        }
        for d in manifest.get("duplicates", [])
    ]


def headline(result: dict) -> str:
    """The first thing the report says: which model, how good, how far to trust it (test split)."""
    text = f"Best model: {result['model']}, {result['accuracy']:.2%} test accuracy (macro F1 {result['macro_f1']:.3f})."
    answers, calibrated = result.get("answers") or {}, result.get("calibration") or {}
    if "kept_share" in answers:
        text += (
            f" It keeps {_share(answers['kept_share'])} of the test cells, {_share(answers['kept_accuracy'], 2)} of "
            f"them right, and refers the rest to a person ({_share(answers.get('unfamiliar_share'))} unlike the "
            f"training images, {_share(answers.get('low_confidence_share'))} low confidence)."
        )
    if "ece" in calibrated:
        text += f" Its confidence is calibrated: expected calibration error {calibrated['ece']:.4f}."
    return text


def calibration_rows(results: dict[str, dict]) -> list[dict[str, str]]:
    """Per model, on the test split: calibration before -> after, selective prediction, the stored threshold."""
    rows = []
    for r in sorted(results.values(), key=lambda r: -r["accuracy"]):
        q = r.get("calibration")
        if not q:
            continue
        rows.append(
            {
                "model": r["model"],
                "temperature": f"{q['temperature']:.2f}",
                "ECE (15 bins)": f"{q['ece_before']:.4f} → {q['ece']:.4f}",
                "NLL": f"{q['nll_before']:.4f} → {q['nll']:.4f}",
                "Brier": f"{q['brier_before']:.4f} → {q['brier']:.4f}",
                "accuracy at 100/95/90% coverage": " / ".join(
                    f"{q[f'accuracy_at_coverage_{c}']:.2%}" for c in (100, 95, 90)
                ),
                "coverage at 99% / 99.5% accuracy": f"{q['coverage_at_accuracy_99']:.1%} / "
                f"{q['coverage_at_accuracy_99_5']:.1%}",
            }
        )
    return rows


def _share(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}%}"


def answer_rows(results: dict[str, dict]) -> list[dict[str, str]]:
    """Per model, on the test split: what its rules refer and keep, and its prediction sets."""
    rows = []
    for r in sorted(results.values(), key=lambda r: -r["accuracy"]):
        a = r.get("answers")
        if not a:
            continue
        promise = a.get("promise", {})
        rows.append(
            {
                "model": r["model"],
                "unlike the training images": _share(a["unfamiliar_share"]),
                "low confidence": _share(a["low_confidence_share"]),
                "kept (accuracy)": f"{_share(a['kept_share'])} ({_share(a['kept_accuracy'], 2)})",
                "promised alone": ", ".join(c for c, p in promise.items() if p == selective.PROMISE_CLASS) or "none",
                "always referred": ", ".join(c for c, p in promise.items() if p == selective.PROMISE_NONE) or "none",
                "set coverage (mean size)": f"{_share(a.get('set_coverage'), 2)} ({a.get('set_mean_size', 0):.2f})"
                if a.get("set_coverage") is not None
                else "-",
            }
        )
    return rows


def per_class_rows(result: dict) -> list[dict[str, str]]:
    """Per class, for one model on the test split: its refer threshold and promise, what it keeps of the
    cells it calls that class and how accurate they are, and how often the sets hold the cells of that class."""
    a = result.get("answers") or {}
    rows = []
    for name, entry in a.get("per_class", {}).items():
        promise = a.get("promise", {}).get(name, selective.PROMISE_NONE)
        rows.append(
            {
                "class": name,
                "promise": PROMISE_WORDS[promise],
                "refer below": f"{a['refer_below'][name]:.4f}" if a["refer_below"][name] <= 1 else "always",
                "called this class": str(entry["predicted"]),
                "kept": _share(entry["kept_share"]),
                "kept accuracy": _share(entry["kept_accuracy"], 2),
                "cells of this class": str(entry["cells"]),
                "set coverage": _share(entry.get("set_coverage"), 2),
            }
        )
    return rows


PROMISE_WORDS = {
    selective.PROMISE_CLASS: "alone",
    selective.PROMISE_GROUP: "with the group",
    selective.PROMISE_NONE: "none: referred",
}


def page_context(
    results: dict[str, dict], counts: dict, manifest: dict, best: str, summary: dict, figures: list[str]
) -> dict[str, Any]:
    """What both pages show."""
    rows = comparison_rows(results, best)
    calibration = calibration_rows(results)
    answers = answer_rows(results)
    per_class = per_class_rows(results[best])
    dataset_columns, dataset_rows = dataset_table(counts)
    return {
        "run_id": summary.get("run_id", ""),
        "profile": summary.get("profile", ""),
        "best": best,
        "headline": headline(results[best]),
        "experiment": summary.get("mlflow_experiment", ""),
        "parent_run_id": summary.get("mlflow_parent_run_id"),
        "columns": list(rows[0]),
        "rows": [list(r.values()) for r in rows],
        "ensemble": describe_ensemble(results),
        "registry": registry.describe(summary.get("registry", {"error": "not attempted"})),
        "tracking_failures": tracking.describe_failures(summary.get("tracking_failures", {})),
        "sections": [(key, title) for key, title in SECTIONS if key in figures],
        "calibration_columns": list(calibration[0]) if calibration else [],
        "calibration_rows": [list(r.values()) for r in calibration],
        "answer_columns": list(answers[0]) if answers else [],
        "answer_rows": [list(r.values()) for r in answers],
        "per_class_columns": list(per_class[0]) if per_class else [],
        "per_class_rows": [list(r.values()) for r in per_class],
        "set_alpha": (results[best].get("answers") or {}).get("set_alpha"),
        "refer_target": next(
            (r["calibration"].get("target_accuracy") for r in results.values() if r.get("calibration")), None
        ),
        "dataset_columns": dataset_columns,
        "dataset_rows": dataset_rows,
        "left_out": left_out(manifest),
    }


def render_html(context: dict[str, Any], figures: dict[str, bytes]) -> str:
    embedded = {key: "data:image/png;base64," + base64.b64encode(png).decode() for key, png in figures.items()}
    return TEMPLATES.get_template("report.html.j2").render(**context, figures=embedded)


def render_markdown(context: dict[str, Any]) -> str:
    def table(rows: str, columns: str) -> str:
        cells = [[markdown_text(cell) for cell in row] for row in context[rows]]
        return tabulate(cells, headers=context[columns], tablefmt="github", disable_numparse=True)

    return TEMPLATES.get_template("report.md.j2").render(
        **context,
        comparison_table=table("rows", "columns"),
        calibration_table=table("calibration_rows", "calibration_columns"),
        answer_table=table("answer_rows", "answer_columns"),
        per_class_table=table("per_class_rows", "per_class_columns"),
        dataset_table=table("dataset_rows", "dataset_columns"),
    )
