"""The cluster files under cluster/ (no cluster needed): the AWS launcher config validates the way
`ray up` does, the KubeRay RayCluster / RayJob have what a GPU sweep needs, and
search_spaces/full.yaml fits the GPU worker types they define."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

import ray.autoscaler
from lrc_ray.distributed.tune import TRIAL_SLOT, driver_resources, trial_concurrency
from lrc_ray.errors import UserInputError
from lrc_ray.search_space import load_search_space

ROOT = Path(__file__).resolve().parent.parent
AWS = ROOT / "cluster" / "aws-gpu.yaml"
RAYCLUSTER = ROOT / "cluster" / "kuberay" / "raycluster.yaml"
RAYJOB = ROOT / "cluster" / "kuberay" / "rayjob.yaml"
FULL = ROOT / "search_spaces" / "full.yaml"
RAY_SCHEMA = Path(os.path.dirname(ray.autoscaler.__file__)) / "ray-schema.json"
TORCH = re.search(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def aws() -> dict:
    return yaml.safe_load(AWS.read_text())


@pytest.fixture(scope="module")
def sweep():
    space = load_search_space(FULL)
    return space.sweep


def _kuberay(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _cluster_spec(path: Path) -> dict:
    doc = _kuberay(path)
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher (`ray up cluster/aws-gpu.yaml`)


def _worker_types(config: dict) -> dict:
    return {name: spec for name, spec in config["available_node_types"].items() if name != config["head_node_type"]}


def test_aws_config_validates_against_rays_schema(aws):
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(aws, schema)


def test_aws_config_passes_ray_up_checks(aws):
    """What `ray up` runs before touching AWS: defaults filled in, then the schema and the
    cross-field checks (head type exists, sum of min_workers <= max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(aws)))


