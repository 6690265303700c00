import copy
import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable

import boto3
import polars as pl
import pytest
import yaml

from components import sources
from components.errors import InputError
from components.ingest import ingest
from components.params import Params
from components.sources import read_labeled, read_unlabeled, unlabeled_batches
from tests.components.hf_models import save_published
from tests.conftest import BIN, FOUNDATION, ROOT, TINY_PARAMS, make_project, repro, support_tickets


def test_labeled_csv_from_s3(tmp_path, bucket):
    path = tmp_path / "tickets.csv"
    pl.DataFrame(support_tickets()).rename({"text": "body", "label": "queue"}).write_csv(path)
    boto3.client("s3").upload_file(str(path), bucket, "exports/tickets.csv")
    params = Params.model_validate({"data": {"labeled": {"path": f"s3://{bucket}/exports/tickets.csv",
                                                         "text_column": "body", "label_column": "queue"}}})
    splits, report = ingest(params)
    assert report["kept"] == 120 and set(splits["test"]["label"]) == {"auth", "billing", "bug"}


def test_missing_s3_key_is_an_input_error(bucket):
    with pytest.raises(InputError, match=f"s3://{bucket}/nope.csv: no such S3 object or prefix"):
        read_labeled(f"s3://{bucket}/nope.csv", "text", "label")
    with pytest.raises(InputError, match="s3://no-such-bucket-here/x.csv: cannot read from S3"):
        list(read_unlabeled("s3://no-such-bucket-here/x.csv", "text"))


def test_missing_s3_key_exits_2_with_one_line(tmp_path, bucket):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"labeled": {"path": f"s3://{bucket}/gone.csv"}}}))
    done = subprocess.run([sys.executable, "-m", "components.ingest"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"s3://{bucket}/gone.csv" in done.stderr and not (tmp_path / "data").exists()


def test_unlabeled_prefix_from_s3_streams_each_object(bucket):
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="corpus/a.txt", Body=b"first text")
    client.put_object(Bucket=bucket, Key="corpus/b.jsonl", Body=b'{"body": "second"}\n{"body": "third"}\n')
    assert list(read_unlabeled(f"s3://{bucket}/corpus", "body")) == ["first text", "second", "third"]


def test_big_txt_file_streams_in_pieces_cut_at_line_ends(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "WHOLE_TXT_BYTES", 1000)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(sources, "TXT_TEXT_BYTES", 300)
    lines = [f"line {i} of a long corpus file\n" for i in range(2000)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    batches = list(unlabeled_batches(str(path), "text"))
    texts = [text for batch in batches for text in batch]
    assert len(batches) > 5 and "".join(texts) == path.read_text()
    assert all(text.endswith("\n") for text in texts) and max(map(len, texts)) < 400


def test_tables_stream_in_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BATCH_ROWS", 100)
    monkeypatch.setattr(sources, "BLOCK_BYTES", 1000)
    frame = pl.DataFrame({"text": [f"text number {i}" for i in range(1000)], "n": range(1000)})
    for suffix in ("csv", "jsonl", "parquet"):
        path = tmp_path / f"corpus.{suffix}"
        {"csv": frame.write_csv, "jsonl": frame.write_ndjson, "parquet": frame.write_parquet}[suffix](path)
        batches = list(unlabeled_batches(str(path), "text"))
        assert len(batches) >= 5, suffix
        assert [t for b in batches for t in b] == frame["text"].to_list(), suffix


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "txt"])
def test_unlabeled_undecodable_fails_or_is_skipped_and_counted(tmp_path, suffix):
    path = tmp_path / f"corpus.{suffix}"
    good = {"jsonl": b'{"text": "fine"}\n', "csv": b"text\nfine\n", "txt": b"fine\n"}[suffix]
    bad = {"jsonl": b'{"text": "bro\xffken"}\n', "csv": b"bro\xffken\n", "txt": b"bro\xffken\n"}[suffix]
    path.write_bytes(good + bad + good)
    line = 2 if suffix != "csv" else 3
    with pytest.raises(InputError, match=f"{path}: line {line} is not UTF-8"):
        list(read_unlabeled(str(path), "text"))
    counts = Counter()
    texts = list(read_unlabeled(str(path), "text", "skip", counts))
    assert counts["undecodable"] == 1 and not any("\ufffd" in text or "bro" in text for text in texts)


