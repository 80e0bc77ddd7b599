"""Kubeflow Pipelines (v2) components: thin wrappers over :mod:`bloodcell.steps`.

Lightweight Python components, so they also run under ``kfp.local``'s runners; their bodies
import what they use (kfp ships only the function's source into the container).
"""

from components.evaluate import evaluator
from components.ingest import ingest
from components.report import report
from components.split import split
from components.train import train, trainer

__all__ = ["evaluator", "ingest", "report", "split", "train", "trainer"]
