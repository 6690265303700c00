"""Tokenize: train a byte-level BPE on the pre-training corpus and write it as sharded, memory-mappable token ids.

    python -m components.tokenize --prepared data/prepared --out data/tokens

The corpus is the train split (with the texts whose labels `data.labels_per_class` held back) plus
`data.unlabeled.paths`, streamed in batches so it may be larger than memory.
Validation and test texts are kept out of it (components/held_out.py): an unlabeled text equal to one is dropped,
one embedded in a longer text is cut out of it, and both are counted. Validation texts are encoded separately for
the held-out perplexity, and test texts never enter either.
"""

import argparse
import hashlib
import json
import time
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import chain
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
from tokenizers import Encoding, Tokenizer, decoders, models, pre_tokenizers, trainers

from components import layout
from components.atomic import atomic_dir
from components.checkpoints import Foundation, resolve_foundation
from components.errors import exit_on_input_error
from components.held_out import HeldOutTexts
from components.ingest import length_stats
from components.params import Params, load_params
from components.sources import unlabeled_batches
from components.special_tokens import SPECIAL_TOKENS, end_of_text_id

ENCODE_BATCH = 1024  # texts per encode call; the Rust side spreads them over every core
ENCODE_BATCH_CHARS = 4 << 20  # ... or fewer, when they are long
PARQUET_BATCH = 4096


