"""The promotion gate: candidate and champion scored on the same test texts with a paired bootstrap, and the
registration that records the decision, on real (tiny) classifiers and a real local registry."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch

from components import layout
from components.evaluate import scores
from components.finetune import save_classifier
from components.inference import load_classifier
from components.model import GPT, Classifier, GPTConfig
from components.params import Params
from components.promotion import paired_comparison, predicted_labels, promotion_decision, split_digest
from components.register import register
from components.registry import Registry
from components.tokenize import train_tokenizer
from tests.conftest import support_tickets

LABELS = ["auth", "billing", "bug"]


def synthetic(correct: float, n: int = 400, seed: int = 0) -> tuple[list[str], list[str]]:
    """Test labels and a model's predictions, right on about `correct` of them."""
    rng = np.random.default_rng(seed)
    truth = [LABELS[i] for i in rng.integers(0, 3, n)]
    return truth, [t if rng.random() < correct else LABELS[(LABELS.index(t) + 1) % 3] for t in truth]


def changed(truth: list[str], predicted: list[str], made_right: int, made_wrong: int) -> list[str]:
    """`predicted` with its first `made_right` wrong answers made right and its first `made_wrong` right answers
    made wrong."""
    result = list(predicted)
    wrong = [i for i, (t, p) in enumerate(zip(truth, predicted, strict=True)) if t != p]
    right = [i for i, (t, p) in enumerate(zip(truth, predicted, strict=True)) if t == p]
    for i in wrong[:made_right]:
        result[i] = truth[i]
    for i in right[:made_wrong]:
        result[i] = LABELS[(LABELS.index(truth[i]) + 1) % 3]
    return result


CHAMPION = {"version": 1, "metrics": {"test_macro_f1": 0.0}}


def decide(candidate: list[str], champion: list[str], truth: list[str], tolerance: float = 0.01,
           max_class_drop: float = 0.05) -> tuple[bool, str, dict]:
    comparison = paired_comparison(truth, candidate, champion, LABELS, 1000, seed=3)
    promoted, reason = promotion_decision({"metrics": {}}, CHAMPION, tolerance, max_class_drop, comparison)
    return promoted, reason, comparison


def test_a_clearly_better_candidate_is_promoted_with_both_scores_and_the_interval():
    truth, champion = synthetic(0.85)
    candidate = changed(truth, champion, 25, 0)
    promoted, reason, comparison = decide(candidate, champion, truth)
    difference = comparison["difference"]
    assert promoted and difference["accuracy"] == pytest.approx(25 / 400)
    low, high = difference["macro_f1_ci95"]
    assert 0 < low < difference["macro_f1"] < high
    assert comparison["candidate"]["accuracy"] == pytest.approx(comparison["champion"]["accuracy"] + 25 / 400)
    assert (f"test macro-F1 {comparison['candidate']['macro_f1']:.4f} vs champion v1's "
            f"{comparison['champion']['macro_f1']:.4f} on the same 400 test texts, difference "
            f"{difference['macro_f1']:+.4f} [95% CI {low:+.4f}, {high:+.4f}]: no worse than") in reason


def test_a_candidate_that_may_be_worse_by_more_than_the_tolerance_stays_challenger():
    truth, champion = synthetic(0.85)
    promoted, reason, comparison = decide(changed(truth, champion, 8, 10), champion, truth)
    difference = comparison["difference"]
    # Two texts fewer right: within the tolerance as a point estimate, but 18 texts changed, so it may be far worse.
    assert difference["accuracy"] == pytest.approx(-2 / 400) and difference["macro_f1"] > -0.01
    assert difference["macro_f1_ci95"][0] < -0.01
    assert not promoted and "may be worse by more than 0.01; kept as challenger" in reason


def test_the_same_predictions_pass_and_the_interval_is_reproducible():
    truth, champion = synthetic(0.7)
    promoted, reason, comparison = decide(list(champion), champion, truth, tolerance=0.0)
    assert promoted and comparison["difference"]["macro_f1_ci95"] == [0.0, 0.0]
    assert comparison == decide(list(champion), champion, truth, tolerance=0.0)[2]  # fixed seed, same interval


def test_a_class_that_fell_too_far_keeps_the_champion():
    truth, champion = synthetic(0.8)
    candidate = [("auth" if t == "bug" and i % 3 == 0 else p) for i, (t, p) in enumerate(zip(truth, champion,
                                                                                                strict=True))]
    promoted, reason, comparison = decide(candidate, champion, truth, tolerance=0.2)
    assert comparison["candidate"]["per_class_f1"]["bug"] < comparison["champion"]["per_class_f1"]["bug"] - 0.05
    assert not promoted and "but F1 of class 'bug' fell" in reason


def test_own_split_rule_for_champions_that_cannot_share_the_test_texts():
    champion = {"version": 1, "metrics": {"test_macro_f1": 0.95, "per_class_f1": {"a": 0.9, "b": 1.0}}}

    def candidate(f1, a, b):
        return {"metrics": {"test_macro_f1": f1, "per_class_f1": {"a": a, "b": b}}}

    assert promotion_decision(candidate(0.945, 0.89, 1.0), champion, 0.01, 0.05)[0]
    promoted, reason = promotion_decision(candidate(0.90, 0.9, 0.9), champion, 0.01, 0.05)
    assert not promoted and "macro-F1 0.9000 is worse" in reason
    promoted, reason = promotion_decision(candidate(0.96, 0.8, 1.0), champion, 0.01, 0.05)
    assert not promoted and "class 'a' fell from 0.9000 to 0.8000" in reason
    assert promotion_decision(candidate(0.1, 0, 0), None, 0.01, 0.05) == (True, "no champion yet")


