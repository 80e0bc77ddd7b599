"""The training step as a kfp component: one component, the model to train as a parameter."""

from kfp import dsl
from kfp.dsl import Model, Output

from bloodcell import compat
from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train(
    model_name: str,
    split_uri: str,
    bucket: str,
    run_id: str,
    profile: str,
    overrides: str,
    experiment: str,
    vgg16_weights: str,
    model: Output[Model],
):
    """Train one model of the profile; the Model artifact is its model.keras, the metadata its record."""
    from bloodcell import steps

    result = steps.train(
        model=model_name,
        split_uri=split_uri,
        bucket=bucket,
        run_id=run_id,
        profile=profile,
        overrides=overrides,
        experiment=experiment,
        vgg16_weights=vgg16_weights,
    )
    steps.fill_model_artifact(model, result)


def trainer(model_name: str) -> dsl.base_component.BaseComponent:
    """:func:`train` under the name ``train-<model>``.

    kfp names a task after its component, and the local runner's log, its failure report and
    ``--resume`` name steps by task, so each model's task keeps its own name.
    """
    return compat.renamed_component(train, f"train-{model_name}")
