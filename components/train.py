"""The three training steps as kfp components (one per model, so each task has its own name)."""

from kfp import dsl
from kfp.dsl import Model, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_cnn1(split_uri: str, bucket: str, run_id: str, profile: str, overrides: str, experiment: str,
               model: Output[Model]):
    """Train cnn1 (the original CNN1 architecture)."""
    from bloodcell import steps

    result = steps.train("cnn1", split_uri, bucket, run_id, profile, overrides, experiment)
    model.metadata.update(result)
    with open(model.path, "w") as pointer:
        pointer.write(result["model_uri"])


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_cnn2(split_uri: str, bucket: str, run_id: str, profile: str, overrides: str, experiment: str,
               model: Output[Model]):
    """Train cnn2 (the original CNN2 architecture: batch norm, L1)."""
    from bloodcell import steps

    result = steps.train("cnn2", split_uri, bucket, run_id, profile, overrides, experiment)
    model.metadata.update(result)
    with open(model.path, "w") as pointer:
        pointer.write(result["model_uri"])


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def train_vgg16(split_uri: str, bucket: str, run_id: str, profile: str, overrides: str, experiment: str,
                vgg16_weights: str, model: Output[Model]):
    """Train VGG16 transfer learning (frozen base, then fine-tuned top block)."""
    from bloodcell import steps

    result = steps.train("vgg16", split_uri, bucket, run_id, profile, overrides, experiment,
                         vgg16_weights=vgg16_weights)
    model.metadata.update(result)
    with open(model.path, "w") as pointer:
        pointer.write(result["model_uri"])
