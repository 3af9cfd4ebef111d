"""`ray job submit` end to end on a real local head with token authentication: start the head,
submit a tiny sweep with the project's runtime_env, wait for SUCCEEDED, find the results table in
`ray job logs`, read the results from outside the job, and stop the head (also on failure)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from lrc_ray.distributed.cluster import client_env, free_port, local_up

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def test_submitted_sweep_succeeds_and_its_results_are_readable(head, tmp_path, tiny_sweep_space):
    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(tiny_sweep_space(space={"pretrain.method": {"choice": ["scratch", "lrc"]}},
                                                     pretrain_epochs=1, finetune_epochs=1, num_samples=2)))
    env = {**os.environ, **client_env(head.workdir)}
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", head.dashboard_url, "--runtime-env", "cluster/runtime_env.yaml",
         "--working-dir", ".", "--submission-id", "lrc-test-sweep", "--",
         "lrc-ray", "tune", str(space), "--storage", str(tmp_path / "sweeps"), "--name", "submitted"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert submitted.returncode == 0, (submitted.stdout + submitted.stderr)[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", head.dashboard_url, "lrc-test-sweep"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert "Job 'lrc-test-sweep' succeeded" in status.stdout, status.stdout + status.stderr  # Ray's SUCCEEDED

    logs = subprocess.run([RAY, "job", "logs", "--address", head.dashboard_url, "lrc-test-sweep"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert "trials, best dice_mean first:" in logs.stdout and "chosen configuration" in logs.stdout

    results = subprocess.run([sys.executable, "-m", "lrc_ray.cli", "results", str(tmp_path / "sweeps" / "submitted")],
                             capture_output=True, text=True, timeout=120)
    assert results.returncode == 0, results.stderr[-2000:]
    assert (tmp_path / "sweeps" / "submitted" / "results" / "results.parquet").is_file()


def test_the_job_cli_without_the_token_is_refused(head):
    env = {**os.environ, **client_env(head.workdir), "RAY_AUTH_TOKEN_PATH": "/nonexistent/token"}
    env.pop("RAY_AUTH_TOKEN", None)
    listed = subprocess.run([RAY, "job", "list", "--address", head.dashboard_url], env=env, capture_output=True,
                            text=True, timeout=60)
    assert listed.returncode != 0


def test_a_second_head_in_the_same_workdir_is_refused(head):
    with pytest.raises(Exception, match="already running"):
        local_up(head.workdir, num_cpus=1, port=free_port(), dashboard_port=free_port())


def test_a_second_head_on_the_machine_takes_jobs_too(head, head_workdir):
    """Each head's agent, which runs the submitted jobs, listens on a port of its own: on Ray's
    fixed default the second head's agent could not listen, and every job it was given failed.
    A job's temp files go to its head's temp dir, which `cluster down` removes."""
    workdir = head_workdir()
    second = local_up(workdir, num_cpus=1, port=free_port(), dashboard_port=free_port())
    job = "import tempfile; print('on the second head, temp dir', tempfile.gettempdir())"
    submitted = subprocess.run(
        [RAY, "job", "submit", "--address", second.dashboard_url, "--", sys.executable, "-c", job],
        env={**os.environ, **client_env(workdir)}, capture_output=True, text=True, timeout=300,
    )
    assert submitted.returncode == 0 and "on the second head" in submitted.stdout, (submitted.stdout + submitted.stderr)[-2000:]
    assert f"temp dir {workdir.resolve() / 'ray' / 'tmp'}" in submitted.stdout


def test_cluster_up_prints_commands_for_its_own_workdir_and_its_stop_command_stops_it(head_workdir):
    workdir = head_workdir()
    lrc_ray = [sys.executable, "-m", "lrc_ray.cli", "cluster"]
    up = subprocess.run([*lrc_ray, "up", "--workdir", str(workdir), "--port", str(free_port()),
                         "--dashboard-port", str(free_port()), "--num-cpus", "1"], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stderr[-2000:]
    stop = next(line for line in up.stdout.splitlines() if line.startswith("stop it: "))
    assert stop == f"stop it: lrc-ray cluster down --workdir {workdir}"
    assert f"lrc-ray cluster submit --workdir {workdir} -- " in up.stdout
    down = subprocess.run([*lrc_ray, *stop.removeprefix("stop it: lrc-ray cluster ").split()],
                          capture_output=True, text=True, timeout=120)
    assert down.returncode == 0 and down.stdout.strip() == "stopped the local Ray head", down.stdout + down.stderr
    assert not (workdir / "head.json").exists()


def test_runtime_env_leaves_data_and_venv_behind(tmp_path):
    """Ray's own packaging of the working dir, with our excludes: no venv, data or caches uploaded."""
    from ray._private.runtime_env.packaging import create_package

    excludes = yaml.safe_load((REPO / "cluster" / "runtime_env.yaml").read_text())["excludes"]
    project = tmp_path / "project"
    for relative in ("lrc_ray/api.py", ".venv/bin/python", ".lrc_ray/data/x.nii.gz", "data/case.nii.gz",
                     "search_spaces/quickstart.yaml", "cache/part-0.parquet"):
        (project / relative).parent.mkdir(parents=True, exist_ok=True)
        (project / relative).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(project), package, include_gitignore=True, include_parent_dir=False, excludes=excludes)
    names = set(zipfile.ZipFile(package).namelist())
    assert "lrc_ray/api.py" in names and "search_spaces/quickstart.yaml" in names
    assert not any(name.startswith((".venv", ".lrc_ray", "data/")) or name.endswith(".parquet") for name in names), names


def test_submitting_without_a_head_names_the_command_that_starts_one(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "lrc_ray.cli", "cluster", "submit", "--workdir", str(tmp_path), "--", "lrc-ray", "--version"],
        capture_output=True, text=True, timeout=60,
    )
    assert completed.returncode == 2
    assert completed.stderr.startswith("lrc-ray: error: no local Ray head is running") and "lrc-ray cluster up" in completed.stderr
    assert completed.stderr.count("\n") == 1
