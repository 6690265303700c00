import copy
import hashlib
import json
import os
import random
import string
import subprocess

import numpy as np
import polars as pl
import pytest
from tokenizers import Tokenizer

from components.held_out import normalise
from components.ingest import ingest, write_splits
from components.params import Params
from components.pretrain import RandomWindows
from components.special_tokens import END_OF_TEXT, PADDING
from components.tokenize import take_chars, token_dtype, tokenize
from tests.conftest import BIN, TINY_PARAMS, make_project, support_tickets


@pytest.fixture
def prepared(tmp_path):
    path = tmp_path / "tickets.csv"
    pl.DataFrame(support_tickets()).write_csv(path)
    params = {"data": {"labeled": {"path": str(path)}}}
    splits, report = ingest(Params.model_validate(params))
    write_splits(splits, report, tmp_path / "prepared")
    return tmp_path, splits


def run_tokenize(tmp_path, unlabeled: list[str], **tokenizer) -> tuple[dict, Tokenizer]:
    params = Params.model_validate({"data": {"unlabeled": {"paths": unlabeled}},
                                    "tokenizer": {"vocab_size": 320, **tokenizer}})
    manifest = tokenize(params, tmp_path / "prepared", tmp_path / "tokens")
    return manifest, Tokenizer.from_file(str(tmp_path / "tokens/tokenizer.json"))


def read_ids(folder, entry) -> np.ndarray:
    return np.concatenate([np.fromfile(folder / s["file"], dtype=entry["dtype"]) for s in entry["shards"]])


def test_special_tokens_and_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(200_000) == np.uint32
    assert Params.model_validate({"tokenizer": {"vocab_size": 100_000}}).tokenizer.vocab_size == 100_000


def test_the_tokenizer_sample_stops_at_its_character_limit_inside_a_batch():
    batches = [["a" * 10] * 5, ["b" * 10] * 5]
    assert list(take_chars(batches, 25)) == [["a" * 10] * 3]  # the text that reaches 25 is the last
    assert list(take_chars(batches, 60)) == [["a" * 10] * 5, ["b" * 10]]
    assert list(take_chars(batches, None)) == batches


def test_test_and_val_texts_never_enter_the_pretraining_stream(prepared):
    tmp_path, splits = prepared
    held = splits["test"]["text"].to_list()[:5] + splits["val"]["text"].to_list()[:2]
    # The same texts, some with other spacing, among genuinely new unlabeled texts and a blank one; one row holds
    # a test text inside a longer text.
    copies = ["  " + text.replace(" ", "\n ") for text in held[:4]] + held[4:]
    new = [f"unlabeled note {i} about a refund and a login" for i in range(30)]
    row = f"Forwarded from the old queue: {held[2]} -- end of forward"
    pl.DataFrame({"text": copies + new + ["   ", row]}).write_ndjson(tmp_path / "extra.jsonl")
    # A test article inside a larger file, wrapped over lines, with a composed accent before it.
    before, after = "Cafe\u0301 au lait, then the weekly digest.\n", "\nMore notes follow after the ticket.\n"
    (tmp_path / "note.txt").write_text(before + held[0].replace(" ", "\n", 3) + after)
    manifest, tokenizer = run_tokenize(tmp_path, [str(tmp_path / "extra.jsonl"), str(tmp_path / "note.txt")])
    assert tokenizer.token_to_id(END_OF_TEXT) == 0 and tokenizer.token_to_id(PADDING) == 1
    corpus = manifest["corpus"]
    assert corpus["unlabeled_dropped"] == {"blank": 1, "leakage": 7, "undecodable": 0}
    assert corpus["unlabeled_texts"] == 32 and corpus["train_texts"] == splits["train"].height
    assert corpus["held_out_cut"] == {"train": {"passages": 0, "chars": 0},
                                      "unlabeled": {"passages": 2, "chars": len(held[0]) + len(held[2])}}
    ids = read_ids(tmp_path / "tokens", manifest["train"])
    stream = tokenizer.decode(ids.tolist(), skip_special_tokens=False)
    texts = stream.split(END_OF_TEXT)
    # Each cut leaves the text on either side of it as texts of their own.
    assert texts[-1] == "" and len(texts) - 1 == splits["train"].height + 30 + 2 + 2
    assert {before, after, "Forwarded from the old queue: ", " -- end of forward"} <= set(texts)
    assert set(texts) >= set(splits["train"]["text"])
    normalised = normalise(stream)
    for text in splits["test"]["text"].to_list() + splits["val"]["text"].to_list():
        assert text not in normalised


