"""Typed configuration: run profiles (smoke, laptop, gpu) and command-line overrides.

Every tunable number of the workflow lives here. Steps receive a profile name plus a JSON
object of overrides (``{"cnn1.epochs": 5}``) and call :func:`resolve`.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import typing
from dataclasses import dataclass

from bloodcell import __version__
from bloodcell.errors import ConfigError

MENDELEY_URL = (
    "https://data.mendeley.com/public-files/datasets/snkd93bnjr/files/"
    "2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded"
)
MENDELEY_ZIP_BYTES = 281_366_219
LR_SCHEDULES = ("plateau", "cosine")
MODEL_NAME = re.compile(r"[a-z][a-z0-9]*")
# The pipeline image: the one name that `make image`, the compiled pipeline, the cluster manifests and
# `pipeline.py run --runner docker` use (BLOODCELL_IMAGE, or make's IMAGE=, overrides it). A local name:
# push it to a registry under another name for a cluster that cannot load local images.
IMAGE = f"bloodcell:{__version__}"
DEFAULT_IMAGE = os.environ.get("BLOODCELL_IMAGE") or IMAGE
DEFAULT_BUCKET = os.environ.get("BLOODCELL_BUCKET", "bloodcell")
DEFAULT_EXPERIMENT = os.environ.get("BLOODCELL_EXPERIMENT", "bloodcell")
REGISTERED_MODEL = "bloodcell-classifier"  # the MLflow registered model every run's best model joins
DEFAULT_VGG16_WEIGHTS = os.environ.get("VGG16_WEIGHTS") or "imagenet"
# In the order of Profile.split_ratio. val: early stopping, the combined model's choices, the temperature
# and the familiarity check; calibration: the refer thresholds and prediction sets, and nothing else.
SUBSETS = ("train", "val", "calibration", "test")


IMAGE_UID = 10001  # the image's non-root user and group (docker/Dockerfile)

# What every step reads from its environment: on a cluster from ConfigMap `bloodcell-env`, in local
# containers from the services `pipeline.py run` started.
STEP_ENV = ("MLFLOW_TRACKING_URI", "STORAGE_EMULATOR_HOST")
# The steps' MLflow login: on a cluster from Secret `bloodcell-mlflow`, locally from `pipeline.py run`.
MLFLOW_CREDENTIAL_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
# The local object store's token (bloodcell.local.store_front): local containers get it from `pipeline.py run`.
STORE_TOKEN_ENV = "BLOODCELL_STORE_TOKEN"
# How a step was started, said by whatever started it (the local runner, the container plan, the cluster
# pipeline), never guessed from the file system: a local process on a machine that is itself a container
# would otherwise claim our image.
RUNTIME_ENV = "BLOODCELL_RUNTIME"
# MLflow's UI opens an experiment by its kind; without one it may open on the GenAI traces overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
LOCAL_PROCESS, CONTAINER, CLUSTER_POD = "local process", "container", "cluster pod"
STORE_CREDENTIAL_ENV = (STORE_TOKEN_ENV,)
# Limits of each `--runner docker` task container: the laptop profile's largest step peaks at 1.7 GB
# (docs/performance.md, "Memory per step"); 8g leaves room for the page cache and larger profiles.
CONTAINER_MEMORY = os.environ.get("BLOODCELL_CONTAINER_MEMORY", "8g")
CONTAINER_PIDS = int(os.environ.get("BLOODCELL_CONTAINER_PIDS", "4096"))  # processes and threads
# Settings of this machine's environment that local containers get too.
PASSED_ENV = ("BLOODCELL_MLFLOW_WAIT_S", "GOOGLE_CLOUD_PROJECT", "BLOODCELL_EXTENSIONS")


@dataclass(frozen=True)
class ModelConfig:
    """A model that trains end to end on the images, in one phase: its architecture and how it trains."""

    architecture: str  # a builder of bloodcell.models (models.register)
    image_size: int
    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    augment: bool = True
    # With augment: a quarter of the training images blurred, Gaussian sigma up to this many pixels (0: none).
    blur_sigma: float = 0.0
    early_stopping_patience: int = 5
    early_stopping_start: int = 0  # epochs before early stopping watches (batch norm settles late)
    lr_schedule: str = "plateau"  # plateau: ReduceLROnPlateau | cosine: 1 warm-up epoch, then cosine decay
    class_weights: bool = False
    width: float = 1.0  # the architecture's channels times this (for a builder that takes a width)

    def __post_init__(self) -> None:
        _check_schedule(self.lr_schedule)

    def image_sizes(self) -> set[int]:
        return {self.image_size}


@dataclass(frozen=True)
class TransferConfig:
    """A model on a pretrained, frozen base (``--vgg16-weights``): its head trains on features the base computed
    once, then (``fine_tune_epochs``) its top block with the head at a low learning rate; no augmentation."""

    architecture: str
    image_size: int
    epochs: int
    batch_size: int = 64
    learning_rate: float = 1e-3
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    early_stopping_patience: int = 5
    early_stopping_start: int = 0
    lr_schedule: str = "plateau"
    class_weights: bool = False

    def __post_init__(self) -> None:
        _check_schedule(self.lr_schedule)

    def image_sizes(self) -> set[int]:
        return {self.image_size}


@dataclass(frozen=True)
class TransferOrScratch:
    """A model with two recipes: ``transfer`` when pretrained weights are given (``--vgg16-weights``),
    ``scratch`` (every layer from random weights) with ``--vgg16-weights none``."""

    transfer: TransferConfig
    scratch: ModelConfig

    def image_sizes(self) -> set[int]:
        return {self.transfer.image_size, self.scratch.image_size}


Recipe = ModelConfig | TransferConfig  # how one model trains in one run
ModelEntry = ModelConfig | TransferOrScratch  # a model of a profile


def _check_schedule(schedule: str) -> None:
    if schedule not in LR_SCHEDULES:
        raise ConfigError(f"lr_schedule {schedule!r} is not one of: {', '.join(LR_SCHEDULES)}")


@dataclass(frozen=True)
class Profile:
    """A complete run configuration."""

    name: str
    # The models this profile trains, by name, in the pipeline's order: the trainer tasks (train-<name>),
    # evaluate and the report follow this list. Adding a model is one entry here (and its builder in models).
    models: dict[str, ModelEntry]
    max_images_per_class: int = 0  # 0 keeps every image
    # train, val, calibration, test. split-folders makes train+val / calibration / test (70/15/15 as the
    # original work, seed 777), then val is carved from the first part per class (docs/architecture.md: the split).
    split_ratio: tuple[float, float, float, float] = (0.65, 0.05, 0.15, 0.15)
    seed: int = 777
    precision: str = "auto"  # auto | float32 | mixed_bfloat16 | mixed_float16
    # The accuracy the cells a model keeps must reach on validation; the less confident are referred to a person.
    refer_target_accuracy: float = 0.99
    # Prediction sets hold the true class with probability at least 1 - this, whatever the class.
    prediction_set_alpha: float = 0.01
    # The familiarity check flags about this share of images like the training ones (validation).
    familiarity_flag_share: float = 0.05
    familiarity_fit_images: int = 5000  # training images its statistics are fitted on (0: all)
    # Whether its best model may take the registry's champion alias (not a profile that only checks the pipeline).
    takes_champion: bool = True

    def __post_init__(self) -> None:
        # A name becomes a task (train-<name>), a kfp parameter and a bucket folder: lower-case letters and digits.
        bad = [name for name in self.models if not MODEL_NAME.fullmatch(name)]
        clashes = {f.name for f in dataclasses.fields(self)} & set(self.models) | {ENSEMBLE_NAME} & set(self.models)
        if bad or clashes:
            raise ConfigError(
                f"profile {self.name!r}: model name(s) {', '.join(sorted({*bad, *clashes}))} not allowed: use "
                f"lower-case letters and digits, starting with a letter, not {ENSEMBLE_NAME!r} or a profile setting"
            )
        if not self.models:
            raise ConfigError(f"profile {self.name!r} has no models")

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    def model(self, name: str) -> ModelEntry:
        if name not in self.models:
            raise ConfigError(
                f"profile {self.name!r} has no model {name!r}; its models: {', '.join(self.models)} "
                "(config.PROFILES lists each profile's models)"
            )
        return self.models[name]

    def image_sizes(self) -> list[int]:
        """Distinct input sizes the models of this profile need (either recipe of each), ascending."""
        return sorted(set().union(*(entry.image_sizes() for entry in self.models.values())))

    def to_dict(self) -> dict[str, typing.Any]:
        return dataclasses.asdict(self)

    def flat_params(self) -> dict[str, str]:
        """``section.key -> value`` strings (``cnn1.epochs``, ``vgg16.transfer.epochs``, ``seed``), for MLflow."""
        values = {key: value for key, value in self.to_dict().items() if key != "models"}
        return _flatten({**self.to_dict()["models"], **values})


def _flatten(values: dict[str, typing.Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = str(value)
    return flat


# The combined model that evaluate builds from a run's trained models (bloodcell.ensemble): its name in
# the bucket (runs/<id>/models/ensemble/), the summary, the report and MLflow.
ENSEMBLE_NAME = "ensemble"

PROFILES: dict[str, Profile] = {
    # Seconds per model: for tests and trying the plumbing.
    "smoke": Profile(
        name="smoke",
        max_images_per_class=24,
        takes_champion=False,
        models={
            "cnn1": ModelConfig("cnn1", image_size=48, epochs=1, batch_size=32),
            "cnn2": ModelConfig("cnn2", image_size=96, epochs=1, batch_size=32, lr_schedule="cosine"),
            "vgg16": TransferOrScratch(
                transfer=TransferConfig("vgg16_transfer", image_size=32, epochs=1, batch_size=32, fine_tune_epochs=1),
                scratch=ModelConfig(
                    "vgg16_from_scratch",
                    image_size=32,
                    epochs=1,
                    batch_size=32,
                    learning_rate=2e-3,
                    lr_schedule="cosine",
                    width=0.25,
                ),
            ),
        },
    ),
    # The full data at reduced resolution, sized for a 2-core CPU (docs/performance.md).
    "laptop": Profile(
        name="laptop",
        models={
            # A cosine decay over a fixed budget: ReduceLROnPlateau stopped cnn1 while it was still improving.
            "cnn1": ModelConfig(
                "cnn1",
                image_size=64,
                epochs=40,
                batch_size=64,
                early_stopping_patience=10,
                early_stopping_start=20,
                lr_schedule="cosine",
            ),
            # cnn2's epochs are the profile's costliest (docs/performance.md): fewer, each with twice the updates.
            "cnn2": ModelConfig(
                "cnn2",
                image_size=96,
                epochs=8,
                batch_size=32,
                blur_sigma=0.8,
                early_stopping_patience=4,
                early_stopping_start=8,
                lr_schedule="cosine",
            ),
            "vgg16": TransferOrScratch(
                transfer=TransferConfig(
                    "vgg16_transfer",
                    image_size=64,
                    epochs=8,
                    batch_size=128,
                    learning_rate=1e-3,
                    fine_tune_epochs=4,
                    fine_tune_learning_rate=1e-4,
                ),
                # From scratch, a quarter of VGG16's width at 64 px fits the laptop budget. Early stopping watches
                # the second half only: while the rate is high, batch norm's moving statistics lag the weights.
                scratch=ModelConfig(
                    "vgg16_from_scratch",
                    image_size=64,
                    epochs=12,
                    batch_size=128,
                    learning_rate=2e-3,
                    early_stopping_start=6,
                    lr_schedule="cosine",
                    width=0.25,
                ),
            ),
        },
    ),
    # A cluster run on GPU nodes: the original resolutions and more epochs.
    "gpu": Profile(
        name="gpu",
        models={
            # A cosine decay over a fixed budget: ReduceLROnPlateau, halving the rate on a noisy val_loss,
            # left cnn1 underfitting at 128 px.
            "cnn1": ModelConfig(
                "cnn1",
                image_size=128,
                epochs=50,
                batch_size=128,
                early_stopping_patience=10,
                early_stopping_start=25,
                lr_schedule="cosine",
            ),
            "cnn2": ModelConfig(
                "cnn2",
                image_size=128,
                epochs=20,
                batch_size=128,
                early_stopping_patience=8,
                early_stopping_start=8,
                lr_schedule="cosine",
            ),
            "vgg16": TransferOrScratch(
                transfer=TransferConfig(
                    "vgg16_transfer",
                    image_size=224,
                    epochs=15,
                    batch_size=64,
                    fine_tune_epochs=15,
                    fine_tune_learning_rate=1e-5,
                ),
                scratch=ModelConfig(
                    "vgg16_from_scratch",
                    image_size=224,
                    epochs=30,
                    batch_size=64,
                    learning_rate=1e-3,
                    early_stopping_start=15,
                    lr_schedule="cosine",
                ),
            ),
        },
    ),
}


@dataclass(frozen=True)
class ClusterSettings:
    """How compiled pipeline tasks are placed on a Kubernetes cluster (from ``BLOODCELL_*`` env)."""

    image: str = DEFAULT_IMAGE
    gpu_resource: str = "nvidia.com/gpu"
    gpu_node_selector: str = "cloud.google.com/gke-accelerator=nvidia-l4"  # key=value, "" for none
    gpu_toleration_key: str = "nvidia.com/gpu"
    env_config_map: str = "bloodcell-env"
    mlflow_secret: str = "bloodcell-mlflow"  # MLFLOW_TRACKING_USERNAME/_PASSWORD of user `pipeline`
    service_account: str = "bloodcell-pipeline"  # the pods' Kubernetes service account (set at submit)
    trainer_cpu: str = "4"
    trainer_memory: str = "24Gi"
    data_cpu: str = "2"
    data_memory: str = "8Gi"
    # Attempts after the first on what the cluster retries (manifests/kfp/patches/workflow-defaults.yaml:
    # a lost, shut down or evicted node, a failed GPU; never OOMKilled nor the step's own errors). Other
    # steps get the cluster's default, 2.
    trainer_retries: int = 3

    @classmethod
    def from_env(cls) -> ClusterSettings:
        defaults = cls()
        values = {}
        for f in dataclasses.fields(cls):
            raw = os.environ.get(f"BLOODCELL_{f.name.upper()}")
            values[f.name] = getattr(defaults, f.name) if raw is None else type(getattr(defaults, f.name))(raw)
        return cls(**values)


def resolve(profile: str, overrides: str | dict[str, typing.Any] | None = None) -> Profile:
    """The named profile with ``overrides`` (a dict or JSON object of dotted keys) applied."""
    if profile not in PROFILES:
        raise ConfigError(f"unknown profile {profile!r}; choose one of: {', '.join(PROFILES)}")
    values: dict[str, typing.Any]
    if isinstance(overrides, str):
        try:
            values = json.loads(overrides or "{}")
        except json.JSONDecodeError as exc:
            raise ConfigError(f"overrides are not a JSON object: {exc}") from None
    else:
        values = overrides or {}
    result = PROFILES[profile]
    for key, value in values.items():
        result = _override(result, key, value)
    return result


def parse_assignments(assignments: list[str]) -> dict[str, str]:
    """``["cnn1.epochs=5"]`` -> ``{"cnn1.epochs": "5"}`` (values are coerced by :func:`resolve`)."""
    parsed: dict[str, str] = {}
    for item in assignments:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE (e.g. cnn1.epochs=5), got {item!r}")
        parsed[key.strip()] = value.strip()
    return parsed


def _override(obj: typing.Any, dotted_key: str, value: typing.Any, prefix: str = "") -> typing.Any:
    head, _, rest = dotted_key.partition(".")
    full_key = prefix + dotted_key
    if isinstance(obj, Profile) and head in obj.models:  # `cnn1.epochs`: a setting of the profile's model cnn1
        if not rest:
            raise ConfigError(f"{full_key!r} is a group; set one of its fields, e.g. {full_key}.epochs")
        entry = _override(obj.models[head], rest, value, f"{head}.")
        return dataclasses.replace(obj, models={**obj.models, head: entry})
    hints = typing.get_type_hints(type(obj))
    if head not in hints or head in ("name", "models"):
        raise ConfigError(
            f"unknown setting {full_key!r}; settings are: {', '.join(sorted(_setting_names(obj, prefix)))}"
        )
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ConfigError(f"setting {prefix + head!r} has no sub-setting {rest!r}")
        new_value = _override(current, rest, value, f"{prefix}{head}.")
    else:
        if dataclasses.is_dataclass(current):
            raise ConfigError(f"{full_key!r} is a group; set one of its fields, e.g. {full_key}.epochs")
        new_value = _coerce(value, hints[head], full_key)
    return dataclasses.replace(obj, **{head: new_value})


def _setting_names(obj: typing.Any, prefix: str = "") -> list[str]:
    names = []
    if isinstance(obj, Profile):
        for model, entry in obj.models.items():
            names += _setting_names(entry, f"{prefix}{model}.")
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            names += _setting_names(value, f"{prefix}{f.name}.")
        elif f.name not in ("name", "models"):
            names.append(prefix + f.name)
    return names


def _coerce(value: typing.Any, hint: typing.Any, key: str) -> typing.Any:
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).lower()
            if text not in {"true", "false", "1", "0", "yes", "no"}:
                raise ValueError(value)
            return text in {"true", "1", "yes"}
        if typing.get_origin(hint) is tuple:
            parts = value if isinstance(value, (list, tuple)) else str(value).split(",")
            ratio = tuple(float(p) for p in parts)
            if len(ratio) != len(SUBSETS) or abs(sum(ratio) - 1) > 1e-6 or min(ratio) <= 0:
                raise ValueError(value)
            return ratio
        return hint(value)
    except (TypeError, ValueError):
        expected = (
            "four positive fractions (train, val, calibration, test) summing to 1, e.g. 0.65,0.05,0.15,0.15"
            if typing.get_origin(hint) is tuple
            else getattr(hint, "__name__", str(hint))
        )
        raise ConfigError(f"setting {key!r}: cannot use {value!r}; expected {expected}") from None


__all__ = [
    "ClusterSettings",
    "ConfigError",
    "DEFAULT_BUCKET",
    "DEFAULT_EXPERIMENT",
    "DEFAULT_IMAGE",
    "DEFAULT_VGG16_WEIGHTS",
    "IMAGE",
    "IMAGE_UID",
    "MENDELEY_URL",
    "MENDELEY_ZIP_BYTES",
    "ModelConfig",
    "ModelEntry",
    "Recipe",
    "TransferConfig",
    "TransferOrScratch",
    "MLFLOW_CREDENTIAL_ENV",
    "PASSED_ENV",
    "PROFILES",
    "Profile",
    "STEP_ENV",
    "SUBSETS",
    "parse_assignments",
    "resolve",
]

# Modules that add models or profiles (a builder registered with bloodcell.models.register, an entry in
# PROFILES), comma-separated: imported here, so the pipeline and every step process see the same models.
EXTENSIONS_ENV = "BLOODCELL_EXTENSIONS"


def load_extensions() -> None:
    for module in filter(None, (name.strip() for name in os.environ.get(EXTENSIONS_ENV, "").split(","))):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(
                f"{EXTENSIONS_ENV} names {module!r}, which cannot be imported ({exc}): put it on PYTHONPATH "
                f"(in containers: into the image) or unset {EXTENSIONS_ENV}"
            ) from None


if __name__ != "__main__":
    load_extensions()

if __name__ == "__main__":  # `python -m bloodcell.config image`: the image name, for make (stdlib only)
    import sys

    if sys.argv[1:] != ["image"]:
        sys.exit("usage: python -m bloodcell.config image")
    print(DEFAULT_IMAGE)
