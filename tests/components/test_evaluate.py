"""Evaluation on a tiny real pipeline: bootstrap intervals, calibration, label efficiency and the report files."""

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from sklearn.metrics import accuracy_score, f1_score
from tokenizers import Tokenizer

from components.bootstrap import resampled_scores
from components.errors import InputError
from components.evaluate import (
    LABEL_PROMPT,
    SHOT_END,
    calibration,
    evaluate,
    expected_calibration_error,
    few_shot_prompt,
    fragment,
    label_logprobs,
    per_class_sample,
    scores,
)
from components.finetune import finetune, fit_temperature, most_confident, save_classifier
from components.inference import LoadedClassifier, load_backbone
from components.model import GPT, Classifier, GPTConfig
from components.model_card import self_training_note
from components.params import Params
from components.tfidf import TfidfLogreg
from tests.components.test_finetune import TINY, make_workspace
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
    temperature = fit_temperature(logits, truth)
    result = calibration(logits, truth, temperature, torch.softmax(logits / temperature, dim=-1))
    assert result["test_ece_after"] < 0.05 < result["test_ece_before"]
    assert result["test_ece_delivered"] == result["test_ece_after"]
    assert result["test_nll_after"] < result["test_nll_before"]


def test_label_budgets_sample_each_class_deterministically():
    train = pl.DataFrame({"text": [f"t{i}" for i in range(30)], "label": ["a"] * 20 + ["b"] * 10})
    small, large = (per_class_sample(train, ["a", "b"], n, seed=3) for n in (4, 12))
    assert small["label"].value_counts().sort("label")["count"].to_list() == [4, 4]
    assert large["label"].value_counts().sort("label")["count"].to_list() == [12, 10]
    assert small.equals(per_class_sample(train, ["a", "b"], 4, seed=3))
    assert set(small["text"]) <= set(large["text"])  # budgets are nested


