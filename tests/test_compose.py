"""The team stack in infra/docker-compose.yml, checked by Compose itself: valid, and secrets only from the
environment."""

import os
import shutil
import subprocess

import yaml

from tests.conftest import ROOT

COMPOSE_FILE = ROOT / "infra/docker-compose.yml"
SECRETS = {"PREFECT_AUTH": "admin:s3cret-auth", "POSTGRES_PASSWORD": "s3cret-pg",
           "AWS_ACCESS_KEY_ID": "key-id-from-env", "AWS_SECRET_ACCESS_KEY": "s3cret-key"}


def compose_config(secrets: dict[str, str]) -> subprocess.CompletedProcess:
    compose = shutil.which("docker-compose")
    assert compose, "docker-compose is not installed: .ci/run installs it (apt-get install docker-compose)"
    env = {key: value for key, value in os.environ.items() if key not in SECRETS} | secrets
    return subprocess.run([compose, "-f", str(COMPOSE_FILE), "config"], env=env, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_stack_validates_and_takes_its_secrets_from_the_environment():
    done = compose_config(SECRETS)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    assert set(services) == {"postgres", "prefect-server", "minio", "setup", "cpu-worker", "gpu-worker"}
    server = services["prefect-server"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == SECRETS["PREFECT_AUTH"]
    assert SECRETS["POSTGRES_PASSWORD"] in server["PREFECT_API_DATABASE_CONNECTION_URL"]
    for worker in ("setup", "cpu-worker", "gpu-worker"):
        env = services[worker]["environment"]
        assert env["PREFECT_API_AUTH_STRING"] == SECRETS["PREFECT_AUTH"]
        assert env["AWS_SECRET_ACCESS_KEY"] == SECRETS["AWS_SECRET_ACCESS_KEY"]
        # They share the Prefect API and the S3 store, nothing on disk: each may run on a host of its own.
        assert env["PREFECT_API_URL"] and env["AWS_ENDPOINT_URL"] and not services[worker].get("volumes")
    assert "team-setup --results s3://" in services["setup"]["command"]
    assert "--pool gpu" in services["gpu-worker"]["command"] and "--limit 1" in services["gpu-worker"]["command"]
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and devices[0]["capabilities"] == ["gpu"]


def test_stack_refuses_to_render_without_a_secret():
    for missing in SECRETS:
        done = compose_config({key: value for key, value in SECRETS.items() if key != missing})
        assert done.returncode != 0
        assert f"set {missing}" in done.stderr, done.stderr


def test_image_context_leaves_out_environment_data_outputs_and_caches():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".venv", "data", "registry", ".gptpipe", ".dvc/cache", "storage", "models/*", "reports/*"} <= ignored
    assert "!models/foundation" in ignored and ".git" not in ignored  # the shipped foundation and git history stay
