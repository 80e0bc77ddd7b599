"""Report: one self-contained HTML file (images embedded) and a Markdown version comparing models.

Stored as ``<run_uri>/report/report.html`` and ``report.md`` (+ ``plots/*.png``), logged to the
MLflow parent run; the run summary goes to ``<run_uri>/summary.json``.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from bloodcell import arrays, storage, tracking

MISCLASSIFIED_SHOWN = 24


@dataclass(frozen=True)
class Report:
    html_uri: str
    markdown_uri: str
    summary: dict
    html: str
    markdown: str


def build_report(
    run_uri: str, split_uri: str, model_names: list[str], summary: dict, tracker: tracking.Tracker | None = None
) -> Report:
    """Gather metrics, histories and dataset counts from the bucket; render, store and log the report.

    MLflow failures of any step (recorded in the bucket) are listed in the report and the summary.
    """
    tracker = tracker or tracking.Tracker(run_uri, "report")
    results = {name: storage.read_json(storage.join(run_uri, "metrics", f"{name}.json")) for name in model_names}
    histories = {name: storage.read_json(storage.join(run_uri, "models", name, "history.json")) for name in model_names}
    counts = storage.read_json(storage.join(split_uri, "counts.json"))
    split = storage.read_json(storage.join(split_uri, "split.json"))
    manifest = storage.read_json(storage.join(split["dataset_uri"], "manifest.json"))
    best = max(results, key=lambda n: (results[n]["accuracy"], results[n]["macro_f1"]))
    registry = _register(results[best], summary, tracker)
    plots = {
        "comparison": plot_comparison(results, best),
        "confusion": plot_confusion_matrices(results),
        "per_class_f1": plot_per_class_f1(results),
        "curves": plot_training_curves(histories),
        "misclassified": plot_misclassified(results[best]),
    }
    report_uri = storage.join(run_uri, "report")
    for name, png in plots.items():
        storage.upload_bytes(png, storage.join(report_uri, "plots", f"{name}.png"), "image/png")
    rows = comparison_rows(results, best)
    summary = {**summary, "registry": registry, "tracking_failures": tracking.recorded_failures(run_uri)}
    page = render_html(rows, plots, counts, manifest, best, summary)
    markdown = render_markdown(rows, counts, manifest, best, summary)
    html_uri = storage.upload_bytes(page, storage.join(report_uri, "report.html"), "text/html")
    markdown_uri = storage.upload_bytes(markdown, storage.join(report_uri, "report.md"), "text/markdown")
    summary = {
        **summary,
        "report_uri": html_uri,
        "report_markdown_uri": markdown_uri,
        "best_model": best,
        "models": {
            n: {
                "test_accuracy": r["accuracy"],
                "macro_f1": r["macro_f1"],
                "model_uri": r["mlflow_model_uri"],
                "bucket_model_uri": r["model_uri"],
                "mlflow_run_id": r["mlflow_run_id"],
            }
            for n, r in results.items()
        },
    }
    parent = summary.get("mlflow_parent_run_id")
    if parent:
        tracker.attempt(
            "log the report to the parent run", _log_report, parent, page, markdown, results, manifest, best
        )
        tracker.attempt("close the parent run", tracking.finish, parent)
    if tracker.failures:  # the report's own MLflow calls above, added without listing the bucket again
        summary["tracking_failures"] = {**summary["tracking_failures"], "report": list(tracker.failures.values())}
    storage.write_json(summary, storage.join(run_uri, "summary.json"))
    return Report(html_uri, markdown_uri, summary, page, markdown)


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


def _register(best: dict, summary: dict, tracker: tracking.Tracker) -> dict:
    """Register the best model; the registry outcome (or why it was not done) goes into the report."""
    if not best.get("mlflow_model_uri"):
        return {"error": f"{best['model']} has no MLflow model (its training could not log to MLflow)"}
    registry = tracker.call(
        "register the best model",
        tracking.register_best,
        best["mlflow_model_uri"],
        best["model"],
        best["accuracy"],
        summary.get("run_id", ""),
    )
    return registry or {"error": "MLflow could not be reached (see the MLflow logging section)"}


def registry_sentence(registry: dict) -> str:
    if "error" in registry:
        return f"Registering the best model in MLflow failed: {registry['error']}"
    text = (
        f"The best model ({registry['model']}, test accuracy {registry['test_accuracy']:.2%}) is version "
        f"{registry['version']} of registered model {registry['registered_model']}. "
    )
    previous = registry["previous_champion_accuracy"]
    if registry["promoted"]:
        return text + (
            "The alias 'champion' now points to it"
            + (
                f" (previous champion: version {registry['previous_champion_version']}, {previous:.2%})."
                if previous is not None
                else " (first champion)."
            )
        )
    return text + (
        f"The alias 'champion' stays on version {registry['previous_champion_version']} "
        f"({previous:.2%}), which this model does not beat."
    )


def comparison_rows(results: dict[str, dict], best: str) -> list[dict]:
    ordered = sorted(results.values(), key=lambda r: -r["accuracy"])
    return [
        {
            "model": r["model"] + (" (best)" if r["model"] == best else ""),
            "test accuracy": f"{r['accuracy']:.2%}",
            "macro F1": f"{r['macro_f1']:.4f}",
            "ROC AUC (ovr)": f"{r['roc_auc_ovr']:.4f}",
            "params": f"{r['params']:,}",
            "input": f"{r['image_size']}px",
            "epochs": str(r["epochs"]),
            "training time": _duration(r["train_seconds"]),
            "inference images/s": f"{r['inference_images_per_second']:,.0f}",
            "size": f"{r['model_size_bytes'] / 2**20:.1f} MiB",
        }
        for r in ordered
    ]


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# -- plots ------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def plot_comparison(results: dict[str, dict], best: str) -> bytes:
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.38
    positions = np.arange(len(names))
    for offset, key, label in ((-width / 2, "accuracy", "test accuracy"), (width / 2, "macro_f1", "macro F1")):
        bars = ax.bar(positions + offset, [results[n][key] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(positions, [f"{n}\n(best)" if n == best else n for n in names])
    ax.set_ylim(0, 1.22)
    ax.set_title("Test accuracy and macro F1 by model")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    return _png(fig)


def plot_confusion_matrices(results: dict[str, dict]) -> bytes:
    fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 5.4), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    for ax, (name, result) in zip(axes[0], results.items()):
        matrix = np.array(result["confusion_matrix"])
        normalized = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
        sns.heatmap(
            normalized,
            annot=matrix,
            fmt="d",
            cmap="Blues",
            vmin=0,
            vmax=1,
            cbar=False,
            ax=ax,
            xticklabels=result["classes"],
            yticklabels=result["classes"],
            annot_kws={"fontsize": 8},
        )
        ax.set_title(f"{name}: accuracy {result['accuracy']:.2%}")
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.tick_params(axis="x", rotation=45)
        ax.tick_params(axis="y", rotation=0)
    fig.suptitle("Confusion matrices (counts; colour = share of the true class)")
    return _png(fig)


def plot_per_class_f1(results: dict[str, dict]) -> bytes:
    classes = next(iter(results.values()))["classes"]
    table = np.array([[r["per_class"][c]["f1-score"] for c in classes] for r in results.values()])
    fig, ax = plt.subplots(figsize=(1.1 * len(classes) + 2, 0.6 * len(results) + 1.6))
    sns.heatmap(
        table,
        annot=True,
        fmt=".2f",
        cmap="RdYlGn",
        vmin=0.5,
        vmax=1,
        ax=ax,
        xticklabels=classes,
        yticklabels=list(results),
    )
    ax.set_title("F1 score per class")
    ax.tick_params(axis="x", rotation=45)
    ax.tick_params(axis="y", rotation=0)
    return _png(fig)


def plot_training_curves(histories: dict[str, dict]) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, history in histories.items():
        for ax, key in zip(axes, ("loss", "accuracy")):
            epochs = np.arange(1, len(history.get(key, [])) + 1)
            (line,) = ax.plot(epochs, history.get(key, []), label=f"{name} train")
            ax.plot(epochs, history.get(f"val_{key}", []), "--", color=line.get_color(), label=f"{name} val")
    for ax, key in zip(axes, ("loss", "accuracy")):
        ax.set_title(f"{key.capitalize()} by epoch (solid: train, dashed: validation)")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].set_yscale("log")  # L1-regularised losses start far above the others
    axes[1].legend(fontsize=8, ncol=2, loc="lower right")
    return _png(fig)


def _round_robin_by_class(indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``indices`` reordered to take one of each true class in turn, so every class shows up."""
    groups = [list(indices[labels[indices] == c]) for c in np.unique(labels[indices])]
    ordered = []
    while any(groups):
        ordered += [g.pop(0) for g in groups if g]
    return np.array(ordered, dtype=int)


