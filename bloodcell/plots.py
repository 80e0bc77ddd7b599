"""The figures of a run: model comparison, confusion matrices, per-class F1, training curves and
misclassified test images, each as PNG bytes (for the report, MLflow and the bucket)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from bloodcell import arrays, runstore, storage

MISCLASSIFIED_SHOWN = 24


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def comparison(results: dict[str, dict], best: str) -> bytes:
    names = list(results)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    width = 0.38
    positions = np.arange(len(names))
    for offset, key, label in ((-width / 2, "accuracy", "test accuracy"), (width / 2, "macro_f1", "macro F1")):
        bars = ax.bar(positions + offset, [results[n][key] for n in names], width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(positions, [f"{n}\n(best)" if n == best else n for n in names])
    # From just below the lowest bar, not from 0: on a 0-1 axis models 94-98% accurate look the same.
    lowest = min(results[n][key] for n in names for key in ("accuracy", "macro_f1"))
    bottom = max(0.0, np.floor((lowest - 0.02) * 20) / 20)
    ax.set_ylim(bottom, 1 + (1 - bottom) * 0.25)  # room above for the value labels and the legend
    ax.set_title(f"Test accuracy and macro F1 by model (axis from {bottom:.2f})")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    return _png(fig)


def confusion_matrices(results: dict[str, dict]) -> bytes:
    rows = -(-len(results) // 3)  # at most 3 a row: 4 models (3 trained and the combined one) in 2 x 2
    columns = -(-len(results) // rows)
    fig, axes = plt.subplots(rows, columns, figsize=(6.2 * columns, 5.4 * rows), squeeze=False)
    fig.subplots_adjust(wspace=0.45, hspace=0.55)
    for ax in axes.flat[len(results) :]:
        ax.axis("off")
    for ax, (name, result) in zip(axes.flat, results.items(), strict=False):  # maybe more axes than models
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


def per_class_f1(results: dict[str, dict]) -> bytes:
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


def training_curves(histories: dict[str, dict]) -> bytes:
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
    for name, history in histories.items():
        for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
            epochs = np.arange(1, len(history.get(key, [])) + 1)
            (line,) = ax.plot(epochs, history.get(key, []), label=f"{name} train")
            ax.plot(epochs, history.get(f"val_{key}", []), "--", color=line.get_color(), label=f"{name} val")
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
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


def _test_predictions(result: dict) -> tuple[np.ndarray, np.ndarray]:
    """The true labels and (calibrated) probabilities evaluate stored for ``result``'s model."""
    predictions = np.load(io.BytesIO(storage.read_bytes(result["predictions_uri"])))
    return predictions["y_true"], predictions["probabilities"]


def _test_images(result: dict) -> np.ndarray:
    """The test images ``result``'s model was evaluated on (the arrays its training record names)."""
    arrays_uri = result.get("arrays_uri")
    if not arrays_uri:  # evaluated before the metrics named them: its record does
        store, name = runstore.RunStore.of_model(result["model_uri"])
        arrays_uri = store.require_record(name).arrays_uri
    return arrays.load(arrays_uri, "test")[0]


