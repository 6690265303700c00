"""A workspace of its own per flow run: a git worktree of the checkout under `.gptpipe/runs/<key>`.

Two runs in one DVC workspace would fight over its lock, params.yaml and outputs. Each isolated run works in a
worktree of one commit instead (the checkout's HEAD where the run starts; on another machine that same commit,
fetched from the git remotes when that checkout lacks it), and shares with the checkout what is safe to share:
the DVC cache (content-addressed, written by rename, so concurrent writers cannot corrupt it; its run-cache
restores a stage another run already computed), local DVC remotes, and the data and registry that relative
paths in params name.
"""

import os
import subprocess
from pathlib import Path

from dvc.repo import Repo

from components.params import Params

RUNS_DIR = Path(".gptpipe/runs")


def enter_checkout() -> dict:
    """The deployments' pull step: a run works in the clone of the worker that took it (`GPTPIPE_CHECKOUT`, else
    the worker's folder), read on that machine when the run starts. prefect.yaml's `{{ $VAR }}` would be filled
    in once, at deploy time, with the deploying machine's path."""
    directory = os.environ.get("GPTPIPE_CHECKOUT") or os.getcwd()
    os.chdir(directory)
    return {"directory": directory}


def _git(*args: str, cwd: Path) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")
    return done.stdout.strip()


def head_commit(checkout: Path) -> str:
    return _git("rev-parse", "HEAD", cwd=checkout)


def _has_commit(checkout: Path, commit: str) -> bool:
    return subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=checkout,
                          capture_output=True).returncode == 0


def ensure_commit(checkout: Path, commit: str) -> None:
    """Make `commit` available in the checkout: a worker whose checkout lags behind fetches it from its remotes."""
    if _has_commit(checkout, commit):
        return
    _git("fetch", "--quiet", "--all", cwd=checkout)
    if not _has_commit(checkout, commit):
        raise RuntimeError(f"commit {commit} is neither in {checkout} nor on its git remotes: push it "
                           "(`git push`) before starting the run, so every worker can check it out")


def _is_local(path: str) -> bool:
    return not path.startswith(("s3://", "builtin:"))


def anchored(params: Params, checkout: Path) -> Params:
    """`params` with relative local paths (data, registry) made absolute against the checkout, so a run in a
    worktree reads the checkout's data (tracked or not) and registers into the checkout's registry."""

    def anchor(path: str | None) -> str | None:
        return str(checkout / path) if path and _is_local(path) and not Path(path).is_absolute() else path

    data = params.data
    return params.model_copy(update={
        "data": data.model_copy(update={
            "labeled": data.labeled.model_copy(update={"path": anchor(data.labeled.path)}),
            "test": data.test.model_copy(update={"path": anchor(data.test.path)}),
            "unlabeled": data.unlabeled.model_copy(update={"paths": [anchor(p) for p in data.unlabeled.paths]}),
        }),
        "registry": params.registry.model_copy(update={"uri": anchor(params.registry.uri)}),
    })


def open_workspace(checkout: Path, key: str, commit: str | None = None) -> Path:
    """The run's worktree, created at `commit` (default: the checkout's HEAD) on first use; a retried or child
    run with the same key reuses it, and with it the stages' outputs and training checkpoints."""
    path = checkout / RUNS_DIR / key
    if (path / ".git").exists():
        return path
    if commit:
        ensure_commit(checkout, commit)
    path.parent.mkdir(parents=True, exist_ok=True)
    _git("worktree", "add", "--detach", str(path), commit or "HEAD", cwd=checkout)
    with Repo(str(checkout)) as repo:
        cache_dir, remotes = repo.cache.local_cache_dir, repo.config["remote"]
    with Repo(str(path)) as repo, repo.config.edit("local") as local:
        local.setdefault("cache", {})["dir"] = cache_dir
        for name, remote in remotes.items():
            if "://" not in remote["url"]:  # a local folder, resolved by DVC to an absolute path
                local.setdefault("remote", {}).setdefault(name, {})["url"] = remote["url"]
    return path


def enter_workspace(checkout: Path, key: str | None, params: Params,
                    commit: str | None = None) -> tuple[Path, Params]:
    """Where a run works and the params it runs with: the checkout and `params` as given, or with a `key` the
    run's worktree (at `commit`) and `params` anchored to the checkout."""
    if key is None:
        return checkout, params
    return open_workspace(checkout, key, commit), anchored(params, checkout)


def close_workspace(checkout: Path, path: Path) -> None:
    """Remove a finished run's worktree: its outputs stay in the shared DVC cache and the registry."""
    _git("worktree", "remove", "--force", str(path), cwd=checkout)
