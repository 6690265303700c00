"""Data-parallel pre-training: two CPU processes (DDP over gloo) against one, at the same global batch."""

import json
import subprocess
import sys

import pytest
import yaml


def pretrain_with(project, env, **pretrain) -> dict:
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"].update(pretrain)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    done = subprocess.run([sys.executable, "-m", "components.pretrain"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((project / "models/pretrained/metrics.json").read_text())


def test_two_processes_match_one_at_the_same_global_batch(tokenized):
    project, env = tokenized
    single = pretrain_with(project, env, devices=1, strategy="auto", batch_size=8, max_steps=4)
    double = pretrain_with(project, env, devices=2, strategy="ddp", batch_size=8, max_steps=4)
    assert single["devices"] == 1 and double["devices"] == 2
    assert double["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
