"""`gptpipe export`: a registered classifier as a Hugging Face folder `transformers` loads with the same logits,
and as ONNX that onnxruntime runs with the same probabilities as `gptpipe predict`."""

import json

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

from components.checkpoints import resolve_foundation
from components.errors import InputError
from components.export import export
from components.finetune import save_classifier
from components.inference import encode_chunks, load_backbone, load_classifier
from components.model import GPT, Classifier, GPTConfig
from components.params import FinetuneParams
from components.predict import load_registered, predict
from components.registry import Registry
from components.special_tokens import padding_id
from components.tfidf import TfidfLogreg
from components.tokenize import train_tokenizer
from tests.components.hf_models import MIXED_LENGTHS, TEXTS, save_published
from tests.conftest import ROOT, gptpipe

LABELS = ["business", "sport", "tech"]


def backbone_of(family: str, tmp_path) -> tuple[GPT, Tokenizer]:
    """An imported published model, or (`here`) a GPT of the shape this repository trains with its own BPE."""
    if family == "here":
        tokenizer = train_tokenizer(TEXTS, vocab_size=320, min_frequency=1)
        torch.manual_seed(0)
        return GPT(GPTConfig(vocab_size=tokenizer.get_vocab_size(), context_length=64, n_layer=2, n_head=2,
                             d_model=16)), tokenizer
    save_published(family, tmp_path / family)
    foundation = resolve_foundation(str(tmp_path / family), "registry", context_length=64)
    return load_backbone(foundation.folder), Tokenizer.from_file(str(foundation.folder / "tokenizer.json"))


def register(family: str, tmp_path, pooling: str = "mean", tfidf: TfidfLogreg | None = None) -> tuple[str, str]:
    """A classifier on the family's backbone (a random head: export must carry it exactly), with `tfidf` as its
    bag-of-words half, registered; returns (registry uri, model ref)."""
    backbone, tokenizer = backbone_of(family, tmp_path)
    torch.manual_seed(1)
    classifier = Classifier(backbone, len(LABELS), pooling)
    torch.nn.init.normal_(classifier.head.weight, std=2.0)
    torch.nn.init.normal_(classifier.head.bias)
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    folder = tmp_path / "classifier"
    cfg = FinetuneParams(pooling=pooling, max_chunks=3)
    save_classifier(classifier, tmp_path / "tokenizer.json", {"labels": LABELS, "temperature": 1.7}, cfg, folder,
                    tfidf)
    uri = str(tmp_path / "registry")
    Registry(uri).register("tiny", folder, {"kind": "classifier"})
    return uri, "tiny@latest"


