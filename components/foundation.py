"""Foundation: pre-train a GPT once on a large, broad corpus, to be continued on each task (ULMFiT's first stage).

    python -m components.foundation --out models/foundation [--set foundation.corpus.paths='[corpus/*.parquet]']

Its own byte-level BPE is trained on a sample of every corpus file; each source (a file's name before `-NNNNN`)
keeps a hashed share of its documents for a held-out perplexity of its own. Token shards are cached under
`.gptpipe/foundation`, and training resumes from its last checkpoint after a kill. `pretrain.init_from` continues
an earlier foundation (its tokenizer and shape kept, tokens seen added up), so a long pre-training can be built up
over several runs. The folder written holds weights, config, tokenizer, metrics, lineage and a model card.
"""

import argparse
import hashlib
import json
import math
import platform
import re
import shutil
import time
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from components.atomic import atomic_dir
from components.checkpoints import resolve_foundation
from components.errors import InputError, exit_on_input_error
from components.foundation_card import model_card
from components.model import GPT, GPTConfig
from components.params import FoundationParams, apply_overrides, read_raw, validate
from components.pretrain import RandomWindows, save_pretrained, train_language_model
from components.sources import corpus_files, file_sha256, local_files, unlabeled_batches
from components.tokenize import take_chars, train_tokenizer, write_token_stream

WORK_ROOT = Path(".gptpipe/foundation")
TOKENS_FORMAT = 2  # raised when the code changes what a cached token folder holds (2: a BPE without held-out text)


def source_of(uri: str) -> str:
    """`.../wikipedia-00003.parquet` -> `wikipedia`."""
    return re.sub(r"-\d+$", "", Path(uri.rstrip("/").rsplit("/", 1)[-1]).name.split(".", 1)[0])


def is_held_out(text: str, fraction: float) -> bool:
    """A stable, content-based choice, so a document stays on its side of the split across runs and readers."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass")) < fraction * 2**32


def split_held_out(batch: list[str], fraction: float) -> tuple[list[str], list[str]]:
    """A batch's documents, blank ones skipped, as (training side, held-out side)."""
    train, held_out = [], []
    for text in batch:
        if text and not text.isspace():
            (held_out if is_held_out(text, fraction) else train).append(text)
    return train, held_out


def file_batches(uri: str, cfg: FoundationParams) -> Iterator[tuple[Path, Iterator[list[str]]]]:
    for local in local_files(uri):
        yield local, unlabeled_batches(str(local), cfg.corpus.text_column)


def tokenizer_sample(files: list[str], cfg: FoundationParams) -> Iterator[list[str]]:
    """The start of every file's training side, an equal share of `train_max_mb` each, so every source shapes the
    vocabulary; held-out documents stay unseen by the tokenizer as by the model, so their perplexity is honest."""
    share = cfg.tokenizer.train_max_mb * 1e6 / len(files) if cfg.tokenizer.train_max_mb else None
    for uri in files:
        for _, batches in file_batches(uri, cfg):
            yield from take_chars((split_held_out(batch, cfg.corpus.val_fraction)[0] for batch in batches), share)


def combined(entries: list[dict]) -> dict:
    """One manifest entry over the shards of several streams (the windows sampler picks shards by size)."""
    shards = [shard for entry in entries for shard in entry["shards"] if shard["tokens"]]
    digest = hashlib.sha256("".join(shard["sha256"] for shard in shards).encode()).hexdigest()
    return {"file": shards[0]["file"], "tokens": sum(s["tokens"] for s in shards), "dtype": entries[0]["dtype"],
            "sha256": digest, "shards": shards}


def encode_corpus(files: list[str], tokenizer: Tokenizer, cfg: FoundationParams, out: Path) -> dict:
    """Token shards per corpus file (train) and per source (held out), with documents, tokens and the file's
    sha256 recorded for each; returns the manifest."""
    held_out: dict[str, list[str]] = defaultdict(list)
    files_seen, train_entries = [], []
    with atomic_dir(out) as staging:
        tokenizer.save(str(staging / "tokenizer.json"))
        for index, uri in enumerate(files):
            source = source_of(uri)
            for local, batches in file_batches(uri, cfg):
                counts = {"documents": 0, "held_out": 0}

                def train_side(batches=batches, counts=counts, source=source) -> Iterator[list[str]]:
                    for batch in batches:
                        kept, held = split_held_out(batch, cfg.corpus.val_fraction)
                        counts["documents"] += len(kept) + len(held)
                        counts["held_out"] += len(held)
                        held_out[source].extend(held)
                        yield kept

                entry = write_token_stream(tokenizer, train_side(), staging, f"train-{index:05d}",
                                           cfg.tokenizer.shard_tokens)
                train_entries.append(entry)
                files_seen.append({"uri": uri, "source": source, "sha256": file_sha256(local),
                                   "bytes": local.stat().st_size, "train_tokens": entry["tokens"], **counts})
                print(f"foundation: encoded {uri}: {counts['documents']:,} documents, {entry['tokens']:,} tokens",
                      flush=True)
        if not held_out:
            documents = sum(file["documents"] for file in files_seen)
            raise InputError(f"foundation.corpus.val_fraction={cfg.corpus.val_fraction}: none of the {documents:,} "
                             "documents was held out for perplexity; raise it or add documents")
        val_entries = {source: write_token_stream(tokenizer, [texts], staging, f"val-{source}",
                                                  cfg.tokenizer.shard_tokens)
                       for source, texts in sorted(held_out.items())}
        manifest = {"vocab_size": tokenizer.get_vocab_size(), "dtype": train_entries[0]["dtype"],
                    "train": combined(train_entries), "val": combined(list(val_entries.values())),
                    "val_sources": val_entries, "files": files_seen}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


