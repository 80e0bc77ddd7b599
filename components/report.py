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
    """Comparison report (HTML + Markdown) and the run summary; returns the report's URI."""
    from bloodcell import steps, storage

    summary = steps.report(bucket, run_id, split_uri, profile, experiment, overrides=overrides)
    with open(report_html.path, "wb") as out:
        out.write(storage.read_bytes(summary["report_uri"]))
    with open(report_markdown.path, "wb") as out:
        out.write(storage.read_bytes(summary["report_markdown_uri"]))
    report_html.metadata["runtime"] = steps.runtime()
    return summary["report_uri"]
