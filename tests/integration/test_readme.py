"""Every command the README shows a user (each `.venv/bin/...` line of its sh blocks) runs, in order, in a fresh
copy of the project after a tiny `make run`, succeeds and does what the README says: the README cannot drift from
the code. DVC's own commands included: `dvc plots show` draws the training curves on a page that needs no network,
`dvc metrics show` lists the test numbers, an experiment reruns only the stages its param reaches, a queued sweep
runs and `dvc exp show` lists it with its params and metrics, and `dvc plots diff` compares two experiments."""

import ast
import json
import os
import re
import shlex
import subprocess

import polars as pl
import pytest

from components.params import Params, to_yaml
from tests.conftest import BIN, ROOT, TINY_PARAMS, gptpipe, make_project, support_tickets

pytestmark = pytest.mark.integration

# The foundation command of the README on a tiny corpus and model, so that it runs in seconds.
TINY_FOUNDATION = {"corpus": {"val_fraction": 0.2},
                   "tokenizer": {"vocab_size": 320, "train_max_mb": 1},
                   "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "context_length": 16},
                   "pretrain": {"init_from": "scratch", "batch_size": 4, "max_steps": 4, "warmup_steps": 1,
                                "val_every_n_steps": 2, "val_batches": 2, "precision": "32-true"}}


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip().startswith(".venv/bin/")]


def test_readme_shows_the_commands_a_user_needs():
    verbs = {shlex.split(command, comments=True)[1] for command in readme_commands()
             if command.startswith(".venv/bin/gptpipe")}
    assert {"run", "predict", "export", "registry", "generate", "foundation"} <= verbs
    assert any(command.startswith(".venv/bin/dvc repro") for command in readme_commands())


