"""Deployments from infra/prefect.yaml on a real Prefect server, run by a real process worker, started the way
the UI's Run button starts them (POST /deployments/{id}/create_flow_run)."""

import copy
import hashlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import polars as pl
import pytest
import yaml

from components.params import apply_overrides, validate
from tests.conftest import BIN, ROOT, TINY_PARAMS, gptpipe, make_project, stop, support_tickets

pytestmark = pytest.mark.integration
RUN_TIMEOUT = 420


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


@pytest.fixture(scope="module")
def deployed(prefect_api, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("deploy") / "project", TINY_PARAMS)
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "GPTPIPE_CHECKOUT": str(project),
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_WORKER_QUERY_SECONDS": "1"}
    prefect = str(BIN / "prefect")
    for pool in ("cpu", "gpu"):
        subprocess.run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], env=env,
                       check=True, capture_output=True)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml"],
                          cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers = [subprocess.Popen([prefect, "worker", "start", "--pool", pool, "--name", f"{pool}-1"],
                                cwd=project.parent, env=env, stdout=(project.parent / f"{pool}.log").open("w"),
                                stderr=subprocess.STDOUT) for pool in ("cpu", "gpu")]
    yield project, env
    for worker in workers:
        stop(worker)


def deployment(base: str, name: str) -> dict:
    return api(base, "GET", f"/deployments/name/retrain/{name}")


def test_retrain_deployments_with_schedule_and_typed_form(prefect_api, deployed):
    default, nightly = deployment(prefect_api, "default"), deployment(prefect_api, "nightly")
    assert default["work_pool_name"] == "cpu"
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
    """Every field of the params, as the UI's Run form sends them: the tiny params with some overrides."""
    raw = apply_overrides(copy.deepcopy(TINY_PARAMS), list(overrides))
    return validate(raw, "test params").model_dump(mode="json")


def start_run(base: str, name: str, parameters: dict | None = None) -> dict:
    """What the Run button does."""
    return api(base, "POST", f"/deployments/{deployment(base, name)['id']}/create_flow_run",
               {"parameters": parameters or {}})


def registered_version(project, run_id: str) -> tuple[dict, object]:
    for path in (project / "registry/bbc/versions").glob("*.json"):
        manifest = json.loads(path.read_text())
        if manifest["flow_run_id"] == run_id:
            return manifest, project / "registry/bbc" / manifest["blob"].split("/", 1)[1]
    raise AssertionError(f"no registered version from flow run {run_id}")


def test_run_button_runs_two_runs_at_once_each_in_its_own_worktree(prefect_api, deployed):
    project, _ = deployed
    runs = [start_run(prefect_api, "default"), start_run(prefect_api, "default", {"params": run_params("seed=7")})]
    finals = [wait_for_final_state(prefect_api, run["id"]) for run in runs]
    for final in finals:
        assert final["state"]["type"] == "COMPLETED", final["state"]
        assert final["work_pool_name"] == "cpu"
    first, second = finals
    assert first["start_time"] < second["end_time"] and second["start_time"] < first["end_time"], "not at once"
    weights = set()
    for run, seed in zip(runs, (TINY_PARAMS.get("seed", 1337), 7), strict=True):
        manifest, files = registered_version(project, run["id"])
        assert yaml.safe_load((files / "params.yaml").read_text())["seed"] == seed
        assert json.loads((files / "metrics.json").read_text())["finetune"]["test"]["accuracy"] >= 0
        weights.add(hashlib.sha256((files / "model.safetensors").read_bytes()).hexdigest())
        predicted = gptpipe("predict", "--model", f"bbc:{manifest['version']}", "my invoice refund", cwd=project)
        assert predicted.returncode == 0, predicted.stderr
        assert set(json.loads(predicted.stdout)["probs"]) == {"auth", "billing", "bug"}
        children = api(prefect_api, "POST", "/flow_runs/filter",
                       {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [run["id"]]}}})
        gpu_stages = {child["parameters"]["stage"]: child for child in children}
        assert set(gpu_stages) == {"pretrain", "finetune"}
        assert all(child["work_pool_name"] == "gpu" and child["state"]["type"] == "COMPLETED"
                   for child in gpu_stages.values())
    assert len(weights) == 2, "the two runs' models are not their own"
    # Each run's worktree is gone once its model is registered; the checkout itself was never touched.
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=project, capture_output=True, text=True).stdout
    assert len(worktrees.splitlines()) == 1, worktrees
    assert not (project / "dvc.lock").exists() and not (project / "data").exists()


def training_processes(folder) -> list[int]:
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


def test_cancelling_a_run_stops_its_training_processes(prefect_api, deployed):
    project, _ = deployed
    run = start_run(prefect_api, "default", {"params": run_params("seed=11", "pretrain.max_steps=1000000")})
    workspace = project / ".gptpipe/runs" / run["id"]
    deadline = time.monotonic() + RUN_TIMEOUT
    while not training_processes(workspace):
        assert time.monotonic() < deadline, "pre-training never started"
        assert api(prefect_api, "GET", f"/flow_runs/{run['id']}")["state"]["type"] in ("SCHEDULED", "PENDING",
                                                                                          "RUNNING")
        time.sleep(0.5)
    # What the UI's Cancel button does.
    api(prefect_api, "POST", f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    assert wait_for_final_state(prefect_api, run["id"])["state"]["type"] == "CANCELLED"
    while training_processes(workspace):
        assert time.monotonic() < deadline, "training still running after the run was cancelled"
        time.sleep(0.5)
    child = api(prefect_api, "POST", "/flow_runs/filter",
                {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [run["id"]]}}})[0]
    assert wait_for_final_state(prefect_api, child["id"])["state"]["type"] == "CANCELLED"


def test_notify_starts_the_on_new_data_deployment(prefect_api, deployed):
    project, env = deployed
    on_new_data = deployment(prefect_api, "on-new-data")
    pl.DataFrame(support_tickets(seed=3)).write_csv(project / "new-labeled.csv")
    result = gptpipe("notify", "labeled", "--path", "new-labeled.csv", cwd=project,
                     env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 120
    runs = []
    while not runs and time.monotonic() < deadline:
        runs = api(prefect_api, "POST", "/flow_runs/filter",
                   {"flow_runs": {"deployment_id": {"any_": [on_new_data["id"]]}}})
        time.sleep(1)
    assert runs, "the event did not start a run of retrain/on-new-data"
    assert runs[0]["parameters"]["data_path"] == "new-labeled.csv"  # the run reads the announced file
    assert wait_for_final_state(prefect_api, runs[0]["id"])["state"]["type"] == "COMPLETED"


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
    _, env = deployed
    done = subprocess.run([str(BIN / "prefect"), "work-pool", "create", "gpu-k8s", "--type", "kubernetes",
                           "--base-job-template", str(ROOT / "infra/k8s-gpu-job-template.json"), "--overwrite"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    pool = api(prefect_api, "GET", "/work_pools/gpu-k8s")
    container = pool["base_job_template"]["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    assert container["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert container["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pool["base_job_template"]["variables"]["properties"]["gpu_count"]["default"] == 1