def test_shards_add_up_and_hash_the_whole_stream(prepared):
    tmp_path, _ = prepared
    manifest, _ = run_tokenize(tmp_path, [], shard_tokens=1024)
    train = manifest["train"]
    assert manifest["vocab_size"] == 320 and train["dtype"] == "uint16" and len(train["shards"]) > 1
    assert all(s["tokens"] == 1024 for s in train["shards"][:-1]) and 0 < train["shards"][-1]["tokens"] <= 1024
    assert sum(s["tokens"] for s in train["shards"]) == train["tokens"]
    ids = read_ids(tmp_path / "tokens", train)
    assert len(ids) == train["tokens"] and hashlib.sha256(ids.tobytes()).hexdigest() == train["sha256"]
    for shard in train["shards"]:
        data = (tmp_path / "tokens" / shard["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    saved = json.loads((tmp_path / "tokens/manifest.json").read_text())
    assert saved == manifest and saved["val"]["tokens"] > 0
    again, _ = run_tokenize(tmp_path, [], shard_tokens=1024)
    assert again["train"]["sha256"] == train["sha256"]  # deterministic


def test_windows_from_shards_never_cross_a_shard_end(tmp_path):
    # Each shard holds consecutive ids that restart at its own base, so a crossing window would break x + 1 == y.
    paths = []
    for index, size in enumerate([50, 3000, 9, 700]):
        paths.append(tmp_path / f"train-{index:05d}.bin")
        (np.arange(size, dtype=np.uint16) + 10_000 * index).tofile(paths[-1])
    windows = list(RandomWindows(paths, "uint16", 16, 32, seed=3, num_batches=40))
    again = list(RandomWindows(paths, "uint16", 16, 32, seed=3, first_batch=20, num_batches=20))
    shards_seen = set()
    for x, y in windows:
        assert x.shape == (32, 16) and (y == x + 1).all()
        shards_seen |= set((x[:, 0] // 10_000).tolist())
    assert shards_seen == {0, 1, 3}  # the 9-token shard holds no 17-token window
    for (a, _), (b, _) in zip(windows[20:], again, strict=True):
        assert (a == b).all()
    # A single file, as before sharding, gives the same batches as a one-shard list.
    single = list(RandomWindows(paths[1], "uint16", 16, 32, seed=3, num_batches=3))
    listed = list(RandomWindows([paths[1]], "uint16", 16, 32, seed=3, num_batches=3))
    assert all((a == b).all() for (a, _), (b, _) in zip(single, listed, strict=True))


def test_a_vocab_above_65536_is_stored_as_uint32_and_trains_end_to_end(tmp_path):
    """90,000 distinct random words, each seen twice, give the BPE more than 65,536 tokens to learn."""
    rng = random.Random(0)
    words = sorted({"".join(rng.choices(string.ascii_lowercase, k=7)) for _ in range(90_000)})
    lines = [" ".join(words[i:i + 20]) for i in range(0, len(words), 20)] * 2
    params = copy.deepcopy(TINY_PARAMS)
    params["data"]["unlabeled"] = {"paths": ["words.txt"]}
    params["tokenizer"]["vocab_size"] = 70_000
    project = make_project(tmp_path / "project", params)
    (project / "words.txt").write_text("\n".join(lines) + "\n")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["dvc", "repro", "finetune"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    manifest = json.loads((project / "data/tokens/manifest.json").read_text())
    assert manifest["vocab_size"] == 70_000 and manifest["dtype"] == "uint32"
    assert read_ids(project / "data/tokens", manifest["train"]).max() >= 1 << 16
    pretrained = json.loads((project / "models/pretrained/config.json").read_text())
    assert pretrained["vocab_size"] == 70_000
    assert (project / "models/classifier/model.safetensors").stat().st_size > 0
