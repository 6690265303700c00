import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import boto3
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from components.curves import read_curves
from components.pretrain import RandomWindows
from components.training import warmup_cosine
from tests.conftest import TINY_PARAMS


def test_windows_are_shifted_targets_deterministic_and_resumable(tmp_path):
    path = tmp_path / "tokens.bin"
    np.arange(1000, dtype=np.uint16).tofile(path)
    full = list(RandomWindows(path, "uint16", 8, 4, seed=1, num_batches=5))
    resumed = list(RandomWindows(path, "uint16", 8, 4, seed=1, first_batch=3, num_batches=2))
    halves = [list(RandomWindows(path, "uint16", 8, 4, seed=1, rank=r, world_size=2, num_batches=5)) for r in (0, 1)]
    x, y = full[0]
    assert x.shape == (4, 8) and (y == x + 1).all()  # consecutive ids: the target is the next token
    for (a, _), (b, _) in zip(full[3:], resumed, strict=True):
        assert (a == b).all()
    for (whole, _), (first, _), (second, _) in zip(full, *halves, strict=True):  # ranks split the global batch
        assert (torch.cat([first, second]) == whole).all()


def test_schedule_warms_up_then_decays_to_floor():
    values = [warmup_cosine(step, 10, 100, 0.1) for step in range(101)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:], strict=False))
    assert values[100] == pytest.approx(0.1)


def test_checkpoint_folder_describes_itself_and_curves_hold_a_row_per_step(tokenized):
    project, env = tokenized
    subprocess.run([sys.executable, "-m", "components.pretrain"], cwd=project, check=True, env=env,
                   capture_output=True)
    out = project / "models/pretrained"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors",
                                                     "tokenizer.json"]
    metrics = json.loads((out / "metrics.json").read_text())
    steps = TINY_PARAMS["pretrain"]["max_steps"]
    assert metrics["steps"] == steps and metrics["resumed_from_step"] == 0
    assert json.loads((out / "config.json").read_text())["d_model"] == TINY_PARAMS["model"]["d_model"]
    assert not any((project / ".gptpipe/resume/pretrain").iterdir())  # resume state is cleaned up
    # The curves (DVCLive): a row per optimizer step, validation at its schedule, the last loss the one reported.
    curves = read_curves(project / "reports/curves/pretrain")
    for name in ("train/loss", "train/lr", "train/grad_norm"):
        assert curves[name]["step"].to_list() == list(range(1, steps + 1)), name
    assert curves["train/loss"]["loss"][-1] == metrics["train_loss"]
    every = TINY_PARAMS["pretrain"]["val_every_n_steps"]
    assert curves["val/loss"]["step"].to_list() == list(range(every, steps + 1, every))
    assert curves["val/perplexity"]["perplexity"].to_list() == pytest.approx(np.exp(curves["val/loss"]["loss"]))
    assert curves["val/loss"]["loss"][-1] == pytest.approx(metrics["val_loss"], abs=1e-6)  # same weights, windows
    summary = json.loads((project / "reports/curves/pretrain/metrics.json").read_text())
    assert summary["step"] == steps and summary["train"]["loss"] == metrics["train_loss"]


KILLED_RUN_STEPS = 100


