"""A run stopped by a signal leaves nothing running: SIGTERM, once or twice in a row, ends `gptpipe run` within
10 s during pre-training and fine-tuning (evaluation and registration: test_signals_late.py), with no process it
started left running or defunct and params.yaml and the finished stages' outputs as they were; kill -9 of the run's
whole process group leaves no stage behind, and the rerun right after works."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request

import psutil
import pytest

from tests.conftest import BIN, TINY_PARAMS, make_project, processes_in
from tests.integration.signals import (
    LONG,
    STOP_SECONDS,
    Run,
    lingering,
    sigterm_the_run_group,
    start_and_wait_for_training,
    write_params,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def project(tmp_path, prefect_api):
    path = make_project(tmp_path / "project", TINY_PARAMS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    return path, env


@pytest.mark.parametrize("times", [1, 2], ids=["sigterm", "sigterm-twice"])
@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_sigterm_to_the_run_group_ends_it_within_10_s_leaving_nothing(stage, times, stages_done, silent_store,
                                                                      tmp_path, prefect_api):
    # Pre-training's cases run with the run's temporary Prefect server in the group; the later stages' cases with
    # the test run's server (a temporary one costs each run a server start).
    sigterm_the_run_group(stage, times, stages_done, silent_store, tmp_path,
                          None if stage == "pretrain" else prefect_api)


def test_sigterm_to_the_run_ends_it_within_10_s_and_marks_the_flow_run_crashed(stages_done, prefect_api, tmp_path):
    """SIGTERM to `gptpipe run` alone (`kill PID`) with a Prefect server of the team's: the UI shows the run
    crashed, not running on."""
    base, env = stages_done
    path = tmp_path / "project"
    shutil.copytree(base, path, symlinks=True)
    write_params(path, LONG["finetune"][0])
    run = Run(path, {**env, "PREFECT_API_URL": prefect_api})
    try:
        _, marker, training = LONG["finetune"]
        run.wait_for(training, after=run.wait_for(re.escape(marker)))
        started = psutil.Process(run.process.pid).children(recursive=True)
        sent = time.monotonic()
        run.process.send_signal(signal.SIGTERM)
        code = run.process.wait(timeout=30)
        assert time.monotonic() - sent < STOP_SECONDS
    finally:
        if run.process.poll() is None:
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
    run.reader.join(5)
    assert code == 128 + signal.SIGTERM and "gptpipe: stopped by SIGTERM" in run.lines[-1], run.tail()
    left = lingering(run.process.pid, started, path)
    assert not left, f"left by the run: {left}"
    name = re.search(r"Flow run '([^']+)'", "\n".join(run.lines)).group(1)
    request = urllib.request.Request(f"{prefect_api}/flow_runs/filter", method="POST",
                                     data=json.dumps({"flow_runs": {"name": {"any_": [name]}}}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        (flow_run,) = json.loads(response.read())
    assert flow_run["state"]["type"] == "CRASHED", flow_run["state"]


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