def misclassified(result: dict) -> bytes:
    y_true, probabilities = _test_predictions(result)
    y_pred = probabilities.argmax(axis=1)
    wrong = _round_robin_by_class(np.flatnonzero(y_true != y_pred), y_true)[:MISCLASSIFIED_SHOWN]
    columns = 6
    rows = max(1, -(-len(wrong) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if len(wrong):
        x_test = _test_images(result)
        for ax, index in zip(axes.flat, wrong, strict=False):  # more axes than images
            ax.imshow(x_test[index])
            ax.set_title(
                f"true {result['classes'][y_true[index]]}\npred {result['classes'][y_pred[index]]}", fontsize=8
            )
    else:
        axes.flat[0].text(0, 0.5, "no misclassified test image", fontsize=10)
    fig.suptitle(f"Misclassified test images of {result['model']} (first {len(wrong)})")
    return _png(fig)


def _grid(count: int, per_row: int = 4, size: tuple[float, float] = (3.6, 3.4)):
    columns = min(count, per_row)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(size[0] * columns, size[1] * rows), squeeze=False)
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes


def reliability_diagrams(results: dict[str, dict]) -> bytes:
    """Per model: accuracy against confidence in 15 bins, before (grey) and after calibration (blue)."""
    fig, axes = _grid(len(results))
    for ax, (name, result) in zip(axes.flat, results.items(), strict=False):
        quality = result["calibration"]
        for key, colour, label in (("reliability_before", "0.6", "before"), ("reliability", "C0", "calibrated")):
            bins = [b for b in quality[key] if b["count"]]
            ece_key = "ece_before" if key == "reliability_before" else "ece"
            confidence, accuracy = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
            ax.plot(confidence, accuracy, "-", color=colour, linewidth=1, label=f"{label}: ECE {quality[ece_key]:.3f}")
            total = sum(b["count"] for b in bins)
            sizes = [4 + 300 * b["count"] / total for b in bins]  # area: the bin's share of the images
            ax.scatter(confidence, accuracy, s=sizes, color=colour, alpha=0.7, zorder=3)
        ax.plot([0, 1], [0, 1], ":", color="black", linewidth=0.8)
        ax.set_xlim(0, 1.01)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"{name} (T = {quality['temperature']:.2f})", fontsize=10)
        ax.set_xlabel("confidence (mean of bin)")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.suptitle(
        "Reliability on the test split: 15 confidence bins, marker area = share of the images; dotted: calibrated"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _png(fig)


def accuracy_coverage(results: dict[str, dict]) -> bytes:
    """Accuracy of the kept test images against the share kept (the least confident referred first)."""
    fig, ax = plt.subplots(figsize=(7, 4))
    lowest = 100.0
    for name, result in results.items():
        quality = result["calibration"]
        coverage, accuracy = (np.array(quality["risk_coverage"][k]) * 100 for k in ("coverage", "accuracy"))
        (line,) = ax.plot(coverage, accuracy, label=name)
        lowest = min(lowest, accuracy[coverage >= 50].min(initial=100.0))
        answers = result.get("answers") or {}
        if answers.get("kept_accuracy") is not None:
            ax.plot(answers["kept_share"] * 100, answers["kept_accuracy"] * 100, "o", color=line.get_color())
    ax.axhline(99, color="black", linestyle=":", linewidth=0.8)
    ax.set_xlim(50, 100.5)
    ax.set_ylim(max(0.0, np.floor(lowest) - 1), 100.2)  # the range the models span when keeping half or more
    ax.set_xlabel("coverage: % of test images kept (the rest referred to a person)")
    ax.set_ylabel("accuracy of the kept images, %")
    ax.set_title("Selective prediction (dots: what each model keeps by its stored rules; dotted: 99%)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    return _png(fig)


EXPLAINED_PER_CLASS = 2  # correct and misclassified test images shown per class


def explanation_examples(y_true: np.ndarray, y_pred: np.ndarray, confidence: np.ndarray) -> list[tuple[int, bool]]:
    """Per class: its most confident correct test images, then its most confidently misclassified ones."""
    chosen = []
    for c in np.unique(y_true):
        for correct in (True, False):
            members = np.flatnonzero((y_true == c) & ((y_pred == y_true) == correct))
            ranked = members[np.argsort(-confidence[members], kind="stable")][:EXPLAINED_PER_CLASS]
            chosen += [(int(i), correct) for i in ranked]
    return chosen


def explanations(result: dict) -> bytes:
    """A grid of Grad-CAM overlays for ``result``'s model: per class (row) correct, then misclassified test images."""
    from bloodcell import explain

    y_true, probabilities = _test_predictions(result)
    y_pred, confidence = probabilities.argmax(axis=1), probabilities.max(axis=1)
    x_test = _test_images(result)
    model = runstore.load_model(result["model_uri"])
    chosen = explanation_examples(y_true, y_pred, confidence)
    rows: dict[int, list[tuple[int, bool, np.ndarray]]] = {int(y_true[i]): [] for i, _ in chosen}
    indices = np.array([i for i, _ in chosen])
    maps, _ = explain.gradcam(model, x_test[indices], y_pred[indices])
    for (index, is_right), heatmap in zip(chosen, maps, strict=True):
        rows[int(y_true[index])].append((index, is_right, heatmap))
    columns = 2 * EXPLAINED_PER_CLASS
    fig, axes = plt.subplots(len(rows), columns, figsize=(2.0 * columns, 2.25 * len(rows)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    classes = result["classes"]
    for row, (label, items) in zip(axes, rows.items(), strict=True):
        correct = [item for item in items if item[1]]
        wrong = [item for item in items if not item[1]]
        padding: list[tuple[int, bool, np.ndarray] | None] = [None] * (EXPLAINED_PER_CLASS - len(correct))
        slots = [*correct, *padding, *wrong]  # misclassified on the right
        for ax, item in zip(row, slots, strict=False):
            if item is None:
                continue
            index, is_correct, heatmap = item
            ax.imshow(explain.overlay(x_test[index], heatmap))
            verdict = "right" if is_correct else f"as {classes[y_pred[index]]}"
            colour = "black" if is_correct else "firebrick"
            ax.set_title(f"{classes[label]}: {verdict}\np = {confidence[index]:.2f}", fontsize=8, color=colour)
    fig.suptitle(f"Grad-CAM of {result['model']}: correct (left) and misclassified (right) test images per class")
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # room for the title
    return _png(fig)


def per_class_answers(result: dict, images: str = "the test split") -> bytes:
    """For one model on ``images``, per predicted class: the share of its cells kept and their accuracy,
    coloured by what the model promises for that class; and per true class, the prediction sets' coverage."""
    answers = result["answers"]
    names = list(answers["per_class"])
    entries = [answers["per_class"][n] for n in names]
    colours = {"class": "C2", "group": "C0", "none": "0.6"}
    colour = [colours.get(answers["promise"].get(n, "none"), "0.6") for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    panels = (
        ("kept_share", "kept, % of the cells called this class", None),
        ("kept_accuracy", "accuracy of the kept cells, %", answers.get("target_accuracy")),
        ("set_coverage", "prediction sets holding the true class, %", 1 - (answers.get("set_alpha") or 0)),
    )
    for ax, (key, title, line) in zip(axes, panels, strict=True):
        values = [100 * (e.get(key) if e.get(key) is not None else 0.0) for e in entries]
        ax.bar(names, values, color=colour if key != "set_coverage" else "C1")
        if line:
            ax.axhline(100 * line, color="black", linestyle=":", linewidth=0.8)
        low = min(values) if key != "kept_share" else 0.0
        ax.set_ylim(max(0.0, np.floor(low) - 1) if key != "kept_share" else 0.0, 100.5)
        ax.set_title(title, fontsize=10)
        ax.tick_params(axis="x", rotation=45)
    fig.suptitle(
        f"{result['model']} on {images}, per class (green: promised alone, blue: with the group, grey: "
        "always referred; dotted: the promise)"
    )
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _png(fig)
