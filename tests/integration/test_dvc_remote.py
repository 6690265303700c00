"""Stage outputs travel through a DVC remote on a real S3 API server: pushed as each stage ends, pulled by a
fresh clone, and a push cut off mid-way fails fast and completes on retry."""

import os
import subprocess
import time

import boto3
import pytest

from components.params import TeamParams
from flows.stages import push_outputs
from tests.conftest import BIN, TINY_PARAMS, CuttableProxy, gptpipe, make_project

pytestmark = pytest.mark.integration


def git(*args, cwd):
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    subprocess.run(["git", *args], cwd=cwd, check=True, env=env, capture_output=True)


def dvc(*args, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "dvc"), *args], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **(env or {})})


@pytest.fixture
def project_with_s3_remote(tmp_path, bucket):
    project = make_project(tmp_path / "project", TINY_PARAMS)
    assert dvc("remote", "add", "-d", "team", f"s3://{bucket}/dvc", cwd=project).returncode == 0
    git("commit", "-qam", "S3 remote", cwd=project)
    return project


def test_run_with_push_lets_a_fresh_clone_pull_every_output(project_with_s3_remote, bucket, prefect_api, tmp_path):
    project = project_with_s3_remote
    result = gptpipe("run", "--push", cwd=project, env={"PREFECT_API_URL": prefect_api})
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix="dvc/").get("Contents", [])]
    assert len(keys) >= 10
    git("add", "dvc.lock", "params.yaml", cwd=project)
    git("commit", "-qm", "run", cwd=project)
    clone = tmp_path / "clone"
    git("clone", "-q", str(project), str(clone), cwd=tmp_path)
    pulled = dvc("pull", cwd=clone)
    assert pulled.returncode == 0, pulled.stderr
    for output in ("data/prepared/train.parquet", "data/tokens/tokenizer.json", "models/pretrained/model.safetensors",
                   "models/classifier/model.safetensors", "reports/metrics.json"):
        assert (clone / output).read_bytes() == (project / output).read_bytes()
    status = dvc("status", cwd=clone)
    # Only the stage that looks at the data files every run shows ("always changed"), nothing out of date.
    assert status.stdout.split() == ["sources:", "always", "changed"], status.stdout


def test_push_cut_off_fails_fast_and_a_retry_completes(project_with_s3_remote, s3_server):
    project = project_with_s3_remote
    for stage in ("ingest", "tokenize"):
        assert dvc("repro", stage, cwd=project).returncode == 0
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.drop()  # the store is unreachable from the start of the push
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"}
    os.environ.update(env)
    try:
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="dvc push --run-cache tokenize"):
            push_outputs(project, ["tokenize"], print, TeamParams(remote_timeout_s=90))
        assert time.monotonic() - started < 90
        proxy.restore()
        push_outputs(project, ["tokenize"], print, TeamParams(remote_timeout_s=90))
    finally:
        os.environ["AWS_ENDPOINT_URL"] = s3_server
    assert "in sync" in dvc("status", "--cloud", "tokenize", cwd=project).stdout
