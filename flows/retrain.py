"""The `retrain` flow: every DVC stage in dvc.yaml order, then registration of the classifier.

    gptpipe run [--set section.key=value ...]           # in this checkout
    prefect deploy --all --prefect-file infra/prefect.yaml  # retrain/default, retrain/nightly, retrain/on-new-data
"""

import base64
import json
import socket
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.context import FlowRunContext
from prefect.deployments import run_deployment
from prefect.runtime import flow_run
from prefect.states import Cancelling

from components import layout
from components.atomic import write_bytes_atomic
from components.model_card import delivered_rows
from components.params import PARAMS_FILE, Params, TeamParams, load_params
from components.register import register
from flows.params_file import write_params
from flows.stages import (
    PipelineStatus,
    StageInputError,
    pull_inputs,
    push_outputs,
    reproduce,
    require_shared_remote,
    restore_workspace,
    retry_unless_bad_input,
    stage_order,
)
from flows.team import wait_for_handed_run
from flows.workspace import close_workspace, enter_workspace, head_commit

# Tagged so that a tag concurrency limit (`prefect concurrency-limit create training 1`) queues them per machine.
TRAINING_STAGES = {"pretrain", "finetune"}


@task(task_run_name="{stage}", retries=1, retry_condition_fn=retry_unless_bad_input)
def run_stage(repo: Path, stage: str, team: TeamParams, pull: bool = False, single: bool = False,
              up_to_date: bool = False) -> bool:
    """Reproduce one stage, unless the run's status check found it up to date; a retry after a crash resumes
    training from its last checkpoint."""
    logger = get_run_logger()
    ran = not up_to_date and reproduce(repo, stage, logger.info, team, pull=pull, single=single)
    logger.info(f"stage {stage}: {'ran' if ran else 'up to date, skipped'}")
    return ran


@task(task_run_name="pull-inputs-{stage}", retries=2, retry_delay_seconds=10)
def pull_stage_inputs(repo: Path, stage: str, team: TeamParams) -> None:
    pull_inputs(repo, stage, get_run_logger().info, team)


@task(task_run_name="push-{stages}", retries=2, retry_delay_seconds=10)
def push_stages(repo: Path, stages: list[str], team: TeamParams) -> None:
    """Send the stages' outputs to the DVC remote, so another worker pulls instead of recomputing them."""
    push_outputs(repo, stages, get_run_logger().info, team)


@task(retries=2, retry_delay_seconds=5)
def register_model(params: Params, repo: Path, stages: dict) -> dict:
    """Register with the lineage of this flow run and, per stage, whether it ran, on which commit and worker."""
    run = {"id": str(flow_run.id), "name": flow_run.name, "url": flow_run.ui_url} if flow_run.id else {}
    return register(params, repo, {**run, "stages": stages})


def _headline(result: dict) -> dict:
    return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4)}


# Inlined as data URLs: they show in the UI without a file store the browser could reach.
PLOT_ARTIFACTS = {
    "confusion-matrix": (layout.CONFUSION_PLOT, "Test confusion matrix of the delivered classifier"),
    "label-efficiency-curve": (layout.LABEL_EFFICIENCY_PLOT, "Test macro-F1 by labels per class"),
    "text-lengths": (layout.LENGTHS_PLOT, "Text lengths of the prepared splits"),
    "training-curves": (layout.CURVES_PLOT, "Loss, validation scores, gradient norm and learning rate of "
                                            "pre-training and fine-tuning, by optimizer step"),
}


