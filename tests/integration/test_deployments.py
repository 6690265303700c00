"""Deployments from infra/prefect.yaml on a real Prefect server, started the way the UI's Run button starts them
(POST /deployments/{id}/create_flow_run), run by a team of two "machines": clones A (a `cpu` pool worker) and
B (a `gpu` pool worker) of one git remote, in separate folders, sharing nothing but the Prefect server and an
S3 API server (DVC remote, registry, checkpoints, flow results), set up as the README's team set-up says."""

import copy
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import polars as pl
import pytest
import yaml

from components.params import apply_overrides, validate
from components.registry import Registry
from tests.conftest import BIN, ROOT, TINY_PARAMS, gptpipe, make_project, stop, support_tickets

pytestmark = pytest.mark.integration
RUN_TIMEOUT = 420
BUCKET = "gptpipe-team"
TEAM_PARAMS = {**TINY_PARAMS, "registry": {"uri": f"s3://{BUCKET}/registry"},
               "pretrain": {**TINY_PARAMS["pretrain"], "checkpoint_uri": f"s3://{BUCKET}/checkpoints"}}
# A's commit changes the pre-training code; B's checkout lags behind it.
CODE_CHANGE = "\n# A change made on machine A after machine B's clone.\n"


def api(base: str, method: str, path: str, body: dict | None = None):
    """One REST call; a 503 (the server's database busy, as on a loaded machine) is retried as Prefect's client
    and the UI do."""
    for attempt in range(5):
        request = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body or {}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read() or "null")
        except urllib.error.HTTPError as error:
            if error.code != 503 or attempt == 4:
                raise
            time.sleep(2 ** attempt)


def wait_for_final_state(base: str, run_id: str) -> dict:
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        run = api(base, "GET", f"/flow_runs/{run_id}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1)
    raise TimeoutError(f"flow run {run_id} not finished after {RUN_TIMEOUT}s")


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, check=True, env=env, capture_output=True, text=True).stdout.strip()


@dataclass
class Team:
    a: Path  # clone with the `cpu` worker, where runs start
    b: Path  # clone with the `gpu` worker, one commit behind
    commit: str  # A's HEAD: the code every stage of a run must run on
    env: dict  # for commands on A


def machine_env(prefect_api: str, clone: Path, home: Path) -> dict:
    """A machine's environment: its own Prefect home (local result storage) and registry download cache."""
    return {**os.environ, "PREFECT_API_URL": prefect_api, "GPTPIPE_CHECKOUT": str(clone),
            "PREFECT_HOME": str(home / "prefect"), "GPTPIPE_CACHE": str(home / "cache"),
            "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_WORKER_QUERY_SECONDS": "1"}


@pytest.fixture(scope="module")
def deployed(prefect_api, s3_server, tmp_path_factory) -> Iterator[Team]:
    """The README's team set-up, step by step, on two machines."""
    root = tmp_path_factory.mktemp("team")
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    source = make_project(root / "source", TEAM_PARAMS)
    subprocess.run([str(BIN / "dvc"), "remote", "add", "-d", "team", f"s3://{BUCKET}/dvc"], cwd=source, check=True)
    git("commit", "-qam", "DVC remote on S3", cwd=source)
    git("clone", "-q", "--bare", str(source), str(root / "origin.git"), cwd=root)
    a, b = root / "machine-a" / "gptpipe", root / "machine-b" / "gptpipe"
    for clone in (a, b):
        git("clone", "-q", str(root / "origin.git"), str(clone), cwd=root)
    with (a / "components/pretrain.py").open("a") as code:
        code.write(CODE_CHANGE)
    git("commit", "-qam", "change on A", cwd=a)
    git("push", "-q", "origin", "HEAD", cwd=a)
    env_a, env_b = machine_env(prefect_api, a, a.parent), machine_env(prefect_api, b, b.parent)
    prefect = str(BIN / "prefect")
    setup = gptpipe("team-setup", "--results", f"s3://{BUCKET}/prefect-results", cwd=a, env=env_a)
    assert setup.returncode == 0, setup.stderr
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
                          cwd=a, env=env_a, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # The nightly cron keeps its schedule but must not start a run of its own on A while the module runs (a run
    # across 03:00 UTC would hold a worktree when the tests count them).
    nightly = api(prefect_api, "GET", "/deployments/name/retrain/nightly")
    api(prefect_api, "PATCH", f"/deployments/{nightly['id']}", {"paused": True})
    assert api(prefect_api, "GET", f"/deployments/{nightly['id']}")["paused"]
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--name", name], cwd=clone, env=env,
                                stdout=(clone.parent / "worker.log").open("w"), stderr=subprocess.STDOUT)
               for pool, name, clone, env in (("cpu", "cpu-a", a, env_a), ("gpu", "gpu-b", b, env_b))]
    yield Team(a=a, b=b, commit=git("rev-parse", "HEAD", cwd=a), env=env_a)
    for worker in workers:
        stop(worker)


