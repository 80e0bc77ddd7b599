"""The one module that touches other libraries' internals: its pins hold, and each touch still works."""

from __future__ import annotations

import importlib.metadata

import pytest

from bloodcell import compat
from bloodcell.errors import BloodcellError


def test_the_installed_libraries_are_the_versions_its_internals_were_read_from():
    compat.check_versions()  # the lock's versions: passes
    installed = importlib.metadata.version("kfp")
    with pytest.raises(BloodcellError, match=rf"internals of kfp 0\.0\.1 .* but {installed} is installed: install"):
        compat.check_versions({"kfp": "0.0.1"})
    compat.check_versions({"not-a-distribution-anywhere": "1.0"})  # absent: nothing to check


def test_each_internal_it_uses_is_still_there():
    assert compat.emulator_binary().is_file()
    assert compat.storage_should_retry(ConnectionError("reset")) and not compat.storage_should_retry(ValueError())
    coloured = "Pipeline \x1b[95m'bloodcell'\x1b[0m finished with status \x1b[91mFAILURE\x1b[0m. Inner task failed: x."
    assert compat.is_pipeline_failure(RuntimeError(coloured)) and not compat.is_pipeline_failure(RuntimeError("bug"))
    assert compat.TASK_START.search("Executing task 'train-cnn1'").group(1) == "train-cnn1"  # type: ignore[union-attr]

    from components.train import trainer

    assert [trainer(m).component_spec.name for m in ("cnn1", "cnn2")] == ["train-cnn1", "train-cnn2"]

    from kfp.local import docker_task_handler

    original = docker_task_handler.run_docker_container
    with compat.docker_runner_calling(lambda *args, **kwargs: 0):
        assert docker_task_handler.run_docker_container is not original
    assert docker_task_handler.run_docker_container is original
