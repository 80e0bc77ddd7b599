"""The report step as a kfp component."""

from kfp import dsl
from kfp.dsl import HTML, Input, Markdown, Metrics, Output

from bloodcell.config import DEFAULT_IMAGE


@dsl.component(base_image=DEFAULT_IMAGE, install_kfp_package=False)
def report(
    bucket: str,
    run_id: str,
    split_uri: str,
    profile: str,
    overrides: str,
    experiment: str,
    metrics: Input[Metrics],
    report_html: Output[HTML],
    report_markdown: Output[Markdown],
) -> str:
    """Comparison report (HTML + Markdown) of the evaluated models (``metrics``) and the run summary;
    returns the report's URI."""
    from bloodcell import steps, storage

    summary = steps.report(
        bucket=bucket,
        run_id=run_id,
        split_uri=split_uri,
        profile=profile,
        experiment=experiment,
        overrides=overrides,
        metrics_uris=metrics.metadata["metrics_uris"],
    )
    for artifact, uri in ((report_html, summary["report_uri"]), (report_markdown, summary["report_markdown_uri"])):
        with open(artifact.path, "wb") as out:
            out.write(storage.read_bytes(uri))
        artifact.metadata.update(report_uri=uri, runtime=steps.runtime())
    return summary["report_uri"]
