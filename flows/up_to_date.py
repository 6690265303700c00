"""A local `gptpipe run` with nothing to do, found without starting Prefect: its temporary server alone takes
longer to answer than `dvc repro` takes to find that nothing changed. What a run would do is checked the same
way the flow checks it; when anything would run or be registered, the flow runs."""

from pathlib import Path

from components.params import PARAMS_FILE, Params, read_raw
from components.register import registered_unchanged
from flows.params_file import changed_leaves
from flows.stages import PipelineStatus, reproduce, stage_order


def registered_without_changes(repo: Path, params: Params) -> dict | None:
    """The registered version the run would end with, when it would change nothing: params.yaml holds the run's
    params already, the stages that look at the data every run (sources) find it as before, every other stage is
    up to date, and the registry's newest version holds this classifier with its promotion decision."""
    if not (repo / "dvc.lock").exists() or changed_leaves(read_raw(repo / PARAMS_FILE), params.model_dump(mode="json")):
        return None
    watchers = [name for name, always_changed in stage_order(repo) if always_changed]
    for name in watchers:
        reproduce(repo, name, print, params.team, single=True)
    if PipelineStatus(repo).stale - set(watchers):
        return None
    return registered_unchanged(params, repo)
