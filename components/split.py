"""The split step as a kfp component."""

from kfp import dsl
from kfp.dsl import Metrics, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def split(dataset_uri: str, bucket: str, profile: str, overrides: str, counts: Output[Metrics]) -> str:
    """Stratified train/val/test split and decode-once arrays; returns the split URI."""
    from bloodcell import steps

    result = steps.split(dataset_uri=dataset_uri, bucket=bucket, profile=profile, overrides=overrides)
    for subset, per_class in result["counts"].items():
        for label, count in per_class.items():
            counts.log_metric(f"{subset}.{label}", count)
    counts.metadata.update(array_uris=result["array_uris"], runtime=steps.runtime())
    return result["split_uri"]
