"""What the signal tests share: a project whose stages have all run, a store that never answers, a run whose
output lines can be awaited, and the check that a run left no process behind. The SIGTERM cases are split
over two modules so that parallel test processes share them."""

import copy
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import BIN, processes_in

LONG_PRETRAIN = ["--set", "pretrain.max_steps=100000", "--set", "pretrain.checkpoint_every_n_steps=20"]
STOP_SECONDS = 10  # the README's promise: SIGTERM ends `gptpipe run` within seconds
REGISTRY = "s3://gptpipe-signals/registry"  # answered by a store that never replies: registration hangs there
STAGES = ["sources", "ingest", "tokenize", "pretrain", "finetune", "evaluate"]  # dvc.yaml order
# Per stage: params that keep it busy for minutes (the finished stages before it stay up to date), the output line
# of that stage, and then the line of its training (Lightning's progress bar). With every stage done, the run's
# quick check asks the store whether this classifier is registered already, and waits there.
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


def sigterm_the_run_group(stage: str, times: int, stages_done, silent_store, tmp_path,
                          prefect_api: str | None = None) -> None:
    """SIGTERM to the run's process group, as a Prefect process worker cancels a run. Without `prefect_api` the run
    starts its temporary Prefect server, which is in the group and gets the signal too."""
    base, env = stages_done
    if prefect_api:
        env = {**env, "PREFECT_API_URL": prefect_api}
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
                assert run.process.poll() is None, "the run ended before asking the registry:\n" + run.tail()
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


