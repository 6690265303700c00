"""Real (non-padding) tokens/s of fine-tuning steps and of classifying, with batches padded to the data set's longest
text and PyTorch's default AdamW (the reference, as fine-tuning did before) and padded to each batch's own longest
(bucketed by length), first with the same AdamW and then with the fused one and the precision fine-tuning now
uses (`auto`: fp32 on a CPU for steps of few tokens); and
zero-shot texts/s scoring one text per forward (the reference) against a batch of texts per forward. Prints JSON.

    python benchmarks/classify_throughput.py --checkpoint models/foundation \
        --texts long=data/prepared/test.parquet short=../shared/devsets/trec/train.csv
"""

import argparse
import contextlib
import json
import time
from pathlib import Path

import polars as pl
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from components.evaluate import label_logprobs, label_token_ids, prompted_guesses
from components.finetune import DrawWindows, ShuffledBuckets, training_precision
from components.inference import batches_by_length, load_backbone, pad_windows, text_windows, token_count
from components.model import Classifier
from components.params import FinetuneParams
from components.special_tokens import padding_id
from components.training import adamw, cpu_has_fast_bf16, resolve_precision


def autocast(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16-mixed" else contextlib.nullcontext()


def padded_to(batch: list[torch.Tensor], width: int, chunks: int, pad: int) -> list[torch.Tensor]:
    """A batch widened to `chunks` windows of `width` tokens: what one set-wide padded tensor gave every batch."""
    ids, mask, labels = batch
    grow = (0, width - ids.size(2), 0, chunks - ids.size(1))
    return [F.pad(ids, grow, value=pad), F.pad(mask, grow, value=0), labels]


def train_tokens_per_second(model: Classifier, batches: list[list[torch.Tensor]], fused: bool, precision: str) -> float:
    """Timed on a second pass over the batches: the first warms the allocator, the optimizer's state and the
    kernels compiled for each batch shape, which a real fine-tune pays once over many epochs."""
    groups = [{"params": list(model.parameters())}]
    optimizer = adamw(groups, torch.device("cpu"), lr=1e-4) if fused else torch.optim.AdamW(groups, lr=1e-4)
    model.train()
    for _ in range(2):
        started, tokens = time.perf_counter(), 0
        for ids, mask, labels in batches:
            with autocast(precision):
                loss = F.cross_entropy(model(ids, mask).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            tokens += int(mask.sum())
    return tokens / (time.perf_counter() - started)


@torch.no_grad()
def classify_tokens_per_second(model: Classifier, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    for _ in range(2):  # timed on the second pass, as training
        started, tokens = time.perf_counter(), 0
        for ids, mask in batches:
            with autocast(resolve_precision("auto")):
                model(ids, mask)
            tokens += int(mask.sum())
    return tokens / (time.perf_counter() - started)


def measure(checkpoint: Path, texts: list[str], steps: int, cfg: FinetuneParams) -> dict:
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    pad = padding_id(tokenizer)
    model = Classifier(load_backbone(checkpoint), 4, cfg.pooling)
    context = model.backbone.config.context_length
    rows = text_windows(tokenizer, texts, context, cfg.max_chunks)
    width, chunks = max(len(w) for ws in rows for w in ws), max(len(ws) for ws in rows)
    labeled = [(windows, i % 4) for i, windows in enumerate(rows)]
    drawn = cfg.train_windows or cfg.max_chunks
    lengths = [min(token_count(windows), drawn * context) for windows in rows]
    draw = DrawWindows(drawn, pad, context, seed=0)
    bucketed = [draw([labeled[i] for i in batch]) for batch in ShuffledBuckets(lengths, cfg.batch_size, 0)][:steps]
    set_wide = [padded_to(batch, width, drawn, pad) for batch in bucketed]  # the same texts, padded as before
    state = {key: value.clone() for key, value in model.state_dict().items()}
    before = resolve_precision("auto")  # what fine-tuning used before: bf16 wherever the CPU runs it fast
    now = training_precision(cfg, lengths)
    train_before = train_tokens_per_second(model, set_wide, fused=False, precision=before)
    model.load_state_dict(state)
    train_padded = train_tokens_per_second(model, bucketed, fused=False, precision=before)
    model.load_state_dict(state)
    train_after = train_tokens_per_second(model, bucketed, fused=True, precision=now)
    order_batches = [list(range(i, min(i + cfg.batch_size, len(rows)))) for i in range(0, len(rows), cfg.batch_size)]
    eval_before = classify_tokens_per_second(
        model, [padded_to([*pad_windows([rows[i] for i in b], pad, context), None], width, chunks, pad)[:2]
                for b in order_batches])
    eval_after = classify_tokens_per_second(
        model, [pad_windows([rows[i] for i in b], pad, context) for b in batches_by_length(rows, cfg.batch_size)])
    return {"texts": len(texts), "mean_tokens": round(sum(map(token_count, rows)) / len(rows), 1),
            "longest_window": width, "train_steps": len(bucketed),
            "train_real_tokens_per_second": {"set_wide_padding": round(train_before),
                                             "per_batch_padding": round(train_padded),
                                             "now_fused_adamw_and_precision": round(train_after),
                                             "precision": {"before": before, "now": now},
                                             "ratio": round(train_after / train_before, 2)},
            "classify_real_tokens_per_second": {"set_wide_padding": round(eval_before),
                                                "per_batch_padding": round(eval_after),
                                                "ratio": round(eval_after / eval_before, 2)}}


def zero_shot_rates(checkpoint: Path, texts: list[str], labels: list[str], text_tokens: int) -> dict:
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    lm = load_backbone(checkpoint).eval()
    label_ids, lengths = label_token_ids(tokenizer, labels)
    started = time.perf_counter()
    for encoding in tokenizer.encode_batch_fast(texts):  # one text per forward, as before
        label_logprobs(lm, [encoding.ids[:text_tokens]], label_ids, lengths)
    one_by_one = len(texts) / (time.perf_counter() - started)
    started = time.perf_counter()
    prompted_guesses(lm, tokenizer, texts, labels, text_tokens, log=lambda line: None)
    batched = len(texts) / (time.perf_counter() - started)
    return {"texts": len(texts), "labels": len(labels), "one_text_per_forward": round(one_by_one, 1),
            "batched": round(batched, 1), "ratio": round(batched / one_by_one, 2)}


def read_texts(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path) if path.suffix == ".parquet" else pl.read_csv(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("models/foundation"))
    parser.add_argument("--texts", nargs="+", required=True, help="NAME=FILE with columns text and label")
    parser.add_argument("--limit", type=int, default=400, help="texts read from each file")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps timed per padding")
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = FinetuneParams()
    results = {"threads": torch.get_num_threads(), "bf16": cpu_has_fast_bf16()}
    for pair in args.texts:
        name, file = pair.split("=", 1)
        frame = read_texts(Path(file)).sample(n=args.limit, seed=0, with_replacement=False)
        texts = frame["text"].to_list()
        results[name] = measure(args.checkpoint, texts, args.steps, cfg)
        labels = sorted(set(frame["label"].to_list()))
        results[name]["zero_shot_texts_per_second"] = zero_shot_rates(args.checkpoint, texts[:200], labels, 128)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
