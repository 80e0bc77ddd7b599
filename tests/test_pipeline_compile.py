"""The compiled pipeline: seven tasks, three GPU trainers that depend only on split."""

import subprocess
import sys

import yaml

from conftest import ROOT

TASKS = {"ingest", "split", "train-cnn1", "train-cnn2", "train-vgg16", "evaluate", "report"}
TRAINERS = {"train-cnn1", "train-cnn2", "train-vgg16"}


def compile_pipeline(tmp_path, env=None):
    output = tmp_path / "pipeline.yaml"
    subprocess.run([sys.executable, "pipeline.py", "compile", "--output", str(output)], cwd=ROOT, check=True,
                   env=env, capture_output=True)
    documents = list(yaml.safe_load_all(output.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else {})


def test_seven_tasks_and_parallel_gpu_trainers(tmp_path):
    spec, platform = compile_pipeline(tmp_path)
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == TASKS
    for name in TRAINERS:
        assert tasks[name]["dependentTasks"] == ["ingest", "split"] or set(tasks[name]["dependentTasks"]) <= {
            "ingest", "split"}
        assert not set(tasks[name].get("dependentTasks", [])) & TRAINERS
        executor = spec["deploymentSpec"]["executors"][tasks[name]["componentRef"]["name"].replace(
            "comp-", "exec-")]
        accelerator = executor["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu" and str(accelerator["resourceCount"]) == "1"
    assert set(tasks["evaluate"]["dependentTasks"]) == TRAINERS
    assert "report" not in {d for t in tasks.values() for d in t.get("dependentTasks", [])}
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in TRAINERS:
        config = executors[spec["root"]["dag"]["tasks"][name]["componentRef"]["name"].replace("comp-", "exec-")]
        assert config["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert config["nodeSelector"]["labels"]
    assert all(t.get("retryPolicy", {}).get("maxRetryCount") == 3 for t in tasks.values())
    assert tasks["ingest"]["cachingOptions"] == {} or not tasks["ingest"]["cachingOptions"].get("enableCache")
