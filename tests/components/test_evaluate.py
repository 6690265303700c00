"""Evaluation on a tiny real pipeline: bootstrap intervals, calibration, label efficiency and the report files."""

import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score
from tokenizers import Tokenizer

from components.bootstrap import resampled_scores
from components.evaluate import (
    calibration,
    evaluate,
    expected_calibration_error,
    label_logprobs,
    most_confident,
    per_class_sample,
    scores,
)
from components.finetune import finetune, fit_temperature, save_classifier
from components.inference import LoadedClassifier, load_backbone
from components.model import GPT, Classifier, GPTConfig
from components.params import Params
from tests.components.test_finetune import make_workspace
from tests.conftest import TINY_PARAMS


def test_bootstrap_interval_contains_the_point_estimate():
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c"]
    truth = [labels[i] for i in rng.integers(0, 3, 300)]
    predicted = [t if rng.random() < 0.8 else labels[rng.integers(0, 3)] for t in truth]
    result = scores(truth, predicted, labels, bootstrap_samples=1000, seed=1)
    for key in ("accuracy", "macro_f1"):
        low, high = result[f"{key}_ci95"]
        assert low < result[key] < high and high - low < 0.2
    assert result == scores(truth, predicted, labels, bootstrap_samples=1000, seed=1)  # fixed seed, same interval
    assert np.array(result["confusion_matrix"]).sum() == 300


def test_resampled_scores_agree_with_sklearn():
    rng = np.random.default_rng(0)
    truth, predicted = rng.integers(0, 3, 50), rng.integers(0, 3, 50)  # label 3 never occurs: F1 0, as sklearn
    picks = np.stack([np.arange(50), rng.integers(0, 50, 50)])
    accuracy, macro_f1 = resampled_scores(truth, predicted, 4, picks)
    for row, pick in enumerate(picks):
        assert accuracy[row] == pytest.approx(accuracy_score(truth[pick], predicted[pick]))
        assert macro_f1[row] == pytest.approx(
            f1_score(truth[pick], predicted[pick], labels=[0, 1, 2, 3], average="macro", zero_division=0))


def test_temperature_scaling_lowers_ece_on_overconfident_predictions():
    generator = torch.Generator().manual_seed(0)
    truth = torch.randint(0, 3, (600,), generator=generator)
    predicted = torch.where(torch.rand(600, generator=generator) < 0.75, truth, (truth + 1) % 3)
    logits = 6.0 * F.one_hot(predicted, 3).float()
    assert expected_calibration_error(torch.softmax(logits, -1), truth) > 0.2
    result = calibration(logits, truth, fit_temperature(logits, truth))
    assert result["test_ece_after"] < 0.05 < result["test_ece_before"]
    assert result["test_nll_after"] < result["test_nll_before"]


def test_label_budgets_sample_each_class_deterministically():
    train = pl.DataFrame({"text": [f"t{i}" for i in range(30)], "label": ["a"] * 20 + ["b"] * 10})
    small, large = (per_class_sample(train, ["a", "b"], n, seed=3) for n in (4, 12))
    assert small["label"].value_counts().sort("label")["count"].to_list() == [4, 4]
    assert large["label"].value_counts().sort("label")["count"].to_list() == [12, 10]
    assert small.equals(per_class_sample(train, ["a", "b"], 4, seed=3))
    assert set(small["text"]) <= set(large["text"])  # budgets are nested


