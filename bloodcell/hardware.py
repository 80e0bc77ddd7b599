"""What the device offers: pick the mixed-precision policy at run time."""

from __future__ import annotations

from pathlib import Path

import keras


def cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def gpu_compute_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability under the active Keras backend, or None without a GPU."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return None
        return tf.config.experimental.get_device_details(gpus[0]).get("compute_capability", (8, 0))
    if backend == "jax":
        import jax

        devices = [d for d in jax.devices() if d.platform == "gpu"]
        if not devices:
            return None
        major, _, minor = str(getattr(devices[0], "compute_capability", "8.0")).partition(".")
        return int(major), int(minor or 0)
    return None


def choose_precision(setting: str = "auto") -> str:
    """The Keras dtype policy for ``setting`` (``auto`` picks what the hardware runs fastest)."""
    if setting != "auto":
        return setting
    capability = gpu_compute_capability()
    if capability is not None:
        return "mixed_bfloat16" if capability >= (8, 0) else "mixed_float16"
    return "mixed_bfloat16" if cpu_has_bf16() else "float32"


def apply_precision(setting: str = "auto") -> str:
    policy = choose_precision(setting)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def device_name() -> str:
    return "gpu" if gpu_compute_capability() is not None else "cpu"