@pytest.mark.parametrize("family", ["here", "gpt2", "llama", "qwen2"])
def test_the_hf_export_loads_in_transformers_with_our_logits_and_head(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    uri, ref = register(family, tmp_path, pooling="last" if family == "llama" else "mean")
    reader, manifest = load_registered(uri, ref)
    export(reader, manifest, "hf", tmp_path / "export")
    out = tmp_path / "export"
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    batch = tokenizer(MIXED_LENGTHS)["input_ids"]
    assert batch == [encoding.ids for encoding in reader.tokenizer.encode_batch(MIXED_LENGTHS)]
    card = json.loads((out / "classifier.json").read_text())
    head = load_file(out / "classifier_head.safetensors")
    ours = reader.model.backbone
    for ids, text in zip(batch, MIXED_LENGTHS, strict=True):
        ids = torch.tensor([ids])
        with torch.no_grad():
            output = theirs(ids, output_hidden_states=True)
            assert torch.allclose(output.logits, ours(ids), atol=1e-4), family
            # The head and pooling as classifier.json describes them, on transformers' own states.
            states = output.hidden_states[-1][0]
            pooled = states.mean(dim=0) if card["pooling"] == "mean" else states[-1]
            probs = torch.softmax((pooled @ head["weight"].T + head["bias"]) / card["temperature"], dim=-1)
        assert torch.allclose(probs, reader.predict_proba([text])[0], atol=1e-4), family
    assert card["labels"] == LABELS and card["architecture"] == theirs.config.architectures[0]
    # An export is itself a published checkpoint: it imports back as the same backbone.
    again = load_backbone(resolve_foundation(str(out), "registry", context_length=64).folder).eval()
    ids = torch.tensor([batch[1]])
    with torch.no_grad():
        assert torch.allclose(again(ids), ours(ids), atol=1e-5)


def test_the_onnx_export_gives_predicts_probabilities(tmp_path):
    import onnxruntime

    uri, ref = register("llama", tmp_path)
    done = gptpipe("export", "--model", ref, "--format", "onnx", "--out", str(tmp_path / "onnx"), "--registry",
                   uri, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    reader, _ = load_registered(uri, ref)
    # 20 texts: a few tokens, one window, and longer than the 64-token window (read as up to 3 windows)
    texts = [" ".join(TEXTS[i : i + n]) if n else MIXED_LENGTHS[i % 4] for i, n in
             zip(range(20), [0, 1, 2, 0, 3, 1, 0, 2, 1, 0] * 2, strict=True)]
    card = json.loads((tmp_path / "onnx/classifier.json").read_text())
    ids, mask = encode_chunks(reader.tokenizer, texts, card["context_length"], card["max_chunks"])
    assert ids.shape[1] == 3 and mask[:, 0].sum(dim=1).min() < 20  # some texts fill three windows, some a few tokens
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx/model.onnx"))
    (probs,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    expected = np.array([[row["probs"][label] for label in card["labels"]] for row in predict(reader, texts)])
    assert np.abs(probs - expected).max() < 1e-4
    # another batch size and length: every dimension is dynamic
    ids, mask = encode_chunks(reader.tokenizer, texts[:3], card["context_length"], 1)
    (probs,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert probs.shape == (3, 3) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
    assert card["pad_token_id"] == padding_id(reader.tokenizer)


@pytest.mark.parametrize("fmt", ["onnx", "hf"])
def test_an_export_carries_the_tfidf_half_and_fusing_it_as_its_card_says_gives_predicts_probabilities(fmt, tmp_path):
    import onnxruntime
    from sklearn.feature_extraction.text import TfidfVectorizer

    texts = [" ".join(TEXTS[i : i + 3]) for i in range(12)]
    train = pl.DataFrame({"text": texts, "label": [LABELS[i % 3] for i in range(12)]})
    uri, ref = register("here", tmp_path, tfidf=TfidfLogreg.fit(train, LABELS, seed=0))
    reader, manifest = load_registered(uri, ref)
    assert reader.tfidf is not None and reader.tfidf_weight == FinetuneParams().tfidf_weight
    out = tmp_path / "export"
    export(reader, manifest, fmt, out)
    card = json.loads((out / "classifier.json").read_text())
    if fmt == "onnx":
        ids, mask = encode_chunks(reader.tokenizer, texts, card["context_length"], card["max_chunks"])
        session = onnxruntime.InferenceSession(str(out / "model.onnx"))
        (gpt,) = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    else:
        gpt = torch.softmax(reader.predict_logits(texts) / card["temperature"], dim=-1).numpy()
    # The TF-IDF half as the card describes it, from the exported files alone.
    vocabulary = json.loads((out / "tfidf.json").read_text())
    half = load_file(out / "tfidf.safetensors")
    features = TfidfVectorizer(vocabulary=vocabulary["vocabulary"], ngram_range=(1, 2), sublinear_tf=True)
    features.idf_ = half["idf"].numpy()
    bag_of_words = torch.softmax(torch.from_numpy(features.transform(texts) @ half["coef"].numpy().T)
                                 + half["intercept"], dim=-1).numpy()
    fused = gpt * bag_of_words ** card["tfidf_weight"]
    fused /= fused.sum(axis=1, keepdims=True)
    expected = np.array([[row["probs"][label] for label in card["labels"]] for row in predict(reader, texts)])
    assert vocabulary["labels"] == card["labels"] and "tfidf_fusion" in card
    assert np.abs(fused - expected).max() < 1e-4


def test_export_refuses_what_it_cannot_write_with_one_line(tmp_path):
    uri, ref = register("here", tmp_path)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("mine")
    for args, says in ((["--format", "onnx", "--out", str(tmp_path / "busy")], "is not an earlier export"),
                       (["--format", "torchscript", "--out", str(tmp_path / "new")], "use one of hf, onnx")):
        done = gptpipe("export", "--model", ref, "--registry", uri, *args, cwd=ROOT)
        assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert says in done.stderr
    assert (tmp_path / "busy/notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()
    reader = load_classifier(Registry(uri).fetch(Registry(uri).resolve(ref)))
    reader.model.backbone = GPT(GPTConfig(vocab_size=400, context_length=32, n_layer=1, n_head=2, d_model=16,
                                          bias=False))  # GPT-2 without biases: no family has that shape
    with pytest.raises(InputError, match="fits no Hugging Face family"):
        export(reader, {"name": "tiny", "version": 1}, "hf", tmp_path / "nofamily")