def test_the_split_digest_ignores_order_and_spacing_but_not_labels():
    rows = support_tickets(5)
    digest = split_digest(pl.DataFrame(rows))
    assert digest["texts"] == 15
    shuffled = pl.DataFrame(rows[::-1]).with_columns(pl.col("text").str.replace(" ", "   "))
    assert split_digest(shuffled) == digest
    relabeled = pl.DataFrame(rows).with_columns(pl.lit("bug").alias("label"))
    assert split_digest(relabeled)["sha256"] != digest["sha256"]


def write_run(repo: Path, seed: int, labels: list[str] = LABELS) -> pl.DataFrame:
    """What the DVC stages leave for register: a real (untrained, seeded) classifier folder, the pre-trained
    checkpoint's summary, the test split and evaluate's scores of the classifier on it."""
    test = pl.DataFrame(support_tickets(20, seed=5))
    (repo / layout.PREPARED).mkdir(parents=True, exist_ok=True)
    test.write_parquet(repo / layout.PREPARED / "test.parquet")
    tokenizer_file = repo / "tokenizer.json"
    train_tokenizer(test["text"].to_list(), vocab_size=300, min_frequency=1).save(str(tokenizer_file))
    torch.manual_seed(seed)
    backbone = GPT(GPTConfig(vocab_size=300, context_length=16, n_layer=1, n_head=1, d_model=8))
    save_classifier(Classifier(backbone, len(labels)), tokenizer_file, {"labels": labels, "temperature": 1.0},
                    SimpleNamespace(pooling="mean", max_chunks=1), repo / layout.CLASSIFIER)
    predicted = predicted_labels(load_classifier(repo / layout.CLASSIFIER), test["text"].to_list())
    (repo / layout.PRETRAINED).mkdir(parents=True, exist_ok=True)
    (repo / layout.PRETRAINED / "metrics.json").write_text(
        json.dumps({"val_perplexity": 9.0, "train_tokens": 1000, "seconds": 1.0}))
    (repo / layout.REPORTS).mkdir(exist_ok=True)
    (repo / layout.METRICS).write_text(json.dumps({"finetune": {"test": scores(test["label"].to_list(), predicted,
                                                                               labels)}}))
    for report in (layout.CONFUSION_PLOT, layout.MODEL_CARD):
        (repo / report).write_bytes(b"report")
    return test


@pytest.fixture
def gate_params(tmp_path) -> Params:
    # Tolerances that let any candidate through: which alias it gets must not depend on untrained weights.
    return Params.model_validate({"registry": {"uri": str(tmp_path / "registry"), "promotion_tolerance": 1.0,
                                               "max_class_f1_drop": 1.0}, "evaluate": {"bootstrap_samples": 200}})


def test_registration_scores_the_champion_on_the_candidates_test_texts(tmp_path, gate_params):
    repo, registry = tmp_path / "run", Registry(gate_params.registry.uri)
    test = write_run(repo, seed=0)
    first = register(gate_params, repo)
    assert (first["alias"], first["reason"], first["comparison"]) == ("champion", "no champion yet", None)
    write_run(repo, seed=1)  # the next run's classifier, the same test texts
    second = register(gate_params, repo)
    split = split_digest(test)
    assert second["alias"] == "champion" and second["test_split"] == split
    assert "vs champion v1's" in second["reason"] and f"on the same {test.height} test texts" in second["reason"]
    decision = registry.decision("bbc", 2)
    comparison = decision["comparison"]
    assert decision["alias"] == "champion" and decision["champion"] == 1 and comparison == second["comparison"]
    assert comparison["texts"] == test.height and comparison["test_split_sha256"] == split["sha256"]
    # Scored again here, each model matches what evaluate recorded for it on these same texts.
    for name, version in (("candidate", 2), ("champion", 1)):
        recorded = registry.manifest("bbc", version)
        assert comparison[name]["macro_f1"] == pytest.approx(recorded["metrics"]["test_macro_f1"])
        assert comparison[name]["accuracy"] == pytest.approx(recorded["metrics"]["test_accuracy"])
        assert recorded["test_split"] == split
    lineage = json.loads((registry.fetch(registry.manifest("bbc", 2)) / "lineage.json").read_text())
    assert lineage["test_split"] == split
    record = json.loads(registry.store.get("bbc/aliases/champion.json"))
    assert record["previous"] == [1] and record["decision"]["comparison"] == comparison
    # A decided version is finished: a rerun after a rollback leaves the rollback alone.
    assert registry.rollback("bbc") == 1
    again = register(gate_params, repo)
    assert (again["registered"], again["reason"]) == (False, "unchanged, already registered")
    assert registry.aliases("bbc")["champion"] == 1


def test_a_champion_with_other_labels_is_compared_on_its_own_test_scores(tmp_path, gate_params):
    repo = tmp_path / "run"
    write_run(repo, seed=0, labels=[*LABELS, "shipping"])
    register(gate_params, repo)
    write_run(repo, seed=1)
    second = register(gate_params, repo)
    assert second["comparison"] is None
    assert ("champion v1 has labels ['auth', 'billing', 'bug', 'shipping'] and this version ['auth', 'billing', "
            "'bug'], so they cannot be scored on the same texts; compared on their own test splits: test macro-F1"
            ) in second["reason"]
    assert Registry(gate_params.registry.uri).decision("bbc", 2)["reason"] == second["reason"]