def train_tokenizer(texts: Iterable[str] | Iterable[list[str]], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def rebatch(batches: Iterable[list[str]], size: int = ENCODE_BATCH,
            max_chars: int = ENCODE_BATCH_CHARS) -> Iterator[list[str]]:
    """Batches of up to `size` texts and about `max_chars` characters, whatever sizes came in."""
    batch, chars = [], 0
    for text in chain.from_iterable(batches):
        batch.append(text)
        chars += len(text)
        if len(batch) >= size or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def take_chars(batches: Iterable[list[str]], limit: float | None) -> Iterator[list[str]]:
    """The texts of `batches` until `limit` characters have gone by, the text that reaches it the last (all of
    them when `limit` is None): a batch of thousands of long documents must not overshoot the limit whole."""
    if limit is None:
        yield from batches
        return
    seen = 0
    for batch in batches:
        taken = []
        for text in batch:
            if seen >= limit:
                break
            taken.append(text)
            seen += len(text)
        if taken:
            yield taken
        if seen >= limit:
            return


def parquet_texts(path: Path) -> Iterator[list[str]]:
    for batch in pq.ParquetFile(path).iter_batches(batch_size=PARQUET_BATCH, columns=["text"]):
        yield batch.column("text").to_pylist()


def corpus_batches(params: Params, prepared: Path, held_out: HeldOutTexts,
                   counts: dict[str, Counter]) -> Iterator[list[str]]:
    """The pre-training corpus: the train split (with the texts whose labels `data.labels_per_class` held back),
    then the unlabeled texts, all without blank texts and without validation or test text (see
    `HeldOutTexts.scrub`); `counts` receives what was kept, dropped and cut, per side."""
    for split in ("train", "unlabeled"):
        for batch in parquet_texts(prepared / f"{split}.parquet"):
            yield held_out.scrub(batch, counts["train"])
    yield from unlabeled_texts(params, held_out, counts["unlabeled"])


def held_out_texts(prepared: Path) -> HeldOutTexts:
    """The validation and test texts, which neither pre-training nor self-training may read."""
    return HeldOutTexts(text for split in ("val", "test") for batch in parquet_texts(prepared / f"{split}.parquet")
                        for text in batch)


def unlabeled_texts(params: Params, held_out: HeldOutTexts, counts: Counter) -> Iterator[list[str]]:
    """`data.unlabeled.paths` in batches, without blank texts and without validation or test text."""
    unlabeled = params.data.unlabeled
    for path in unlabeled.paths:
        for batch in unlabeled_batches(path, unlabeled.text_column, params.data.undecodable, counts):
            yield held_out.scrub(batch, counts)


class ShardWriter:
    """Appends token ids to `<split>-NNNNN.bin` files of at most `shard_tokens` ids each, hashing as it goes."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.digest, self.tokens, self.shards = hashlib.sha256(), 0, []
        self.file = None
        self._open()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self.file = (self.folder / name).open("wb")
        self.shards.append({"file": name, "tokens": 0, "_digest": hashlib.sha256()})

    def write(self, ids: np.ndarray) -> None:
        while len(ids):
            shard = self.shards[-1]
            if shard["tokens"] == self.shard_tokens:
                self.file.close()
                self._open()
                shard = self.shards[-1]
            piece, ids = ids[:self.shard_tokens - shard["tokens"]], ids[self.shard_tokens - shard["tokens"]:]
            data = piece.tobytes()
            self.file.write(data)
            shard["_digest"].update(data)
            self.digest.update(data)
            shard["tokens"] += len(piece)
            self.tokens += len(piece)

    def close(self) -> dict:
        self.file.close()
        shards = [{"file": s["file"], "tokens": s["tokens"], "sha256": s["_digest"].hexdigest()} for s in self.shards]
        return {"file": shards[0]["file"], "tokens": self.tokens, "dtype": self.dtype.name,
                "sha256": self.digest.hexdigest(), "shards": shards}


def ids_with_end_of_text(encodings: list[Encoding], end_of_text: int, dtype: np.dtype,
                         text_tokens: array) -> np.ndarray:
    """The batch's ids, each text followed by end-of-text; appends each text's token count to `text_tokens`."""
    ids = [encoding.ids for encoding in encodings]
    text_tokens.extend(map(len, ids))
    for one in ids:
        one.append(end_of_text)
    return np.fromiter(chain.from_iterable(ids), dtype=dtype, count=sum(map(len, ids)))


def write_token_stream(tokenizer: Tokenizer, batches: Iterable[list[str]], folder: Path, split: str,
                       shard_tokens: int) -> dict:
    """Encode in parallel batches (the Rust side uses every core, without the GIL, while this thread reads the
    next batch and writes the last) and append ids, each text followed by end-of-text, to shards."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    end_of_text = end_of_text_id(tokenizer)
    writer = ShardWriter(folder, split, dtype, shard_tokens)
    text_tokens = array("I")  # 4 bytes per text: a few MB for millions of texts
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = None
        for batch in rebatch(batches):
            future = pool.submit(tokenizer.encode_batch_fast, batch)
            if pending is not None:
                writer.write(ids_with_end_of_text(pending.result(), end_of_text, dtype, text_tokens))
            pending = future
        if pending is not None:
            writer.write(ids_with_end_of_text(pending.result(), end_of_text, dtype, text_tokens))
    # Token counts per text tell whether model.context_length (times finetune.max_chunks) reads whole texts.
    return {**writer.close(), "text_tokens": length_stats(pl.Series(text_tokens, dtype=pl.UInt32)) if text_tokens
            else None}


def corpus_counts() -> dict[str, Counter]:
    return {"train": Counter(), "unlabeled": Counter()}


def corpus_report(counts: dict[str, Counter]) -> dict:
    """How many train and unlabeled texts went into the corpus, which were dropped and why, and how many
    validation or test passages were cut out of the ones kept."""
    train, unlabeled = counts["train"], counts["unlabeled"]
    return {"train_texts": train["kept"], "unlabeled_texts": unlabeled["kept"],
            "unlabeled_dropped": {"blank": unlabeled["blank"], "leakage": unlabeled["equal"],
                                  "undecodable": unlabeled["undecodable"]},
            "held_out_cut": {side: {"passages": counts[side]["passages"], "chars": counts[side]["chars"]}
                             for side in ("train", "unlabeled")}}


def tokenize(params: Params, prepared: Path, out: Path, timings: dict | None = None,
             foundation: Foundation | None = None) -> dict:
    """Train the tokenizer (or take the `foundation`'s, which its weights were trained with), encode the corpus
    and the validation split into shards; returns the manifest. `timings`, when given, receives the seconds
    spent training and encoding."""
    held_out = held_out_texts(prepared)
    cfg = params.tokenizer
    limit = cfg.train_max_mb * 1e6 if cfg.train_max_mb else None
    started = time.perf_counter()
    if foundation is not None:
        tokenizer = Tokenizer.from_file(str(foundation.folder / "tokenizer.json"))
    else:
        tokenizer = train_tokenizer(take_chars(corpus_batches(params, prepared, held_out, corpus_counts()), limit),
                                    cfg.vocab_size, cfg.min_frequency)
    trained = time.perf_counter()
    counts = corpus_counts()
    with atomic_dir(out) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        train = write_token_stream(tokenizer, corpus_batches(params, prepared, held_out, counts), staging, "train",
                                   cfg.shard_tokens)
        val = write_token_stream(tokenizer, parquet_texts(prepared / "val.parquet"), staging, "val", cfg.shard_tokens)
        manifest = {"vocab_size": tokenizer.get_vocab_size(), "dtype": train["dtype"], "train": train, "val": val,
                    "corpus": corpus_report(counts)}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    if timings is not None:
        timings.update(train_seconds=trained - started, encode_seconds=time.perf_counter() - trained)
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=layout.PREPARED)
    parser.add_argument("--out", type=Path, default=layout.TOKENS)
    args = parser.parse_args()
    params = load_params(args.params)
    foundation = resolve_foundation(params.pretrain.init_from, params.registry.uri, params.model.context_length)
    manifest = tokenize(params, args.prepared, args.out, foundation=foundation)
    dropped = manifest["corpus"]["unlabeled_dropped"]
    cut = ", ".join(f"{side} {n['passages']} ({n['chars']:,} chars)"
                    for side, n in manifest["corpus"]["held_out_cut"].items())
    origin = f"the tokenizer of {foundation.record['name']}" if foundation else "a BPE trained on this corpus"
    print(f"tokenize: {origin}, vocab {manifest['vocab_size']}, {manifest['train']['tokens']:,} train tokens in "
          f"{len(manifest['train']['shards'])} shard(s), {manifest['val']['tokens']:,} val tokens "
          f"({manifest['dtype']}); unlabeled texts dropped: {dropped['leakage']} equal to val/test, "
          f"{dropped['blank']} blank, {dropped['undecodable']} undecodable; val/test passages cut: {cut}")
    if lengths := manifest["val"]["text_tokens"]:
        print(f"tokenize: labeled (val) texts have {lengths['p50']:.0f} tokens at the median, {lengths['p90']:.0f} "
              f"at p90, {lengths['max']} at most")


if __name__ == "__main__":
    exit_on_input_error(main)
