"""The ingest step as a kfp component."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def ingest(source: str, bucket: str, vgg16_weights: str, stats: Output[Metrics], data_sha256: str = "") -> str:
    """Check and store the dataset's images (content-addressed); returns the dataset URI."""
    from bloodcell import steps

    result = steps.ingest(source=source, bucket=bucket, vgg16_weights=vgg16_weights, data_sha256=data_sha256)
    for key in ("images", "quarantined", "duplicates"):
        stats.log_metric(key, result[key])
    stats.metadata.update(
        dataset_hash=result["dataset_hash"],
        source_sha256=result["source_sha256"],
        source_sha256_of=result["source_sha256_of"],
        runtime=steps.runtime(),
    )
    return result["dataset_uri"]