def deployment(base: str, name: str) -> dict:
    return api(base, "GET", f"/deployments/name/retrain/{name}")


def test_retrain_deployments_with_schedule_and_typed_form(prefect_api, deployed):
    default, nightly = deployment(prefect_api, "default"), deployment(prefect_api, "nightly")
    assert default["work_pool_name"] == "cpu"
    assert default["parameters"]["push"] is True  # the team's deployments share stage outputs through the remote
    results_block = default["job_variables"]["env"]["PREFECT_RESULTS_DEFAULT_STORAGE_BLOCK"]
    assert results_block == "remote-file-system/gptpipe-results"
    assert nightly["schedules"][0]["schedule"]["cron"] == "0 3 * * *"
    deployment(prefect_api, "on-new-data")
    schema = default["parameter_openapi_schema"]
    assert schema["properties"]["params"]["$ref"] == "#/definitions/Params"
    pretrain = schema["definitions"]["PretrainParams"]["properties"]
    assert pretrain["max_steps"]["type"] == "integer" and pretrain["max_steps"]["minimum"] == 0
    foundation = api(prefect_api, "GET", "/deployments/name/foundation/gpu")
    assert foundation["work_pool_name"] == "gpu"
    assert "corpus" in foundation["parameter_openapi_schema"]["definitions"]["FoundationParams"]["properties"]
    assert schema["properties"]["params"]["default"]["pretrain"]["max_steps"] == TINY_PARAMS["pretrain"]["max_steps"]


def run_params(*overrides: str) -> dict:
    """Every field of the params, as the UI's Run form sends them: the team's params with some overrides."""
    raw = apply_overrides(copy.deepcopy(TEAM_PARAMS), list(overrides))
    return validate(raw, "test params").model_dump(mode="json")


def start_run(base: str, name: str, parameters: dict | None = None) -> dict:
    """What the Run button does."""
    return api(base, "POST", f"/deployments/{deployment(base, name)['id']}/create_flow_run",
               {"parameters": parameters or {}})


def registered_version(run_id: str) -> tuple[dict, Path]:
    """The registry version (on S3) a flow run registered, and its files fetched locally."""
    registry = Registry(TEAM_PARAMS["registry"]["uri"])
    for version in registry.versions("bbc"):
        manifest = registry.manifest("bbc", version)
        if manifest["flow_run_id"] == run_id:
            return manifest, registry.fetch(manifest)
    raise AssertionError(f"no registered version from flow run {run_id}")


def children(base: str, run_id: str) -> dict[str, dict]:
    """The stage subflows of a run, by stage."""
    runs = api(base, "POST", "/flow_runs/filter",
               {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [run_id]}}})
    return {child["parameters"]["stage"]: child for child in runs}


def run_logs(base: str, run_ids: list[str]) -> str:
    lines, offset = [], 0
    while page := api(base, "POST", "/logs/filter", {"logs": {"flow_run_id": {"any_": run_ids}},
                                                      "limit": 200, "offset": offset}):
        lines += [log["message"] for log in page]
        offset += len(page)
    return "\n".join(lines)


def worktrees(clone: Path) -> list[str]:
    return git("worktree", "list", cwd=clone).splitlines()