def plot_misclassified(result: dict) -> bytes:
    predictions = np.load(io.BytesIO(storage.read_bytes(result["predictions_uri"])))
    y_true, y_pred = predictions["y_true"], predictions["probabilities"].argmax(axis=1)
    wrong = _round_robin_by_class(np.flatnonzero(y_true != y_pred), y_true)[:MISCLASSIFIED_SHOWN]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if len(wrong):
        train = storage.read_json(storage.join(result["model_uri"].rsplit("/", 1)[0], "train.json"))
        x_test, _ = arrays.load(train["arrays_uri"], "test")
        for ax, index in zip(axes.flat, wrong):
            ax.imshow(x_test[index])
            ax.set_title(
                f"true {result['classes'][y_true[index]]}\npred {result['classes'][y_pred[index]]}", fontsize=8
            )
    else:
        axes.flat[0].text(0, 0.5, "no misclassified test image", fontsize=10)
    fig.suptitle(f"Misclassified test images of {result['model']} (first {len(wrong)})")
    return _png(fig)


# -- rendering --------------------------------------------------------------------------------------
SECTIONS = [
    ("comparison", "Model comparison"),
    ("per_class_f1", "Per-class F1"),
    ("confusion", "Confusion matrices"),
    ("curves", "Training curves"),
    ("misclassified", "Misclassified test images"),
]


