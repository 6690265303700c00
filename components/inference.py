"""Load a fine-tuned classifier folder and turn texts into class probabilities, in batches, each text read as up
to `max_chunks` context windows."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_model
from tokenizers import Tokenizer

from components.errors import InputError
from components.model import GPT, Classifier, GPTConfig
from components.tokenize import PADDING

PREDICT_BATCH = 32


def encode_chunks(tokenizer: Tokenizer, texts: list[str], context_length: int,
                  max_chunks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, K, T): each text cut into up to `max_chunks` consecutive windows of `context_length` tokens
    (the rest dropped), K the most any text needs; windows and missing windows right-padded, mask 1 for real tokens."""
    pad = tokenizer.token_to_id(PADDING)
    windows = []
    for encoding in tokenizer.encode_batch_fast(texts):
        ids = encoding.ids[: context_length * max_chunks] or [pad]
        windows.append([ids[start : start + context_length] for start in range(0, len(ids), context_length)])
    chunks = max(len(row) for row in windows)
    width = max(len(window) for row in windows for window in row)
    batch = torch.full((len(windows), chunks, width), pad, dtype=torch.long)
    mask = torch.zeros((len(windows), chunks, width), dtype=torch.long)
    for row, row_windows in enumerate(windows):
        for k, window in enumerate(row_windows):
            batch[row, k, : len(window)] = torch.tensor(window)
            mask[row, k, : len(window)] = 1
    return batch, mask


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights (tied embeddings handled), refusing a file written for another shape."""
    try:
        load_model(module, file, strict=True)
    except RuntimeError as error:
        raise InputError(f"{file}: weights do not match the config beside them ({str(error).splitlines()[0]}); "
                         "the folder mixes two trainings, re-run the stage that wrote it") from None


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

    @torch.no_grad()
    def predict_logits(self, texts: list[str]) -> torch.Tensor:
        """Raw logits (N, classes), before temperature scaling."""
        self.model.eval()
        context = self.model.backbone.config.context_length
        batches = []
        for start in range(0, len(texts), PREDICT_BATCH):
            ids, mask = encode_chunks(self.tokenizer, texts[start : start + PREDICT_BATCH], context, self.max_chunks)
            batches.append(self.model(ids, mask).float())
        return torch.cat(batches) if batches else torch.empty(0, len(self.labels))

    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """Probabilities (N, classes), scaled by the temperature fitted on the validation split."""
        return torch.softmax(self.predict_logits(texts) / self.temperature, dim=-1)


def load_classifier(folder: Path) -> LoadedClassifier:
    folder = Path(folder)
    meta = json.loads((folder / "classifier.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    backbone = GPT(GPTConfig(**meta["gpt"]))
    if tokenizer.get_vocab_size() != backbone.config.vocab_size:
        raise InputError(f"{folder}/tokenizer.json: vocabulary of {tokenizer.get_vocab_size()} does not match the "
                         f"model's {backbone.config.vocab_size}; the folder mixes two trainings")
    model = Classifier(backbone, len(meta["labels"]), meta["pooling"])
    load_weights(model, folder / "model.safetensors")
    return LoadedClassifier(model, tokenizer, meta["labels"], meta.get("temperature", 1.0), meta.get("max_chunks", 1))
