"""The three training steps as kfp components (one per model, so each task has its own name)."""

from kfp import dsl
from kfp.dsl import Model, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_cnn1(
    split_uri: str, bucket: str, run_id: str, profile: str, overrides: str, experiment: str, model: Output[Model]
):
    """Train cnn1 (the original CNN1 architecture)."""
    from bloodcell import steps

    steps.describe_model_artifact(model, steps.train("cnn1", split_uri, bucket, run_id, profile, overrides, experiment))


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_cnn2(
    split_uri: str, bucket: str, run_id: str, profile: str, overrides: str, experiment: str, model: Output[Model]
):
    """Train cnn2 (the original CNN2 architecture: batch norm, L1)."""
    from bloodcell import steps

    steps.describe_model_artifact(model, steps.train("cnn2", split_uri, bucket, run_id, profile, overrides, experiment))


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_vgg16(
    split_uri: str,
    bucket: str,
    run_id: str,
    profile: str,
    overrides: str,
    experiment: str,
    vgg16_weights: str,
    model: Output[Model],
):
    """Train VGG16 transfer learning (frozen base, then fine-tuned top block)."""
    from bloodcell import steps

    result = steps.train(
        "vgg16", split_uri, bucket, run_id, profile, overrides, experiment, vgg16_weights=vgg16_weights
    )
    steps.describe_model_artifact(model, result)
