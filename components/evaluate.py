"""The evaluate step as a kfp component."""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Input, Metrics, Model, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def evaluate(
    bucket: str,
    run_id: str,
    cnn1: Input[Model],
    cnn2: Input[Model],
    vgg16: Input[Model],
    metrics: Output[Metrics],
    cnn1_confusion: Output[ClassificationMetrics],
    cnn2_confusion: Output[ClassificationMetrics],
    vgg16_confusion: Output[ClassificationMetrics],
    ensemble_confusion: Output[ClassificationMetrics],
):
    """Test-split metrics of the trained models (their Model artifacts) and of their combined model (built
    here, chosen on the validation split): kfp Metrics, confusion matrices, the metrics JSON in the bucket
    (``metrics_uris`` in the metadata) and MLflow."""
    from bloodcell import config, steps

    trained = {"cnn1": cnn1, "cnn2": cnn2, "vgg16": vgg16}
    confusion = {
        "cnn1": cnn1_confusion,
        "cnn2": cnn2_confusion,
        "vgg16": vgg16_confusion,
        config.ENSEMBLE_NAME: ensemble_confusion,
    }
    results = steps.evaluate(bucket=bucket, run_id=run_id, trained=[dict(model.metadata) for model in trained.values()])
    for name, result in results.items():
        for key in ("accuracy", "macro_f1", "weighted_f1", "roc_auc_ovr"):
            metrics.log_metric(f"{name}.{key}", result[key])
        confusion[name].log_confusion_matrix(result["classes"], result["confusion_matrix"])
    metrics.metadata.update(
        metrics_uris={name: result["metrics_uri"] for name, result in results.items()}, runtime=steps.runtime()
    )
