"""The layout's promises: components/ stays free of the orchestrators, one CLI lists every verb, lint is clean."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import build_parser
from tests.conftest import BIN, ROOT


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted((ROOT / "components").glob("*.py")), ids=lambda p: p.name)
def test_components_never_import_prefect_or_dvc(path):
    assert not imported_modules(path) & {"prefect", "dvc"}


def test_help_lists_every_verb():
    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert verbs == {"run", "predict", "export", "generate", "foundation", "notify", "team-setup", "registry"}
    out = subprocess.run([str(BIN / "gptpipe"), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(verb in out for verb in verbs)


def test_a_reader_that_leaves_early_ends_the_cli_quietly(tmp_path):
    """`gptpipe registry list | head`: the pipe's reader is gone before the output is written."""
    reader, writer = os.pipe()
    os.close(reader)
    with os.fdopen(writer, "wb") as closed_pipe:
        done = subprocess.run([str(BIN / "gptpipe"), "registry", "list", "--registry", str(tmp_path)],
                              stdout=closed_pipe, stderr=subprocess.PIPE, text=True)
    assert done.returncode == 141, done.stderr
    assert done.stderr == ""


def test_bad_override_exits_2_with_one_line(tmp_path):
    done = subprocess.run([str(BIN / "gptpipe"), "run", "--set", "model.n_head=3"], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "model.n_head (3)" in done.stderr


def test_ruff_is_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "components", "flows", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_team_setup_without_a_prefect_server_exits_2_with_one_line():
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    done = subprocess.run([str(BIN / "gptpipe"), "team-setup", "--results", "s3://bucket/results"], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "PREFECT_API_URL" in done.stderr
