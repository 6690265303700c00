"""A registry nobody can escape: names, aliases, versions and manifest keys that would reach outside the registry
root or the download cache are refused with nothing written there, and a file changed after registration fails
its sha256 check on download, on load from the cache, and in `gptpipe predict`. Against a real local folder and a
real S3 API server (moto) on 127.0.0.1."""

import hashlib
import json
import re
import uuid
from pathlib import Path

import boto3
import pytest

from components.errors import ERROR_PREFIX, InputError
from components.registry import NAME_PATTERN, VERSION_PATTERN, ModelRef, Registry, cache_root
from tests.conftest import gptpipe

BAD_NAMES = ["", ".", "..", "../escaped", "../../../escaped", "a/b", "a/../../b", "/abs", "a\\b", "-dash", ".hidden",
             "_under", "with space", "bbc\n", "nul\0", "ü", "a" * 65, "bbc@champion", "bbc:1"]
GOOD_NAMES = ["bbc", "News-v2.1_x", "9", "a..b", "A" + "b" * 63]
BAD_VERSIONS = ["0", "-1", "1.0", "01", "1e3", "../1", "1/../2", "", "٣", "1\n", "10000000000"]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    """The download cache inside tmp_path, so that the tests can see every file written anywhere."""
    monkeypatch.setenv("GPTPIPE_CACHE", str(tmp_path / "cache"))
    return cache_root()


@pytest.fixture(params=["local", "s3"])
def registry(request, tmp_path) -> Registry:
    if request.param == "local":
        return Registry(str(tmp_path / "x" / "a" / "b" / "registry"))  # deep, so `..` has room to land
    request.getfixturevalue("s3_server")
    bucket = f"integrity-{uuid.uuid4().hex}"  # one per test: parameter ids would not fit a bucket name
    boto3.client("s3").create_bucket(Bucket=bucket)
    return Registry(f"s3://{bucket}/models")


@pytest.fixture
def model_folder(tmp_path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "tokenizer.json").write_text('{"vocab": {"a": 0, "b": 1}}')
    return folder


