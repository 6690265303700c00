"""The lineage's git state: a run's own dvc.lock update leaves the code clean; an edited source file does not; a
pre-trained checkpoint is registered with the commit of the code that made it."""

import json
import subprocess

from components.register import git_state, register_checkpoint


def git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def committed_repo(repo):
    git(repo, "init", "-q")
    (repo / "train.py").write_text("print(1)\n")
    git(repo, "add", ".")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")


def test_only_a_changed_dvc_lock_keeps_the_checkout_clean(tmp_path):
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    committed_repo(tmp_path)
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    state = git_state(tmp_path)
    assert state["dirty"] is False and len(state["commit"]) == 40
    (tmp_path / "train.py").write_text("print(2)\n")
    assert git_state(tmp_path)["dirty"] is True


def test_a_registered_checkpoint_records_the_commit_of_its_checkout(tmp_path):
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir()
    committed_repo(repo)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    for folder in (repo / "models/pretrained", outside / "pretrained"):  # the first as a pipeline run leaves it
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"val_perplexity": 12.5}))
    assert register_checkpoint(str(tmp_path / "registry"), "base", repo / "models/pretrained")["git_commit"] == head
    assert register_checkpoint(str(tmp_path / "registry"), "other", outside / "pretrained")["git_commit"] is None
