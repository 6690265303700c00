"""Team runs fail fast and clean: a run that shares its stages through the DVC remote stops before anything runs
when no other machine could reach that remote; every DVC command that talks to the remote runs under the guard and
stops within team.remote_timeout_s (never counting a stage's own command); a stage handed to a work pool with no
worker online fails after team.worker_timeout_s, naming the pool."""

import contextvars
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid

import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled

from components.errors import InputError
from components.params import Params, TeamParams
from flows.stages import pull_inputs, push_outputs, reproduce, shared_remote_problem
from tests.conftest import BIN, TINY_PARAMS, SilentStore, gptpipe, make_project, processes_in

pytestmark = pytest.mark.integration
SET_UP_STEP = "do step 1 of the README's team set-up"
# DVC takes up to about 12 s to start and reach the store on a loaded 2-core machine: the limit covers that.
LIMIT = 20.0
STOP_SLACK = 5.0  # past the limit: stopping the command's process group


def dvc(*args: str, cwd) -> None:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def test_only_a_default_remote_outside_the_checkout_is_shared(tmp_path):
    project = make_project(tmp_path / "project", TINY_PARAMS)
    assert "inside this checkout" in shared_remote_problem(project)  # the `local` remote .dvc/config ships with
    dvc("remote", "add", "-d", "nfs", str(tmp_path / "team-store"), cwd=project)
    assert shared_remote_problem(project) is None
    dvc("remote", "add", "-d", "team", "s3://bucket/dvc", cwd=project)
    assert shared_remote_problem(project) is None
    dvc("remote", "default", "--unset", cwd=project)
    assert shared_remote_problem(project) == "no default DVC remote"


def test_run_with_push_and_no_shared_remote_stops_at_once_naming_the_set_up_step(tmp_path):
    project = make_project(tmp_path / "project", TINY_PARAMS)
    started = time.monotonic()
    result = gptpipe("run", "--push", cwd=project, timeout=120)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert time.monotonic() - started < 30
    (line,) = result.stderr.strip().splitlines()
    assert SET_UP_STEP in line and "`local`" in line, line
    assert not (project / "dvc.lock").exists() and not (project / "data").exists()


def test_team_deployment_run_without_shared_remote_fails_before_any_stage(tmp_path, prefect_api):
    """What retrain/default does (push, training stages on stage/gpu, a worktree of its own), on a clone that
    skipped step 1: the flow fails at its start, before a worktree or any stage."""
    from flows.retrain import retrain

    project = make_project(tmp_path / "project", TINY_PARAMS)
    started = time.monotonic()
    with temporary_settings({PREFECT_API_URL: prefect_api}), pytest.raises(InputError, match=SET_UP_STEP):
        retrain(params=Params.model_validate(TINY_PARAMS), repo=str(project), push=True,
                training_deployment="stage/gpu", isolate=True)
    assert time.monotonic() - started < 30
    assert not (project / ".gptpipe").exists() and not (project / "dvc.lock").exists()


@pytest.fixture(scope="module")
def tokenized_once(tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("tokenized") / "project", TINY_PARAMS)
    for stage in ("ingest", "tokenize"):
        dvc("repro", stage, cwd=project)
    return project