def everything(tmp_path: Path, registry: Registry) -> dict:
    """Every file under tmp_path with its content, and for S3 every object in the bucket (any prefix)."""
    files = {str(p.relative_to(tmp_path)): p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    if registry.uri.startswith("s3://"):
        bucket = registry.uri.removeprefix("s3://").split("/")[0]
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
        files |= {f"s3:{obj['Key']}": obj["ETag"] for page in pages for obj in page.get("Contents", [])}
    return files


def outside(tmp_path: Path, registry: Registry, cache: Path) -> dict:
    """What lies outside the registry root and the cache: must never change."""
    root = str(Path(registry.uri).relative_to(tmp_path)) if not registry.uri.startswith("s3://") else None
    prefix = "s3:models/"
    return {key: value for key, value in everything(tmp_path, registry).items()
            if not key.startswith(str(cache.relative_to(tmp_path)) + "/")
            and not (root and key.startswith(root + "/")) and not key.startswith(prefix)}


def register(registry: Registry, folder: Path, name: str = "bbc") -> dict:
    return registry.register(name, folder, {"metrics": {"test_accuracy": 0.9, "test_macro_f1": 0.9}})


def refused(value: object, pattern: str):
    """pytest.raises for an InputError whose message names the value (as repr) and the pattern."""
    return pytest.raises(InputError, match=re.escape(repr(value)) + ".*" + re.escape(pattern))


def test_valid_names_aliases_and_versions_still_work(registry, model_folder):
    for name in GOOD_NAMES:
        assert register(registry, model_folder, name)["version"] == 1
        assert register(registry, model_folder, name)["version"] == 2
        for alias in ("champion", "canary-2.0", "A_1"):
            registry.set_alias(name, alias, 2)
            registry.set_alias(name, alias, "1")  # a version as its decimal string, as the CLI may pass it
            assert registry.resolve(f"{name}@{alias}")["version"] == 1
            assert registry.rollback(name, alias) == 2
        copy = registry.fetch(registry.resolve(f"{name}:2"))
        assert (copy / "model.safetensors").read_bytes() == b"weights"
        assert registry.fetch(registry.resolve(name)) == copy  # a bare name is NAME@latest, the cached copy reused
    assert registry.models() == sorted(GOOD_NAMES)


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_a_bad_model_name_is_refused_at_every_entry_point_and_writes_nothing(registry, model_folder, tmp_path,
                                                                             cache, bad):
    register(registry, model_folder)
    registry.set_alias("bbc", "champion", 1)
    before = everything(tmp_path, registry)
    with refused(bad, NAME_PATTERN):
        register(registry, model_folder, bad)
    with refused(bad, NAME_PATTERN):
        registry.set_alias(bad, "champion", 1)
    with refused(bad, NAME_PATTERN):
        registry.update_alias(bad, "champion", lambda record: {"version": 1, "previous": []})
    with refused(bad, NAME_PATTERN):
        registry.rollback(bad, "champion")
    with refused(bad, NAME_PATTERN):
        registry.manifest(bad, 1)
    with refused(bad, NAME_PATTERN):
        registry.versions(bad)
    with refused(bad, NAME_PATTERN):
        registry.aliases(bad)
    if "@" not in bad and ":" not in bad:
        for ref in (f"{bad}@champion", f"{bad}:1"):
            with refused(bad, NAME_PATTERN):
                registry.resolve(ref)
    with pytest.raises(InputError, match=re.escape(NAME_PATTERN)):
        registry.fetch({**registry.manifest("bbc", 1), "name": bad})
    assert everything(tmp_path, registry) == before  # nothing written, inside the roots or out


@pytest.mark.parametrize("bad", BAD_NAMES, ids=repr)
def test_a_bad_alias_is_refused_and_writes_nothing(registry, model_folder, tmp_path, bad):
    register(registry, model_folder)
    before = everything(tmp_path, registry)
    with refused(bad, NAME_PATTERN):
        registry.set_alias("bbc", bad, 1)
    with refused(bad, NAME_PATTERN):
        registry.update_alias("bbc", bad, lambda record: {"version": 1, "previous": []})
    with refused(bad, NAME_PATTERN):
        registry.rollback("bbc", bad)
    if ":" not in bad:
        with refused(bad, NAME_PATTERN):
            registry.resolve(f"bbc@{bad}")
    assert everything(tmp_path, registry) == before
    assert not [key for key in everything(tmp_path, registry) if "escaped" in key]


def test_the_escaping_alias_of_the_issue_writes_nothing_outside(registry, model_folder, tmp_path, cache):
    """set_alias('bbc', '../../../escaped', 1): on the local folder this would have written
    x/escaped.json and a lock file beside the registry root."""
    register(registry, model_folder)
    before = outside(tmp_path, registry, cache)
    with pytest.raises(InputError, match=r"alias '\.\./\.\./\.\./escaped' is not allowed"):
        registry.set_alias("bbc", "../../../escaped", 1)
    assert outside(tmp_path, registry, cache) == before
    assert not [key for key in everything(tmp_path, registry) if "escaped" in key]


@pytest.mark.parametrize("bad", BAD_VERSIONS, ids=repr)
def test_a_bad_version_is_refused(registry, model_folder, tmp_path, bad):
    register(registry, model_folder)
    before = everything(tmp_path, registry)
    with refused(bad, VERSION_PATTERN):
        registry.resolve(f"bbc:{bad}")
    with refused(bad, VERSION_PATTERN):
        registry.set_alias("bbc", "champion", bad)
    with refused(bad, VERSION_PATTERN):
        registry.manifest("bbc", bad)
    assert everything(tmp_path, registry) == before


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, None, 10**10], ids=repr)
def test_a_version_must_be_a_positive_integer(registry, model_folder, bad):
    register(registry, model_folder)
    with refused(bad, VERSION_PATTERN):
        registry.set_alias("bbc", "champion", bad)
    with refused(bad, VERSION_PATTERN):
        registry.manifest("bbc", bad)
    with refused(bad, VERSION_PATTERN):
        registry.fetch({**registry.manifest("bbc", 1), "version": bad})


def test_model_refs_parse_only_valid_parts():
    assert ModelRef.parse("bbc") == ModelRef("bbc", alias="latest")
    assert ModelRef.parse("bbc@champion") == ModelRef("bbc", alias="champion")
    assert ModelRef.parse("bbc:12") == ModelRef("bbc", version=12)
    for ref in ("bbc@", "bbc@../x", "../bbc", "bbc:", "bbc:0", "bbc:1:2", "bbc@champion:1", "bbc:1@champion"):
        with pytest.raises(InputError, match="is not allowed"):
            ModelRef.parse(ref)