def test_runs_on_two_machines_use_the_runs_commit_and_a_rerun_runs_no_stage(prefect_api, deployed):
    team = deployed
    assert git("rev-parse", "HEAD", cwd=team.b) != team.commit, "B's checkout should lag behind A's"
    runs = [start_run(prefect_api, "default"), start_run(prefect_api, "default", {"params": run_params("seed=7")})]
    finals = [wait_for_final_state(prefect_api, run["id"]) for run in runs]
    for final in finals:
        assert final["state"]["type"] == "COMPLETED", final["state"]
        assert final["work_pool_name"] == "cpu"
    first, second = finals
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"], "not at once"
    weights = set()
    for run, seed in zip(runs, (TEAM_PARAMS.get("seed", 1337), 7), strict=True):
        manifest, files = registered_version(run["id"])
        assert yaml.safe_load((files / "params.yaml").read_text())["seed"] == seed
        weights.add(hashlib.sha256((files / "model.safetensors").read_bytes()).hexdigest())
        lineage = json.loads((files / "lineage.json").read_text())
        assert lineage["git"]["commit"] == team.commit
        stages = lineage["flow_run"]["stages"]
        for name, clone, pool in (("ingest", team.a, "cpu"), ("tokenize", team.a, "cpu"), ("pretrain", team.b, "gpu"),
                                  ("finetune", team.b, "gpu"), ("evaluate", team.a, "cpu")):
            assert stages[name]["ran"], name
            assert stages[name]["commit"] == team.commit, f"{name} ran on other code than the run's commit"
            assert (stages[name]["worker"]["checkout"], stages[name]["worker"]["work_pool"]) == (str(clone), pool)
        gpu_stages = children(prefect_api, run["id"])
        assert set(gpu_stages) == {"pretrain", "finetune"}
        assert all(child["work_pool_name"] == "gpu" and child["state"]["type"] == "COMPLETED"
                   for child in gpu_stages.values())
        # A restored what B trained from the DVC remote (same inputs, same code: a cached run), never trained.
        logs = run_logs(prefect_api, [run["id"]])
        assert "Running stage 'pretrain'" not in logs and "Running stage 'finetune'" not in logs
        assert "Stage 'pretrain' is cached" in logs and "Stage 'finetune' is cached" in logs
        predicted = gptpipe("predict", "--model", f"bbc:{manifest['version']}", "my invoice refund", cwd=team.a)
        assert predicted.returncode == 0, predicted.stderr
        assert set(json.loads(predicted.stdout)["probs"]) == {"auth", "billing", "bug"}
    assert len(weights) == 2, "the two runs' models are not their own"
    # Every run's worktrees are gone once done, on both machines; the checkouts themselves were never touched.
    assert len(worktrees(team.a)) == 1 and len(worktrees(team.b)) == 1, (worktrees(team.a), worktrees(team.b))
    for clone in (team.a, team.b):
        assert not (clone / "dvc.lock").exists() and not (clone / "data").exists()
    # Flow results and persisted state are in the shared store, none on either machine's disk.
    results = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="prefect-results/")
    assert results.get("KeyCount", 0) > 0
    for clone in (team.a, team.b):
        assert not list((clone.parent / "prefect").glob("storage/*"))

    # Again, with nothing changed: no stage reruns on either machine (every one is restored from the run cache).
    rerun = start_run(prefect_api, "default", {"params": run_params("seed=7")})
    assert wait_for_final_state(prefect_api, rerun["id"])["state"]["type"] == "COMPLETED"
    gpu_stages = children(prefect_api, rerun["id"])
    assert all(child["state"]["type"] == "COMPLETED" for child in gpu_stages.values())
    logs = run_logs(prefect_api, [rerun["id"], *(child["id"] for child in gpu_stages.values())])
    ran = set(re.findall(r"Running stage '(\w+)'", logs))
    assert ran <= {"sources"}, f"stages rerun with nothing changed: {ran}"  # sources only looks at the data
    assert "Stage 'pretrain' is cached" in logs and "Stage 'finetune' is cached" in logs


def training_processes(folder: Path) -> list[int]:
    """Pids of pre-training processes working in `folder`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(proc / "cwd")
        except (OSError, ValueError):
            continue
        if "components.pretrain" in command and cwd == str(folder):
            pids.append(int(proc.name))
    return pids


def mirrored_checkpoints() -> set[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="checkpoints/")
    return {item["Key"] for item in listing.get("Contents", [])}


def cancel(base: str, run_id: str) -> None:
    """What the UI's Cancel button does."""
    api(base, "POST", f"/flow_runs/{run_id}/set_state", {"state": {"type": "CANCELLING"}, "force": True})


def cancel_and_wait_until_training_stops(base: str, run_id: str, workspace: Path) -> float:
    """Cancel a run; returns the seconds until no training process is left in `workspace` (B's stage worktree)."""
    cancel(base, run_id)
    cancelled = time.monotonic()
    while training_processes(workspace):
        assert time.monotonic() - cancelled < 60, "training still running on B a minute after the cancel"
        time.sleep(0.5)
    stopped_after = time.monotonic() - cancelled
    assert wait_for_final_state(base, run_id)["state"]["type"] == "CANCELLED"
    assert wait_for_final_state(base, children(base, run_id)["pretrain"]["id"])["state"]["type"] == "CANCELLED"
    return stopped_after


