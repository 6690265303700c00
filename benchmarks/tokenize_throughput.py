"""Tokenize stage throughput: the project's whole tokenize stage (streaming read, leak filter, BPE training, sharded
encode) against raw `Tokenizer.encode_batch_fast` on the same texts with the same trained tokenizer, in one run;
prints JSON with MB/s of both, their ratio and the peak RSS.

    python benchmarks/tokenize_throughput.py [--size-mb 200] [--vocab 4096]
"""

import argparse
import json
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
from tokenizers import Tokenizer

from components.params import Params
from components.tokenize import ENCODE_BATCH, tokenize

FILE_MB = 64
SYLLABLES = ["ka", "to", "ri", "men", "sa", "lo", "ver", "di", "na", "pre", "con", "al", "tion", "ing", "er", "st",
             "qu", "ba", "el", "or", "un", "is", "an", "ed", "mo", "ph", "re", "ly", "ex", "it"]


def vocabulary(rng: np.random.Generator, size: int = 50_000) -> np.ndarray:
    lengths = rng.integers(1, 5, size)
    picks = rng.integers(0, len(SYLLABLES), (size, 4))
    words = {"".join(SYLLABLES[p] for p in row[:n]) for row, n in zip(picks, lengths, strict=True)}
    return np.array(sorted(words))


def write_corpus(folder: Path, size_mb: int, seed: int = 0) -> int:
    """Word-like documents (Zipf-distributed pseudo-words, sentences, paragraphs) as JSONL files of FILE_MB."""
    rng = np.random.default_rng(seed)
    words = vocabulary(rng)
    ranks = 1 / np.arange(1, len(words) + 1) ** 1.1
    probs = ranks / ranks.sum()
    written, index = 0, 0
    while written < size_mb * 1e6:
        docs, chunk = [], 0
        while chunk < FILE_MB * 1e6 and written + chunk < size_mb * 1e6:
            picked = words[rng.choice(len(words), size=int(rng.integers(80, 900)), p=probs)]
            sentences = [" ".join(s).capitalize() + "." for s in np.array_split(picked, max(1, len(picked) // 14))]
            paragraphs = ["  ".join(sentences[i:i + 6]) for i in range(0, len(sentences), 6)]
            docs.append("\n\n".join(paragraphs))
            chunk += len(docs[-1])
        pl.DataFrame({"text": docs}).write_ndjson(folder / f"corpus-{index:04d}.jsonl")
        written, index = written + chunk, index + 1
    return written


def prepared_splits(folder: Path) -> None:
    folder.mkdir()
    for split in ("train", "val", "test"):
        texts = [f"{split} ticket {i}: the invoice was charged twice" for i in range(50)]
        pl.DataFrame({"text": texts, "label": ["billing"] * 50}).write_parquet(folder / f"{split}.parquet")


def raw_encode(tokenizer: Tokenizer, files: list[Path]) -> float:
    """Seconds spent in encode_batch_fast alone, on the same texts in the same batch size."""
    seconds = 0.0
    for file in files:
        texts = pl.read_ndjson(file)["text"].to_list()
        for start in range(0, len(texts), ENCODE_BATCH):
            batch = texts[start:start + ENCODE_BATCH]
            began = time.perf_counter()
            tokenizer.encode_batch_fast(batch)
            seconds += time.perf_counter() - began
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--train-max-mb", type=float, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptpipe-bench-") as tmp:
        root = Path(tmp)
        (root / "corpus").mkdir()
        began = time.perf_counter()
        chars = write_corpus(root / "corpus", args.size_mb)
        generated = time.perf_counter() - began
        prepared_splits(root / "prepared")
        params = Params.model_validate({
            "data": {"unlabeled": {"paths": [str(root / "corpus/*.jsonl")]}},
            "tokenizer": {"vocab_size": args.vocab, "train_max_mb": args.train_max_mb}})
        timings: dict = {}
        began = time.perf_counter()
        manifest = tokenize(params, root / "prepared", root / "tokens", timings)
        stage = time.perf_counter() - began
        rss_stage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        tokenizer = Tokenizer.from_file(str(root / "tokens/tokenizer.json"))
        raw = raw_encode(tokenizer, sorted((root / "corpus").glob("*.jsonl")))
    mb = chars / 1e6
    result = {
        "corpus_mb": round(mb, 1), "generate_seconds": round(generated, 1),
        "train_tokens": manifest["train"]["tokens"], "shards": len(manifest["train"]["shards"]),
        "dtype": manifest["dtype"], "tokenizer_trained_on_mb": min(mb, args.train_max_mb or mb),
        "stage_seconds": round(stage, 1), "stage_train_seconds": round(timings["train_seconds"], 1),
        "stage_encode_seconds": round(timings["encode_seconds"], 1),
        "stage_encode_mb_per_s": round(mb / timings["encode_seconds"], 2),
        "stage_total_mb_per_s": round(mb / stage, 2),
        "raw_encode_batch_fast_mb_per_s": round(mb / raw, 2),
        "ratio_encode": round(raw / timings["encode_seconds"], 3),
        "ratio_total": round(raw / stage, 3),
        "peak_rss_mb_after_stage": round(rss_stage),
        "peak_rss_mb_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "peak_rss_mb_children": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024),
        "cpus": len(os.sched_getaffinity(0)), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
