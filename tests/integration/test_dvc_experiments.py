"""DVC's own commands on the pipeline, in a real git + DVC project on tiny params: `dvc plots show` draws the training
curves on a page that needs no network, `dvc metrics show` lists the test numbers, `dvc exp run -S` reruns only the
stages its param reaches and `dvc exp show` lists it, a queued experiment runs with `dvc queue start`, and `dvc plots
diff` compares the workspace with it."""

import copy
import json
import os
import re
import subprocess
import time

import pytest

from tests.conftest import BIN, TINY_PARAMS, make_project

pytestmark = pytest.mark.integration
CURVES = ("train/loss", "train/lr", "train/grad_norm", "val/loss")


def dvc(project, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"})
    assert done.returncode == 0, f"dvc {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def experiment(shown: list[dict], name: str) -> dict:
    """The record of experiment `name` in `dvc exp show --json`."""
    for record in shown:
        for group in record.get("experiments") or []:
            for rev in group["revs"]:
                if rev["name"] == name:
                    return rev
    raise AssertionError(f"no experiment {name} in {[r.get('name') for r in shown]}")


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project whose pipeline has run (two fine-tuning epochs, no label budgets: evaluate stays quick)."""
    params = copy.deepcopy(TINY_PARAMS)
    params["finetune"]["epochs"] = 2
    params["evaluate"]["label_budgets"] = []
    path = make_project(tmp_path_factory.mktemp("experiments") / "project", params)
    dvc(path, "repro")
    return path


def test_plots_show_draws_the_curves_offline_and_metrics_show_the_test_numbers(project):
    dvc(project, "plots", "show")
    page = (project / "dvc_plots/index.html").read_text()
    for stage, extra in (("pretrain", "val/perplexity"), ("finetune", "val/macro_f1")):
        for name in (*CURVES, extra):
            assert f"reports/curves/{stage}/plots/metrics/{name}.tsv" in page, (stage, name)
    assert not re.search(r"<script[^>]*\bsrc=", page)  # the Vega libraries are inlined, not fetched
    assert "vegaEmbed" in page
    metrics = json.loads(dvc(project, "metrics", "show", "--json").stdout)[""]["data"]  # "": the workspace
    test = metrics["reports/metrics.json"]["data"]["finetune"]["test"]
    assert 0 <= test["accuracy"] <= 1 and 0 <= test["macro_f1"] <= 1
    finetuned = json.loads((project / "models/classifier/metrics.json").read_text())
    assert metrics["reports/curves/finetune/metrics.json"]["data"]["step"] == finetuned["steps"]
    # After a run and the plots, git sees only the lock file DVC writes for the user to commit.
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert status.splitlines() == ["?? dvc.lock"]


def test_experiment_reruns_only_what_its_param_reaches_and_is_listed(project):
    done = dvc(project, "exp", "run", "-S", "finetune.epochs=1", "--name", "one-epoch")
    ran = set(re.findall(r"Running stage '(\w+)'", done.stdout)) - {"sources"}  # sources looks every time
    assert ran == {"finetune", "evaluate"}, done.stdout[-3000:]
    shown = experiment(json.loads(dvc(project, "exp", "show", "--json").stdout), "one-epoch")["data"]
    assert shown["params"]["params.yaml"]["data"]["finetune"]["epochs"] == 1
    metrics = shown["metrics"]["reports/metrics.json"]["data"]["finetune"]
    assert 0 <= metrics["test"]["accuracy"] <= 1 and metrics["epochs_trained"] == 1
    assert shown["metrics"]["reports/curves/finetune/metrics.json"]["data"]["step"] == metrics["steps"]


def test_queued_experiment_runs_and_plots_diff_compares_it(project):
    dvc(project, "exp", "run", "--queue", "-S", "finetune.learning_rate=0.003", "--name", "queued")
    dvc(project, "queue", "start")
    deadline = time.monotonic() + 600
    while not re.search(r"\bqueued\b.*\b(Success|Failed)\b", status := dvc(project, "queue", "status").stdout):
        assert time.monotonic() < deadline, status
        time.sleep(2)
    log = dvc(project, "queue", "logs", "queued").stdout
    assert re.search(r"\bqueued\b.*\bSuccess\b", status), log[-3000:]
    # In its copy of the repository the unchanged stages came from DVC's run cache; only fine-tuning trained.
    assert set(re.findall(r"Running stage '(\w+)'", log)) - {"sources"} == {"finetune", "evaluate"}, log[-3000:]
    dvc(project, "queue", "stop")
    shown = experiment(json.loads(dvc(project, "exp", "show", "--json").stdout), "queued")["data"]
    assert shown["params"]["params.yaml"]["data"]["finetune"]["learning_rate"] == 0.003
    assert 0 <= shown["metrics"]["reports/metrics.json"]["data"]["finetune"]["test"]["accuracy"] <= 1
    dvc(project, "plots", "diff", "queued")
    page = (project / "dvc_plots/index.html").read_text()
    assert "reports/curves/finetune/plots/metrics/train/loss.tsv" in page
    assert '"rev": "queued"' in page and '"rev": "workspace"' in page