def forge_version(registry: Registry, version: int, files: dict[str, bytes], blob: str | None = None) -> dict:
    """A version whose manifest someone wrote by hand, each file uploaded under its (possibly hostile) key."""
    blob = blob or f"bbc/blobs/{uuid.uuid4().hex}"
    for relative, data in files.items():
        if registry.uri.startswith("s3://"):  # the S3 key as given, `..` and all, behind the registry's back
            bucket, _, prefix = registry.uri.removeprefix("s3://").partition("/")
            boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{blob}/{relative}", Body=data)
    manifest = {"name": "bbc", "version": version, "blob": blob,
                "files": {relative: hashlib.sha256(data).hexdigest() for relative, data in files.items()},
                "created": "2025-01-01T00:00:00+00:00"}
    assert registry.store.put(f"bbc/versions/{version}.json", json.dumps(manifest).encode(), create_only=True)
    return manifest


# From the cache's staging folder <cache>/<where>/bbc/blobs/.fetch-XXXX, six `..` reach tmp_path; from the local
# registry's <tmp>/x/a/b/registry/bbc/blobs/<id>, the same key reads <tmp>/x/outside/victim.txt.
DEEP = "../../../../../../outside/victim.txt"


@pytest.mark.parametrize("key", ["../../../../victim.txt", DEEP, "sub/../../../../../../victim.txt", "ABSOLUTE",
                                 "./victim.txt", "sub//victim.txt", "sub\\..\\..\\victim.txt"])
def test_a_manifest_key_that_escapes_is_refused_and_nothing_is_written(registry, model_folder, tmp_path, cache, key):
    key = str(tmp_path / "absolute" / "victim.txt") if key == "ABSOLUTE" else key
    register(registry, model_folder)
    # Where a store without the checks would read the file from, with the digest the manifest records: the
    # download would then succeed and land the file outside the cache.
    source = tmp_path / "x" / "outside" / "victim.txt"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"victim")
    manifest = forge_version(registry, 2, {"model.safetensors": b"weights", key: b"victim"})
    before = outside(tmp_path, registry, cache)
    for attempt in (lambda: registry.fetch(registry.resolve("bbc:2")), lambda: registry.fetch(manifest)):
        with pytest.raises(InputError, match=re.escape(repr(key)) + ".* is not allowed"):
            attempt()
    assert outside(tmp_path, registry, cache) == before
    assert [p for p in tmp_path.rglob("victim.txt")] == [source]
    assert not [p for p in cache.rglob("*") if p.is_file()]  # not even the good file of that version


@pytest.mark.parametrize("blob", ["../../../../outside", "bbc/blobs/../../../outside", "other/blobs/" + "0" * 32,
                                  "bbc/blobs/not-hex", "bbc/blobs/" + "0" * 32 + "/.."])
def test_a_manifest_blob_outside_its_model_is_refused(registry, model_folder, tmp_path, cache, blob):
    register(registry, model_folder)
    forged = forge_version(registry, 2, {"model.safetensors": b"weights"}, blob=blob)
    before = outside(tmp_path, registry, cache)
    for attempt in (lambda: registry.resolve("bbc:2"), lambda: registry.fetch(forged)):
        with pytest.raises(InputError, match=re.escape(repr(blob))):
            attempt()
    assert outside(tmp_path, registry, cache) == before
    assert not cache.exists() or not [p for p in cache.rglob("*") if p.is_file()]


def test_a_manifest_without_digests_is_refused(registry, model_folder):
    manifest = register(registry, model_folder)
    assert set(manifest["files"]) == {"model.safetensors", "tokenizer.json"}
    assert manifest["files"]["tokenizer.json"] == hashlib.sha256(b'{"vocab": {"a": 0, "b": 1}}').hexdigest()
    with pytest.raises(InputError, match="records no file digests"):
        registry.fetch({**manifest, "files": {}})
    with pytest.raises(InputError, match="tokenizer.json has no sha256 recorded"):
        registry.fetch({**manifest, "files": {**manifest["files"], "tokenizer.json": None}})


def overwrite_stored(registry: Registry, manifest: dict, relative: str, data: bytes) -> None:
    """Replace a registered file in the store itself, as a careless hand (or a hostile one) would."""
    key = f"{manifest['blob']}/{relative}"
    if registry.uri.startswith("s3://"):
        bucket, _, prefix = registry.uri.removeprefix("s3://").partition("/")
        boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
    else:
        (Path(registry.uri) / key).write_bytes(data)


def test_a_file_changed_in_the_store_fails_its_digest_check(registry, model_folder, cache):
    manifest = register(registry, model_folder)
    original = (model_folder / "tokenizer.json").read_bytes()
    swapped = original.replace(b'"a": 0, "b": 1', b'"a": 1, "b": 0')  # same size, same vocabulary size
    assert len(swapped) == len(original) and swapped != original
    overwrite_stored(registry, manifest, "tokenizer.json", swapped)
    with pytest.raises(InputError, match=r"bbc:1/tokenizer\.json does not match the sha256"):
        registry.fetch(registry.resolve("bbc@latest"))
    assert not [p for p in cache.rglob("*") if p.is_file()]  # no copy of the damaged version is kept
    overwrite_stored(registry, manifest, "tokenizer.json", original)
    assert (registry.fetch(registry.resolve("bbc:1")) / "tokenizer.json").read_bytes() == original