def train_on_texts(pretrained: Path, texts: list[str], steps: int = 20) -> None:
    """A few next-token steps of the checkpoint's GPT on `texts`, saved back into its folder."""
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    lm = load_backbone(pretrained).train()
    rows = [encoding.ids for encoding in tokenizer.encode_batch_fast(texts)]
    width = max(len(ids) for ids in rows)
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    targets = torch.tensor([row[1:] + [-100] * (width - len(row)) for row in rows])
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(steps):
        loss = F.cross_entropy(lm(ids[:, :-1]).flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    save_model(lm, str(pretrained / "model.safetensors"))


def test_evaluate_writes_the_reports(tmp_path):
    prepared, pretrained = make_workspace(tmp_path, replace(TINY, context_length=256))  # a few-shot prompt fits
    train_on_texts(pretrained, pl.read_parquet(prepared / "train.parquet")["text"].to_list())
    params = Params.model_validate({**TINY_PARAMS, "finetune": {**TINY_PARAMS["finetune"], "pseudo_labels": 1},
                                    "evaluate": {
        "baselines": ["tfidf_logreg", "zero_shot", "few_shot", "scratch"], "zero_shot_text_tokens": 8,
        "few_shot_per_class": 2, "few_shot_text_tokens": 10, "label_budgets": [2, "all"],
        "scratch_labels_per_class": 2, "bootstrap_samples": 200}})
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    curves = tmp_path / "curves"  # the fine-tune's; pre-training's are missing, and drawn as such
    with tempfile.TemporaryDirectory() as work_dir:
        classifier, summary = finetune(params, prepared, load_backbone(pretrained), tokenizer, Path(work_dir),
                                       curves=curves / "finetune")
    train = pl.read_parquet(prepared / "train.parquet")
    tfidf = TfidfLogreg.fit(train, sorted(set(train["label"])), params.seed)
    save_classifier(classifier, pretrained / "tokenizer.json", summary, params.finetune, tmp_path / "classifier",
                    tfidf)
    out = tmp_path / "reports"
    metrics = evaluate(params, prepared, pretrained, tmp_path / "classifier", curves, out)

    assert metrics == json.loads((out / "metrics.json").read_text())
    test = metrics["finetune"]["test"]
    assert {"accuracy", "macro_f1", "accuracy_ci95", "macro_f1_ci95", "per_class", "confusion_matrix"} <= set(test)
    assert metrics["finetune"]["calibration"]["temperature"] == summary["temperature"]
    # delivered: the GPT with the TF-IDF half fused in; the GPT alone reported beside it
    assert metrics["finetune"]["tfidf_weight"] == params.finetune.tfidf_weight > 0
    assert set(metrics["finetune"]["test_gpt_alone"]) == set(test)
    test_texts = pl.read_parquet(prepared / "test.parquet").height
    for name in ("scratch", "tfidf_logreg", "zero_shot", "few_shot"):
        assert set(metrics["baselines"][name]["test"]) == set(test)
        assert 0 <= metrics["baselines"][name]["test"]["macro_f1"] <= 1
        assert np.array(metrics["baselines"][name]["test"]["confusion_matrix"]).sum() == test_texts
    assert metrics["baselines"]["few_shot"]["labels_per_class"] == 2  # two rounds of demonstrations fit in 256
    assert metrics["baselines"]["scratch"]["labels_per_class"] == 2
    assert metrics["baselines"]["scratch"]["train_examples"] == 6  # labeled; self-training added its guesses
    assert 1 <= metrics["baselines"]["scratch"]["pseudo_labeled"] <= 6

    curve = json.loads((out / "label_efficiency.json").read_text())
    assert [row["labels_per_class"] for row in curve] == [2, None]  # null: every training label
    assert curve[0]["train_examples"] == 2 * 3 and curve[1]["train_examples"] == 54
    assert set(metrics["baselines"]["scratch"]["test_gpt_alone"]) == {"accuracy", "macro_f1", "per_class",
                                                                       "confusion_matrix"}
    for row in curve:
        for name in ("pretrained", "scratch", "tfidf_logreg", "pretrained_gpt_alone"):
            assert set(row[name]) == {"accuracy", "macro_f1"} and 0 <= row[name]["macro_f1"] <= 1
    assert curve[1]["pretrained_gpt_alone"]["accuracy"] == metrics["finetune"]["test_gpt_alone"]["accuracy"]
    assert curve[1]["pretrained"]["accuracy"] == pytest.approx(test["accuracy"])
    assert curve[0]["scratch"]["macro_f1"] == metrics["baselines"]["scratch"]["test"]["macro_f1"]
    for png in ("confusion_matrix.png", "label_efficiency.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "mistakes.md").read_text().startswith("| confidence | true | predicted | text |")
    card = (out / "model_card.md").read_text()
    assert "## Limits" in card and f"{test['accuracy']:.3f} (" in card
    alone = metrics["finetune"]["test_gpt_alone"]
    assert f"| fine-tuned GPT alone | all | {alone['accuracy']:.3f} (" in card
    assert f"raised to the power {params.finetune.tfidf_weight:g}" in card
    few_shot = metrics["baselines"]["few_shot"]["test"]
    assert f"| few_shot | 2 | {few_shot['accuracy']:.3f} ({few_shot['accuracy_ci95'][0]:.3f}-" in card


def few_shot_params(**evaluate_options) -> Params:
    return Params.model_validate({**TINY_PARAMS, "evaluate": {"few_shot_per_class": 2, "few_shot_text_tokens": 10,
                                                              "zero_shot_text_tokens": 8, **evaluate_options}})


def test_few_shot_prompt_shows_train_texts_of_every_label_and_fits_the_window(tmp_path):
    prepared, pretrained = make_workspace(tmp_path)
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    labels = json.loads((prepared / "labels.json").read_text())
    train = pl.read_parquet(prepared / "train.parquet")
    held_out = pl.concat([pl.read_parquet(prepared / f"{split}.parquet") for split in ("val", "test")])
    params = few_shot_params()
    prompt = few_shot_prompt(tokenizer, train, labels, params, context_length=512)

    prompt_ids, end_ids = fragment(tokenizer, LABEL_PROMPT), fragment(tokenizer, SHOT_END)
    label_ids = {label: fragment(tokenizer, " " + label) for label in labels}
    shown, rest = [], prompt.shots  # (first 10 token ids, label) of each demonstration, read back from the ids
    while rest:
        text, rest = tuple(rest[:10]), rest[10:]
        assert rest[: len(prompt_ids)] == prompt_ids
        rest = rest[len(prompt_ids) :]
        label = next(label for label, ids in label_ids.items() if rest[: len(ids)] == ids)
        assert rest[len(label_ids[label]) : len(label_ids[label]) + len(end_ids)] == end_ids
        rest = rest[len(label_ids[label]) + len(end_ids) :]
        shown.append((text, label))
    assert prompt.per_class == 2 and [label for _, label in shown] == labels * 2  # rounds of one text per label

    def leading(frame: pl.DataFrame) -> dict[tuple[int, ...], str]:
        return {tuple(tokenizer.encode(text).ids[:10]): label for text, label in frame.select("text", "label").rows()}

    train_texts, held_out_texts = leading(train), leading(held_out)
    assert len(train_texts) == train.height and not train_texts.keys() & held_out_texts.keys()  # 10 tokens tell apart
    assert len(set(shown)) == 6 and all(train_texts.get(text) == label for text, label in shown)
    assert few_shot_prompt(tokenizer, train, labels, params, 512) == prompt  # drawn by seed
    assert few_shot_prompt(tokenizer, train, labels, params.model_copy(update={"seed": 7}), 512).shots != prompt.shots

    # The window holds the demonstrations, the test text's 8 tokens, the prompt and the longest label: whole rounds
    # of demonstrations while they fit, and an error naming the param when not one round does.
    exact = len(prompt.shots) + 8 + len(prompt_ids) + max(len(ids) for ids in label_ids.values())
    for context, rounds in ((exact, 2), (exact - 1, 1)):
        fitted = few_shot_prompt(tokenizer, train, labels, params, context)
        assert (fitted.per_class, fitted.text_tokens) == (rounds, 8)
        assert fitted.shots == prompt.shots[: len(prompt.shots) * rounds // 2]
        assert len(fitted.shots) + 8 + len(prompt_ids) + max(len(ids) for ids in label_ids.values()) <= context
    with pytest.raises(InputError, match="evaluate.few_shot_text_tokens"):
        few_shot_prompt(tokenizer, train, labels, params, exact - len(prompt.shots) // 2 - 1)


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


@pytest.mark.parametrize("config", [
    GPTConfig(vocab_size=50, context_length=24, n_layer=2, n_head=2, d_model=16),
    GPTConfig(vocab_size=50, context_length=24, n_layer=2, n_head=2, d_model=16, n_kv_head=1, norm="rmsnorm",
              positions="rotary", mlp="swiglu", bias=False),  # the Llama family's switches
], ids=["gpt2", "llama"])
@pytest.mark.parametrize("shots", [[], [4, 9, 1, 17, 30, 2]], ids=["zero-shot", "shared-prefix"])
def test_label_scores_from_the_cached_prefixes_match_full_forward_passes(config, shots):
    torch.manual_seed(0)
    lm = GPT(config).eval()
    prefixes, labels = [[3, 7, 1, 9, 4], [8, 2], [5, 5, 5, 6, 7, 1, 2]], [[5], [6, 2, 8], [11, 12]]
    lengths = torch.tensor([len(ids) for ids in labels])
    padded = torch.tensor([ids + [0] * (3 - len(ids)) for ids in labels])
    with torch.no_grad():
        shared = lm.hidden_states(torch.tensor([shots]))[1] if shots else None
    cached = label_logprobs(lm, prefixes, padded, lengths, shared)
    assert cached.shape == (3, 3)
    with torch.no_grad():
        for text, prefix in enumerate(prefixes):
            prompt = shots + prefix  # the whole prompt, no cache
            for row, ids in enumerate(labels):
                logprobs = torch.log_softmax(lm(torch.tensor([prompt + ids])), dim=-1)[0]
                full = sum(logprobs[len(prompt) - 1 + k, token].item() for k, token in enumerate(ids))
                assert cached[text, row].item() == pytest.approx(full, abs=1e-4)


def test_model_card_says_when_the_classifier_was_self_trained():
    assert self_training_note({"train_examples": 50, "pseudo_labeled": 0}, rounds=1) == ""
    one_round = self_training_note({"train_examples": 50, "pseudo_labeled": 200}, rounds=1)
    assert "200 texts without labels" in one_round and "rounds" not in one_round
    assert "in 2 rounds" in self_training_note({"train_examples": 50, "pseudo_labeled": 200}, rounds=2)
