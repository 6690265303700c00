"""The registry against a local folder and a real S3 API server (moto) on 127.0.0.1."""

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from components.errors import InputError
from components.registry import Registry


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path) -> Registry:
    if request.param == "local":
        return Registry(str(tmp_path / "registry"))
    bucket = request.getfixturevalue("bucket")
    return Registry(f"s3://{bucket}/models")


@pytest.fixture
def model_folder(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "sub").mkdir()
    (folder / "sub" / "tokenizer.json").write_text("{}")
    return folder


def register(registry, folder, f1=0.9):
    return registry.register("news", folder, {"metrics": {"test_accuracy": f1, "test_macro_f1": f1}})


def test_versions_count_up_and_files_round_trip(registry, model_folder):
    assert register(registry, model_folder)["version"] == 1
    (model_folder / "model.safetensors").write_bytes(b"weights v2")
    assert register(registry, model_folder)["version"] == 2
    assert registry.versions("news") == [1, 2] and registry.models() == ["news"]
    first = registry.fetch(registry.resolve("news:1"))
    assert (first / "model.safetensors").read_bytes() == b"weights"
    assert (first / "sub" / "tokenizer.json").read_text() == "{}"
    assert (registry.fetch(registry.resolve("news")) / "model.safetensors").read_bytes() == b"weights v2"


def test_two_checkouts_registries_never_share_a_cached_copy(tmp_path, model_folder, monkeypatch):
    """Two checkouts each have `registry/` (the default uri) holding a `news:1`: predict must read its own."""
    contents = {}
    for checkout, weights in (("a", b"weights a"), ("b", b"weights b")):
        (tmp_path / checkout).mkdir()
        monkeypatch.chdir(tmp_path / checkout)
        (model_folder / "model.safetensors").write_bytes(weights)
        registry = Registry("registry")
        register(registry, model_folder)
        contents[checkout] = (registry.fetch(registry.resolve("news:1")) / "model.safetensors").read_bytes()
    assert contents == {"a": b"weights a", "b": b"weights b"}


def test_aliases_move_and_roll_back(registry, model_folder):
    for _ in range(3):
        register(registry, model_folder)
    registry.set_alias("news", "champion", 1)
    registry.set_alias("news", "champion", 3)
    assert registry.resolve("news@champion")["version"] == 3
    assert registry.rollback("news") == 1
    assert registry.resolve("news@champion")["version"] == 1
    with pytest.raises(InputError, match="no earlier version"):
        registry.rollback("news")


def test_unknown_refs_are_clear_errors(registry, model_folder):
    register(registry, model_folder)
    with pytest.raises(InputError, match="no alias 'champion'"):
        registry.resolve("news@champion")
    with pytest.raises(InputError, match="no version 7"):
        registry.resolve("news:7")
    with pytest.raises(InputError, match="cannot be set"):
        registry.set_alias("news", "latest", 1)


def test_concurrent_registrations_get_distinct_versions(registry, model_folder):
    with ThreadPoolExecutor(4) as pool:
        versions = list(pool.map(lambda _: register(registry, model_folder)["version"], range(4)))
    assert sorted(versions) == [1, 2, 3, 4]
    assert registry.versions("news") == [1, 2, 3, 4]


def test_a_written_version_is_never_overwritten(registry, model_folder):
    manifest = register(registry, model_folder)
    assert registry.store.put("news/versions/1.json", b"{}", create_only=True) is False
    assert json.loads(registry.store.get("news/versions/1.json")) == manifest


def test_alias_moves_at_once_keep_every_entry_of_the_history(registry, model_folder):
    for _ in range(8):
        register(registry, model_folder)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda version: registry.set_alias("news", "champion", version), range(1, 9)))
    record = json.loads(registry.store.get("news/aliases/champion.json"))
    assert sorted(record["previous"] + [record["version"]]) == list(range(1, 9))  # no move was lost


def promote_in_process(uri: str, alias: str, version: int, endpoint: str | None) -> int | None:
    """One registration's promotion step, in a process of its own: champion only if no better one exists."""
    import os

    if endpoint:
        os.environ["AWS_ENDPOINT_URL"] = endpoint
    registry = Registry(uri)
    candidate = registry.manifest("news", version)

    def better(record):
        champion = registry.manifest("news", record["version"]) if record else None
        beaten = champion is None or candidate["metrics"]["test_macro_f1"] >= champion["metrics"]["test_macro_f1"]
        return {"version": version, "previous": []} if beaten else None

    updated = registry.update_alias("news", alias, better)
    return updated["version"] if updated else None


def test_two_promotions_at_once_end_with_one_champion(registry, model_folder):
    """Two processes each promote their version only if it beats the champion they see, starting with none:
    with the writes compare-and-swapped the better one ends as champion whichever order they land in, every
    time (check-then-write lets the worse one, landing second, overwrite it)."""
    import multiprocessing
    import os

    for _ in range(5):
        register(registry, model_folder, f1=0.5)
        register(registry, model_folder, f1=0.9)
    context = multiprocessing.get_context("spawn")
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    for round_, (worse, better) in enumerate(((1, 2), (3, 4), (5, 6), (7, 8), (9, 10))):
        alias = f"champion-{round_}"
        with context.Pool(2) as pool:
            pool.starmap(promote_in_process, [(registry.uri, alias, better, endpoint),
                                              (registry.uri, alias, worse, endpoint)])
        assert registry.resolve(f"news@{alias}")["version"] == better