def test_a_cached_copy_changed_after_download_fails_on_load(registry, model_folder):
    copy = registry.fetch(registry.resolve("bbc:" + str(register(registry, model_folder)["version"])))
    (copy / "tokenizer.json").write_text('{"vocab": {"a": 1, "b": 0}}')
    with pytest.raises(InputError, match=r"cached copy .*tokenizer\.json of bbc:1/tokenizer\.json does not match"):
        registry.fetch(registry.resolve("bbc:1"))
    (copy / "model.safetensors").unlink()
    with pytest.raises(InputError, match=r"bbc:1/model\.safetensors does not match"):
        registry.fetch(registry.resolve("bbc:1"))


def test_a_link_out_of_the_local_registry_is_refused(tmp_path, model_folder):
    """A model folder inside the registry that is a link to elsewhere: resolved, it is outside; nothing is written
    through it."""
    root = tmp_path / "registry"
    root.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "bbc").symlink_to(elsewhere)
    with pytest.raises(InputError, match="outside"):
        register(Registry(str(root)), model_folder)
    assert not list(elsewhere.iterdir())


# gptpipe predict on a real (tiny, untrained) classifier folder written by the fine-tuning stage's own writer.


@pytest.fixture
def classifier_folder(tmp_path) -> Path:
    from types import SimpleNamespace

    from components.finetune import save_classifier
    from components.model import GPT, Classifier, GPTConfig
    from components.tokenize import train_tokenizer

    texts = [f"ticket {i}: my invoice refund password login crash error" for i in range(50)]
    tokenizer = train_tokenizer(texts, vocab_size=300, min_frequency=1)
    tokenizer_file = tmp_path / "tokenizer.json"
    tokenizer.save(str(tokenizer_file))
    # Re-serialised without escapes, so that swapping two tokens' ids below keeps the file's size.
    tokenizer_file.write_bytes(json.dumps(json.loads(tokenizer_file.read_bytes()), ensure_ascii=False).encode())
    backbone = GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), context_length=16, n_layer=1, n_head=1,
                             d_model=8))
    out = tmp_path / "classifier"
    save_classifier(Classifier(backbone, 3), tokenizer_file, {"labels": ["auth", "billing", "bug"], "temperature": 1.0},
                    SimpleNamespace(pooling="mean", max_chunks=1), out)
    return out


def swapped_tokenizer(data: bytes) -> bytes:
    """The same tokenizer with two tokens' ids exchanged: same file size, same vocabulary size, other ids."""
    tokenizer = json.loads(data)
    vocab = tokenizer["model"]["vocab"]
    vocab["a"], vocab["b"] = vocab["b"], vocab["a"]
    swapped = json.dumps(tokenizer, ensure_ascii=False).encode()
    return swapped


def test_predict_refuses_a_registered_model_whose_tokenizer_was_replaced(tmp_path, classifier_folder):
    registry = Registry(str(tmp_path / "registry"))
    intact = register(registry, classifier_folder)
    damaged = register(registry, classifier_folder)
    tokenizer = (classifier_folder / "tokenizer.json").read_bytes()
    swapped = swapped_tokenizer(tokenizer)
    assert len(swapped) == len(tokenizer) and swapped != tokenizer
    overwrite_stored(registry, damaged, "tokenizer.json", swapped)

    def predict(ref: str):
        return gptpipe("predict", "--registry", registry.uri, "--model", ref, "my invoice", cwd=tmp_path)

    done = predict(f"bbc:{intact['version']}")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[0])["label"] in ("auth", "billing", "bug")

    done = predict(f"bbc:{damaged['version']}")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(ERROR_PREFIX), done.stderr
    assert "bbc:2/tokenizer.json does not match the sha256" in done.stderr

    copy = registry.fetch(registry.resolve("bbc:1"))  # the intact version's cached copy, changed after download
    (copy / "tokenizer.json").write_bytes(swapped)
    done = predict("bbc:1")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "tokenizer.json" in done.stderr, done.stderr

    done = gptpipe("registry", "promote", "bbc:1", "--alias", "../../../escaped", "--registry", registry.uri,
                   cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and NAME_PATTERN in done.stderr, done.stderr
    assert not list(tmp_path.rglob("*escaped*"))
