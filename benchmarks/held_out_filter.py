"""Cost of keeping validation and test text out of the pre-training corpus: `HeldOutTexts.scrub` (equal texts
dropped, embedded ones cut) against the previous filter (equal texts only), on the same batches, in one run; the
encoding of the same text with the shipped foundation's tokenizer gives the scale. Prints JSON.

    python benchmarks/held_out_filter.py --corpus '../shared/corpus/*.parquet' [--size-mb 50] [--embedded 100]

The held-out side is BBC News' 2,225 articles (normalised, as ingest writes them); `--embedded` of the corpus
texts get one of them pasted into their middle, which the filter must find and cut.
"""

import argparse
import glob
import json
import os
import platform
import random
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
from tokenizers import Tokenizer

from components.held_out import HeldOutTexts
from components.ingest import normalise
from components.params import BUILTIN_BBC_NEWS
from components.sources import BATCH_ROWS, read_labeled
from components.tokenize import rebatch


def corpus_batches(pattern: str, size_mb: float) -> list[list[str]]:
    """About `size_mb` MB of text, an equal share from each file, in the batches the tokenize stage reads."""
    files = sorted(glob.glob(pattern))
    share = size_mb * 1e6 / len(files)
    batches = []
    for file in files:
        texts, taken = [], 0
        for text in (text for batch in pq.ParquetFile(file).iter_batches(batch_size=64, columns=["text"])
                     for text in batch.column("text").to_pylist()):
            texts.append(text)
            taken += len(text)
            if taken >= share:
                break
        batches.extend(texts[start:start + BATCH_ROWS] for start in range(0, len(texts), BATCH_ROWS))
    return batches


def encode(tokenizer: Tokenizer, batches: list[list[str]]) -> None:
    for batch in rebatch(batches):
        tokenizer.encode_batch_fast(batch)  # the ids are dropped: only the time counts


def embed(batches: list[list[str]], articles: list[str], count: int, seed: int = 0) -> None:
    """Paste `count` articles, re-wrapped over lines, into the middle of as many corpus texts."""
    rng = random.Random(seed)
    places = rng.sample([(b, i) for b, batch in enumerate(batches) for i in range(len(batch))], count)
    for (b, i), article in zip(places, rng.sample(articles, count), strict=True):
        text, middle = batches[b][i], len(batches[b][i]) // 2
        wrapped = article.replace(". ", ".\n")
        batches[b][i] = f"{text[:middle]}\n{wrapped}\n{text[middle:]}"


def equal_only(batch: list[str], held_out: set[str]) -> list[str]:
    """The previous filter: blank texts and texts equal to a held-out text dropped."""
    return [text for text in batch if text and not text.isspace() and normalise(text) not in held_out]


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True, help="Parquet files with a `text` column (a glob)")
    parser.add_argument("--size-mb", type=float, default=50)
    parser.add_argument("--embedded", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tokenizer", type=Path, default=Path("models/foundation/tokenizer.json"))
    args = parser.parse_args()
    articles = list(dict.fromkeys(map(normalise, read_labeled(BUILTIN_BBC_NEWS, "text", "label")["text"])))
    batches = corpus_batches(args.corpus, args.size_mb)
    embed(batches, articles, args.embedded)
    chars = sum(len(text) for batch in batches for text in batch)

    began = time.perf_counter()
    held_out = HeldOutTexts(articles)
    build = time.perf_counter() - began
    whole = set(articles)
    old = best_of(args.repeats, lambda: [equal_only(batch, whole) for batch in batches])
    counts: Counter = Counter()
    new = best_of(args.repeats, lambda: [held_out.scrub(batch, counts) for batch in batches])
    tokenizer = Tokenizer.from_file(str(args.tokenizer))
    encoding = best_of(1, lambda: encode(tokenizer, batches))
    mb = chars / 1e6
    result = {
        "corpus_mb": round(mb, 1), "corpus_texts": sum(map(len, batches)), "held_out_texts": len(articles),
        "embedded_articles": args.embedded, "passages_cut": counts["passages"] // args.repeats,
        "chars_cut": counts["chars"] // args.repeats,
        "build_seconds": round(build, 3),
        "equal_only_seconds": round(old, 2), "scrub_seconds": round(new, 2),
        "equal_only_mb_per_s": round(mb / old, 1), "scrub_mb_per_s": round(mb / new, 1),
        "ratio_scrub_to_equal_only": round(new / old, 2),
        "encode_seconds": round(encoding, 2), "encode_mb_per_s": round(mb / encoding, 2),
        "extra_seconds_per_encode_second": round((new - old) / encoding, 3),
        "cpus": len(os.sched_getaffinity(0)), "machine": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