@pytest.fixture
def hanging_remote(tokenized_once, tmp_path, monkeypatch):
    """A copy of a tokenized project with its default DVC remote on an S3 endpoint that accepts connections and
    never answers."""
    project = shutil.copytree(tokenized_once, tmp_path / "project", symlinks=True)
    store = SilentStore()
    dvc("remote", "add", "-d", "team", "s3://team/dvc", cwd=project)
    for key, value in {"AWS_ENDPOINT_URL": store.url, "AWS_ACCESS_KEY_ID": "testing",
                       "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(key, value)
    yield project, store
    store.close()


def pull_with_empty_cache(project, log, team):
    shutil.rmtree(project / ".dvc/cache")  # so that the pull has something to fetch
    pull_inputs(project, "pretrain", log, team)


REMOTE_COMMANDS = {
    "dvc push --run-cache tokenize": lambda project, log, team: push_outputs(project, ["tokenize"], log, team),
    "dvc pull": pull_with_empty_cache,
    "dvc repro --pull --single-item tokenize":
        lambda project, log, team: reproduce(project, "tokenize", log, team, pull=True, single=True),
}


@pytest.mark.parametrize("command", list(REMOTE_COMMANDS))
def test_dvc_command_on_a_hanging_remote_stops_within_the_limit_with_one_line(command, hanging_remote):
    project, store = hanging_remote
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        REMOTE_COMMANDS[command](project, print, TeamParams(remote_timeout_s=LIMIT))
    elapsed = time.monotonic() - started
    assert store.contacted.is_set(), "the command failed before it talked to the remote"
    assert LIMIT <= elapsed < LIMIT + STOP_SLACK, elapsed
    message = str(error.value)
    assert message.startswith(command) and "team.remote_timeout_s" in message and "\n" not in message, message
    assert not processes_in(project), "the DVC command outlived its time limit"


def test_the_time_limit_leaves_a_stage_s_own_command_alone(tmp_path, bucket):
    """`dvc repro --pull` of a stage whose command runs longer than the limit: the limit is on DVC's talk to the
    remote (a real S3 API server here), the command finishes."""
    project = make_project(tmp_path / "project", TINY_PARAMS)
    dvc("remote", "add", "-d", "team", f"s3://{bucket}/dvc", cwd=project)
    (project / "slow.py").write_text(f"import time\ntime.sleep({LIMIT + 3})\n")
    pipeline = yaml.safe_load((project / "dvc.yaml").read_text())
    pipeline["stages"]["slow"] = {"cmd": "python slow.py && echo done > slow.txt", "deps": ["slow.py"],
                                  "outs": [{"slow.txt": {"cache": False}}]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(pipeline))
    started = time.monotonic()
    assert reproduce(project, "slow", print, TeamParams(remote_timeout_s=LIMIT), pull=True, single=True)
    assert time.monotonic() - started > LIMIT + 3
    assert (project / "slow.txt").read_text().strip() == "done"


PUSH_UNTIL_KILLED = ("from pathlib import Path; from components.params import TeamParams; from flows.stages "
                     "import push_outputs; push_outputs(Path('.'), ['tokenize'], print, TeamParams())")


def test_kill_9_of_a_pushing_process_ends_the_push_and_frees_dvc_s_lock(hanging_remote):
    project, store = hanging_remote
    parent = subprocess.Popen([sys.executable, "-c", PUSH_UNTIL_KILLED], cwd=project, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = []
    try:
        while not store.contacted.wait(0.5):  # `dvc push` holds the lock while it talks to the store
            assert parent.poll() is None, "the push ended before it reached the store"
        started = psutil.Process(parent.pid).children(recursive=True)
        assert any("push" in process.cmdline() for process in started)
    finally:
        os.kill(parent.pid, signal.SIGKILL)  # the parent alone, as the OOM killer would
        parent.wait()
    _, alive = psutil.wait_procs(started, timeout=30)
    assert not alive, f"outlived the killed parent: {[process.cmdline() for process in alive]}"
    checkout = subprocess.run([str(BIN / "dvc"), "checkout", "tokenize"], cwd=project, capture_output=True, text=True)
    assert checkout.returncode == 0 and "Unable to acquire lock" not in checkout.stderr, checkout.stderr


@pytest.fixture
def idle_pool(prefect_api, tmp_path):
    """A process work pool with a deployment of the `stage` flow on it and no worker, and a project to hand a
    stage from."""
    pool = f"gpu-{uuid.uuid4().hex[:8]}"
    with temporary_settings({PREFECT_API_URL: prefect_api}), get_client(sync_client=True) as client:
        client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
        client.create_deployment(flow_id=client.create_flow_from_name("stage"), name=pool, work_pool_name=pool,
                                 entrypoint="flows/retrain.py:stage")
        yield pool, client, make_project(tmp_path / "project", TINY_PARAMS)


def hand_over(pool: str, project, timeout_s: float) -> None:
    from flows.retrain import run_training_stage

    params = Params.model_validate({**TINY_PARAMS, "team": {"worker_timeout_s": timeout_s}})
    run_training_stage(f"stage/{pool}", "pretrain", project, push=False, params=params, workspace=None)


def stage_runs(client, pool: str) -> list:
    return client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[pool])))


def test_a_stage_handed_to_a_pool_without_worker_fails_naming_the_pool(idle_pool):
    pool, client, project = idle_pool
    started = time.monotonic()
    with pytest.raises(RuntimeError) as error:
        hand_over(pool, project, timeout_s=1)
    assert time.monotonic() - started < 15
    message = str(error.value)
    assert f"work pool `{pool}` had no worker online" in message and f"--pool {pool}" in message, message
    assert "team.worker_timeout_s" in message and "\n" not in message
    (child,) = stage_runs(client, pool)
    assert child.state.is_cancelled(), "a worker started later would take the stale stage run"


def test_a_stage_queued_on_a_pool_with_a_worker_online_waits(idle_pool):
    """A busy worker is no reason to fail: the stage queues until the worker takes it (here: until cancelled)."""
    pool, client, project = idle_pool
    client.send_worker_heartbeat(work_pool_name=pool, worker_name="busy")
    failure = []
    # In a copy of this context, which holds the test's Prefect settings.
    waiting = threading.Thread(target=contextvars.copy_context().run,
                               args=(lambda: failure.append(pytest.raises(RuntimeError, hand_over, pool, project, 1)),))
    waiting.start()
    waiting.join(6)  # several times the timeout, polls included
    assert waiting.is_alive(), "gave up on a pool with a worker online"
    (child,) = stage_runs(client, pool)
    client.set_flow_run_state(child.id, Cancelled(), force=True)
    waiting.join(15)
    assert "CANCELLED" in str(failure[0].value)