def publish_artifacts(repo: Path, metrics: dict, registered: dict) -> None:
    rows = [{"model": name, **_headline(result)} for name, result in delivered_rows(metrics)]
    rows += [{"model": name, **_headline(result["test"])} for name, result in metrics["baselines"].items()]
    create_table_artifact(key="test-metrics", table=rows, description="Test accuracy and macro-F1, same split")
    curve = json.loads((repo / layout.LABEL_EFFICIENCY).read_text())
    create_table_artifact(key="label-efficiency", description="Test macro-F1 by labels per class (null: all)",
                          table=[{"labels_per_class": row["labels_per_class"],
                                  **{name: round(row[name]["macro_f1"], 4) for name in ("pretrained", "scratch")}}
                                 for row in curve])
    for key, (path, description) in PLOT_ARTIFACTS.items():
        png = base64.b64encode((repo / path).read_bytes()).decode()
        create_image_artifact(image_url=f"data:image/png;base64,{png}", key=key, description=description)
    create_markdown_artifact(key="model-card", markdown=(repo / layout.MODEL_CARD).read_text())
    split = registered["test_split"]
    create_markdown_artifact(
        key="registered-model",
        markdown=(f"**{registered['name']}:{registered['version']}** in `{registered['uri']}` is "
                  f"`{registered['alias']}` ({registered['reason']}).\n\n"
                  f"Test split: {split['texts']} texts, sha256 `{split['sha256']}`.\n\n"
                  f"Predict with `gptpipe predict --model {registered['name']}:{registered['version']} \"text\"`."),
    )


def checkout_params() -> Params:
    """The UI form's defaults: this checkout's params.yaml when the flow is loaded (or deployed)."""
    return load_params(PARAMS_FILE) if PARAMS_FILE.exists() else Params()


CHECKOUT_PARAMS = checkout_params()


def worker_record(checkout: Path) -> dict:
    """Which machine, checkout, work pool and flow run did a step: the lineage names them."""
    context = FlowRunContext.get()
    run = context.flow_run if context else None
    return {"host": socket.gethostname(), "checkout": str(checkout),
            "work_pool": run.work_pool_name if run else None, "flow_run": str(run.id) if run else None}


@flow(name="stage", persist_result=True)
def stage(stage: str, repo: str = ".", push: bool = False, params: Params = CHECKOUT_PARAMS,
          workspace: str | None = None, commit: str | None = None, lock: str | None = None) -> dict:
    """One dvc.yaml stage on whichever worker takes it: retrain sends its training stages here through a
    deployment on the `gpu` pool, with its params, workspace key, commit and, with `push`, its dvc.lock. With
    `push` the worker needs nothing but the DVC remote: in a worktree of its own at the run's commit (fetched
    when this clone lags behind), it pulls the inputs the lock names, reproduces the stage and pushes the
    outputs and run record back, so the run restores them instead of recomputing them; the worktree goes once
    pushed. Without, it works in the run's worktree, which only a worker on the same machine shares."""
    checkout = Path(repo).resolve()
    if push:
        require_shared_remote(checkout, f"stage {stage} on {socket.gethostname()}")
    from_remote = push and lock is not None
    key = f"{workspace or flow_run.id}-{stage}" if from_remote else workspace
    root, run_params = enter_workspace(checkout, key, params, commit)
    write_params(root / PARAMS_FILE, run_params)
    if from_remote:
        write_bytes_atomic(root / "dvc.lock", lock.encode())
        pull_stage_inputs(root, stage, run_params.team)
    ran = run_stage(root, stage, run_params.team, pull=push, single=from_remote)
    if push:
        push_stages(root, [stage], run_params.team)
    done = {"ran": ran, "commit": head_commit(root), "worker": worker_record(checkout)}
    if key != workspace:
        close_workspace(checkout, root)
    return done


def run_training_stage(deployment: str, name: str, root: Path, push: bool, params: Params,
                       workspace: str | None) -> dict:
    """Run a training stage as a subflow on another work pool, on this run's commit, params and dvc.lock; fail
    when that pool has no worker online for `team.worker_timeout_s`. Cancelling this run cancels the subflow
    (Prefect's cancellation cleanup), whose worker then stops the training process group."""
    lock = root / "dvc.lock"
    child = run_deployment(deployment, timeout=0, parameters={
        "stage": name, "push": push, "params": params.model_dump(mode="json"), "workspace": workspace,
        "commit": head_commit(root), "lock": lock.read_text() if push and lock.exists() else None})
    child = wait_for_handed_run(child, f"stage {name} on {deployment}", params.team.worker_timeout_s)
    if not child.state or not child.state.is_completed():
        raise RuntimeError(f"stage {name} on {deployment} ended {child.state.type if child.state else 'unknown'}")
    return child.state.result()


