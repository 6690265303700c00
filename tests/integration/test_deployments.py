"""Deployments from infra/prefect.yaml on a real Prefect server, run by a real process worker, started the way
the UI's Run button starts them (POST /deployments/{id}/create_flow_run)."""

import json
import os
import shutil
import subprocess
import time
import urllib.request

import pytest

from tests.conftest import BIN, ROOT, TINY_PARAMS, gptpipe, make_project, stop

pytestmark = pytest.mark.integration
RUN_TIMEOUT = 420


def api(base: str, method: str, path: str, body: dict | None = None):
    request = urllib.request.Request(f"{base}{path}", method=method, data=json.dumps(body or {}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read() or "null")


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
    assert pretrain["max_steps"]["type"] == "integer" and pretrain["max_steps"]["minimum"] == 1
    assert schema["properties"]["params"]["default"]["pretrain"]["max_steps"] == TINY_PARAMS["pretrain"]["max_steps"]


def test_run_button_runs_the_pipeline_on_the_worker(prefect_api, deployed):
    project, _ = deployed
    default = deployment(prefect_api, "default")
    run = api(prefect_api, "POST", f"/deployments/{default['id']}/create_flow_run", {})
    final = wait_for_final_state(prefect_api, run["id"])
    assert final["state"]["type"] == "COMPLETED", final["state"]
    assert final["work_pool_name"] == "cpu"
    manifest = json.loads((project / "registry/bbc/versions/1.json").read_text())
    assert manifest["flow_run_id"] == run["id"]
    children = api(prefect_api, "POST", "/flow_runs/filter",
                   {"flow_runs": {"parent_flow_run_id": {"operator": "and_", "any_": [run["id"]]}}})
    gpu_stages = {child["parameters"]["stage"]: child for child in children}
    assert set(gpu_stages) == {"pretrain", "finetune"}
    assert all(child["work_pool_name"] == "gpu" and child["state"]["type"] == "COMPLETED"
               for child in gpu_stages.values())


def test_notify_starts_the_on_new_data_deployment(prefect_api, deployed):
    project, env = deployed
    on_new_data = deployment(prefect_api, "on-new-data")
    result = gptpipe("notify", "labeled", "--path", "labeled.csv", cwd=project, env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 0, result.stderr
    deadline = time.monotonic() + 120
    runs = []
    while not runs and time.monotonic() < deadline:
        runs = api(prefect_api, "POST", "/flow_runs/filter",
                   {"flow_runs": {"deployment_id": {"any_": [on_new_data["id"]]}}})
        time.sleep(1)
    assert runs, "the event did not start a run of retrain/on-new-data"
    assert wait_for_final_state(prefect_api, runs[0]["id"])["state"]["type"] == "COMPLETED"


def test_ui_shows_the_deployment_and_its_parameter_form(prefect_api, deployed, tmp_path):
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