def kill_after_first_checkpoint(project, env, saved=None, **pretrain) -> list[str]:
    """Start pre-training, SIGKILL it once `saved()` says a checkpoint is kept (default: on local disk);
    returns the command to rerun."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"].update(max_steps=KILLED_RUN_STEPS, checkpoint_every_n_steps=20, val_every_n_steps=50, **pretrain)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    command = [sys.executable, "-m", "components.pretrain"]
    process = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resume = project / ".gptpipe/resume/pretrain"
    saved = saved or (lambda: bool(list(resume.glob("*/last.ckpt"))))
    deadline = time.monotonic() + 240
    while not saved() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert process.poll() is None, "pre-training finished before a checkpoint could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (project / "models/pretrained").exists()  # nothing half-written
    return command


def curve_steps(project) -> list[int]:
    """Steps of the train-loss rows the running pre-training has written so far."""
    files = list(project.glob(".gptpipe/resume/pretrain/*/curves/plots/metrics/train/loss.tsv"))
    rows = files[0].read_text().splitlines()[1:] if files else []
    return [int(row.split("\t")[0]) for row in rows if row.split("\t")[0].isdigit()]


def rerun_and_check_resumed(project, env, command) -> None:
    """The resumed run ends where an uninterrupted run of the same params ends: same weights, same val loss
    (data position, optimizer and schedule all restored). The uninterrupted run's curves go to
    reports/curves/uninterrupted."""
    done = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((project / "models/pretrained/metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 20 and metrics["resumed_from_step"] % 20 == 0
    assert metrics["steps"] == KILLED_RUN_STEPS
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"]["checkpoint_uri"] = None  # the uninterrupted run must not find the mirrored checkpoint
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([*command, "--out", "models/uninterrupted", "--curves", "reports/curves/uninterrupted"],
                          cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    whole = json.loads((project / "models/uninterrupted/metrics.json").read_text())
    assert whole["resumed_from_step"] == 0
    assert metrics["val_loss"] == pytest.approx(whole["val_loss"], abs=1e-4)
    resumed, uninterrupted = (load_file(project / f"models/{name}/model.safetensors")
                              for name in ("pretrained", "uninterrupted"))
    for key, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=1e-4, atol=1e-5)


def test_mixed_precision_with_gradient_clipping_trains(tokenized):
    """bf16-mixed with grad_clip, as `precision: auto` runs on bf16 hardware (the fused AdamW cannot be clipped)."""
    project, env = tokenized
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"].update(precision="bf16-mixed", max_steps=2, grad_clip=1.0)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "components.pretrain"], cwd=project, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((project / "models/pretrained/metrics.json").read_text())["steps"] == 2


def test_sigkill_mid_run_resumes_from_last_checkpoint_and_continues_its_curves(tokenized):
    project, env = tokenized

    def past_a_checkpoint() -> bool:  # the killed run has logged steps that the resumed one trains again
        last = max(curve_steps(project), default=0)
        return bool(list(project.glob(".gptpipe/resume/pretrain/*/last.ckpt"))) and last > 20 and last % 20 != 0

    command = kill_after_first_checkpoint(project, env, saved=past_a_checkpoint)
    rerun_and_check_resumed(project, env, command)
    # One curve over the killed and the resumed run, step by step the uninterrupted run's.
    resumed, whole = (read_curves(project / f"reports/curves/{name}") for name in ("pretrain", "uninterrupted"))
    for name in ("train/loss", "train/lr", "train/grad_norm", "val/loss", "val/perplexity"):
        assert resumed[name]["step"].to_list() == whole[name]["step"].to_list(), name
        assert resumed[name][:, -1].to_list() == pytest.approx(whole[name][:, -1].to_list(), rel=1e-3), name
    assert resumed["train/loss"]["step"].to_list() == list(range(1, KILLED_RUN_STEPS + 1))


def test_retry_on_another_worker_resumes_from_the_mirrored_checkpoint(tokenized, bucket):
    project, env = tokenized
    client = boto3.client("s3")

    def mirrored() -> bool:  # the local copy is written first: a worker dying in between loses that one
        listed = client.list_objects_v2(Bucket=bucket, Prefix="checkpoints/").get("Contents", [])
        return any(item["Key"].endswith("/last.ckpt") for item in listed)

    command = kill_after_first_checkpoint(project, env, saved=mirrored, checkpoint_uri=f"s3://{bucket}/checkpoints")
    shutil.rmtree(project / ".gptpipe")  # the other worker has no local state, only the store
    rerun_and_check_resumed(project, env, command)
    # The curves logged before the checkpoint stayed with the stopped worker: these continue from its step.
    resumed_from = json.loads((project / "models/pretrained/metrics.json").read_text())["resumed_from_step"]
    steps = read_curves(project / "reports/curves/pretrain")["train/loss"]["step"].to_list()
    assert steps == list(range(resumed_from + 1, KILLED_RUN_STEPS + 1))


def test_continued_pretraining_keeps_the_foundation_tokenizer_and_never_reads_held_out_text(tmp_path):
    import polars as pl
    from tokenizers import Tokenizer

    from components.foundation import build_foundation
    from components.params import FoundationParams
    from tests.components.test_foundation import TINY_FOUNDATION
    from tests.conftest import make_project, support_tickets

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pl.DataFrame(support_tickets(rows_per_label=50, seed=5)).select("text").write_parquet(corpus / "t-00000.parquet")
    cfg = FoundationParams.model_validate({**TINY_FOUNDATION, "corpus": {"paths": [str(corpus)], "val_fraction": 0.1}})
    build_foundation(cfg, seed=1, registry_uri=str(tmp_path / "registry"), out=tmp_path / "base",
                     work_root=tmp_path / "work")
    params = {**TINY_PARAMS, "pretrain": {**TINY_PARAMS["pretrain"], "init_from": str(tmp_path / "base")}}
    project = make_project(tmp_path / "project", params)
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "repro", "pretrain"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    tokens, pretrained = project / "data/tokens", project / "models/pretrained"
    base_tokenizer = (tmp_path / "base/tokenizer.json").read_text()
    assert (tokens / "tokenizer.json").read_text() == base_tokenizer == (pretrained / "tokenizer.json").read_text()
    metrics = json.loads((pretrained / "metrics.json").read_text())
    assert metrics["foundation"]["path"] == str(tmp_path / "base") and metrics["steps"] == 6
    config = json.loads((pretrained / "config.json").read_text())
    assert config == json.loads((tmp_path / "base/config.json").read_text())
    # The corpus it continued on is the train split: no validation or test text is in it.
    manifest = json.loads((tokens / "manifest.json").read_text())
    ids = np.concatenate([np.fromfile(tokens / shard["file"], dtype=manifest["dtype"])
                          for shard in manifest["train"]["shards"]])
    corpus_text = Tokenizer.from_str(base_tokenizer).decode(ids.tolist(), skip_special_tokens=False)
    for split in ("val", "test"):
        for text in pl.read_parquet(project / f"data/prepared/{split}.parquet")["text"]:
            assert text not in corpus_text
    train = pl.read_parquet(project / "data/prepared/train.parquet")["text"]
    assert all(text in corpus_text for text in train)


def test_a_model_that_cannot_fit_stops_before_training_with_one_line(tokenized):
    """96 layers 12,288 wide (174B parameters: 2.8 TB of weights, gradients and AdamW state in fp32) at 100,000
    windows a step (300 TB of activations): no machine holds it. The stage says so before allocating anything,
    and writes nothing."""
    project, env = tokenized
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["model"].update(n_layer=96, n_head=96, d_model=12288)
    params["pretrain"]["batch_size"] = 100_000
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "components.pretrain"], cwd=project, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 2, done.stderr[-2000:]
    [line] = done.stderr.strip().splitlines()
    need, free = (float(gb.replace(",", "")) for gb in re.findall(r"([\d,.]+) GB", line))
    assert "173,965,860,864-parameter GPT" in line and need > 100_000 > free > 0
    assert "RAM" in line or "GPU" in line
    assert "pretrain.batch_size" in line and "gpu work pool" in line
    assert not (project / "models/pretrained").exists() and not (project / "reports/curves/pretrain").exists()