def test_every_readme_command_works(prefect_api, tmp_path):
    params = {**TINY_PARAMS, "foundation": TINY_FOUNDATION}
    project = make_project(tmp_path / "project", params)
    (project / "params.yaml").write_text(to_yaml(Params.model_validate(params)))
    env = {"PREFECT_API_URL": prefect_api}
    first = gptpipe("run", cwd=project, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    # After a run git sees only the lock file DVC writes for the user to commit.
    status = subprocess.run(["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True).stdout
    assert status.splitlines() == ["?? dvc.lock"]
    pl.DataFrame({"body": ["refund my invoice", "cannot login"]}).write_csv(project / "texts.csv")
    pl.DataFrame({"text": ["the page crashes", "password reset"]}).write_parquet(project / "texts.parquet")
    (project / "corpus").mkdir()
    tickets = pl.DataFrame(support_tickets(rows_per_label=30)).select("text")
    tickets.write_parquet(project / "corpus/tickets-00000.parquet")
    run_env = {**os.environ, **env, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    shown = {}
    for command in readme_commands():
        words = shlex.split(command, comments=True)
        done = subprocess.run([str(BIN / word.removeprefix(".venv/bin/")) if word.startswith(".venv/bin/") else word
                               for word in words], cwd=project, capture_output=True, text=True, timeout=600,
                              env=run_env)
        assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-1500:]}\n{done.stderr[-1500:]}"
        shown.update(check_output(words[0].removeprefix(".venv/bin/"), words[1:], done.stdout, project, shown))
    assert {"champion", "no-op"} <= set(shown), "the README no longer shows the registry or the no-op rerun"


def check_output(tool: str, args: list[str], stdout: str, project, shown: dict) -> dict:
    """What a README command must print or leave, beyond its exit status; returns what later checks need."""
    if tool == "dvc":
        return check_dvc_output(args, stdout, project)
    if tool != "gptpipe":
        return {}
    if args[0] == "predict" and "--output" not in args:
        rows = [json.loads(line) for line in stdout.splitlines()]
        assert len(rows) == (2 if "--input" in args else 1), stdout
        for row in rows:
            assert set(row) == {"text", "label", "probs"} and row["label"] in row["probs"], row
            assert sum(row["probs"].values()) == pytest.approx(1.0, abs=1e-3)
    if args[0] == "predict" and "--output" in args:
        labeled = pl.read_parquet(project / args[args.index("--output") + 1])
        assert labeled.height == 2 and {"text", "label"} <= set(labeled.columns)
    if args[0] == "export" and args[args.index("--format") + 1] == "onnx":
        check_serving_example(project, args[args.index("--model") + 1])
    if args[:2] == ["registry", "show"]:
        return {"champion": json.loads(stdout)["version"]}
    if args[:2] == ["registry", "promote"]:
        assert stdout.strip().endswith(f"-> version {args[2].split(':')[1]}"), stdout
    if args[:2] == ["registry", "rollback"]:  # back to the champion shown before the promotion
        assert stdout.strip().endswith(f"-> version {shown['champion']}"), stdout
    return {}


def check_serving_example(project, model: str) -> None:
    """The README's Python example, run on the ONNX export, prints `gptpipe predict`'s probabilities (to its 3
    decimals), the classifier's TF-IDF half included."""
    assert json.loads((project / "exported/onnx/classifier.json").read_text())["tfidf_weight"] > 0
    example = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    texts = ast.literal_eval(re.search(r"^texts = (\[.*\])$", example, flags=re.M).group(1))
    served = subprocess.run([str(BIN / "python"), "-c", example], cwd=project, capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]
    predicted = gptpipe("predict", "--model", model, *texts, cwd=project)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    expected = [json.loads(line)["probs"] for line in predicted.stdout.splitlines()]
    for row, probs in zip(ast.literal_eval(served.stdout.strip().splitlines()[-1]), expected, strict=True):
        assert row.keys() == probs.keys()
        assert all(abs(row[label] - probs[label]) <= 6e-4 for label in row), (row, probs)


CURVES = ("train/loss", "train/lr", "train/grad_norm", "val/loss")


def check_dvc_output(args: list[str], stdout: str, project) -> dict:
    ran = set(re.findall(r"Running stage '([^']+)'", stdout)) - {"sources"}  # sources looks every time
    if args[0] == "repro":  # right after a run nothing changed: only the data check runs
        assert re.findall(r"Running stage '([^']+)'", stdout) == ["sources"], stdout
        return {"no-op": True}
    if args[:2] == ["plots", "show"]:
        page = (project / "dvc_plots/index.html").read_text()
        for stage, extra in (("pretrain", "val/perplexity"), ("finetune", "val/macro_f1")):
            for name in (*CURVES, extra):
                assert f"reports/curves/{stage}/plots/metrics/{name}.tsv" in page, (stage, name)
        assert not re.search(r"<script[^>]*\bsrc=", page)  # the Vega libraries are inlined, not fetched
        assert "vegaEmbed" in page
    if args[:2] == ["metrics", "show"]:
        assert "reports/metrics.json" in stdout and "finetune.test.accuracy" in stdout, stdout
    if args[:2] == ["exp", "run"] and "--queue" not in args and "--run-all" not in args:
        assert ran == {"finetune", "evaluate"}, stdout[-3000:]
    if args[:2] == ["exp", "show"]:
        shown = json.loads(subprocess.run([str(BIN / "dvc"), "exp", "show", "--json"], cwd=project,
                                          capture_output=True, text=True, check=True).stdout)
        rates = {}
        for name in ("faster", "lr-1", "lr-2", "lr-3"):
            assert name in stdout, stdout
            data = experiment(shown, name)["data"]
            rates[name] = data["params"]["params.yaml"]["data"]["finetune"]["learning_rate"]
            metrics = data["metrics"]["reports/metrics.json"]["data"]["finetune"]
            assert 0 <= metrics["test"]["accuracy"] <= 1
            assert data["metrics"]["reports/curves/finetune/metrics.json"]["data"]["step"] == metrics["steps"]
        assert rates["faster"] == 0.003 and {rates[f"lr-{i}"] for i in (1, 2, 3)} == {0.0003, 0.001, 0.003}
    if args[:2] == ["plots", "diff"]:
        page = (project / "dvc_plots/index.html").read_text()
        assert "reports/curves/finetune/plots/metrics/train/loss.tsv" in page
        assert all(f'"rev": "{name}"' in page for name in args[2:]), args
    return {}


def experiment(shown: list[dict], name: str) -> dict:
    """The record of experiment `name` in `dvc exp show --json`."""
    for record in shown:
        for group in record.get("experiments") or []:
            for rev in group["revs"]:
                if rev["name"] == name:
                    return rev
    raise AssertionError(f"no experiment {name} in {[r.get('name') for r in shown]}")