def test_cancelling_stops_training_on_the_other_machine_and_a_retry_resumes_there(prefect_api, deployed):
    team = deployed
    # Training that only a cancel ends, on any machine's speed (seed 7's data stages are done: they are restored).
    parameters = {"params": run_params("seed=7", "pretrain.max_steps=1000000", "pretrain.val_every_n_steps=100000",
                                       "pretrain.checkpoint_every_n_steps=200")}
    before = mirrored_checkpoints()
    run = start_run(prefect_api, "default", parameters)
    workspace = team.b / ".gptpipe/runs" / f"{run['id']}-pretrain"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not (training_processes(workspace) and mirrored_checkpoints() - before):
        assert time.monotonic() < deadline, "pre-training on B never started or never mirrored a checkpoint"
        assert api(prefect_api, "GET", f"/flow_runs/{run['id']}")["state"]["type"] in ("SCHEDULED", "PENDING",
                                                                                          "RUNNING")
        time.sleep(0.5)
    (mirrored,) = mirrored_checkpoints() - before
    stopped_after = cancel_and_wait_until_training_stops(prefect_api, run["id"], workspace)
    print(f"training on B stopped {stopped_after:.1f}s after the cancel")
    # Started again: B's stage works in a fresh worktree (nothing of the first is on its disk) and resumes from
    # the checkpoint the first mirrored to S3.
    retry = start_run(prefect_api, "default", parameters)
    resumed = f"Restored all states from the checkpoint at .gptpipe/resume/pretrain/{mirrored.split('/')[1]}/"
    while "pretrain" not in (stages := children(prefect_api, retry["id"])) or \
            resumed not in run_logs(prefect_api, [stages["pretrain"]["id"]]):
        assert time.monotonic() < deadline + RUN_TIMEOUT, "the retry did not resume from the mirrored checkpoint"
        assert api(prefect_api, "GET", f"/flow_runs/{retry['id']}")["state"]["type"] in ("SCHEDULED", "PENDING",
                                                                                            "RUNNING")
        time.sleep(1)
    cancel_and_wait_until_training_stops(prefect_api, retry["id"], team.b / ".gptpipe/runs" / f"{retry['id']}-pretrain")


def test_notify_starts_the_on_new_data_deployment(prefect_api, deployed):
    team = deployed
    on_new_data = deployment(prefect_api, "on-new-data")
    announced = pl.DataFrame(support_tickets(rows_per_label=37, seed=3))  # a row count no other file here has
    announced.write_csv(team.a / "new-labeled.csv")
    result = gptpipe("notify", "labeled", "--path", "new-labeled.csv", cwd=team.a,
                     env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 120
    runs = []
    while not runs and time.monotonic() < deadline:
        runs = api(prefect_api, "POST", "/flow_runs/filter",
                   {"flow_runs": {"deployment_id": {"any_": [on_new_data["id"]]}}})
        time.sleep(1)
    assert runs, "the event did not start a run of retrain/on-new-data"
    assert runs[0]["parameters"]["data_path"] == "new-labeled.csv"
    assert wait_for_final_state(prefect_api, runs[0]["id"])["state"]["type"] == "COMPLETED"
    # ingest runs as a task of the run itself (only training stages go to the training deployment)
    assert f"ingest: {announced.height} rows read" in run_logs(prefect_api, [runs[0]["id"]])  # it read that file


def test_ui_shows_the_deployment_its_parameter_form_and_plots(prefect_api, deployed, tmp_path):
    """The Prefect UI, rendered by headless Chromium, lists the deployment and shows the typed params form."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "chromium is not installed: .ci/run installs it (apt-get install chromium)"
    default = deployment(prefect_api, "default")
    ui = prefect_api.removesuffix("/api")

    def render(path: str) -> str:
        done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--disable-background-networking", "--disable-component-update", "--no-first-run",
                               "--disable-sync", f"--user-data-dir={tmp_path / 'chromium'}",
                               "--virtual-time-budget=20000", "--dump-dom", f"{ui}{path}"],
                              capture_output=True, text=True, timeout=120)
        return done.stdout

    page = render(f"/deployments/deployment/{default['id']}")
    assert "retrain" in page and ">default<" in page.replace(" ", "")
    form = render(f"/deployments/deployment/{default['id']}/run")
    # The nested params model renders as titled, described fields, with the choices of a Literal as options.
    for field in ("Max Steps", "Vocab Size", "Context Length", "Seeds splits, initialisation and data order.",
                  "bf16-mixed"):
        assert field in form, f"{field!r} missing from the Run form"
    # A run's plots are image artifacts that the UI shows inline.
    plot = api(prefect_api, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": ["confusion-matrix"]}}})[0]
    page = render(f"/artifacts/artifact/{plot['id']}")
    assert '<img' in page and 'src="data:image/png;base64,' in page


def test_kubernetes_gpu_job_template_is_accepted_by_work_pool_tooling(prefect_api, deployed):
    done = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "gpu-k8s", "--type", "kubernetes",
                           "--base-job-template", str(ROOT / "infra/k8s-gpu-job-template.json"), "--overwrite"],
                          env=deployed.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    pool = api(prefect_api, "GET", "/work_pools/gpu-k8s")
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert container["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pool["base_job_template"]["variables"]["properties"]["gpu_count"]["default"] == 1

