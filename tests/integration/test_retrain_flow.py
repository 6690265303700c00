"""The real retrain flow on a real Prefect server, real DVC in a real git repo, real (tiny) training."""

import base64
import json
import subprocess

import polars as pl
import pytest
import yaml

from components.params import PARAMS_FILE, load_params
from components.promotion import split_digest
from flows.stages import PipelineStatus
from flows.up_to_date import registered_without_changes
from tests.conftest import BIN, TINY_PARAMS, gptpipe, make_project, support_tickets

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def first_run(prefect_api, tmp_path_factory):
    project = make_project(tmp_path_factory.mktemp("flow") / "project", TINY_PARAMS)
    env = {"PREFECT_API_URL": prefect_api}
    result = gptpipe("run", "--set", "pretrain.max_steps=8", cwd=project, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return project, env, result


def test_run_writes_outputs_lock_and_registry_version(first_run):
    project, _, result = first_run
    assert "stages run: ingest, tokenize, pretrain, finetune, evaluate" in result.stdout
    assert "registered bbc:1 as champion" in result.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"sources", "ingest", "tokenize", "pretrain", "finetune", "evaluate"}
    assert lock["stages"]["pretrain"]["params"]["params.yaml"]["pretrain"]["max_steps"] == 8
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert 0 <= metrics["finetune"]["test"]["accuracy"] <= 1
    assert {"tfidf_logreg", "zero_shot"} <= set(metrics["baselines"])
    assert metrics["pretrain"]["steps"] == 8 and metrics["pretrain"]["n_params"] > 0
    assert (project / "reports/confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    version = project / "registry/bbc/versions/1.json"
    manifest = json.loads(version.read_text())
    assert {"model.safetensors", "tokenizer.json", "classifier.json", "lineage.json", "model_card.md", "params.yaml",
            "metrics.json"} <= set(manifest["files"])


def test_run_publishes_tables_plots_and_model_card_artifacts(first_run, prefect_api):
    import urllib.request

    project, _, _ = first_run
    manifest = json.loads((project / "registry/bbc/versions/1.json").read_text())
    lineage = json.loads((project / "registry/bbc" / manifest["blob"].split("/", 1)[1] / "lineage.json").read_text())
    query = {"artifacts": {"flow_run_id": {"any_": [lineage["flow_run"]["id"]]}}}  # this run's
    request = urllib.request.Request(f"{prefect_api}/artifacts/filter", method="POST",
                                     data=json.dumps(query).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        artifacts = {artifact["key"]: artifact for artifact in json.loads(response.read())}
    assert {"test-metrics", "label-efficiency", "model-card", "registered-model"} <= set(artifacts)
    for plot in ("confusion-matrix", "label-efficiency-curve", "text-lengths", "training-curves"):
        assert artifacts[plot]["type"] == "image"
        png = base64.b64decode(artifacts[plot]["data"].removeprefix("data:image/png;base64,"))
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the loss and validation curves of the run's pre-training and fine-tuning, as evaluate drew them
    curves = base64.b64decode(artifacts["training-curves"]["data"].removeprefix("data:image/png;base64,"))
    assert curves == (project / "reports/training_curves.png").read_bytes()


def test_lineage_points_at_commit_and_dvc_hashes(first_run):
    project, _, _ = first_run
    manifest = json.loads((project / "registry/bbc/versions/1.json").read_text())
    lineage = json.loads((project / "registry/bbc" / manifest["blob"].split("/", 1)[1] / "lineage.json").read_text())
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert lineage["git"]["commit"] == head
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    assert lineage["dvc_lock"]["pretrain"]["models/pretrained"] == lock["stages"]["pretrain"]["outs"][0]["md5"]
    assert lineage["flow_run"]["id"]


def test_status_check_names_stale_stages_from_any_folder(tokenized):
    """Checked from another folder (as a run in its own worktree is), by stage name; void once dvc.lock changes."""
    project, _ = tokenized
    status = PipelineStatus(project)
    assert [status.up_to_date(stage) for stage in ("sources", "ingest", "tokenize", "pretrain")] == \
        [False, True, True, False]  # `sources` looks at the data every run; pre-training never ran
    with (project / "dvc.lock").open("a") as lock:
        lock.write("\n")
    assert not status.up_to_date("ingest")


def test_second_run_reruns_nothing_and_registers_nothing(first_run):
    project, env, _ = first_run
    lock_before = (project / "dvc.lock").read_text()
    curve_before = (project / "reports/curves/pretrain/plots/metrics/train/loss.tsv").read_text()
    again = gptpipe("run", "--set", "pretrain.max_steps=8", cwd=project, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "stages run: none (all up to date)" in again.stdout
    assert (project / "dvc.lock").read_text() == lock_before
    # skipped stages keep their curves (8 steps of pre-training)
    assert (project / "reports/curves/pretrain/plots/metrics/train/loss.tsv").read_text() == curve_before
    assert len(curve_before.splitlines()) == 1 + 8
    assert sorted(p.name for p in (project / "registry/bbc/versions").iterdir()) == ["1.json"]
    status = subprocess.run([str(BIN / "dvc"), "status"], cwd=project, capture_output=True, text=True)
    # Only the stage that looks at the data files every run shows; no stage after it is out of date.
    assert "always changed" in status.stdout
    assert not {"ingest", "tokenize", "pretrain", "finetune", "evaluate"} & set(status.stdout.replace(":", " ").split())


def test_a_local_rerun_with_nothing_changed_finishes_without_prefect(first_run):
    project, _, _ = first_run
    again = gptpipe("run", "--set", "pretrain.max_steps=8", cwd=project, env={"PREFECT_API_URL": ""})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "nothing changed since the last run: no flow run started" in again.stdout
    assert "stages run: none (all up to date)" in again.stdout
    assert "registered bbc:1 as latest" in again.stdout and "(unchanged, already registered)" in again.stdout
    assert "flow run" not in again.stderr.lower()  # Prefect never started
    assert sorted(p.name for p in (project / "registry/bbc/versions").iterdir()) == ["1.json"]


def test_the_quick_check_leaves_a_run_with_anything_to_do_to_the_flow(first_run, monkeypatch):
    project, _, _ = first_run
    monkeypatch.chdir(project)
    params = load_params(PARAMS_FILE)
    assert registered_without_changes(project, params)["version"] == 1
    other = params.model_copy(deep=True)
    other.finetune.epochs += 1
    assert registered_without_changes(project, other) is None  # params.yaml would change
    labeled = project / "labeled.csv"
    original = labeled.read_bytes()
    labeled.write_bytes(original + b"one more ticket about a refund,billing\n")
    assert registered_without_changes(project, params) is None  # ingest would run
    labeled.write_bytes(original)
    assert registered_without_changes(project, params)["version"] == 1


def test_predict_answers_from_the_registry(first_run):
    project, _, _ = first_run
    result = gptpipe("predict", "--model", "bbc@champion", "my invoice refund charge", "password reset login",
                     cwd=project)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["text"] for line in lines] == ["my invoice refund charge", "password reset login"]
    for line in lines:
        assert set(line["probs"]) == {"auth", "billing", "bug"}
        assert line["label"] == max(line["probs"], key=line["probs"].get)
        assert abs(sum(line["probs"].values()) - 1) < 1e-4


def test_changed_param_reruns_only_downstream(first_run):
    project, env, _ = first_run
    result = gptpipe("run", "--set", "pretrain.max_steps=8", "--set", "finetune.learning_rate=0.003",
                     cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stages run: finetune, evaluate" in result.stdout
    assert "registered bbc:2" in result.stdout
    # Same data, same test texts: the champion (bbc:1) was scored on exactly the split it was tested on.
    test = pl.read_parquet(project / "data/prepared/test.parquet")
    assert "vs champion v1's" in result.stdout and f"on the same {test.height} test texts" in result.stdout
    decision = json.loads((project / "registry/bbc/decisions/2.json").read_text())
    champion = json.loads((project / "registry/bbc/versions/1.json").read_text())
    assert decision["comparison"]["test_split_sha256"] == champion["test_split"]["sha256"]


def test_continue_from_a_registered_foundation(first_run):
    project, env, _ = first_run
    foundation = json.loads((project / "registry/bbc-foundation/versions/1.json").read_text())
    assert "model.safetensors" in foundation["files"] and "config.json" in foundation["files"]
    result = gptpipe("run", "--set", "pretrain.init_from=registry:bbc-foundation:1", cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pretrain, finetune, evaluate" in result.stdout
    # The run continued version 1 on the task's text: the result is a new foundation version naming its parent.
    assert sorted(p.name for p in (project / "registry/bbc-foundation/versions").iterdir()) == ["1.json", "2.json"]
    metrics = json.loads((project / "reports/metrics.json").read_text())
    assert metrics["pretrain"]["foundation"]["name"] == "bbc-foundation"
    assert metrics["pretrain"]["foundation"]["version"] == 1
    newest = max(int(p.stem) for p in (project / "registry/bbc/versions").iterdir())
    manifest = json.loads((project / f"registry/bbc/versions/{newest}.json").read_text())
    assert manifest["foundation"]["version"] == 2
    assert manifest["foundation"]["continued_from"]["version"] == 1


def test_grown_data_file_keeps_old_test_texts_in_test_and_compares_on_them(first_run):
    """The nightly export at the same path grows by 10%: every old test text stays in test (none moves into
    train or val), and the new version and the champion are scored on the same new test split."""
    project, env, _ = first_run
    before = {split: set(pl.read_parquet(project / f"data/prepared/{split}.parquet")["text"])
              for split in ("train", "val", "test")}
    labeled = pl.read_csv(project / "labeled.csv")
    grown = pl.concat([labeled, pl.DataFrame(support_tickets(seed=7)).sample(labeled.height // 10, seed=0)])
    grown.write_csv(project / "labeled.csv")
    result = gptpipe("run", "--set", "pretrain.max_steps=8", cwd=project, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stages run: ingest, tokenize, pretrain, finetune, evaluate" in result.stdout
    after = {split: pl.read_parquet(project / f"data/prepared/{split}.parquet") for split in ("train", "val", "test")}
    assert before["test"] <= set(after["test"]["text"])
    assert not before["test"] & (set(after["train"]["text"]) | set(after["val"]["text"]))
    newest = max(int(p.stem) for p in (project / "registry/bbc/versions").iterdir())
    registered = next(line for line in result.stdout.splitlines() if line.startswith(f"registered bbc:{newest} as "))
    shown = json.loads(gptpipe("registry", "show", f"bbc:{newest}", cwd=project).stdout)
    comparison = shown["promotion"]["comparison"]
    assert f"vs champion v{shown['promotion']['champion']}'s" in registered
    assert f"on the same {after['test'].height} test texts" in registered
    assert comparison["texts"] == after["test"].height == shown["test_split"]["texts"]
    assert comparison["test_split_sha256"] == shown["test_split"]["sha256"] == split_digest(after["test"])["sha256"]
    again = gptpipe("run", "--set", "pretrain.max_steps=8", cwd=project, env=env)
    assert "stages run: none (all up to date)" in again.stdout


def test_bad_input_leaves_params_and_last_outputs_and_says_one_line(first_run):
    project, env, _ = first_run
    (project / "empty.csv").write_text("")
    params_before = (project / "params.yaml").read_bytes()
    report_before = (project / "reports/data.json").read_bytes()
    result = gptpipe("run", "--set", "data.labeled.path=empty.csv", "--set", "pretrain.max_steps=8", cwd=project,
                     env=env)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("gptpipe: error:")]
    assert len(errors) == 1 and "empty.csv" in errors[0], result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert (project / "params.yaml").read_bytes() == params_before
    assert (project / "reports/data.json").read_bytes() == report_before
    assert (project / "data/prepared/train.parquet").exists()


def test_bad_input_exits_2_and_writes_nothing(prefect_api, tmp_path):
    one_class = [{"text": f"text {i}", "label": "x"} for i in range(10)]
    project = make_project(tmp_path / "project", TINY_PARAMS, rows=one_class)
    result = gptpipe("run", cwd=project, env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 2
    assert "single class" in result.stderr and "labeled.csv" in result.stderr
    assert not (project / "data/prepared").exists() and not (project / "registry").exists()