def test_unlabeled_missing_column_and_file(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("body\nhello\n")
    with pytest.raises(InputError, match=f"{path}: column 'text' not found"):
        list(read_unlabeled(str(path), "text"))
    with pytest.raises(InputError, match="pattern matches no file"):
        list(read_unlabeled(str(tmp_path / "*.jsonl"), "text"))
    with pytest.raises(InputError, match="gone.txt: file not found"):
        list(read_unlabeled(str(tmp_path / "gone.txt"), "text"))


def test_data_sources_change_exactly_when_a_file_does(tmp_path, bucket):
    import boto3

    from components.data_sources import describe

    def labeled(path: str) -> list[dict]:
        return describe(path, "data.labeled.path")

    (tmp_path / "a.csv").write_text("text,label\nx,1\n")
    single, pattern = str(tmp_path / "a.csv"), str(tmp_path / "*.csv")
    before = labeled(single), labeled(pattern)
    assert (labeled(single), labeled(pattern)) == before  # unchanged: nothing reruns
    (tmp_path / "a.csv").write_text("text,label\ny,1\n")  # replaced in place, same size
    assert labeled(single) != before[0]
    (tmp_path / "b.csv").write_text("text,label\nz,2\n")  # added to the glob
    assert len(labeled(pattern)) == 2
    client = boto3.client("s3")
    client.put_object(Bucket=bucket, Key="data/a.csv", Body=b"text,label\nx,1\n")
    first = labeled(f"s3://{bucket}/data/")
    assert labeled(f"s3://{bucket}/data/") == first
    client.put_object(Bucket=bucket, Key="data/a.csv", Body=b"text,label\nq,1\n")  # new ETag
    assert labeled(f"s3://{bucket}/data/") != first
    with pytest.raises(InputError, match="gone.csv: file not found; check data.test.path"):
        describe(str(tmp_path / "gone.csv"), "data.test.path")


def write_checkpoint(folder, seed: int) -> None:
    """A tiny checkpoint folder of this repository's kind, its weights drawn with `seed`."""
    import shutil

    import torch
    from safetensors.torch import save_model

    from components.model import GPT, GPTConfig

    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=8192, context_length=16, n_layer=1, n_head=2, d_model=8)
    folder.mkdir(exist_ok=True)
    save_model(GPT(config), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    shutil.copy(ROOT / FOUNDATION / "tokenizer.json", folder / "tokenizer.json")
    (folder / "metrics.json").write_text(json.dumps({"val_perplexity": 100.0 + seed}))


def test_the_foundation_record_changes_exactly_when_the_checkpoint_does(tmp_path):
    from components.data_sources import foundation_source
    from components.register import register_checkpoint

    folder, registry = tmp_path / "base", str(tmp_path / "registry")

    def source(init_from: str) -> dict:
        return foundation_source(Params.model_validate({"pretrain": {"init_from": init_from},
                                                        "registry": {"uri": registry}}))

    write_checkpoint(folder, seed=0)
    register_checkpoint(registry, "base", folder)
    by_folder, by_alias = source(str(folder)), source("registry:base@latest")
    assert (source(str(folder)), source("registry:base@latest")) == (by_folder, by_alias)  # unchanged: no rerun
    write_checkpoint(folder, seed=1)  # rebuilt in place
    assert source(str(folder))["sha256"] != by_folder["sha256"]
    assert source("registry:base@latest") == by_alias  # the alias has not moved
    register_checkpoint(registry, "base", folder)  # now it has
    moved = source("registry:base@latest")
    assert (moved["version"], by_alias["version"]) == (2, 1) and moved["sha256"] != by_alias["sha256"]
    assert source("scratch") == {"init_from": "scratch"}


def rebuilt_folder(tmp_path, hub) -> tuple[str, dict, Callable[[], None]]:
    folder = tmp_path / "tiny-llama"
    save_published("llama", folder)
    return str(folder), {}, lambda: save_published("llama", folder, seed=1)


def moved_hub_revision(tmp_path, hub) -> tuple[str, dict, Callable[[], None]]:
    save_published("llama", tmp_path / "first")
    hub.publish("tiny-org/tiny-llama", tmp_path / "first")
    save_published("llama", tmp_path / "second", seed=1)
    return ("hf:tiny-org/tiny-llama@main", hub.environment(tmp_path / "hub"),
            lambda: hub.publish("tiny-org/tiny-llama", tmp_path / "second"))


def moved_registry_alias(tmp_path, hub) -> tuple[str, dict, Callable[[], None]]:
    from components.register import register_checkpoint

    folder, registry = tmp_path / "base", str(tmp_path / "registry")
    write_checkpoint(folder, seed=0)
    register_checkpoint(registry, "base", folder)

    def register_another() -> None:
        write_checkpoint(folder, seed=1)
        register_checkpoint(registry, "base", folder)

    return "registry:base@latest", {}, register_another


@pytest.mark.parametrize("foundation", [rebuilt_folder, moved_hub_revision, moved_registry_alias],
                         ids=["folder-rebuilt", "hub-revision-moved", "registry-alias-moved"])
def test_tokenize_reruns_when_the_foundation_changes_and_nothing_reruns_when_it_does_not(foundation, tmp_path, hub):
    """`dvc repro` reruns tokenize (and pretrain after it: both read data/foundation.json) exactly when what
    `pretrain.init_from` names holds other weights: a folder rebuilt in place, a Hub branch moved to another commit,
    a registry alias moved to another version."""
    init_from, env, move = foundation(tmp_path, hub)
    params = copy.deepcopy(TINY_PARAMS)
    params["pretrain"]["init_from"] = init_from
    params["registry"] = {"uri": str(tmp_path / "registry")}
    project = make_project(tmp_path / "project", params)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "GPTPIPE_CACHE": str(tmp_path / "cache"),
           **env}
    repro(project, env, "tokenize")
    first = json.loads((project / "data/foundation.json").read_text())
    # Unchanged: the sources stage looks again, and nothing after it runs.
    assert "Running stage 'tokenize'" not in repro(project, env, "tokenize")
    move()
    rerun = repro(project, env, "tokenize")
    assert "Running stage 'tokenize'" in rerun and "Running stage 'ingest'" not in rerun
    assert json.loads((project / "data/foundation.json").read_text())["sha256"] != first["sha256"]
    stages = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    assert "data/foundation.json" in stages["pretrain"]["deps"]
