"""The foundation pipeline end to end on a tiny corpus: local shards, s3:// shards and an fsspec URL through the
same code, continuation from an earlier foundation, and resume after kill -9."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import polars as pl
import pytest
from tokenizers import Tokenizer

from components.curves import read_curves
from components.foundation import build_foundation, is_held_out, source_of
from components.params import FoundationParams
from tests.conftest import ROOT, support_tickets

TINY_FOUNDATION = {
    "corpus": {"licences": {"tickets": "CC0", "notes": "public domain"}, "val_fraction": 0.1},
    "tokenizer": {"vocab_size": 320, "train_max_mb": 1},
    "model": {"n_layer": 1, "n_head": 2, "d_model": 16, "context_length": 16},
    "pretrain": {"init_from": "scratch", "batch_size": 4, "max_steps": 4, "warmup_steps": 1, "val_every_n_steps": 2,
                 "val_batches": 2, "checkpoint_every_n_steps": 2, "precision": "32-true"},
}
FILES = {"model.safetensors", "config.json", "tokenizer.json", "metrics.json", "lineage.json", "MODEL_CARD.md",
         "curves"}


@pytest.fixture
def corpus(tmp_path) -> Path:
    """Two sources: a Parquet shard of tickets and a JSONL shard of notes."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    pl.DataFrame(support_tickets(rows_per_label=60)).select("text").write_parquet(folder / "tickets-00000.parquet")
    pl.DataFrame({"text": [f"Note {i}: the team met on day {i % 7} and agreed the plan for week {i}."
                           for i in range(400)]}).write_ndjson(folder / "notes-00000.jsonl")
    return folder


def build(corpus_paths: list[str], out: Path, work: Path, **pretrain) -> dict:
    cfg = FoundationParams.model_validate({**TINY_FOUNDATION, "corpus": {**TINY_FOUNDATION["corpus"],
                                                                         "paths": corpus_paths},
                                           "pretrain": {**TINY_FOUNDATION["pretrain"], **pretrain}})
    return build_foundation(cfg, seed=1, registry_uri=str(work / "registry"), out=out, work_root=work)


def test_source_names_and_a_stable_held_out_choice():
    assert source_of("s3://b/corpus/wikipedia-00003.parquet") == "wikipedia"
    assert source_of("/data/cia-factbook-00000.parquet") == "cia-factbook"
    texts = [f"document {i}" for i in range(2000)]
    held = [t for t in texts if is_held_out(t, 0.1)]
    assert 120 < len(held) < 280 and held == [t for t in texts if is_held_out(t, 0.1)]


