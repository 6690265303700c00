"""Export: a registered classifier in the formats the rest of the world serves.

    gptpipe export --model NAME@ALIAS --format hf|onnx --out DIR

`hf`: the backbone in its family's Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json), which `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads, plus the classifier's
head in `classifier_head.safetensors` and how to apply it in `classifier.json` (see README, "Export").
`onnx`: the whole classifier in `model.onnx`: token ids and mask (batch, windows, tokens) in, temperature-scaled
class probabilities out, every dimension dynamic; with the tokenizer and `classifier.json` beside it.
Either way a classifier with a TF-IDF half (`finetune.tfidf_weight`) brings `tfidf.json` and `tfidf.safetensors`,
and `classifier.json` says how to fuse them.
"""

import json
import logging
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import save_file
from tokenizers import Tokenizer

from components.atomic import atomic_dir
from components.errors import InputError
from components.hf_format import WEIGHTS_FILE, family_of, hf_config, to_hf
from components.inference import LoadedClassifier
from components.model import Classifier
from components.special_tokens import end_of_text_id, padding_id

FORMATS = ("hf", "onnx")
ONNX_OPSET = 18


def special_ids(tokenizer: Tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids for a Hugging Face config: the start token is whatever the tokenizer puts before a text
    (Llama 3's <|begin_of_text|>), else the end of text, as GPT-2 uses it for both."""
    eos = end_of_text_id(tokenizer)
    added = tokenizer.encode("", add_special_tokens=True).ids
    return {"bos": added[0] if added else eos, "eos": eos, "pad": padding_id(tokenizer)}


FUSION = ("the delivered probabilities (gptpipe predict's) are these times TF-IDF's raised to tfidf_weight, "
          "renormalised: TF-IDF's = softmax(tfidf.safetensors' coef @ x + intercept), x the text's l2-normalised "
          "1-2-gram counts (sublinear tf: 1 + log) times idf, over tfidf.json's vocabulary (scikit-learn's "
          "TfidfVectorizer(vocabulary=..., ngram_range=(1, 2), sublinear_tf=True) with idf_ set computes x)")


def head_card(reader: LoadedClassifier, staging: Path, **extra) -> dict:
    """classifier.json of an export: everything needed to turn token states (or ids) into the labels' probabilities;
    the TF-IDF half's files are written beside it where the classifier has one."""
    config = reader.model.backbone.config
    fusion = {}
    if reader.tfidf is not None:
        reader.tfidf.save(staging)
        fusion = {"tfidf_weight": reader.tfidf_weight, "tfidf_fusion": FUSION}
    return {"labels": reader.labels, "pooling": reader.model.pooling, "temperature": reader.temperature,
            "context_length": config.context_length, "max_chunks": reader.max_chunks,
            "pad_token_id": padding_id(reader.tokenizer), **extra, **fusion}


def export_hf(reader: LoadedClassifier, out: Path, source: dict) -> None:
    backbone, tokenizer = reader.model.backbone, reader.tokenizer
    config = backbone.config
    family = family_of(config)
    special = special_ids(tokenizer)
    tensors = to_hf(backbone.state_dict(), config, family)
    with atomic_dir(out) as staging:
        save_file(tensors, str(staging / WEIGHTS_FILE), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config(config, family, special), indent=2) + "\n")
        tokenizer.save(str(staging / "tokenizer.json"))
        tokens = {f"{role}_token": tokenizer.id_to_token(token) for role, token in special.items()}
        (staging / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.context_length, **tokens},
            indent=2) + "\n")
        head = reader.model.head
        save_file({"weight": head.weight.detach().contiguous(), "bias": head.bias.detach().contiguous()},
                  str(staging / "classifier_head.safetensors"))
        card = head_card(reader, staging, format="hf",
                         architecture=hf_config(config, family, special)["architectures"][0],
                         source=source,
                         how=("logits = head(states mean-pooled over each window's tokens with mask 1 (pooling "
                              "'mean') or taken at its last such token ('last'); windows of context_length tokens "
                              "averaged weighted by their tokens ('mean') or alike ('last')); probabilities = "
                              "softmax(logits / temperature). states: the last hidden states, after the final norm"))
        (staging / "classifier.json").write_text(json.dumps(card, indent=2) + "\n")


class Probabilities(nn.Module):
    """The classifier as ONNX serves it: every window computed (no data-dependent shapes), probabilities out."""

    def __init__(self, classifier: Classifier, temperature: float):
        super().__init__()
        self.classifier, self.temperature = classifier, temperature

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask (B, K, T) -> probabilities (B, classes)."""
        B, K, T = input_ids.shape
        flat_mask = attention_mask.reshape(B * K, T)
        states = self.classifier.backbone.hidden_states(input_ids.reshape(B * K, T))[0]  # (B K, T, C)
        windows = self.classifier.pool(states, flat_mask).view(B, K, -1)
        return torch.softmax(self.classifier.combine(windows, attention_mask) / self.temperature, dim=-1)


def export_onnx(reader: LoadedClassifier, out: Path, source: dict) -> None:
    model = Probabilities(reader.model.eval(), reader.temperature).eval()
    context = reader.model.backbone.config.context_length
    ids = torch.ones(2, 2, min(8, context), dtype=torch.long)
    mask = torch.ones_like(ids)  # its own tensor: the same one twice would export as one input
    batch, windows = torch.export.Dim("batch"), torch.export.Dim("windows")
    tokens = torch.export.Dim("tokens", max=context)
    shapes = {"input_ids": {0: batch, 1: windows, 2: tokens}, "attention_mask": {0: batch, 1: windows, 2: tokens}}
    # The exporter's notes (torchvision absent, axis names merged) say nothing about this model: kept off the console.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with atomic_dir(out) as staging, tempfile.TemporaryDirectory() as scratch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (ids, mask), dynamic_shapes=shapes, opset_version=ONNX_OPSET,
                                    input_names=["input_ids", "attention_mask"], output_names=["probabilities"],
                                    dynamo=True, verbose=False)
        program.save(str(Path(scratch) / "model.onnx"))
        for file in Path(scratch).iterdir():  # model.onnx, and its weights beside it when they are large
            file.rename(staging / file.name)
        reader.tokenizer.save(str(staging / "tokenizer.json"))
        card = head_card(reader, staging, format="onnx", source=source,
                         inputs="input_ids, attention_mask: int64 (batch, windows, tokens); each text as up to "
                         "max_chunks consecutive windows of at most context_length tokens, mask 1 for real tokens",
                         outputs="probabilities: float32 (batch, labels), the GPT's, temperature-scaled, in the "
                         "order of labels")
        (staging / "classifier.json").write_text(json.dumps(card, indent=2) + "\n")


def check_out(out: Path) -> None:
    """Write into a new or empty folder, or over an earlier export; never over anything else."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "classifier.json").exists())):
        raise InputError(f"--out {out}: exists and is not an earlier export; name a new or empty folder")


def export(reader: LoadedClassifier, manifest: dict, fmt: str, out: Path) -> None:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: not a format; use one of {', '.join(FORMATS)}")
    check_out(out)
    source = {"name": manifest["name"], "version": manifest["version"], "foundation": manifest.get("foundation")}
    (export_hf if fmt == "hf" else export_onnx)(reader, out, source)
