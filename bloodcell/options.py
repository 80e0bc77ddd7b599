"""Command-line options that ``pipeline.py`` and the ``bloodcell`` command share: one definition,
one default and one help text each."""

from __future__ import annotations

import argparse
import json
import re

from bloodcell import config


def add_profile(parser: argparse.ArgumentParser, default: str) -> None:
    parser.add_argument(
        "--profile",
        default=default,
        choices=list(config.PROFILES),
        help=f"run profile (default {default}; settings in bloodcell/config.py)",
    )
    parser.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        default=[],
        help="override a profile setting, e.g. --set cnn1.epochs=5 (repeatable)",
    )


def add_bucket(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bucket",
        default=config.DEFAULT_BUCKET,
        help=f"object storage bucket (default {config.DEFAULT_BUCKET}; BLOODCELL_BUCKET)",
    )


def add_experiment(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment",
        default=config.DEFAULT_EXPERIMENT,
        help=f"MLflow experiment (default {config.DEFAULT_EXPERIMENT}; BLOODCELL_EXPERIMENT)",
    )


def add_mlflow_parent_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--parent-run-id",
        dest="mlflow_parent_run_id",
        default="",
        help="MLflow parent run (default: the one of this pipeline run id)",
    )


def add_vgg16_weights(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vgg16-weights",
        default=config.DEFAULT_VGG16_WEIGHTS,
        help="imagenet | none | path or gs:// URI of a no-top weights file "
        f"(default {config.DEFAULT_VGG16_WEIGHTS}; VGG16_WEIGHTS)",
    )


def add_data(parser: argparse.ArgumentParser, positional: bool = False) -> None:
    help_text = "folder, zip, http(s) URL or gs:// URI of the images (default: the official PBC zip)"
    if positional:
        parser.add_argument("source", nargs="?", default=config.MENDELEY_URL, help=help_text)
    else:
        parser.add_argument("--data", default=config.MENDELEY_URL, help=help_text)


def add_data_sha256(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-sha256",
        default="",
        metavar="HEX",
        type=_sha256_hex,
        help="pin the data: the SHA-256 it must have, else nothing is stored. For a zip (local, http(s) or "
        "gs://), of the archive's bytes (`sha256sum data.zip`); for a folder or gs:// prefix, of its content "
        "(the source_sha256 that ingest prints and records in the manifest)",
    )


def _sha256_hex(text: str) -> str:
    digest = text.strip().lower()
    if digest and not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 digest (64 hex characters)")
    return digest


def overrides(args: argparse.Namespace) -> str:
    """``--set`` assignments as the JSON object the steps take."""
    return json.dumps(config.parse_assignments(args.set or []))
