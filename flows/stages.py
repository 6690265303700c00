"""The DVC stages as the flow sees them: their order comes from dvc.yaml, and each runs through `dvc repro`
so that a stage whose inputs and params did not change is skipped."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from dvc.stage import PipelineStage

from components.atomic import write_bytes_atomic
from components.errors import ERROR_PREFIX

PROGRESS_LOG_SECONDS = 15.0
TRANSFER_TIMEOUT_SECONDS = 300.0
STOP_GRACE_SECONDS = 20.0


class StageInputError(Exception):
    """A stage rejected its input (exit status 2); retrying cannot help."""


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Prefect retry condition: retry a crash or a transient failure, never input a retry cannot fix."""
    try:
        state.result()
    except StageInputError:
        return False
    except Exception:
        return True
    return False


def stage_order(repo: Path) -> list[tuple[str, bool]]:
    """Pipeline stages of dvc.yaml, each after the stages it depends on, with whether it runs every time
    (`always_changed`: it only looks at the data; what follows reruns only if its output changed)."""
    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph  # edge: stage -> a stage it depends on
        stages = [s for s in reversed(list(nx.topological_sort(graph))) if isinstance(s, PipelineStage)]
        return [(stage.name, stage.always_changed) for stage in stages]


def project_env() -> dict[str, str]:
    """The running interpreter's bin folder first on PATH, so `dvc` and the stages' `python` are the project's."""
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]), "PYTHONUNBUFFERED": "1"}


def upstream_stages(repo: Path, stage: str) -> list[str]:
    """The pipeline stages whose outputs `stage` reads."""
    with Repo(str(repo)) as dvc_repo:
        graph = dvc_repo.index.graph
        (node,) = [s for s in graph if isinstance(s, PipelineStage) and s.name == stage]
        return sorted(s.name for s in graph.successors(node) if isinstance(s, PipelineStage))


def dvc_transfer(repo: Path, args: list[str], log: Callable[[str], None],
                 timeout: float = TRANSFER_TIMEOUT_SECONDS) -> None:
    """`dvc push|pull ...` with a hard timeout and few S3 retries: DVC's defaults hang for minutes on a dead store,
    while failing fast lets the task's retry resume once the store is back (a retried transfer moves only what is
    missing)."""
    env = {**project_env(), "AWS_MAX_ATTEMPTS": os.environ.get("AWS_MAX_ATTEMPTS", "2")}
    command = " ".join(["dvc", *args])
    try:
        done = subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=timeout,
                              start_new_session=True)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{command} did not finish within {timeout:.0f}s; is the DVC remote reachable?") from None
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            log(line)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed with exit status {done.returncode}; see the log above")


def push_outputs(repo: Path, stages: list[str], log: Callable[[str], None],
                 timeout: float = TRANSFER_TIMEOUT_SECONDS) -> None:
    """Send the stages' outputs and run records to the DVC remote: another worker's `dvc repro --pull` then
    restores a stage (same inputs, same code) instead of running it."""
    dvc_transfer(repo, ["push", "--run-cache", *stages], log, timeout)


def pull_inputs(repo: Path, stage: str, log: Callable[[str], None]) -> None:
    """Fetch from the DVC remote the outputs of the stages `stage` reads, as dvc.lock records them."""
    if upstream := upstream_stages(repo, stage):
        dvc_transfer(repo, ["pull", *upstream], log)


def has_remote(repo: Path) -> bool:
    with Repo(str(repo)) as dvc_repo:
        return bool(dvc_repo.config["core"].get("remote"))


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM to the group (training saves nothing half-done and exits), SIGKILL to what is left after a grace."""
    os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=STOP_GRACE_SECONDS)
    with contextlib.suppress(ProcessLookupError):  # raised once no process of the group is left
        while time.monotonic() < deadline:
            os.killpg(process.pid, 0)
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_guarded(command: list[str], repo: Path, log: Callable[[str], None],
                on_line: Callable[[str], None] = lambda line: None) -> None:
    """Run `command` under flows.guard (if this process dies by any signal, the command and all it started die
    with it), streaming its output to `log`. Progress bars redraw with carriage returns: those lines are logged
    at most every few seconds. A failure with the components' error line is bad input (StageInputError)."""
    process = subprocess.Popen([sys.executable, "-m", "flows.guard", *command], cwd=repo, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, env=project_env())
    error_line, last_progress, pending = None, 0.0, b""
    try:
        for chunk in iter(lambda: process.stdout.read1(65536), b""):
            pending += chunk
            *parts, pending = re.split(rb"(\r|\n)", pending)
            for text, end in zip(parts[0::2], parts[1::2], strict=True):
                line = text.decode(errors="replace").rstrip()
                if not line:
                    continue
                if end == b"\r":
                    if time.monotonic() - last_progress < PROGRESS_LOG_SECONDS:
                        continue
                    last_progress = time.monotonic()
                on_line(line)
                error_line = line if line.startswith(ERROR_PREFIX) else error_line
                log(line)
        code = process.wait()
    finally:
        # A cancelled or failed task must not leave training running (holding a GPU): stop its process group.
        if process.poll() is None:
            stop_process_group(process)
    if code != 0:
        if error_line:
            raise StageInputError(error_line.removeprefix(ERROR_PREFIX).strip())
        raise RuntimeError(f"{' '.join(command[:3])} failed with exit status {code}; see the log above")


def reproduce(repo: Path, stage: str, log: Callable[[str], None], pull: bool = False, single: bool = False) -> bool:
    """`dvc repro STAGE` (with `pull`, fetching missing inputs and cached runs from the DVC remote first; with
    `single`, checking that stage alone, its inputs being in place already), streaming its output to `log`;
    returns whether the stage's command ran (not when DVC restored it from a cached run)."""
    ran = []

    def note(line: str) -> None:
        if line.startswith(f"Running stage '{stage}'"):
            ran.append(stage)

    run_guarded(["dvc", "repro", *(["--pull"] if pull else []), *(["--single-item"] if single else []), stage],
                repo, log, note)
    return bool(ran)


def restore_workspace(repo: Path, params_file: bytes | None, log: Callable[[str], None]) -> None:
    """Put back params.yaml as it was before the run and the outputs dvc.lock records (from the DVC cache)."""
    if params_file is not None:
        write_bytes_atomic(repo / "params.yaml", params_file)
    done = subprocess.run(["dvc", "checkout", "--force"], cwd=repo, env=project_env(), capture_output=True, text=True)
    log("restored params.yaml and the last good outputs" if done.returncode == 0 else
        f"could not restore the last outputs (dvc checkout: {done.stderr.strip()[-300:]})")
