"""Tokenize: train a byte-level BPE on the pre-training corpus and write it as memory-mappable token ids.

    python -m components.tokenize --prepared data/prepared --out data/tokens

The corpus is the train split plus `data.unlabeled.paths`; validation texts are encoded separately for the
held-out perplexity, and test texts never enter either.
"""

import argparse
import hashlib
import json
from collections.abc import Iterable, Iterator
from itertools import chain, islice
from pathlib import Path

import numpy as np
import polars as pl
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from components.atomic import atomic_dir
from components.errors import exit_on_input_error
from components.params import Params, load_params
from components.sources import read_unlabeled

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, PADDING]
ENCODE_BATCH = 1024


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def batched(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(islice(iterator, size)):
        yield batch


def write_token_stream(tokenizer: Tokenizer, texts: Iterable[str], path: Path) -> dict:
    """Encode in parallel batches (the Rust side uses every core) and append ids, each text followed by
    end-of-text, without holding the corpus in memory."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    digest, count = hashlib.sha256(), 0
    with path.open("wb") as file:
        for batch in batched(texts, ENCODE_BATCH):
            ids = [np.append(np.asarray(e.ids, dtype=dtype), dtype.type(end_of_text))
                   for e in tokenizer.encode_batch_fast(batch)]
            chunk = np.concatenate(ids).tobytes()
            digest.update(chunk)
            file.write(chunk)
            count += sum(len(i) for i in ids)
    return {"file": path.name, "tokens": count, "dtype": dtype.name, "sha256": digest.hexdigest()}


def tokenize(params: Params, prepared: Path, out: Path) -> dict:
    train_texts = pl.read_parquet(prepared / "train.parquet")["text"].to_list()
    val_texts = pl.read_parquet(prepared / "val.parquet")["text"].to_list()

    def corpus() -> Iterator[str]:
        unlabeled = params.data.unlabeled
        return chain(train_texts, *(read_unlabeled(p, unlabeled.text_column) for p in unlabeled.paths))

    tokenizer = train_tokenizer(corpus(), params.tokenizer.vocab_size, params.tokenizer.min_frequency)
    with atomic_dir(out) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        manifest = {"vocab_size": tokenizer.get_vocab_size(),
                    "train": write_token_stream(tokenizer, corpus(), staging / "train.bin"),
                    "val": write_token_stream(tokenizer, val_texts, staging / "val.bin")}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("data/tokens"))
    args = parser.parse_args()
    manifest = tokenize(load_params(args.params), args.prepared, args.out)
    print(f"tokenize: vocab {manifest['vocab_size']}, {manifest['train']['tokens']:,} train tokens, "
          f"{manifest['val']['tokens']:,} val tokens ({manifest['train']['dtype']})")


if __name__ == "__main__":
    exit_on_input_error(main)
