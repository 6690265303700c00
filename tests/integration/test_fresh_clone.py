"""A fresh clone fine-tunes from the foundation shipped in git, with no network at all (its own network
namespace, loopback only): no download is needed between `git clone` and a fine-tuned classifier."""

import json
import os
import subprocess
import sys

import polars as pl
import pytest
import yaml
from safetensors import safe_open

from components.model import GPTConfig
from tests.conftest import ROOT, support_tickets

pytestmark = pytest.mark.integration


def test_fresh_clone_continues_the_shipped_foundation_offline(tmp_path):
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    shipped = clone / "models/foundation"
    with safe_open(str(shipped / "model.safetensors"), "pt") as weights:
        assert len(list(weights.keys())) > 0  # real weights in git, not an LFS pointer
    params = yaml.safe_load((clone / "params.yaml").read_text())
    assert params["pretrain"]["init_from"] == "models/foundation"
    params["data"]["labeled"]["path"] = "tickets.csv"
    params["pretrain"].update(max_steps=2, warmup_steps=1, val_batches=2)
    params["finetune"].update(epochs=1)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    pl.DataFrame(support_tickets()).write_csv(clone / "tickets.csv")
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["unshare", "--map-root-user", "--net", "dvc", "repro", "finetune"], cwd=clone, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    metrics = json.loads((clone / "models/pretrained/metrics.json").read_text())
    assert metrics["foundation"]["path"] == "models/foundation"
    assert (clone / "data/tokens/tokenizer.json").read_bytes() == (shipped / "tokenizer.json").read_bytes()
    classifier = json.loads((clone / "models/classifier/classifier.json").read_text())
    assert classifier["labels"] == ["auth", "billing", "bug"]
    assert GPTConfig(**classifier["gpt"]) == GPTConfig(**json.loads((shipped / "config.json").read_text()))