def render_html(
    rows: list[dict], plots: dict[str, bytes], counts: dict, manifest: dict, best: str, summary: dict
) -> str:
    def table(headers: list[str], body: list[list[str]]) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in body)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>"

    def image(name: str) -> str:
        data = base64.b64encode(plots[name]).decode()
        return f'<img alt="{name}" src="data:image/png;base64,{data}">'

    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>bloodcell report {html.escape(summary.get('run_id', ''))}</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:1400px;margin:2em auto;padding:0 1em;color:#222}",
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 10px;text-align:right}",
        "th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}",
        ".best{font-weight:bold}</style></head><body>",
        f"<h1>Blood cell classifiers: run {html.escape(summary.get('run_id', ''))}</h1>",
        f"<p>Profile <b>{html.escape(summary.get('profile', ''))}</b>; best model <b>{html.escape(best)}</b>; "
        f"MLflow experiment <code>{html.escape(summary.get('mlflow_experiment', ''))}</code>, parent run "
        f"<code>{html.escape(summary.get('mlflow_parent_run_id') or 'none (MLflow was unreachable)')}</code>.</p>",
        "<h2 id='comparison'>Model comparison</h2>",
        table(list(rows[0]), [list(r.values()) for r in rows]),
        f"<p id='registry'>{html.escape(registry_sentence(summary.get('registry', {'error': 'not attempted'})))}</p>",
        _tracking_html(summary.get("tracking_failures", {})),
    ]
    for key, title in SECTIONS:
        if key == "comparison":
            parts.append(image(key))
        else:
            parts += [f"<h2 id='{key}'>{title}</h2>", image(key)]
    parts += [
        "<h2 id='dataset'>Dataset</h2>",
        table(*_dataset_table(counts)),
        _quarantine_html(manifest),
        "</body></html>",
    ]
    return "\n".join(parts)


def _tracking_html(failures: dict) -> str:
    lines = tracking.describe_failures(failures)
    if not lines:
        return ""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in lines)
    return (
        f"<div id='tracking-failures'><p><b>MLflow logging failed</b> in {len(lines)} step(s); the metrics and "
        f"models are in the bucket, this report is built from there:</p><ul>{items}</ul></div>"
    )


def _dataset_table(counts: dict) -> tuple[list[str], list[list[str]]]:
    subsets = [s for s in ("train", "val", "test") if s in counts]
    classes = sorted(set().union(*(c.keys() for c in counts.values())))
    body = [
        [c, *(str(counts[s].get(c, 0)) for s in subsets), str(sum(counts[s].get(c, 0) for s in subsets))]
        for c in classes
    ]
    body.append(
        ["total", *(str(sum(counts[s].values())) for s in subsets), str(sum(sum(counts[s].values()) for s in subsets))]
    )
    return ["class", *subsets, "all"], body


def _quarantine_html(manifest: dict) -> str:
    items = manifest.get("quarantined", []) + [
        {
            "path": d["path"],
            "reason": f"duplicate of {d['duplicate_of']}"
            + (f" (a different class: kept as {d['conflicting_label']})" if d.get("conflicting_label") else ""),
        }
        for d in manifest.get("duplicates", [])
    ]
    if not items:
        return "<p>No file was quarantined.</p>"
    rows = "".join(f"<li><code>{html.escape(i['path'])}</code>: {html.escape(i['reason'])}</li>" for i in items)
    return f"<p>Files left out ({len(items)}):</p><ul>{rows}</ul>"


def render_markdown(rows: list[dict], counts: dict, manifest: dict, best: str, summary: dict) -> str:
    def table(headers: list[str], body: list[list[str]]) -> list[str]:
        return [
            "| " + " | ".join(headers) + " |",
            "|" + "---|" * len(headers),
            *("| " + " | ".join(map(str, r)) + " |" for r in body),
        ]

    lines = [
        f"# Blood cell classifiers: run {summary.get('run_id', '')}",
        "",
        f"Profile **{summary.get('profile', '')}**; best model **{best}**.",
        "",
        "## Model comparison",
        "",
    ]
    lines += table(list(rows[0]), [list(r.values()) for r in rows])
    lines += ["", registry_sentence(summary.get("registry", {"error": "not attempted"}))]
    failures = tracking.describe_failures(summary.get("tracking_failures", {}))
    if failures:
        lines += ["", "**MLflow logging failed** (metrics and models are in the bucket):", ""]
        lines += [f"- {line}" for line in failures]
    for key, title in SECTIONS:
        lines += ["", f"## {title}", "", f"![{title}](plots/{key}.png)"]
    lines += ["", "## Dataset", ""] + table(*_dataset_table(counts))
    left_out = manifest.get("quarantined", [])
    lines += ["", f"Quarantined files: {len(left_out)}"] + [f"- `{q['path']}`: {q['reason']}" for q in left_out]
    return "\n".join(lines) + "\n"
