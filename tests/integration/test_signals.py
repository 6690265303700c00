"""A run stopped by a signal leaves nothing running: SIGTERM, once or twice in a row, ends `gptpipe run` within
10 s during each training stage and during registration, with no process it started left running or defunct and
params.yaml and the finished stages' outputs as they were; kill -9 of the run's whole process group leaves no
stage behind, and the rerun right after works."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import BIN, TINY_PARAMS, SilentStore, make_project, processes_in

pytestmark = pytest.mark.integration
LONG_PRETRAIN = ["--set", "pretrain.max_steps=100000", "--set", "pretrain.checkpoint_every_n_steps=20"]
STOP_SECONDS = 10  # the README's promise: SIGTERM ends `gptpipe run` within seconds
REGISTRY = "s3://gptpipe-signals/registry"  # answered by a store that never replies: registration hangs there
STAGES = ["sources", "ingest", "tokenize", "pretrain", "finetune", "evaluate"]  # dvc.yaml order
# Per stage: params that keep it busy for minutes (the finished stages before it stay up to date), the output line
# of that stage, and then the line of its training (Lightning's progress bar); registration talks to the store.
LONG = {
    "pretrain": ({"pretrain": {"max_steps": 100000, "checkpoint_every_n_steps": 20}}, "Running stage 'pretrain'",
                 r"Epoch \d+"),
    "finetune": ({"finetune": {"epochs": 100000}}, "Running stage 'finetune'", r"Epoch 1\b"),  # its second epoch
    # the largest budget first: its fine-tune lasts seconds, the bar's first line is its start
    "evaluate": ({"evaluate": {"label_budgets": list(range(40, 0, -1))}}, "evaluate: fine-tuning the pretrained model",
                 r"Training: "),
    "register": ({}, None, None),
}


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


@pytest.fixture(scope="module")
def silent_store():
    store = SilentStore()
    yield store
    store.close()


@pytest.fixture(scope="module")
def stages_done(tmp_path_factory, silent_store) -> tuple[Path, dict]:
    """A project whose stages have all run (tiny params, the registry on the silent store), and the environment
    of a run in it: no PREFECT_API_URL, so each run starts a temporary Prefect server, in the run's process group
    as `gptpipe run` starts it; one Prefect home for the module, so only the first run migrates its database."""
    params = {**copy.deepcopy(TINY_PARAMS), "registry": {"uri": REGISTRY}}
    path = make_project(tmp_path_factory.mktemp("signals") / "project", params)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path_factory.mktemp("home")),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "AWS_ENDPOINT_URL": silent_store.url,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    done = subprocess.run(["dvc", "repro"], cwd=path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not silent_store.contacted.is_set(), "a stage used the registry"
    return path, env


def merged(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def write_params(project: Path, override: dict) -> None:
    """The project's params.yaml with `override`'s values (it names every key already, in its own schema)."""
    params = merged(yaml.safe_load((project / "params.yaml").read_text()), override)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


class Run:
    """`gptpipe run` in a session of its own, its output lines collected; `wait_for` returns once a line matches."""

    def __init__(self, project: Path, env: dict):
        self.process = subprocess.Popen([str(BIN / "gptpipe"), "run"], cwd=project, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.changed = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.rstrip())
                self.changed.notify_all()

    def wait_for(self, pattern: re.Pattern | str, after: int = 0, timeout: float = 600) -> int:
        """Index of the first line from `after` on that matches `pattern`."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for index in range(after, len(self.lines)):
                    if re.search(pattern, self.lines[index]):
                        return index
                after = len(self.lines)
                assert self.process.poll() is None, f"the run ended before {pattern!r}:\n" + self.tail()
                assert time.monotonic() < deadline, f"no {pattern!r} within {timeout} s:\n" + self.tail()
                self.changed.wait(1)

    def tail(self, count: int = 40) -> str:
        return "\n".join(self.lines[-count:])


def describe(processes: list[psutil.Process]) -> list[str]:
    described = []
    for process in processes:
        try:
            described.append(f"{process.pid} {process.status()} {' '.join(process.cmdline()[:4]) or process.name()}")
        except psutil.ZombieProcess:
            described.append(f"{process.pid} zombie {process.name()}")
        except psutil.NoSuchProcess:
            continue
    return described


def lingering(run_pid: int, started: list[psutil.Process], project: Path) -> list[str]:
    """What the run left, checked as it has just ended: any process it had started still running, and any process
    working in the project; then, after a grace for init to reap what ended as an orphan, any of them left as a
    zombie, and any process still in the run's process group or session or whose parent it was."""
    def running(process: psutil.Process) -> bool:
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    left = {process.pid: process for process in [*started, *processes_in(project)] if running(process)}
    if left:
        return describe(list(left.values()))
    _, left = psutil.wait_procs(started, timeout=5)
    for process in psutil.process_iter():
        try:
            if process.ppid() == run_pid or os.getpgid(process.pid) == run_pid or os.getsid(process.pid) == run_pid:
                left.append(process)
        except (psutil.Error, ProcessLookupError):
            continue
    return describe(left)


@pytest.mark.parametrize("times", [1, 2], ids=["sigterm", "sigterm-twice"])
@pytest.mark.parametrize("stage", list(LONG))
def test_sigterm_to_the_run_group_ends_it_within_10_s_leaving_nothing(stage, times, stages_done, silent_store,
                                                                      tmp_path):
    """SIGTERM to the run's process group, as a Prefect process worker cancels a run: its temporary Prefect server
    gets it too."""
    base, env = stages_done
    path = tmp_path / "project"
    shutil.copytree(base, path, symlinks=True)
    params, marker, training = LONG[stage]
    write_params(path, params)
    params_before, lock_before = (path / "params.yaml").read_bytes(), (path / "dvc.lock").read_bytes()
    silent_store.contacted.clear()
    run = Run(path, env)
    try:
        if stage == "register":
            while not silent_store.contacted.wait(1):
                assert run.process.poll() is None, "the run ended before registration:\n" + run.tail()
            time.sleep(1)
        else:
            run.wait_for(training, after=run.wait_for(re.escape(marker)))
        started = psutil.Process(run.process.pid).children(recursive=True)
        sent = time.monotonic()
        os.killpg(run.process.pid, signal.SIGTERM)
        if times == 2:
            time.sleep(1.5)
            os.killpg(run.process.pid, signal.SIGTERM)  # the run, or its zombie until reaped, is still in the group
        try:
            code = run.process.wait(timeout=STOP_SECONDS - (time.monotonic() - sent))
        except subprocess.TimeoutExpired:
            pytest.fail(f"`gptpipe run` still running {STOP_SECONDS} s after SIGTERM:\n" + run.tail())
        run.reader.join(5)
        assert code == 128 + signal.SIGTERM and "gptpipe: stopped by SIGTERM" in run.lines[-1], run.tail()
        left = lingering(run.process.pid, started, path)
        assert not left, f"left by the run: {left}"
    finally:
        if run.process.poll() is None:
            for process in psutil.Process(run.process.pid).children(recursive=True):
                process.kill()
            os.killpg(run.process.pid, signal.SIGKILL)
            run.process.wait()
    assert (path / "params.yaml").read_bytes() == params_before
    assert (path / "dvc.lock").read_bytes() == lock_before
    finished = STAGES if stage == "register" else STAGES[:STAGES.index(stage)]
    lock = yaml.safe_load(lock_before)["stages"]
    for name in finished:
        for out in lock[name].get("outs", []):
            assert (path / out["path"]).exists(), f"{out['path']} of the finished stage {name} is gone"


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
