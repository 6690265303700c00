"""The DVC stages as the flow sees them: their order comes from dvc.yaml, and each runs through `dvc repro`
so that a stage whose inputs and params did not change is skipped."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import networkx as nx
from dvc.repo import Repo
from dvc.stage import PipelineStage

from components.atomic import write_bytes_atomic
from components.errors import ERROR_PREFIX, InputError
from components.params import TeamParams

PROGRESS_LOG_SECONDS = 15.0
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


class PipelineStatus:
    """Which stages are up to date, from one `dvc status` of the whole pipeline in this process: a `dvc repro` per
    stage would start DVC once per stage, most of a run with nothing to do. The answer holds until dvc.lock
    changes (a stage that ran or was restored changes what follows it; `sources` rerunning to the same result
    does not); from then on every stage goes through `dvc repro`."""

    def __init__(self, repo: Path):
        self.lock_file = repo / "dvc.lock"
        with Repo(str(repo)) as dvc_repo:  # keyed by address, `path/to/dvc.yaml:name` from another folder
            self.stale = {address.rsplit(":", 1)[-1] for address in dvc_repo.status()}
        self.lock = self._read_lock()

    def up_to_date(self, stage: str) -> bool:
        return stage not in self.stale and self._read_lock() == self.lock

    def _read_lock(self) -> bytes | None:
        return self.lock_file.read_bytes() if self.lock_file.exists() else None


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


def remote_env(team: TeamParams) -> dict[str, str]:
    """The environment of a DVC command that talks to the remote: few S3 attempts, so that a dead store fails
    the command (and the task's retry resumes it) rather than botocore retrying for minutes."""
    return {**project_env(), "AWS_MAX_ATTEMPTS": str(team.s3_max_attempts), "AWS_RETRY_MODE": "standard"}


class RemoteTimeLimit:
    """Stops a guarded DVC command whose talk to the remote outlasts `seconds`. The clock runs while DVC itself
    works (pushing, pulling, checking a stage) and stands still while a stage's own command runs, which may train
    for hours: DVC's line announcing the command stops it, its line recording the result in dvc.lock restarts it."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = False
        self._group = 0
        self._timer: threading.Timer | None = None

    def start(self, group: int) -> None:
        self._group = group
        self._restart()

    def stop(self) -> None:
        if self._timer:
            self._timer.cancel()

    def watch(self, line: str) -> None:
        if line.startswith("Running stage '"):
            self.stop()
        elif line.startswith(("Updating lock file", "Generating lock file")):
            self._restart()

    def _restart(self) -> None:
        self.stop()
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        self.expired = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._group, signal.SIGTERM)  # the guard stops the rest of its group


def run_dvc_remote_command(repo: Path, args: list[str], log: Callable[[str], None], team: TeamParams,
                           on_line: Callable[[str], None] = lambda line: None) -> None:
    """A DVC command that talks to the remote (`push`, `pull`, `repro --pull`): under the guard, with few S3
    attempts and `team.remote_timeout_s` on its talk to the remote. Failing fast lets the task's retry resume
    once the store is back (a retried transfer moves only what is missing)."""
    run_guarded(["dvc", *args], repo, log, on_line, env=remote_env(team),
                time_limit=RemoteTimeLimit(team.remote_timeout_s))


def push_outputs(repo: Path, stages: list[str], log: Callable[[str], None], team: TeamParams) -> None:
    """Send the stages' outputs and run records to the DVC remote: another worker's `dvc repro --pull` then
    restores a stage (same inputs, same code) instead of running it."""
    run_dvc_remote_command(repo, ["push", "--run-cache", *stages], log, team)


def pull_inputs(repo: Path, stage: str, log: Callable[[str], None], team: TeamParams) -> None:
    """Fetch from the DVC remote the outputs of the stages `stage` reads, as dvc.lock records them."""
    if upstream := upstream_stages(repo, stage):
        run_dvc_remote_command(repo, ["pull", *upstream], log, team)


def shared_remote_problem(checkout: Path) -> str | None:
    """Why the checkout's default DVC remote cannot carry a run's outputs to other machines and clones (there is
    none, or it is a folder inside the checkout, like the `local` remote .dvc/config ships with), or None."""
    with Repo(str(checkout)) as dvc_repo:
        name = dvc_repo.config["core"].get("remote")
        url = dvc_repo.config["remote"].get(name, {}).get("url") if name else None
    if not url:
        return "no default DVC remote"
    if "://" not in url and Path(url).resolve().is_relative_to(checkout.resolve()):
        return f"the default DVC remote `{name}` is {url}, inside this checkout, where no other machine or clone looks"
    return None


def require_shared_remote(checkout: Path, what: str) -> None:
    """Stop a run that shares its stages through the DVC remote before anything runs, when other machines would
    find nothing there (DVC would only say "missing cache" on the second machine)."""
    if problem := shared_remote_problem(checkout):
        raise InputError(f"{what}: {problem}; do step 1 of the README's team set-up (`dvc remote add -d team "
                              "s3://BUCKET/dvc`, commit and push .dvc/config), or run without push")


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
                on_line: Callable[[str], None] = lambda line: None, env: dict[str, str] | None = None,
                time_limit: RemoteTimeLimit | None = None) -> None:
    """Run `command` under flows.guard (if this process dies by any signal, the command and all it started die
    with it), streaming its output to `log`. Progress bars redraw with carriage returns: those lines are logged
    at most every few seconds. A failure with the components' error line is bad input (StageInputError)."""
    process = subprocess.Popen([sys.executable, "-m", "flows.guard", *command], cwd=repo, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True, env=env or project_env())
    if time_limit:
        time_limit.start(process.pid)
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
                if time_limit:
                    time_limit.watch(line)
                error_line = line if line.startswith(ERROR_PREFIX) else error_line
                log(line)
        code = process.wait()
    finally:
        if time_limit:
            time_limit.stop()
        # A cancelled or failed task must not leave training running (holding a GPU): stop its process group.
        if process.poll() is None:
            stop_process_group(process)
    if code != 0:
        if time_limit and time_limit.expired:
            raise RuntimeError(f"{' '.join(command)}: no answer from the DVC remote within {time_limit.seconds:g} s "
                               "(team.remote_timeout_s); check that the remote is reachable")
        if error_line:
            raise StageInputError(error_line.removeprefix(ERROR_PREFIX).strip())
        raise RuntimeError(f"{' '.join(command)} failed with exit status {code}; see the log above")


def reproduce(repo: Path, stage: str, log: Callable[[str], None], team: TeamParams, pull: bool = False,
              single: bool = False) -> bool:
    """`dvc repro STAGE` (with `pull`, fetching missing inputs and cached runs from the DVC remote first, within
    `team`'s limits; with `single`, checking that stage alone, its inputs being in place already), streaming its
    output to `log`; returns whether the stage's command ran (not when DVC restored it from a cached run)."""
    ran = []

    def note(line: str) -> None:
        if line.startswith(f"Running stage '{stage}'"):
            ran.append(stage)

    args = ["repro", *(["--pull"] if pull else []), *(["--single-item"] if single else []), stage]
    if pull:
        run_dvc_remote_command(repo, args, log, team, note)
    else:
        run_guarded(["dvc", *args], repo, log, note)
    return bool(ran)


def restore_workspace(repo: Path, params_file: bytes | None, log: Callable[[str], None]) -> None:
    """Put back params.yaml as it was before the run and the outputs dvc.lock records (from the DVC cache)."""
    if params_file is not None:
        write_bytes_atomic(repo / "params.yaml", params_file)
    done = subprocess.run(["dvc", "checkout", "--force"], cwd=repo, env=project_env(), capture_output=True, text=True)
    log("restored params.yaml and the last good outputs" if done.returncode == 0 else
        f"could not restore the last outputs (dvc checkout: {done.stderr.strip()[-300:]})")
