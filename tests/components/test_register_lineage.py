"""The lineage's git state: a run's own dvc.lock update leaves the code clean; an edited source file does not."""

import subprocess

from components.register import git_state


def test_only_a_changed_dvc_lock_keeps_the_checkout_clean(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    (tmp_path / "train.py").write_text("print(1)\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "first")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    state = git_state(tmp_path)
    assert state["dirty"] is False and len(state["commit"]) == 40
    (tmp_path / "train.py").write_text("print(2)\n")
    assert git_state(tmp_path)["dirty"] is True
