"""Load a fine-tuned classifier folder and turn texts into class probabilities, in batches, each text read as up
to `max_chunks` context windows."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from components.errors import InputError
from components.model import GPT, Classifier, GPTConfig, load_weights
from components.sources import file_sha256
from components.special_tokens import padding_id
from components.tfidf import TfidfLogreg

PREDICT_BATCH = 32


Windows = list[list[int]]  # one text's consecutive context windows of token ids


def text_windows(tokenizer: Tokenizer, texts: list[str], context_length: int, max_chunks: int) -> list[Windows]:
    """Each text cut into up to `max_chunks` consecutive windows of `context_length` tokens (the rest dropped); an
    empty text is one padding token, so that every text has a window."""
    pad = padding_id(tokenizer)
    rows = []
    for encoding in tokenizer.encode_batch_fast(texts):
        ids = encoding.ids[: context_length * max_chunks] or [pad]
        rows.append([ids[start : start + context_length] for start in range(0, len(ids), context_length)])
    return rows


PAD_MULTIPLE = 8  # batch widths rounded up to this: few distinct shapes, so the CPU's kernel caches stay warm


def pad_windows(rows: list[Windows], pad: int, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and mask (B, K, T), K the most windows and T the longest window of these rows only (rounded up to
    a multiple of 8, at most the context), so a batch pays for its own longest text, not the data set's; mask 1
    for real tokens."""
    chunks = max(len(windows) for windows in rows)
    longest = max(len(window) for windows in rows for window in windows)
    width = min(-(-longest // PAD_MULTIPLE) * PAD_MULTIPLE, context_length)
    batch = torch.full((len(rows), chunks, width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), chunks, width), dtype=torch.long)
    for row, windows in enumerate(rows):
        for k, window in enumerate(windows):
            batch[row, k, : len(window)] = torch.tensor(window)
            mask[row, k, : len(window)] = 1
    return batch, mask


def encode_chunks(tokenizer: Tokenizer, texts: list[str], context_length: int,
                  max_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`texts` as one padded batch (B, K, T) of their windows."""
    rows = text_windows(tokenizer, texts, context_length, max_chunks)
    return pad_windows(rows, padding_id(tokenizer), context_length)


def token_count(windows: Windows) -> int:
    return sum(len(window) for window in windows)


def batches_by_length(rows: list[Windows], batch_size: int) -> list[list[int]]:
    """Row indices in batches of similar token counts (for forward passes, where order does not matter), so that
    little of a batch is padding."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]), token_count(rows[i])))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


@torch.no_grad()
def classify_windows(model: Classifier, rows: list[Windows], pad: int, batch_size: int) -> torch.Tensor:
    """Logits (N, classes) of texts given as windows, batched by length and returned in the rows' order."""
    model.eval()
    context = model.backbone.config.context_length
    logits = torch.empty(len(rows), model.head.out_features)
    for batch in batches_by_length(rows, batch_size):
        logits[batch] = model(*pad_windows([rows[i] for i in batch], pad, context)).float()
    return logits


def load_backbone(folder: Path) -> GPT:
    model = GPT(GPTConfig(**json.loads((folder / "config.json").read_text())))
    load_weights(model, folder / "model.safetensors")
    return model


@dataclass
class LoadedClassifier:
    model: Classifier
    tokenizer: Tokenizer
    labels: list[str]
    temperature: float
    max_chunks: int = 1
    tfidf: TfidfLogreg | None = None  # the bag-of-words half, fused at `tfidf_weight` (finetune.tfidf_weight)
    tfidf_weight: float = 0.0

    def predict_logits(self, texts: list[str]) -> torch.Tensor:
        """The GPT's raw logits (N, classes), before temperature scaling and without the TF-IDF half."""
        context = self.model.backbone.config.context_length
        rows = text_windows(self.tokenizer, texts, context, self.max_chunks)
        return classify_windows(self.model, rows, padding_id(self.tokenizer), PREDICT_BATCH)

    def fuse(self, logits: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Probabilities (N, classes) of `texts` from their GPT `logits`: the GPT's, scaled by the temperature fitted
        on the validation split, times TF-IDF's to the power `tfidf_weight`, renormalised."""
        log_probs = torch.log_softmax(logits / self.temperature, dim=-1)
        if self.tfidf is not None:
            log_probs = log_probs + self.tfidf_weight * self.tfidf.log_proba(texts)
        return torch.softmax(log_probs, dim=-1)

    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """Probabilities (N, classes): the delivered classifier's, the TF-IDF half fused in where it has one."""
        return self.fuse(self.predict_logits(texts), texts)


def load_classifier(folder: Path) -> LoadedClassifier:
    folder = Path(folder)
    meta = json.loads((folder / "classifier.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backbone = GPT(GPTConfig(**meta["gpt"]))
    trained_with = meta.get("tokenizer_sha256")  # absent in folders written before it was recorded
    if trained_with and file_sha256(folder / "tokenizer.json") != trained_with:
        raise InputError(f"{folder}/tokenizer.json: not the tokenizer this classifier was trained with (sha256 "
                         f"differs from classifier.json's tokenizer_sha256); copy back the folder's own tokenizer")
    # A published model's embedding may be padded past its tokenizer's ids (Qwen2), never shorter.
    if tokenizer.get_vocab_size() > backbone.config.vocab_size:
        raise InputError(f"{folder}/tokenizer.json: vocabulary of {tokenizer.get_vocab_size()} does not fit the "
                         f"model's {backbone.config.vocab_size} embeddings; the folder mixes two trainings")
    model = Classifier(backbone, len(meta["labels"]), meta["pooling"])
    load_weights(model, folder / "model.safetensors")
    weight = meta.get("tfidf_weight", 0.0)  # absent in folders written before classifiers had a TF-IDF half
    tfidf = TfidfLogreg.load(folder) if weight else None
    if tfidf is not None and tfidf.labels != meta["labels"]:
        raise InputError(f"{folder}/tfidf.json: its labels differ from classifier.json's; the folder mixes two "
                         "trainings, re-run the finetune stage that wrote it")
    return LoadedClassifier(model, tokenizer, meta["labels"], meta.get("temperature", 1.0), meta.get("max_chunks", 1),
                            tfidf, weight)
