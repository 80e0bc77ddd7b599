"""The compiled pipeline: seven tasks, three GPU trainers that depend only on split."""

import subprocess
import sys

import yaml

from conftest import ROOT

TASKS = {"ingest", "split", "train-cnn1", "train-cnn2", "train-vgg16", "evaluate", "report"}
TRAINERS = {"train-cnn1", "train-cnn2", "train-vgg16"}


def compile_pipeline(tmp_path, env=None):
    output = tmp_path / "pipeline.yaml"
    subprocess.run(
        [sys.executable, "pipeline.py", "compile", "--output", str(output)],
        cwd=ROOT,
        check=True,
        env=env,
        capture_output=True,
    )
    documents = list(yaml.safe_load_all(output.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else {})


def test_seven_tasks_and_parallel_gpu_trainers(tmp_path):
    spec, platform = compile_pipeline(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == TASKS
    for name in TRAINERS:
        assert tasks[name]["dependentTasks"] == ["split"]
        executor = spec["deploymentSpec"]["executors"][tasks[name]["componentRef"]["name"].replace("comp-", "exec-")]
        accelerator = executor["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and str(accelerator["resourceCount"]) == "1"
    assert set(tasks["evaluate"]["dependentTasks"]) == TRAINERS
    assert "report" not in {d for t in tasks.values() for d in t.get("dependentTasks", [])}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in TRAINERS:
        config = executors[spec["root"]["dag"]["tasks"][name]["componentRef"]["name"].replace("comp-", "exec-")]
        assert config["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert config["nodeSelector"]["labels"]
    # Retries where they help (a preempted GPU node), not where a bad dataset would be ingested four times.
    assert {name for name, t in tasks.items() if t.get("retryPolicy", {}).get("maxRetryCount") == 3} == TRAINERS
    assert tasks["ingest"]["cachingOptions"]["enableCache"] and tasks["split"]["cachingOptions"]["enableCache"]


def test_image_and_placement_come_from_the_environment(tmp_path):
    import os

    env = {
        **os.environ,
        "BLOODCELL_IMAGE": "registry.example/bloodcell:test",
        "BLOODCELL_GPU_RESOURCE": "",
        "BLOODCELL_TRAINER_MEMORY": "6Gi",
    }
    spec, platform = compile_pipeline(tmp_path, env)
    executors = spec["deploymentSpec"]["executors"]
    assert len(executors) == 7
    assert {e["container"]["image"] for e in executors.values()} == {"registry.example/bloodcell:test"}
    for name in TRAINERS:
        resources = executors[f"exec-{name}"]["container"]["resources"]
        assert "accelerator" not in resources and resources["memoryLimit"] == 6 * 2**30 / 1e9
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert all(k["configMapAsEnv"][0]["configMapName"] == "bloodcell-env" for k in kubernetes.values())


def test_every_task_runs_as_the_image_user_with_the_mlflow_login_from_a_secret(tmp_path):
    spec, platform = compile_pipeline(tmp_path)
    kubernetes = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert len(kubernetes) == len(TASKS)
    for executor in kubernetes.values():
        assert executor["securityContext"] == {"runAsUser": "10001", "runAsGroup": "10001", "runAsNonRoot": True}
        (secret,) = executor["secretAsEnv"]
        assert secret["secretName"] == "bloodcell-mlflow"
        assert {k["secretKey"] for k in secret["keyToEnv"]} == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
        config_map_keys = {k["configMapKey"] for k in executor["configMapAsEnv"][0]["keyToEnv"]}
        assert not config_map_keys & {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