def cancel_stage_subflows(flow, flow_run, state) -> None:  # Prefect passes these by name
    """On Cancel: cancel the run's stage subflows on the other machines at once, rather than at the server's
    next cancellation-cleanup pass (every 20 s by default), so their workers stop training sooner."""
    with get_client(sync_client=True) as client:
        children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run.id])))
        for child in children:
            if child.state and not child.state.is_final():
                client.set_flow_run_state(child.id, Cancelling(), force=True)


@flow(name="retrain", log_prints=True, on_cancellation=[cancel_stage_subflows])
def retrain(params: Params = CHECKOUT_PARAMS, repo: str = ".", push: bool = False,
            training_deployment: str | None = None, isolate: bool = False, data_path: str | None = None) -> dict:
    """Run the dvc.yaml stages (unchanged ones are skipped) and register the classifier. The run's params are
    written to params.yaml first, so that dvc.lock records exactly what ran; with `push`, the stages' outputs
    and run records go to the DVC remote before another worker needs them and at the end; with
    `training_deployment` (e.g. `stage/gpu`), pre-training and fine-tuning run as subflows of that deployment,
    on its work pool; with `isolate`, the
    run works in a git worktree of its own (several runs at once, sharing the DVC cache and the registry),
    removed once the model is registered; with `data_path` (the on-new-data trigger passes the path from
    `gptpipe notify --path`), the labeled data is read from there instead of `data.labeled.path`."""
    if data_path:
        params = params.model_copy(deep=True)
        params.data.labeled.path = data_path
    checkout = Path(repo).resolve()
    if push:
        require_shared_remote(checkout, "push")
    logger = get_run_logger()
    workspace = str(flow_run.id) if isolate else None
    root, run_params = enter_workspace(checkout, workspace, params)
    if workspace:
        logger.info(f"working in {root}")
    params_before = (root / PARAMS_FILE).read_bytes() if (root / PARAMS_FILE).exists() else None
    if write_params(root / PARAMS_FILE, run_params):
        logger.info("params.yaml updated with this run's params")
    here = {"commit": head_commit(root), "worker": worker_record(checkout)}
    stages, watchers, unpushed = {}, set(), []
    status = PipelineStatus(root)
    try:
        # Stages run in dvc.yaml order, each checked on its own inputs (the ones before it were just checked).
        for name, always_changed in stage_order(root):
            if always_changed:
                watchers.add(name)
            if training_deployment and name in TRAINING_STAGES:
                if unpushed:  # what the other worker pulls
                    push_stages(root, unpushed, run_params.team)
                    unpushed = []
                stages[name] = run_training_stage(training_deployment, name, root, push, run_params, workspace)
                restore = run_stage.with_options(task_run_name=f"restore-{name}")
                if push and restore(root, name, run_params.team, pull=True, single=True):
                    logger.warning(f"stage {name} ran here again: the DVC remote had no run of it with this "
                                   "run's inputs; do the workers run the same code and params?")
                continue
            tags = {"training"} if name in TRAINING_STAGES else set()
            stage_task = run_stage.with_options(tags=tags)
            ran = stage_task(root, name, run_params.team, pull=push, single=True, up_to_date=status.up_to_date(name))
            stages[name] = {"ran": ran, **here}
            unpushed += [name] if push else []
        if unpushed:
            push_stages(root, unpushed, run_params.team)
    except StageInputError:
        # Bad input changes nothing: the last good params and outputs come back (DVC removed the failed
        # stage's outputs before running it; dvc.lock still names them, and the cache has them).
        restore_workspace(root, params_before, logger.info)
        raise
    registered = register_model(run_params, root, stages)
    metrics = json.loads((root / layout.METRICS).read_text())
    publish_artifacts(root, metrics, registered)
    logger.info(f"registered {registered['name']}:{registered['version']} as {registered['alias']}: "
                f"{registered['reason']}; test accuracy {registered['test_accuracy']:.3f}")
    if workspace:
        close_workspace(checkout, root)
    return {"stages_run": [name for name, step in stages.items() if step["ran"] and name not in watchers],
            "registered": registered, "metrics": metrics}
