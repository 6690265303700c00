"""Data-parallel pre-training: two CPU processes (DDP over gloo) against one, at the same global batch."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

GLOBAL_BATCH = 8
STEPS = 4

# Runs pretraining as `python -m components.pretrain` does, with training_step wrapped to log the step and a hash
# of every input row to one file per rank. Lightning starts rank 1 by re-running this same script, so both ranks
# record. It lives in the project folder so that `components` is imported from there, as `-m` would.
RECORD_BATCHES = """\
import hashlib
import json
import os
from pathlib import Path

from components import pretrain
from components.errors import exit_on_input_error

record_dir = Path(os.environ["BATCH_RECORD_DIR"])
training_step = pretrain.LanguageModel.training_step


def recording_training_step(self, batch, batch_idx):
    rows = [hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in batch[0].cpu()]
    with (record_dir / f"rank{self.global_rank}.jsonl").open("a") as log:
        print(json.dumps({"step": self.global_step, "rows": rows}), file=log)
    return training_step(self, batch, batch_idx)


pretrain.LanguageModel.training_step = recording_training_step
exit_on_input_error(pretrain.main)
"""


def rows_per_step(log: Path) -> list[list[str]]:
    """The row hashes one rank trained on, indexed by step; every step recorded once, in order."""
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["step"] for entry in entries] == list(range(STEPS)), log
    return [entry["rows"] for entry in entries]


def pretrain_recording_batches(project: Path, env: dict, record_dir: Path, **pretrain) -> tuple[dict, dict]:
    """Pretrain with these overrides; returns its metrics and, per rank, the rows it trained on at each step."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["pretrain"].update(pretrain)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    (project / "record_batches.py").write_text(RECORD_BATCHES)
    record_dir.mkdir()
    done = subprocess.run([sys.executable, "record_batches.py"], cwd=project,
                          env={**env, "BATCH_RECORD_DIR": str(record_dir)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = {int(log.stem.removeprefix("rank")): rows_per_step(log) for log in record_dir.glob("rank*.jsonl")}
    return json.loads((project / "models/pretrained/metrics.json").read_text()), seen


def test_two_processes_split_the_global_batch_and_match_one(tokenized, tmp_path):
    project, env = tokenized
    single, single_seen = pretrain_recording_batches(project, env, tmp_path / "single", devices=1, strategy="auto",
                                                     batch_size=GLOBAL_BATCH, max_steps=STEPS)
    double, double_seen = pretrain_recording_batches(project, env, tmp_path / "double", devices=2, strategy="ddp",
                                                     batch_size=GLOBAL_BATCH, max_steps=STEPS)
    assert single["devices"] == 1 and double["devices"] == 2
    assert sorted(single_seen) == [0] and sorted(double_seen) == [0, 1]
    batches = zip(single_seen[0], double_seen[0], double_seen[1], strict=True)
    for step, (whole, first, second) in enumerate(batches):
        assert len(first) == len(second) == GLOBAL_BATCH // 2, f"step {step}: ranks got unequal shares"
        assert not set(first) & set(second), f"step {step}: both ranks trained on the same rows"
        assert sorted(first + second) == sorted(whole), f"step {step}: the ranks' rows are not the global batch"
    assert double["val_loss"] == pytest.approx(single["val_loss"], rel=1e-4)