def test_the_foundation_tokenizer_never_sees_its_held_out_documents(tmp_path):
    """Every document that carries a made-up word is on the held-out side: the BPE, trained on that corpus, has
    no token of it, though as often as it occurs it would be among the first merges."""
    marker = " zqxjvk" * 3
    held_out = [text for text in (f"Memo {i}:{marker} for the plan." for i in range(3000)) if is_held_out(text, 0.1)]
    notes = [text for text in (f"Note {i}: the team met and agreed the plan." for i in range(600))
             if not is_held_out(text, 0.1)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    pl.DataFrame({"text": notes + held_out}).write_parquet(corpus / "memos-00000.parquet")
    summary = build([str(corpus)], tmp_path / "out", tmp_path / "work", max_steps=1)
    assert len(held_out) > 200 and summary["corpus"]["memos"]["held_out_tokens"] > 0
    vocab = Tokenizer.from_file(str(tmp_path / "out/tokenizer.json")).get_vocab()
    assert not [token for token in vocab if "zq" in token or "xj" in token or "vk" in token]
    assert "Note" in vocab  # the training side did shape it


def test_a_source_with_too_little_held_out_text_is_left_out_of_the_per_source_perplexity(corpus, tmp_path):
    """A source whose held-out share is shorter than one window gets no perplexity: the metrics stay strict JSON
    (no NaN) and the card says why its cell is empty."""
    short = next(text for text in (f"Fig {i}." for i in range(1000)) if is_held_out(text, 0.1))
    facts = [text for text in (f"Fact {i}: the river is long and the hills are green." for i in range(300))
             if not is_held_out(text, 0.1)]
    pl.DataFrame({"text": [*facts, short]}).write_parquet(corpus / "facts-00000.parquet")
    summary = build([str(corpus / "*")], tmp_path / "out", tmp_path / "work", max_steps=1)
    assert 0 < summary["corpus"]["facts"]["held_out_tokens"] <= TINY_FOUNDATION["model"]["context_length"]
    assert set(summary["val_perplexity_per_source"]) == {"tickets", "notes"}

    def refuse(constant: str):
        raise AssertionError(f"{constant} in metrics.json")

    json.loads((tmp_path / "out/metrics.json").read_text(), parse_constant=refuse)
    assert "| too little held out |" in (tmp_path / "out/MODEL_CARD.md").read_text()


def test_foundation_from_local_s3_and_fsspec_shards(corpus, tmp_path, bucket):
    local = build([str(corpus / "*")], tmp_path / "local", tmp_path / "work-local")
    out = tmp_path / "local"
    assert {p.name for p in out.iterdir()} == FILES
    lineage = json.loads((out / "lineage.json").read_text())
    assert {Path(f["uri"]).name for f in lineage["files"]} == {"tickets-00000.parquet", "notes-00000.jsonl"}
    assert local["corpus"]["tickets"]["documents"] == 180 and local["corpus"]["tickets"]["licence"] == "CC0"
    assert set(local["val_perplexity_per_source"]) == {"tickets", "notes"}
    assert local["tokens_seen"] == 4 * 4 * 16
    curves = read_curves(out / "curves")  # DVCLive's files: a row per step, validation every 2
    assert curves["train/loss"]["step"].to_list() == [1, 2, 3, 4]
    assert curves["val/perplexity"]["step"].to_list() == [2, 4]
    card = (out / "MODEL_CARD.md").read_text()
    assert "| notes | public domain |" in card and "| tickets | CC0 |" in card
    # The same shards from S3 and through fsspec (the code path of hf:// paths): the same bytes, the same model.
    client = boto3.client("s3")
    for shard in corpus.iterdir():
        client.upload_file(str(shard), bucket, f"corpus/{shard.name}")
    for uri, name in ((f"s3://{bucket}/corpus/", "s3"), (f"file://{corpus}", "fsspec")):
        remote = build([uri], tmp_path / name, tmp_path / f"work-{name}")
        files = json.loads((tmp_path / name / "lineage.json").read_text())["files"]
        assert all(f["uri"].startswith(uri.split("://")[0] + "://") for f in files)
        assert sorted(f["sha256"] for f in files) == sorted(f["sha256"] for f in lineage["files"])
        assert remote["val_loss"] == pytest.approx(local["val_loss"], abs=1e-5)


def test_a_foundation_continues_an_earlier_one(corpus, tmp_path):
    first = build([str(corpus)], tmp_path / "first", tmp_path / "work")
    second = build([str(corpus)], tmp_path / "second", tmp_path / "work", init_from=str(tmp_path / "first"),
                   max_steps=2)
    assert second["tokens_seen"] == first["tokens_seen"] + 2 * 4 * 16
    assert second["continued_from"]["path"] == str(tmp_path / "first")
    assert (tmp_path / "second/tokenizer.json").read_text() == (tmp_path / "first/tokenizer.json").read_text()
    assert "Continued from" in (tmp_path / "second/MODEL_CARD.md").read_text()


def test_foundation_resumes_after_kill(corpus, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"foundation": {**TINY_FOUNDATION, "corpus": {
        **TINY_FOUNDATION["corpus"], "paths": [str(corpus)]}, "pretrain": {
        **TINY_FOUNDATION["pretrain"], "max_steps": 100, "checkpoint_every_n_steps": 25, "val_every_n_steps": 100}}}))
    command = [sys.executable, "-m", "components.foundation", "--params", str(params), "--out", str(tmp_path / "out")]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".gptpipe/foundation/resume/*/last.ckpt")) and time.monotonic() < deadline:
        assert process.poll() is None, "the foundation run ended before its first checkpoint"
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((tmp_path / "out/metrics.json").read_text())
    assert metrics["resumed_from_step"] >= 25 and metrics["tokens_seen"] == 100 * 4 * 16
    steps = read_curves(tmp_path / "out/curves")["train/loss"]["step"].to_list()
    assert steps == sorted(set(steps)) and steps[-1] == 100  # continued, no step twice
