"""The evaluate step as a kfp component, made for the pipeline's list of models.

kfp passes artifacts only as named, typed parameters, so the component's signature is generated from the
model names: one ``Input[Model]`` per trained model, one ``Output[ClassificationMetrics]`` per model and for
their combined model (the confusion matrices the KFP UI shows), and the ``Metrics`` the report reads.
"""

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Input, Metrics, Model, Output

from bloodcell import compat
from bloodcell.config import DEFAULT_IMAGE, ENSEMBLE_NAME

TEMPLATE = '''
def evaluate(bucket: str, run_id: str, {inputs}, metrics: Output[Metrics], {outputs}):
    """Test-split metrics of the trained models (their Model artifacts) and of their combined model (built
    here, chosen on the validation split): kfp Metrics, confusion matrices, the metrics in the bucket
    (``metrics_uris`` in the metadata) and MLflow."""
    from bloodcell import steps

    trained = {{{trained}}}
    confusion = {{{confusion}}}
    results = steps.evaluate(bucket=bucket, run_id=run_id, trained=[dict(m.metadata) for m in trained.values()])
    steps.fill_evaluation_artifacts(results, metrics=metrics, confusion=confusion)
'''


def evaluator(model_names: list[str]) -> dsl.base_component.BaseComponent:
    """The evaluate component for ``model_names`` (identifiers: config.Profile checks them)."""
    confusion_of = [*model_names, ENSEMBLE_NAME] if len(model_names) > 1 else list(model_names)
    source = TEMPLATE.format(
        inputs=", ".join(f"{name}: Input[Model]" for name in model_names),
        outputs=", ".join(f"{name}_confusion: Output[ClassificationMetrics]" for name in confusion_of),
        trained=", ".join(f"{name!r}: {name}" for name in model_names),
        confusion=", ".join(f"{name!r}: {name}_confusion" for name in confusion_of),
    )
    namespace = {"Input": Input, "Output": Output, "Model": Model, "Metrics": Metrics}
    function = compat.function_from_source(
        source, "evaluate", {**namespace, "ClassificationMetrics": ClassificationMetrics}
    )
    return dsl.component(function, base_image=DEFAULT_IMAGE, install_kfp_package=False)
