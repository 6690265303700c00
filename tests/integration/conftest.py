"""Fixtures of the signal tests (test_signals*.py), module-scoped: each module gets its own project."""

import copy
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import BIN, TINY_PARAMS, SilentStore, make_project
from tests.integration.signals import REGISTRY


@pytest.fixture(scope="module")
def silent_store():
    store = SilentStore()
    yield store
    store.close()


@pytest.fixture(scope="module")
def stages_done(tmp_path_factory, silent_store) -> tuple[Path, dict]:
    """A project whose stages have all run (tiny params, the registry on the silent store), and the environment
    of a run in it: no PREFECT_API_URL, so a run starts a temporary Prefect server, in the run's process group as
    `gptpipe run` starts it, unless the test names one; one Prefect home for the module, so only the first run
    migrates its database."""
    params = {**copy.deepcopy(TINY_PARAMS), "registry": {"uri": REGISTRY}}
    path = make_project(tmp_path_factory.mktemp("signals") / "project", params)
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PREFECT_HOME": str(tmp_path_factory.mktemp("home")),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "AWS_ENDPOINT_URL": silent_store.url,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
    done = subprocess.run(["dvc", "repro"], cwd=path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert not silent_store.contacted.is_set(), "a stage used the registry"
    return path, env
