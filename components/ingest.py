"""The ingest step as a kfp component."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Metrics, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def ingest(
    source: str, bucket: str, run_id: str, profile: str, overrides: str, experiment: str, vgg16_weights: str,
    stats: Output[Metrics],
) -> NamedTuple("IngestOutputs", [("dataset_uri", str), ("mlflow_parent_run_id", str)]):
    """Check and store the dataset's images; open the MLflow parent run."""
    from collections import namedtuple

    from bloodcell import steps

    result = steps.ingest(source, bucket, run_id, profile, overrides, experiment, vgg16_weights)
    for key in ("images", "quarantined", "duplicates"):
        stats.log_metric(key, result[key])
    stats.metadata["dataset_uri"] = result["dataset_uri"]
    outputs = namedtuple("IngestOutputs", ["dataset_uri", "mlflow_parent_run_id"])
    return outputs(result["dataset_uri"], result["mlflow_parent_run_id"])