def test_evaluate_writes_the_reports(tmp_path):
    prepared, pretrained = make_workspace(tmp_path)
    params = Params.model_validate({**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "pseudo_labels": 1},
                                    "evaluate": {
        "baselines": ["tfidf_logreg", "zero_shot", "scratch"], "zero_shot_text_tokens": 8,
        "label_budgets": [2, "all"], "scratch_labels_per_class": 2,
        "bootstrap_samples": 200}})
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    curves = tmp_path / "curves"  # the fine-tune's; pre-training's are missing, and drawn as such
    with tempfile.TemporaryDirectory() as work_dir:
        classifier, summary = finetune(params, prepared, load_backbone(pretrained), tokenizer, Path(work_dir),
                                       curves=curves / "finetune")
    save_classifier(classifier, pretrained / "tokenizer.json", summary, params.finetune, tmp_path / "classifier")
    out = tmp_path / "reports"
    metrics = evaluate(params, prepared, pretrained, tmp_path / "classifier", curves, out)

    assert metrics == json.loads((out / "metrics.json").read_text())
    test = metrics["finetune"]["test"]
    assert {"accuracy", "macro_f1", "accuracy_ci95", "macro_f1_ci95", "per_class", "confusion_matrix"} <= set(test)
    assert metrics["finetune"]["calibration"]["temperature"] == summary["temperature"]
    for name in ("scratch", "tfidf_logreg", "zero_shot"):
        assert 0 <= metrics["baselines"][name]["test"]["macro_f1"] <= 1
    assert metrics["baselines"]["scratch"]["labels_per_class"] == 2
    assert metrics["baselines"]["scratch"]["train_examples"] == 6  # labeled; self-training added its guesses
    assert 1 <= metrics["baselines"]["scratch"]["pseudo_labeled"] <= 6

    curve = json.loads((out / "label_efficiency.json").read_text())
    assert [row["labels_per_class"] for row in curve] == [2, None]  # null: every training label
    assert curve[0]["train_examples"] == 2 * 3 and curve[1]["train_examples"] == 54
    for row in curve:
        for name in ("pretrained", "scratch", "tfidf_logreg"):
            assert set(row[name]) == {"accuracy", "macro_f1"} and 0 <= row[name]["macro_f1"] <= 1
    assert curve[1]["pretrained"]["accuracy"] == pytest.approx(test["accuracy"])
    assert curve[0]["scratch"]["macro_f1"] == metrics["baselines"]["scratch"]["test"]["macro_f1"]
    for png in ("confusion_matrix.png", "label_efficiency.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "mistakes.md").read_text().startswith("| confidence | true | predicted | text |")
    card = (out / "model_card.md").read_text()
    assert "## Limits" in card and f"{test['accuracy']:.3f} (" in card


def test_self_training_takes_the_surest_guesses_of_each_class(tmp_path):
    prepared, pretrained = make_workspace(tmp_path)
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    labels = json.loads((prepared / "labels.json").read_text())
    torch.manual_seed(0)
    reader = LoadedClassifier(Classifier(load_backbone(pretrained), len(labels)), tokenizer, labels, 1.0, 2)
    texts = pl.read_parquet(prepared / "train.parquet")["text"].to_list()
    confidence, predicted = reader.predict_proba(texts).max(dim=-1)
    picked = most_confident(reader, texts, 3)
    assert picked.columns == ["text", "label"]
    for index, label in enumerate(labels):
        guessed = [(c, t) for c, p, t in zip(confidence.tolist(), predicted.tolist(), texts, strict=True) if p == index]
        surest = {text for _, text in sorted(guessed, reverse=True)[:3]}
        assert set(picked.filter(pl.col("label") == label)["text"]) == surest
    agreeing = most_confident(reader, texts, 3, agreeing=[labels[int(predicted[0])]] * len(texts))
    assert set(agreeing["label"]) == {labels[int(predicted[0])]}  # the others' guesses have no second vote


def test_label_scores_from_the_cached_prefixes_match_full_forward_passes():
    torch.manual_seed(0)
    lm = GPT(GPTConfig(vocab_size=50, context_length=16, n_layer=2, n_head=2, d_model=16)).eval()
    prefixes, labels = [[3, 7, 1, 9, 4], [8, 2], [5, 5, 5, 6, 7, 1, 2]], [[5], [6, 2, 8], [11, 12]]
    lengths = torch.tensor([len(ids) for ids in labels])
    padded = torch.tensor([ids + [0] * (3 - len(ids)) for ids in labels])
    cached = label_logprobs(lm, prefixes, padded, lengths)
    assert cached.shape == (3, 3)
    with torch.no_grad():
        for text, prefix in enumerate(prefixes):
            for row, ids in enumerate(labels):
                logprobs = torch.log_softmax(lm(torch.tensor([prefix + ids])), dim=-1)[0]
                full = sum(logprobs[len(prefix) - 1 + k, token].item() for k, token in enumerate(ids))
                assert cached[text, row].item() == pytest.approx(full, abs=1e-4)
