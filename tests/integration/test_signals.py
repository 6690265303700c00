"""A run stopped by a signal leaves nothing running: SIGTERM ends `gptpipe run` within 10 s with training
stopped; kill -9 of the run's whole process group leaves no stage behind, and the rerun right after works."""

import os
import signal
import subprocess
import time

import psutil
import pytest

from tests.conftest import BIN, TINY_PARAMS, make_project

pytestmark = pytest.mark.integration
LONG_PRETRAIN = ["--set", "pretrain.max_steps=100000", "--set", "pretrain.checkpoint_every_n_steps=20"]


def processes_in(project) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cwd"]):
        if process.info["cwd"] and process.info["cwd"].startswith(str(project)):
            found.append(process)
    return found


def start_and_wait_for_training(project, env) -> subprocess.Popen:
    process = subprocess.Popen([str(BIN / "gptpipe"), "run", *LONG_PRETRAIN], cwd=project, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(project.glob(".gptpipe/resume/pretrain/*/last.ckpt")):
        assert process.poll() is None and time.monotonic() < deadline, "pre-training did not start"
        time.sleep(0.5)
    return process


@pytest.fixture
def project(tmp_path, prefect_api):
    path = make_project(tmp_path / "project", TINY_PARAMS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return path, env


def test_sigterm_ends_the_run_within_10_s_with_training_stopped(project):
    path, env = project
    process = start_and_wait_for_training(path, env)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=30)
    assert time.monotonic() - sent < 10
    assert code != 0 and "stopped by SIGTERM" in process.stderr.read()
    psutil.wait_procs(processes_in(path), timeout=5)
    assert not processes_in(path), "a stage process outlived the run"


def test_kill_9_of_the_run_leaves_no_stage_and_the_rerun_works(project):
    path, env = project
    process = start_and_wait_for_training(path, env)
    os.killpg(process.pid, signal.SIGKILL)  # the run's whole group, as a crashed worker or the OOM killer would
    process.wait()
    psutil.wait_procs(processes_in(path), timeout=30)
    assert not processes_in(path), "dvc repro or training outlived the killed run"
    rerun = subprocess.run([str(BIN / "gptpipe"), "run", "--set", "pretrain.max_steps=40"], cwd=path, env=env,
                           capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "is busy" not in rerun.stderr and "Unable to acquire lock" not in rerun.stderr