def test_aws_head_hosts_the_trial_drivers(aws, sweep):
    head = aws["available_node_types"][aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert head["resources"][TRIAL_SLOT] >= sweep.max_concurrent_trials
    # lrc_ray's drivers then ask for a slot, not a CPU
    assert driver_resources(head["resources"], workers=sweep.workers_per_trial, use_gpu=True) == {TRIAL_SLOT: 1}
    assert all(TRIAL_SLOT not in spec["resources"] for spec in _worker_types(aws).values())


def test_aws_worker_types_are_gpu_and_bounded(aws):
    workers = _worker_types(aws)
    assert len(workers) >= 2
    for name, spec in workers.items():
        assert spec["resources"]["GPU"] >= 1, name
        assert spec["resources"]["CPU"] >= 1, name
        assert 0 <= spec.get("min_workers", 0) <= spec["max_workers"], name
    assert aws["max_workers"] >= sum(spec["max_workers"] for spec in workers.values())
    gpus = {spec["node_config"]["InstanceType"]: spec["resources"]["GPU"] for spec in workers.values()}
    assert gpus.get("g5.xlarge") == 1
    assert gpus.get("p4d.24xlarge", gpus.get("g5.48xlarge")) == 8
    spot = [spec for spec in workers.values() if spec["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    assert spot and all(spec["resources"]["GPU"] == 1 for spec in spot)


def test_aws_setup_installs_the_project_on_every_node(aws):
    from ray.autoscaler._private.util import prepare_config

    config = prepare_config(copy.deepcopy(aws))  # merges setup_commands into head/worker lists
    assert "~/lrc_ray" in config["file_mounts"]
    head = config["head_setup_commands"]
    worker_lists = [config["worker_setup_commands"]] + [
        spec["worker_setup_commands"] for spec in _worker_types(config).values() if "worker_setup_commands" in spec
    ]
    for commands in [head, *worker_lists]:
        installs = [i for i, command in enumerate(commands) if "pip install" in command and "lrc_ray" in command
                    and " -e " in command]
        torches = [i for i, command in enumerate(commands) if "pip install" in command and f"torch=={TORCH}" in command]
        assert installs and torches and torches[0] < installs[0], commands  # torch first, as the Makefile does
        for index in installs + torches:  # the versions `make install` installs
            assert "-c ~/lrc_ray/requirements/constraints.txt" in commands[index], commands[index]
    # the head has no GPU: the CPU build; the GPU workers: not the CPU build
    assert any("torch==" in command and "whl/cpu" in command for command in head)
    for commands in worker_lists:
        assert not any("torch==" in command and "whl/cpu" in command for command in commands)


def test_aws_start_commands(aws):
    head = " ".join(aws["head_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "--dashboard-host=0.0.0.0" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(aws["worker_start_ray_commands"])


def _usage_argv(path: Path, command: str) -> list[str]:
    """The words from `lrc-ray COMMAND` on of the usage line in a cluster file's comments."""
    line = next(line for line in path.read_text().splitlines() if line.startswith("#") and f"lrc-ray {command} " in line)
    words = shlex.split(line.lstrip("#"))
    return words[words.index("lrc-ray"):]


def test_aws_sweeps_and_cache_go_to_s3_without_a_shared_file_system(aws):
    argv = _usage_argv(AWS, "tune")
    assert argv[argv.index("--storage") + 1].startswith("s3://")
    assert argv[argv.index("--cache-root") + 1].startswith("s3://")
    assert not aws.get("initialization_commands"), "no file system to mount"
    assert not any(option.startswith("-v ") for option in aws["docker"]["run_options"])
    # --data is a local path that every node has: the setup commands copy the data set there from S3
    data = argv[argv.index("--data") + 1]
    assert any("copy_files('s3://" in command and f"'{data}')" in command for command in aws["setup_commands"])
    for name, spec in _worker_types(aws).items():  # the workers' role reaches the bucket, from inside Docker
        assert spec["node_config"]["IamInstanceProfile"]["Arn"], name
    for spec in aws["available_node_types"].values():
        assert spec["node_config"]["MetadataOptions"]["HttpPutResponseHopLimit"] >= 2


def test_full_sweep_fits_the_aws_gpu_types(aws, sweep):
    assert sweep.use_gpu is True
    need = sweep.max_concurrent_trials * sweep.workers_per_trial  # GPUs at once, one per Train worker
    head = aws["available_node_types"][aws["head_node_type"]]["resources"]
    workers = _worker_types(aws)
    largest = max(workers.values(), key=lambda spec: spec["resources"]["GPU"])
    assert need <= largest["resources"]["GPU"] * largest["max_workers"]
    for name, spec in workers.items():
        # each type alone can hold the sweep; lrc_ray then runs max_concurrent_trials at once
        count = -(-need // spec["resources"]["GPU"])
        assert count <= spec["max_workers"], name
        resources = {key: head.get(key, 0) + count * spec["resources"].get(key, 0) for key in {*head, *spec["resources"]}}
        assert trial_concurrency(resources, workers=sweep.workers_per_trial, use_gpu=True,
                                 cap=sweep.max_concurrent_trials) == sweep.max_concurrent_trials, name


def test_full_sweep_starts_on_the_autoscaling_head_before_any_gpu_node(aws, sweep):
    """Every worker type starts at 0: the autoscaler adds GPU nodes as the trials ask for them, so
    the sweep starts with its max_concurrent_trials on the head alone; without an autoscaler
    the same head is refused."""
    head = aws["available_node_types"][aws["head_node_type"]]["resources"]
    assert trial_concurrency(head, workers=sweep.workers_per_trial, use_gpu=True, cap=sweep.max_concurrent_trials,
                             autoscaling=True) == sweep.max_concurrent_trials
    with pytest.raises(UserInputError):
        trial_concurrency(head, workers=sweep.workers_per_trial, use_gpu=True, cap=sweep.max_concurrent_trials)


# ---------------------------------------------------------------------------------------------
# KubeRay


def _quantity(value) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]


def _start_resources(group: dict) -> dict:
    """KubeRay's format: a JSON object inside a quoted string, '"{\\"name\\": 1}"'."""
    text = group.get("rayStartParams", {}).get("resources")
    return json.loads(json.loads(text)) if text else {}


def _gpu_groups(spec: dict) -> list[dict]:
    return [g for g in spec["workerGroupSpecs"] if int(_container(g)["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1]


def _mounts(group: dict) -> dict[str, str]:
    """volume name -> mount path of the group's Ray container."""
    return {m["name"]: m["mountPath"] for m in _container(group).get("volumeMounts", [])}


def _ray_resources(group: dict, replicas: int) -> dict:
    limits = _container(group)["resources"]["limits"]
    one = {"CPU": _quantity(limits["cpu"]), "GPU": int(limits.get("nvidia.com/gpu", 0)), **_start_resources(group)}
    return {key: value * replicas for key, value in one.items()}


@pytest.mark.parametrize("path, kind", [(RAYCLUSTER, "RayCluster"), (RAYJOB, "RayJob")])
def test_kuberay_files_parse(path, kind):
    doc = _kuberay(path)
    assert doc["apiVersion"] == "ray.io/v1"
    assert doc["kind"] == kind
    assert doc["metadata"]["name"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB])
def test_kuberay_head(path, sweep):
    head = _cluster_spec(path)["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    assert _start_resources(head)[TRIAL_SLOT] >= sweep.max_concurrent_trials
    assert "nvidia.com/gpu" not in _container(head)["resources"]["limits"]


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB])
def test_kuberay_gpu_workers(path):
    spec = _cluster_spec(path)
    groups = _gpu_groups(spec)
    assert groups
    for group in groups:
        resources = _container(group)["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources.get("requests", resources["limits"]).get("nvidia.com/gpu")
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        tolerations = group["template"]["spec"]["tolerations"]
        assert any(t["key"] == "nvidia.com/gpu" and t.get("effect") == "NoSchedule" for t in tolerations)
    images = {_container(spec["headGroupSpec"])["image"]} | {_container(g)["image"] for g in spec["workerGroupSpecs"]}
    assert len(images) == 1  # one image everywhere


@pytest.mark.parametrize("path", [RAYCLUSTER, RAYJOB])
def test_kuberay_pods_need_no_shared_file_system(path):
    """Sweeps and cache go to S3 (through the service account's role); each pod's init container
    copies the data set to the same local path."""
    spec = _cluster_spec(path)
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == "lrc-ray"
        assert not [v for v in pod["volumes"] if "persistentVolumeClaim" in v], "no claim to create beforehand"
        (init,) = pod["initContainers"]
        assert init["image"] == _container(group)["image"]
        data_mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "data")
        assert data_mount == _mounts(group)["data"] == "/mnt/data"
        assert "copy_files('s3://" in init["command"][-1] and "'/mnt/data/btcv')" in init["command"][-1]


def test_raycluster_autoscales_and_starts_the_sweep_at_zero_gpu_pods(sweep):
    spec = _cluster_spec(RAYCLUSTER)
    assert spec["enableInTreeAutoscaling"] is True
    assert all(group["minReplicas"] == 0 for group in _gpu_groups(spec))
    head = _ray_resources(spec["headGroupSpec"], 1)
    assert trial_concurrency(head, workers=sweep.workers_per_trial, use_gpu=True, cap=sweep.max_concurrent_trials,
                             autoscaling=True) == sweep.max_concurrent_trials


def test_rayjob_has_the_same_cluster_shape_as_raycluster():
    cluster, job = _cluster_spec(RAYCLUSTER), _cluster_spec(RAYJOB)
    assert job["rayVersion"] == cluster["rayVersion"]
    assert job["headGroupSpec"]["rayStartParams"] == cluster["headGroupSpec"]["rayStartParams"]
    assert _container(job["headGroupSpec"])["resources"] == _container(cluster["headGroupSpec"])["resources"]
    assert [g["groupName"] for g in job["workerGroupSpecs"]] == [g["groupName"] for g in cluster["workerGroupSpecs"]]
    for job_group, cluster_group in zip(job["workerGroupSpecs"], cluster["workerGroupSpecs"]):
        assert _container(job_group)["resources"] == _container(cluster_group)["resources"]
        assert job_group["template"]["spec"]["tolerations"] == cluster_group["template"]["spec"]["tolerations"]
        assert job_group["template"]["spec"]["volumes"] == cluster_group["template"]["spec"]["volumes"]


def _entrypoint_argv() -> tuple[list[str], str]:
    """The `lrc-ray tune ...` words of the RayJob entrypoint (which may be wrapped in `bash -c '...'`,
    with shell variables it assigns first substituted) and the directory it changes to, if any."""
    words = shlex.split(_kuberay(RAYJOB)["spec"]["entrypoint"])
    if words[:2] == ["bash", "-c"]:
        words = shlex.split(words[2])
    cwd = words[words.index("cd") + 1] if "cd" in words else ""
    start = words.index("lrc-ray")
    assigned = dict(word.split("=", 1) for word in words[:start] if "=" in word and word.split("=", 1)[0].isidentifier())
    argv = []
    for word in words[start:]:
        for name, value in assigned.items():
            word = word.replace("$" + name, value)
        argv.append(word)
    return argv, cwd


def test_rayjob_runs_the_full_sweep_with_s3_storage():
    doc = _kuberay(RAYJOB)
    argv, _ = _entrypoint_argv()
    assert argv[:2] == ["lrc-ray", "tune"]
    assert argv[2].endswith("search_spaces/full.yaml")
    assert argv[argv.index("--storage") + 1].startswith("s3://")
    assert argv[argv.index("--cache-root") + 1].startswith("s3://")
    assert argv[argv.index("--data") + 1].startswith(_mounts(_cluster_spec(RAYJOB)["headGroupSpec"])["data"] + "/")
    assert argv[argv.index("--name") + 1] == "full"
    spec = doc["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec["submissionMode"] in {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
    assert "working_dir" in yaml.safe_load(spec["runtimeEnvYAML"])


@pytest.mark.parametrize("path", [AWS, RAYCLUSTER])
def test_the_usage_lines_parse_with_lrc_rays_own_parser(path):
    """The `lrc-ray tune` line a user copies from the file's comments is one the CLI accepts."""
    from lrc_ray.cli import build_parser

    args = build_parser().parse_args(_usage_argv(path, "tune")[1:])
    assert args.storage and str(args.storage).startswith("s3:") and args.cache_root.startswith("s3://")


@pytest.mark.parametrize("path, count", [(RAYCLUSTER, "maxReplicas"), (RAYJOB, "replicas")])
def test_full_sweep_fits_the_kuberay_gpu_group(path, count, sweep):
    """RayCluster: at its largest; RayJob: with the pods KubeRay waits for before submitting."""
    assert sweep.use_gpu is True
    spec = _cluster_spec(path)
    groups = _gpu_groups(spec)
    largest = max(groups, key=lambda g: int(_container(g)["resources"]["limits"]["nvidia.com/gpu"]))
    gpus = int(_container(largest)["resources"]["limits"]["nvidia.com/gpu"])
    assert sweep.max_concurrent_trials * sweep.workers_per_trial <= gpus * largest["maxReplicas"]
    resources = _ray_resources(spec["headGroupSpec"], 1)
    for key, value in _ray_resources(largest, largest[count]).items():
        resources[key] = resources.get(key, 0) + value
    assert trial_concurrency(resources, workers=sweep.workers_per_trial, use_gpu=True,
                             cap=sweep.max_concurrent_trials) == sweep.max_concurrent_trials


# ---------------------------------------------------------------------------------------------
# The image and the locked install


def _dockerfile_arg(name: str) -> str:
    return re.search(rf"^ARG {name}=(\S+)$", (ROOT / "Dockerfile").read_text(), re.M).group(1)


def test_the_dockerfile_builds_on_the_ray_the_cluster_files_run(aws):
    image = _dockerfile_arg("RAY_IMAGE")
    assert image == aws["docker"]["worker_image"] == "rayproject/ray:2.60.0-py311-gpu"
    ray_pin = next(line for line in _constraints() if line.startswith("ray=="))
    assert ray_pin == "ray==" + image.split(":")[1].split("-")[0]
    assert _dockerfile_arg("TORCH_VERSION") == TORCH
    for path in (RAYCLUSTER, RAYJOB):  # the image built from it, tagged with its base
        spec = _cluster_spec(path)
        assert _container(spec["headGroupSpec"])["image"].endswith("-ray2.60.0-py311-gpu")
    installs = [line for line in (ROOT / "Dockerfile").read_text().splitlines() if "pip install" in line]
    assert installs and all("--constraint requirements/constraints.txt" in line for line in installs)


def _constraints() -> list[str]:
    return [line for line in (ROOT / "requirements" / "constraints.txt").read_text().splitlines()
            if line and not line.startswith("#")]


def test_the_constraints_pin_every_dependency_inside_its_tested_range():
    """`make install` installs the constraints' versions: each must satisfy pyproject's range, and
    every direct dependency (torch apart: its build is the machine's) must be pinned."""
    import tomllib

    from packaging.requirements import Requirement

    pinned = dict(line.split("==") for line in _constraints())
    pinned = {name.lower().replace("_", "-"): version for name, version in pinned.items()}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in map(Requirement, requirements):
        if requirement.name == "torch":
            assert requirement.specifier.contains(TORCH), requirement
            continue
        version = pinned.get(requirement.name.lower().replace("_", "-"))
        assert version is not None, f"{requirement.name} is not in requirements/constraints.txt"
        assert requirement.specifier.contains(version), f"{requirement.name}=={version} outside {requirement.specifier}"
