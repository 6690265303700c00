"""A workspace of its own per flow run: a git worktree of the checkout under `.gptpipe/runs/<key>`.

Two runs in one DVC workspace would fight over its lock, params.yaml and outputs. Each isolated run works in a
worktree of the checkout's HEAD instead, and shares with the checkout what is safe to share: the DVC cache
(content-addressed, written by rename, so concurrent writers cannot corrupt it; its run-cache restores a stage
another run already computed), local DVC remotes, and the data and registry that relative paths in params name.
"""

import subprocess
from pathlib import Path

from dvc.repo import Repo

from components.params import Params

RUNS_DIR = Path(".gptpipe/runs")


def _git(*args: str, cwd: Path) -> None:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed in {cwd}: {done.stderr.strip()}")


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


def open_workspace(checkout: Path, key: str) -> Path:
    """The run's worktree, created at the checkout's HEAD on first use; a retried or child run with the same
    key reuses it, and with it the stages' outputs and training checkpoints."""
    path = checkout / RUNS_DIR / key
    if (path / ".git").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _git("worktree", "add", "--detach", str(path), "HEAD", cwd=checkout)
    with Repo(str(checkout)) as repo:
        cache_dir, remotes = repo.cache.local_cache_dir, repo.config["remote"]
    with Repo(str(path)) as repo, repo.config.edit("local") as local:
        local.setdefault("cache", {})["dir"] = cache_dir
        for name, remote in remotes.items():
            if "://" not in remote["url"]:  # a local folder, resolved by DVC to an absolute path
                local.setdefault("remote", {}).setdefault(name, {})["url"] = remote["url"]
    return path


def enter_workspace(checkout: Path, key: str | None, params: Params) -> tuple[Path, Params]:
    """Where a run works and the params it runs with: the checkout and `params` as given, or with a `key` the
    run's worktree and `params` anchored to the checkout."""
    if key is None:
        return checkout, params
    return open_workspace(checkout, key), anchored(params, checkout)


def close_workspace(checkout: Path, path: Path) -> None:
    """Remove a finished run's worktree: its outputs stay in the shared DVC cache and the registry."""
    _git("worktree", "remove", "--force", str(path), cwd=checkout)