@torch.no_grad()
def held_out_perplexity(model: GPT, tokens: Path, entry: dict, batches: int, seed: int) -> float:
    """Perplexity on the same fixed windows of one source's held-out text every time."""
    context = model.config.context_length
    files = [tokens / shard["file"] for shard in entry["shards"]]
    model.eval()
    losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
              for x, y in RandomWindows(files, entry["dtype"], context, 16, seed, num_batches=batches)]
    return math.exp(sum(losses) / len(losses))


def corpus_key(files: list[dict], cfg: FoundationParams, tokenizer_from: str | None) -> str:
    identity = {"files": files, "tokenizer": cfg.tokenizer.model_dump(), "val_fraction": cfg.corpus.val_fraction,
                "text_column": cfg.corpus.text_column, "tokenizer_from": tokenizer_from, "format": TOKENS_FORMAT}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def build_foundation(cfg: FoundationParams, seed: int, registry_uri: str, out: Path,
                     work_root: Path = WORK_ROOT) -> dict:
    # setup: the corpus files, and what training starts from
    if not cfg.corpus.paths:
        raise InputError("foundation.corpus.paths: empty; name the corpus, e.g. --set "
                         "'foundation.corpus.paths=[corpus/*.parquet]' (local, s3:// or hf:// paths)")
    listing = corpus_files(cfg.corpus.paths)
    files = [entry["uri"] for entry in listing]
    earlier = resolve_foundation(cfg.pretrain.init_from, registry_uri, cfg.model.context_length,
                                 key="foundation.pretrain.init_from")
    started = time.perf_counter()
    tokens = work_root / f"tokens-{corpus_key(listing, cfg, earlier.record['sha256'] if earlier else None)}"
    # build: tokenizer and shards, reused from the cache when the corpus and settings are unchanged
    if not (tokens / "manifest.json").exists():
        if earlier:
            tokenizer = Tokenizer.from_file(str(earlier.folder / "tokenizer.json"))
        else:
            print(f"foundation: training a {cfg.tokenizer.vocab_size}-token BPE on {len(files)} file(s)", flush=True)
            tokenizer = train_tokenizer(tokenizer_sample(files, cfg), cfg.tokenizer.vocab_size,
                                        cfg.tokenizer.min_frequency)
        encode_corpus(files, tokenizer, cfg, tokens)
    manifest = json.loads((tokens / "manifest.json").read_text())
    # loop
    if earlier:
        config = GPTConfig(**json.loads((earlier.folder / "config.json").read_text()))
        init = earlier.folder / "model.safetensors"
    else:
        config = GPTConfig(vocab_size=manifest["vocab_size"], **cfg.model.model_dump())
        init = None
    curves = work_root / "curves"
    model, summary, _ = train_language_model(seed, config, cfg.pretrain, tokens, manifest, work_root / "resume",
                                             curves, init, key="foundation.pretrain")
    # validate, per source: one held out too little text for a single window is left out (JSON has no NaN)
    per_source = {source: held_out_perplexity(model, tokens, entry, cfg.pretrain.val_batches, seed)
                  for source, entry in manifest["val_sources"].items()
                  if entry["tokens"] > config.context_length + 1}
    # save
    before = json.loads((earlier.folder / "metrics.json").read_text()) if earlier else {}
    summary.update(
        name=cfg.name, kind="foundation", continued_from=earlier.record if earlier else None,
        tokens_seen=before.get("tokens_seen", 0) + summary["train_tokens"],
        wall_seconds=before.get("wall_seconds", 0) + time.perf_counter() - started,
        device=device_name(), val_perplexity_per_source=per_source,
        corpus=corpus_summary(manifest, cfg.corpus.licences))
    lineage = {"files": manifest["files"], "params": cfg.model_dump(mode="json"), "seed": seed,
               "continued_from": summary["continued_from"], "tokens_sha256": manifest["train"]["sha256"]}
    save_pretrained(model, tokens, summary, out)
    with atomic_dir(out) as staging:  # add card, lineage and training curves to the checkpoint folder in one rename
        shutil.copytree(out, staging, dirs_exist_ok=True)
        (staging / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (staging / "MODEL_CARD.md").write_text(model_card(summary, config))
        shutil.copytree(curves, staging / "curves")
    return summary


def corpus_summary(manifest: dict, licences: dict[str, str]) -> dict:
    sources: dict[str, dict] = {}
    for file in manifest["files"]:
        row = sources.setdefault(file["source"], {"files": 0, "documents": 0, "train_tokens": 0, "bytes": 0,
                                                   "licence": licences.get(file["source"], "not stated")})
        row["files"] += 1
        row["documents"] += file["documents"]
        row["train_tokens"] += file["train_tokens"]
        row["bytes"] += file["bytes"]
    for source, entry in manifest["val_sources"].items():
        sources[source]["held_out_tokens"] = entry["tokens"]
    return sources


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="foundation.KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path("models/foundation"))
    args = parser.parse_args()
    params = validate(apply_overrides(read_raw(args.params), args.set), args.params)
    summary = build_foundation(params.foundation, params.seed, params.registry.uri, args.out)
    print(f"foundation: {summary['tokens_seen']:,} tokens seen, held-out perplexity {summary['val_perplexity']:.1f}; "
          f"wrote {args.out}")


if __name__ == "__main__":
    exit_on_input_error(main)
