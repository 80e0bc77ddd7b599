"""Metrics, report rendering, the champion alias and the cross-run comparison."""

from __future__ import annotations

import contextlib
import html.parser
import uuid

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from sklearn import metrics as skm

from bloodcell import calibration, comparison, config, decisions, evaluate, plots, registry, report, tracking

CLASSES = ["a", "b", "c"]


def fixed_predictions():
    rng = np.random.default_rng(7)
    y_true = np.repeat([0, 1, 2], 20)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[y_true]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, probabilities


def test_metrics_equal_scikit_learn():
    y_true, probabilities = fixed_predictions()
    y_pred = probabilities.argmax(axis=1)
    result = evaluate.classification_metrics(y_true, probabilities, CLASSES)
    assert result["accuracy"] == skm.accuracy_score(y_true, y_pred)
    assert result["macro_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="macro"))
    assert result["weighted_f1"] == pytest.approx(skm.f1_score(y_true, y_pred, average="weighted"))
    assert result["macro_precision"] == pytest.approx(skm.precision_score(y_true, y_pred, average="macro"))
    assert result["roc_auc_ovr"] == pytest.approx(skm.roc_auc_score(y_true, probabilities, multi_class="ovr"))
    assert result["confusion_matrix"] == skm.confusion_matrix(y_true, y_pred).tolist()
    per_class_recall = skm.recall_score(y_true, y_pred, average=None)
    assert [result["per_class"][c]["recall"] for c in CLASSES] == pytest.approx(per_class_recall)
    assert result["per_class"]["a"]["support"] == 20


class Collector(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.images, self.open = set(), [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag not in {"meta", "br", "hr", "link"}:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"unbalanced </{tag}>"
        self.open.pop()


def synthetic_results():
    y_true, probabilities = fixed_predictions()
    results = {}
    for index, name in enumerate(["cnn1", "cnn2", "vgg16"]):
        result = evaluate.classification_metrics(y_true, np.roll(probabilities, index, axis=0), CLASSES)
        result.update(
            {
                "model": name,
                "params": 1000 * (index + 1),
                "train_seconds": 60.0,
                "epochs": 3,
                "image_size": 64,
                "inference_images_per_second": 500.0,
                "model_size_bytes": 2**20,
            }
        )
        rolled = np.roll(probabilities, index, axis=0)
        calibrated = calibration.apply_temperature(rolled, 1.5)
        result["calibration"] = {
            "temperature": 1.5,
            "target_accuracy": 0.99,
            **calibration.quality(y_true, rolled, calibrated),
        }
        rules = decisions.Rules(np.full(len(CLASSES), 0.6), ["class"] + ["group"] * (len(CLASSES) - 1), 0.99,
                                np.full(len(CLASSES), 0.2), 0.01, 1.0, 0.05, True, 1.5)  # fmt: skip
        familiarity = np.linspace(0, 2, len(y_true))
        result["answers"] = evaluate.answers_summary(
            y_true, rules, decisions.Outputs(rolled, calibrated, familiarity), CLASSES
        )
        results[name] = result
    return results


def test_html_report_has_every_section_with_embedded_images():
    results = synthetic_results()
    best = report.best_model(results)
    assert best == max(results, key=lambda n: results[n]["accuracy"])
    figures = {
        "comparison": plots.comparison(results, best),
        "confusion": plots.confusion_matrices(results),
        "per_class_f1": plots.per_class_f1(results),
        "curves": plots.training_curves(
            {
                n: {"loss": [1.0, 0.5], "val_loss": [1.1, 0.7], "accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}
                for n in results
            }
        ),
        "misclassified": plots.comparison(results, best),
        "calibration": plots.reliability_diagrams(results),
        "selective": plots.accuracy_coverage(results),
        "explanations": plots.comparison(results, best),  # the real one needs a stored model (pipeline tests)
        "answers": plots.per_class_answers(results[best]),
    }
    counts = {"train": {"a": 14, "b": 14}, "val": {"a": 3, "b": 3}, "test": {"a": 3, "b": 3}}
    manifest = {"quarantined": [{"path": "b/.DS_1.jpg", "reason": "hidden file"}], "duplicates": []}
    outcome = {
        "registered_model": "bloodcell-classifier",
        "version": "2",
        "promoted": False,
        "model": best,
        "test_accuracy": results[best]["accuracy"],
        "previous_champion_version": "1",
        "previous_champion_accuracy": 0.99,
        "reason": "version 1 (99.00%) is not beaten on the same test split",
    }
    context = report.page_context(
        results, counts, manifest, best, {"run_id": "r1", "profile": "smoke", "registry": outcome}, list(figures)
    )
    page = report.render_html(context, figures)
    parser = Collector()
    parser.feed(page)
    parser.close()
    assert not parser.open
    sections = {"comparison", "per_class_f1", "confusion", "curves", "misclassified", "dataset", "registry"}
    assert sections | {"calibration", "selective", "explanations", "answers"} <= parser.ids
    assert len(parser.images) == 9 and all(src.startswith("data:image/png;base64,") for src in parser.images)
    assert "1.50" in page and "ECE (15 bins)" in page  # the calibration table
    assert "unlike the training images" in page and "promised alone" in page and "set coverage" in page
    assert "with the group" in page and "refer below" in page  # the best model's per-class table
    assert "b/.DS_1.jpg" in page and "stays on version 1" in page and f"{best} (best)" in page
    first = page.split('<h2 id="comparison">', 1)[0]  # the first screen: which model, how good, how far to trust it
    assert f'<p id="headline" class="headline"><b>Best model: {best}, {results[best]["accuracy"]:.2%} test' in first
    assert "It keeps" in first and "refers the rest to a person" in first and "calibration error" in first
    markdown = report.render_markdown(context)
    assert markdown.split("\n")[2].startswith(f"**Best model: {best}, ")
    assert "| model " in markdown and "![Confusion matrices](plots/confusion.png)" in markdown
    assert "temperature" in markdown.split("## Calibration")[1]
    assert "- `b/.DS_1.jpg`: hidden file" in markdown


def with_combined_model(results: dict[str, dict]) -> dict[str, dict]:
    y_true, probabilities = fixed_predictions()
    combined = evaluate.classification_metrics(y_true, probabilities, CLASSES)
    combined.update(
        {
            **{k: results["cnn1"][k] for k in ("params", "image_size", "model_size_bytes")},
            "model": "ensemble",
            "train_seconds": 12.0,
            "epochs": 0,
            "inference_images_per_second": 60.0,
            "members": ["cnn1", "cnn2"],
            "description": "the average of cnn1 (shrunk by area, averaged over the 8 symmetries) and cnn2",
            "tta": {"cnn1": True, "cnn2": False},
            "resize": {"cnn1": "area", "cnn2": None},
            "val_accuracy": 0.975,
            "mlflow_model_uri": "models:/m-1",
            "model_uri": "gs://b/runs/r/models/ensemble/model.keras",
            "mlflow_run_id": "abc",
        }
    )
    return {**results, "ensemble": combined}


def test_the_combined_model_is_a_row_like_the_trained_models():
    results = with_combined_model(synthetic_results())
    rows = {row["model"].removesuffix(" (best)"): row for row in report.comparison_rows(results, "ensemble")}
    assert set(rows) == {"cnn1", "cnn2", "vgg16", "ensemble"}
    assert rows["ensemble"]["epochs"] == "-" and rows["ensemble"]["inference images/s"] == "60"
    sentence = report.describe_ensemble(results)
    assert "ensemble is the average of cnn1 (shrunk by area, averaged over the 8 symmetries) and cnn2:" in sentence
    assert "validation accuracy 97.50%" in sentence
    assert report.describe_ensemble(synthetic_results()) == ""
    row = report.summary_row(results["ensemble"])
    assert row["members"] == ["cnn1", "cnn2"] and row["inference_images_per_second"] == 60.0
    assert "members" not in report.summary_row({**results["ensemble"], "model": "cnn1"})
    counts = {"train": {"a": 14}, "val": {"a": 3}, "test": {"a": 3}}
    context = report.page_context(results, counts, {"quarantined": [], "duplicates": []}, "ensemble", {}, [])
    assert sentence in report.render_markdown(context)
    assert f'<p id="ensemble">{sentence}</p>' in report.render_html(context, {key: b"" for key, _ in report.SECTIONS})
    assert plots.confusion_matrices(results).startswith(b"\x89PNG")  # 4 models: a 2 x 2 grid


def test_champion_alias_logic():
    assert registry.should_promote(0.9, None)
    assert registry.should_promote(0.91, 0.90)
    assert not registry.should_promote(0.90, 0.90)
    assert not registry.should_promote(0.80, 0.90)


def test_the_champion_is_weighed_only_on_its_own_test_split_and_never_by_a_smoke_run():
    laptop = registry.Candidate("models:/m-1", "vgg16", 0.98, "run-2", split="s1", profile="laptop")
    held = registry.Champion("3", 0.97, "s1")
    assert registry.decide(laptop, None) == (True, "first champion")
    promoted, reason = registry.decide(laptop, held)
    assert promoted and reason == "98.00% beats version 3 (97.00%) on the same test split"
    promoted, reason = registry.decide(laptop, registry.Champion("3", 0.99, "s1"))
    assert not promoted and "not beaten on the same test split" in reason
    promoted, reason = registry.decide(laptop, registry.Champion("3", 0.90, "s0"))  # another dataset or recipe
    assert not promoted and "another test split (s0, this run's is s1)" in reason and "MLflow's UI" in reason
    promoted, reason = registry.decide(laptop, registry.Champion("3", 0.90, ""))  # registered before splits were
    assert promoted and "not recorded" in reason
    smoke = registry.Candidate("models:/m-2", "cnn1", 1.0, "run-3", split="s1", profile="smoke", takes_champion=False)
    for champion in (None, held):
        promoted, reason = registry.decide(smoke, champion)
        assert not promoted and reason.startswith("a smoke-profile run never takes the alias")
    assert not config.resolve("smoke").takes_champion and config.resolve("laptop").takes_champion
    assert config.resolve("gpu").takes_champion


@pytest.fixture()
def experiment(services):
    mlflow.set_tracking_uri(services["env"]["MLFLOW_TRACKING_URI"])
    name = f"test-{uuid.uuid4().hex[:8]}"
    mlflow.set_experiment(name)
    return name


def log_tiny_model() -> str:
    import keras

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, activation="softmax")])
    with mlflow.start_run():
        return mlflow.keras.log_model(model, name="model").model_uri


def test_champion_moves_only_to_a_better_model_on_the_same_split(experiment):
    client = MlflowClient()
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.delete_registered_model(registry.REGISTERED_MODEL)

    def register(model: str, accuracy: float, run: str, split: str = "s1", profile: str = "laptop") -> dict:
        candidate = registry.Candidate(
            log_tiny_model(), model, accuracy, run, split, profile, takes_champion=profile != "smoke"
        )
        return registry.register_best(candidate)

    def champion() -> str:
        return client.get_model_version_by_alias(registry.REGISTERED_MODEL, "champion").version

    smoke = register("cnn1", 1.0, "run-0", split="s0", profile="smoke")
    assert not smoke["promoted"] and "No version holds the alias" in registry.describe(smoke)
    first = register("cnn1", 0.90, "run-1")
    assert first["promoted"] and first["previous_champion_accuracy"] is None and champion() == first["version"]
    worse = register("cnn2", 0.85, "run-2")
    assert not worse["promoted"] and champion() == first["version"]
    elsewhere = register("cnn2", 0.99, "run-3", split="s2")  # another test set: not compared
    assert not elsewhere["promoted"] and champion() == first["version"]
    assert "another test split" in registry.describe(elsewhere)
    better = register("vgg16", 0.95, "run-4")
    assert better["promoted"] and better["previous_champion_accuracy"] == 0.90 and champion() == better["version"]
    assert "now points to it (95.00% beats version" in registry.describe(better)
    tags = client.get_model_version(registry.REGISTERED_MODEL, better["version"]).tags
    assert (tags["split"], tags["profile"]) == ("s1", "laptop")
    assert tags["champion_decision"].startswith("took the alias: 95.00% beats version")
    smoke_tags = client.get_model_version(registry.REGISTERED_MODEL, smoke["version"]).tags
    assert smoke_tags["champion_decision"].startswith("did not take the alias: a smoke-profile run")


def test_compare_lists_models_across_runs_best_first(experiment):
    client = MlflowClient()
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    for run, accuracies in (("run-a", {"cnn1": 0.80, "cnn2": 0.93}), ("run-b", {"cnn1": 0.88, "vgg16": 0.97})):
        parent = client.create_run(
            experiment_id, tags={tracking.PIPELINE_RUN_TAG: run, tracking.ROLE_TAG: "pipeline", "profile": "smoke"}
        ).info.run_id
        for model, accuracy in accuracies.items():
            child = client.create_run(
                experiment_id,
                tags={
                    tracking.PIPELINE_RUN_TAG: run,
                    tracking.ROLE_TAG: "model",
                    tracking.MODEL_TAG: model,
                    "mlflow.parentRunId": parent,
                },
            ).info.run_id
            client.log_metric(child, "test_accuracy", accuracy)
            client.log_metric(child, "test_macro_f1", accuracy - 0.01)
            if model == "vgg16":
                client.log_metric(child, "test_ece", 0.012)
                client.log_metric(child, "test_kept_share", 0.9)
    rows = comparison.compare(experiment, last=5)
    assert (rows[0]["ece"], rows[0]["refer_share"]) == (0.012, pytest.approx(0.1)) and rows[1]["ece"] is None
    assert [(r["pipeline_run"], r["model"]) for r in rows] == [
        ("run-b", "vgg16"),
        ("run-a", "cnn2"),
        ("run-b", "cnn1"),
        ("run-a", "cnn1"),
    ]
    assert [r["pipeline_run"] for r in comparison.compare(experiment, last=1)] == ["run-b", "run-b"]
    table = comparison.format_table(rows)
    assert table.splitlines()[1].split()[:4] == ["run-b", "smoke", "vgg16", "0.9700"]


def test_names_from_the_data_cannot_add_markup_to_the_markdown_report():
    """Class and file names come from whoever made the dataset: in report.md they stay plain text."""
    hostile = "<img src=x onerror=alert(1)>|*[x](http://evil.example)*"
    assert report.markdown_text(hostile) == r"\<img src=x onerror=alert(1)\>\|\*\[x\](http://evil.example)\*"
    assert report.markdown_text("two\nlines") == "two lines"
    assert report.markdown_code("a`b") == "``a`b``" and report.markdown_code("`x") == "`` `x ``"
    rendered = (
        report.TEMPLATES.overlay(autoescape=False)
        .from_string("- {{ path | code }}: {{ reason | md }}")
        .render(path="b/``evil``.jpg", reason=f"hidden file {hostile}")
    )
    assert rendered == r"- ```b/``evil``.jpg```: hidden file " + report.markdown_text(hostile)
