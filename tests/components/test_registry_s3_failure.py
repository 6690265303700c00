"""The connection to the S3 API server dies in the middle of a registration: no half-visible version, and a
retry once the store is reachable again completes."""

import time

import pytest

from components.errors import InputError
from components.registry import Registry
from components.sources import TransientStorageError
from tests.conftest import CuttableProxy


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(bytes(range(256)) * 40_000)  # 10 MB: the cut lands mid-upload
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_registration_interrupted_mid_upload_leaves_no_version_and_retry_works(s3_server, bucket, model_folder,
                                                                              monkeypatch):
    direct = Registry(f"s3://{bucket}/models")
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]), cut_after_bytes=3_000_000)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    through_proxy = Registry(f"s3://{bucket}/models")
    started = time.monotonic()
    with pytest.raises(TransientStorageError, match="upload.*did not answer"):
        through_proxy.register("news", model_folder, {"metrics": {"test_accuracy": 1, "test_macro_f1": 1}})
    assert time.monotonic() - started < 60  # bounded retries and timeouts, not minutes of hanging
    assert direct.versions("news") == []
    proxy.restore()
    manifest = through_proxy.register("news", model_folder, {"metrics": {"test_accuracy": 1, "test_macro_f1": 1}})
    assert manifest["version"] == 1 and direct.versions("news") == [1]
    copy = direct.fetch(direct.resolve("news@latest"))
    assert (copy / "model.safetensors").read_bytes() == (model_folder / "model.safetensors").read_bytes()


def test_a_dead_store_is_transient_and_a_missing_object_is_bad_input(s3_server, bucket, monkeypatch):
    with pytest.raises(InputError, match="no alias"):
        Registry(f"s3://{bucket}/models").resolve("news@champion")
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]))
    proxy.drop()  # every connection refused from now on, as by a store that went away
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    with pytest.raises(TransientStorageError, match="did not answer"):
        Registry(f"s3://{bucket}/models").resolve("news@champion")
