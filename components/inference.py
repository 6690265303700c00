"""Load a fine-tuned classifier folder and turn texts into class probabilities, in batches."""

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


def encode(tokenizer: Tokenizer, texts: list[str], context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) cut to the context and right-padded to the longest text, and the mask of real tokens."""
    ids = [e.ids[:context_length] or [tokenizer.token_to_id(PADDING)] for e in tokenizer.encode_batch_fast(texts)]
    width = max(len(row) for row in ids)
    batch = torch.full((len(ids), width), tokenizer.token_to_id(PADDING), dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, row_ids in enumerate(ids):
        batch[row, : len(row_ids)] = torch.tensor(row_ids)
        mask[row, : len(row_ids)] = 1
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

    @torch.no_grad()
    def predict_proba(self, texts: list[str]) -> torch.Tensor:
        """Probabilities (N, classes), temperature-scaled."""
        self.model.eval()
        context = self.model.backbone.config.context_length
        chunks = []
        for start in range(0, len(texts), PREDICT_BATCH):
            ids, mask = encode(self.tokenizer, texts[start : start + PREDICT_BATCH], context)
            chunks.append(torch.softmax(self.model(ids, mask).float() / self.temperature, dim=-1))
        return torch.cat(chunks) if chunks else torch.empty(0, len(self.labels))


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
    return LoadedClassifier(model, tokenizer, meta["labels"], meta.get("temperature", 1.0))
