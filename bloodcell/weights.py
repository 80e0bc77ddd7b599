"""The ``--vgg16-weights`` setting, parsed once: which recipe a transfer-or-scratch model trains with, and
where its pretrained weights come from (Keras' ImageNet download, a local file, a file in the bucket)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bloodcell.errors import BloodcellError

VGG16_NOTOP_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
    "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
)
VGG16_NOTOP_FILE = "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
NONE, IMAGENET = "none", "imagenet"
HINT = (
    f"Offline options: --vgg16-weights none (train from scratch), --vgg16-weights /path/to/{VGG16_NOTOP_FILE}, "
    f"or --vgg16-weights gs://bucket/{VGG16_NOTOP_FILE} (VGG16_WEIGHTS=... with make)."
)


@dataclass(frozen=True)
class Weights:
    """Pretrained weights, or none: ``kind`` says where they come from, ``text`` is the setting as given."""

    text: str
    kind: Literal["none", "imagenet", "file", "bucket"]

    @classmethod
    def parse(cls, text: str | None) -> Weights:
        text = (text or "").strip()
        if text in ("", NONE):
            return cls(NONE, "none")
        if text == IMAGENET:
            return cls(text, "imagenet")
        if text.startswith("gs://"):
            return cls(text, "bucket")
        if "://" in text:
            raise BloodcellError(f"--vgg16-weights {text!r}: give imagenet, none, a local file or a gs:// file")
        return cls(text, "file")

    @property
    def pretrained(self) -> bool:
        return self.kind != "none"

    @property
    def local_file(self) -> Path | None:
        """The local weights file (a container needs it mounted), if that is where they come from."""
        return Path(self.text) if self.kind == "file" else None

    def absolute(self) -> Weights:
        """A local file's path made absolute (a container resolves relative paths elsewhere)."""
        return Weights(str(Path(self.text).expanduser().resolve()), "file") if self.kind == "file" else self

    def check(self, timeout_s: float = 5) -> None:
        """Fail within seconds when the weights cannot be had: no network for ``imagenet``, a missing file."""
        if self.kind == "imagenet" and not cached_imagenet():
            import requests

            try:
                requests.head(VGG16_NOTOP_URL, timeout=timeout_s).raise_for_status()
            except requests.RequestException as exc:
                raise BloodcellError(
                    f"VGG16 ImageNet weights are not cached and cannot be downloaded from {VGG16_NOTOP_URL} "
                    f"({type(exc).__name__}). {HINT}"
                ) from None
        elif self.kind == "bucket":
            from bloodcell import storage

            if not storage.exists(self.text):
                raise BloodcellError(f"VGG16 weights file {self.text} does not exist. {HINT}")
        elif self.kind == "file" and not os.path.isfile(self.text):
            raise BloodcellError(f"VGG16 weights file {self.text!r} does not exist. {HINT}")

    def keras_argument(self) -> str | None:
        """The ``weights`` argument Keras takes: ``imagenet``, a local path (a bucket file is downloaded to the
        cache first), or None."""
        self.check()
        if self.kind == "bucket":
            from bloodcell import sources, storage

            return str(storage.cached_download(self.text, sources.cache_dir() / "weights"))
        return None if self.kind == "none" else self.text

    def __str__(self) -> str:
        return self.text


def cached_imagenet() -> str | None:
    """Path of the Keras-cached ImageNet no-top weights, if present."""
    home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
    path = os.path.join(home, "models", VGG16_NOTOP_FILE)
    return path if os.path.exists(path) else None
