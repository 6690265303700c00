"""The connection to the S3 API server fails in the middle of a registration: dies mid-upload, refuses the alias
writes, or loses the answer to a write that landed. No half-visible version, no version or history entry counted
twice, and a retry once the store answers again finishes the registration, promotion decision included."""

import json
import time

import pytest

from components.errors import InputError
from components.params import Params
from components.register import register
from components.registry import Registry
from components.sources import TransientStorageError
from tests.components.test_promotion import write_run
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


def test_a_lost_answer_to_a_conditional_write_is_taken_as_the_write_it_was(s3_server, bucket, model_folder,
                                                                         monkeypatch):
    """The store creates the version's manifest, or moves the alias, and the answer is lost: boto3 sends the write
    again, which its own first attempt now fails (412). The registry reads what is there, finds its own write,
    and counts it done: one new version, one history entry, and rollback returns to the version before."""
    direct = Registry(f"s3://{bucket}/models")
    metadata = {"metrics": {"test_accuracy": 1, "test_macro_f1": 1}}
    direct.register("news", model_folder, metadata)
    direct.set_alias("news", "champion", 1)
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    through_proxy = Registry(f"s3://{bucket}/models")
    proxy.lose_answer(b"PUT ", b"/news/versions/2.json", b"If-None-Match")
    assert through_proxy.register("news", model_folder, metadata)["version"] == 2
    proxy.lose_answer(b"PUT ", b"/news/aliases/champion.json", b"If-Match")
    through_proxy.set_alias("news", "champion", 2)
    assert proxy.lost == 2  # both answers were lost, and each write was sent again
    assert direct.versions("news") == [1, 2]
    assert json.loads(direct.store.get("news/aliases/champion.json"))["previous"] == [1]
    assert through_proxy.rollback("news") == 1 and direct.resolve("news@champion")["version"] == 1


def test_a_registration_whose_alias_write_failed_takes_its_decision_when_run_again(s3_server, bucket, tmp_path,
                                                                                  monkeypatch):
    direct = Registry(f"s3://{bucket}/models")
    proxy = CuttableProxy(int(s3_server.rsplit(":", 1)[1]))
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{proxy.port}")
    params = Params.model_validate({"registry": {"uri": f"s3://{bucket}/models"},
                                    "evaluate": {"bootstrap_samples": 200}})
    repo = tmp_path / "run"
    write_run(repo, seed=0)
    assert register(params, repo)["alias"] == "champion"
    write_run(repo, seed=1)
    proxy.refuse(b"PUT ", b"/aliases/")
    with pytest.raises(TransientStorageError, match="write"):
        register(params, repo)
    assert direct.versions("bbc") == [1, 2] and direct.aliases("bbc") == {"champion": 1, "latest": 2}
    assert direct.decision("bbc", 2) is None
    proxy.restore()
    again = register(params, repo)
    assert again["registered"] is False and again["version"] == 2 and again["alias"] in ("champion", "challenger")
    assert direct.aliases("bbc")[again["alias"]] == 2 and direct.versions("bbc") == [1, 2]
    decision = direct.decision("bbc", 2)
    assert decision["alias"] == again["alias"] and decision["comparison"]["texts"] == again["test_split"]["texts"]
    assert register(params, repo)["reason"] == "unchanged, already registered"
