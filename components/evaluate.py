"""Evaluate: score the fine-tuned classifier and the baselines on the same held-out test split, with bootstrap
intervals, calibration, its worst mistakes, a label-efficiency curve and a model card.

    python -m components.evaluate --prepared data/prepared --pretrained models/pretrained \
        --classifier models/classifier --out reports
"""

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from sklearn.metrics import (
    ConfusionMatrixDisplay,
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
)
from tokenizers import Tokenizer

from components import layout
from components.atomic import write_bytes_atomic, write_json_atomic
from components.bootstrap import bootstrap_intervals
from components.curves import plot_curves
from components.errors import InputError, exit_on_input_error
from components.figures import save_figure
from components.finetune import finetune_and_self_train
from components.inference import LoadedClassifier, load_backbone, load_classifier
from components.model import GPT, KeyValues
from components.model_card import delivered_rows, model_card
from components.params import Params, load_params
from components.tfidf import tfidf_logreg

LABEL_PROMPT = "\nThis text is about"  # the label name follows
SHOT_END = "\n\n"  # after each labeled demonstration of a few-shot prompt
ECE_BINS = 15
MISTAKES = 10
PROGRESS_SECONDS = 10.0  # a progress line at most this often from a long evaluate step
# Label tokens of the batch of texts that prompting scores in one forward: bounds its memory.
PROMPT_LABEL_TOKENS = 2048


def scores(truth: list[str], predicted: list[str], labels: list[str], bootstrap_samples: int = 0,
           seed: int = 0) -> dict:
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    result = {"accuracy": accuracy_score(truth, predicted),
              "macro_f1": f1_score(truth, predicted, labels=labels, average="macro", zero_division=0),
              "per_class": {label: {"precision": p, "recall": r, "f1": f, "support": int(s)}
                            for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)},
              # rows: true label, columns: predicted label, both in `labels` order
              "confusion_matrix": confusion_matrix(truth, predicted, labels=labels).tolist()}
    if bootstrap_samples:
        index = {label: i for i, label in enumerate(labels)}
        intervals = bootstrap_intervals(np.array([index[t] for t in truth]), np.array([index[p] for p in predicted]),
                                        len(labels), bootstrap_samples, seed)
        result |= {"accuracy_ci95": intervals["accuracy"], "macro_f1_ci95": intervals["macro_f1"]}
    return result


def expected_calibration_error(probs: torch.Tensor, truth: torch.Tensor, bins: int = ECE_BINS) -> float:
    """ECE: the gap between confidence and accuracy, averaged over equal-width confidence bins by their size."""
    confidence, predicted = probs.max(dim=-1)
    correct = (predicted == truth).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=probs.dtype)
    which = torch.bucketize(confidence, edges[1:-1], right=True)
    return sum(abs(correct[which == b].mean() - confidence[which == b].double().mean()).item()
               * (which == b).sum().item() for b in range(bins) if (which == b).any()) / len(truth)


def calibration(logits: torch.Tensor, truth: torch.Tensor, temperature: float, delivered: torch.Tensor) -> dict:
    """The GPT's calibration before and after its temperature, and that of the `delivered` probabilities (with the
    TF-IDF half fused in, where there is one)."""
    before, after = torch.softmax(logits, dim=-1), torch.softmax(logits / temperature, dim=-1)
    return {"temperature": temperature, "bins": ECE_BINS,
            "test_ece_before": expected_calibration_error(before, truth),
            "test_ece_after": expected_calibration_error(after, truth),
            "test_ece_delivered": expected_calibration_error(delivered, truth),
            "test_nll_before": F.cross_entropy(logits, truth).item(),
            "test_nll_after": F.cross_entropy(logits / temperature, truth).item()}


def confident_mistakes(test: pl.DataFrame, probs: torch.Tensor, labels: list[str], top: int = MISTAKES) -> str:
    """A markdown table of the wrong predictions the model was surest of."""
    confidence, predicted = probs.max(dim=-1)
    truth = test["label"].to_list()
    wrong = [i for i, p in enumerate(predicted.tolist()) if labels[p] != truth[i]]
    wrong.sort(key=lambda i: -confidence[i].item())
    lines = ["| confidence | true | predicted | text |", "|---:|---|---|---|"]
    for i in wrong[:top]:
        words = " ".join(test["text"][i].split())
        text = (words[:160] + ("..." if len(words) > 160 else "")).replace("|", "\\|")
        lines.append(f"| {confidence[i].item():.3f} | {truth[i]} | {labels[predicted[i]]} | {text} |")
    return "\n".join(lines) + "\n"


@torch.no_grad()
def label_logprobs(lm: GPT, prefixes: list[list[int]], label_ids: torch.Tensor, label_lengths: torch.Tensor,
                   shared: list[KeyValues] | None = None) -> torch.Tensor:
    """log P(label | prefix) (B, L) for every prefix and label in two forward passes: the prefixes run once,
    right-padded, and then every label of every text continues from its text's keys and values at once, each label
    token seeing its own prefix and its own label's earlier tokens (label_ids (L, K) right-padded, lengths (L,)).
    With `shared` (the keys and values of tokens that come before every prefix, batch 1), the prefixes continue
    those tokens instead of recomputing them."""
    lengths = torch.tensor([len(prefix) for prefix in prefixes])
    padded = torch.zeros(len(prefixes), int(lengths.max()), dtype=torch.long)
    for row, prefix in enumerate(prefixes):
        padded[row, : len(prefix)] = torch.tensor(prefix)
    states, past = lm.hidden_states(padded, shared)  # causal: right padding never reaches the real tokens
    S = shared[0][0].size(2) if shared else 0
    B, P = padded.shape
    L, K = label_ids.shape
    last = states[torch.arange(B), lengths - 1]  # (B, C)
    first = F.log_softmax(lm.lm_head(last).float(), dim=-1)[:, label_ids[:, 0]]  # (B, L)
    if K == 1:
        return first
    ends = S + lengths  # each row's shared and own prefix tokens
    step = torch.arange(K - 1).repeat(L)  # each continued token's place in its label, (Q,) with Q = L (K - 1)
    label_of = torch.arange(L).repeat_interleave(K - 1)
    sees_prefix = (torch.arange(S + P)[None, :] < ends[:, None])[:, None, :].expand(B, step.numel(), S + P)
    sees_label = (label_of[:, None] == label_of[None, :]) & (step[None, :] <= step[:, None])  # (Q, Q)
    mask = torch.cat([sees_prefix, sees_label.expand(B, -1, -1)], dim=2)[:, None]  # (B, 1, Q, S + P + Q)
    tokens = label_ids[:, :-1].reshape(1, -1).expand(B, -1)  # (B, Q)
    continued, _ = lm.hidden_states(tokens, past, ends[:, None] + step[None, :], mask)
    logprobs = F.log_softmax(lm.lm_head(continued).float(), dim=-1)  # (B, Q, vocab)
    rest = logprobs.gather(-1, label_ids[:, 1:].reshape(1, -1, 1).expand(B, -1, 1)).view(B, L, K - 1)
    real = torch.arange(1, K)[None, :] < label_lengths[:, None]  # (L, K - 1)
    return first + (rest * real).sum(dim=2)


def fragment(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of text in the middle of a prompt: no start-of-text token, which a Llama-family tokenizer adds."""
    return tokenizer.encode(text, add_special_tokens=False).ids


def label_token_ids(tokenizer: Tokenizer, labels: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each label name as the LM continues the prompt with it: ids (L, K) right-padded, and lengths (L,)."""
    encoded = [fragment(tokenizer, " " + label) for label in labels]
    lengths = torch.tensor([len(ids) for ids in encoded])
    return torch.tensor([ids + [0] * (int(lengths.max()) - len(ids)) for ids in encoded]), lengths


def prompted_guesses(lm: GPT, tokenizer: Tokenizer, texts: list[str], labels: list[str], text_tokens: int,
                     shots: list[int] | None = None, log=print) -> list[str]:
    """Prompt the pre-trained LM with each label name after the text and pick the most likely one, each score
    taken relative to the label's likelihood with no text, so that a label that is merely frequent (or shown last)
    does not win. `shots` (token ids of labeled demonstrations, see `few_shot_prompt`) go before every text; they
    run once and every text continues from their keys and values."""
    lm.eval()
    label_ids, lengths = label_token_ids(tokenizer, labels)
    prompt_ids = fragment(tokenizer, LABEL_PROMPT)
    shots = shots or []
    with torch.no_grad():
        shared = lm.hidden_states(torch.tensor([shots]))[1] if shots else None
    room = lm.config.context_length - len(shots) - len(prompt_ids) - label_ids.size(1)
    prior = label_logprobs(lm, [prompt_ids], label_ids, lengths, shared)[0]
    batch = max(1, PROMPT_LABEL_TOKENS // label_ids.numel())
    # A text that starts the prompt is encoded whole; after demonstrations it is a fragment.
    encodings = tokenizer.encode_batch_fast(texts, add_special_tokens=not shots)
    kind = "few-shot" if shots else "zero-shot"
    guesses, reported = [], time.monotonic()
    for start in range(0, len(texts), batch):
        prefixes = [encoding.ids[: min(text_tokens, room)] + prompt_ids
                    for encoding in encodings[start : start + batch]]
        best = (label_logprobs(lm, prefixes, label_ids, lengths, shared) - prior).argmax(dim=1)
        guesses += [labels[i] for i in best.tolist()]
        if time.monotonic() - reported > PROGRESS_SECONDS:
            log(f"evaluate: {kind} {len(guesses)}/{len(texts)} texts")
            reported = time.monotonic()
    return guesses


class FewShotPrompt(NamedTuple):
    shots: list[int]  # token ids of the labeled demonstrations that start every prompt
    per_class: int  # demonstrations of each label they hold
    text_tokens: int  # of each test text after them


def few_shot_prompt(tokenizer: Tokenizer, train: pl.DataFrame, labels: list[str], params: Params,
                    context_length: int) -> FewShotPrompt:
    """Labeled train texts for a few-shot prompt: up to `evaluate.few_shot_per_class` of each label (chosen by
    seed, as a label budget's), each cut to `evaluate.few_shot_text_tokens` tokens and followed by the prompt, its
    label and a blank line, in rounds of one text per label; as many whole rounds as the window holds beside the
    test text (cut as for zero-shot), its prompt and the longest label."""
    cfg = params.evaluate
    prompt_ids, end_ids = fragment(tokenizer, LABEL_PROMPT), fragment(tokenizer, SHOT_END)
    text_room = context_length - len(prompt_ids) - label_token_ids(tokenizer, labels)[0].size(1)
    text_tokens = min(cfg.zero_shot_text_tokens, text_room)
    shots = (per_class_sample(train, labels, cfg.few_shot_per_class, params.seed)
             .with_columns(round=pl.int_range(pl.len()).over("label")).sort("round", maintain_order=True))
    ids, rounds = [], 0
    for _, group in shots.group_by("round", maintain_order=True):
        round_ids = []
        for text, label in group.select("text", "label").iter_rows():
            # The first text starts the prompt and is encoded whole, like a zero-shot text.
            text_ids = tokenizer.encode(text, add_special_tokens=not ids and not round_ids).ids
            round_ids += text_ids[: cfg.few_shot_text_tokens] + prompt_ids + fragment(tokenizer, " " + label) + end_ids
        if len(ids) + len(round_ids) > text_room - text_tokens:
            break
        ids, rounds = ids + round_ids, rounds + 1
    if not rounds:
        raise InputError(f"params evaluate.few_shot_text_tokens: one train text of each of the {len(labels)} "
                         f"labels, cut to {cfg.few_shot_text_tokens} tokens, does not fit in the model's "
                         f"{context_length}-token window beside {text_tokens} tokens of the test text; lower "
                         "evaluate.few_shot_text_tokens or evaluate.zero_shot_text_tokens")
    return FewShotPrompt(ids, rounds, text_tokens)


def per_class_sample(train: pl.DataFrame, labels: list[str], count: int, seed: int) -> pl.DataFrame:
    """Up to `count` rows of each label, chosen by seed; a smaller budget is a subset of a larger one."""
    return pl.concat([train.filter(pl.col("label") == label).sample(fraction=1.0, shuffle=True, seed=seed).head(count)
                      for label in labels])


class LabelEfficiency:
    """Fine-tunes pre-trained and scratch models on label budgets and scores them on the test split; each
    (model, budget) trains once, whether the curve, the scratch baseline or both ask for it."""

    def __init__(self, params: Params, prepared: Path, pretrained: Path, reader: LoadedClassifier,
                 test: pl.DataFrame):
        self.params, self.prepared, self.pretrained, self.reader, self.test = params, prepared, pretrained, reader, test
        self.train = pl.read_parquet(prepared / "train.parquet")
        self.runs: dict[tuple[str, int | None], dict] = {}

    def score(self, init: str, per_class: int | None) -> dict:
        """Test scores of `init` (`pretrained` or `scratch`) fine-tuned on `per_class` labels of each class
        (None: the whole train split, the fine-tune's own recipe, val selection included)."""
        if (init, per_class) in self.runs:
            return self.runs[(init, per_class)]
        params, labels = self.params, self.reader.labels
        print(f"evaluate: fine-tuning the {init} model on {per_class or 'all'} labels per class", flush=True)
        train = None if per_class is None else per_class_sample(self.train, labels, per_class, params.seed)
        reader, summary = self.finetune_from(init, train)
        texts, truth = self.test["text"].to_list(), self.test["label"].to_list()
        logits = reader.predict_logits(texts)
        predicted = [labels[i] for i in reader.fuse(logits, texts).argmax(-1).tolist()]
        result = {"test": scores(truth, predicted, labels, params.evaluate.bootstrap_samples, params.seed),
                  "test_gpt_alone": scores(truth, [labels[i] for i in logits.argmax(-1).tolist()], labels),
                  "labels_per_class": per_class, "train_examples": summary["train_examples"],
                  "pseudo_labeled": summary["pseudo_labeled"],
                  "epochs": summary["epochs_trained"]}
        self.runs[(init, per_class)] = result
        return result

    def finetune_from(self, init: str, train: pl.DataFrame | None) -> tuple[LoadedClassifier, dict]:
        """`init` weights fine-tuned on `train`; few labels (not None) train without val labels and keep the last
        epoch."""
        def initial() -> GPT:
            torch.manual_seed(self.params.seed)
            backbone = load_backbone(self.pretrained)
            return GPT(backbone.config) if init == "scratch" else backbone

        with tempfile.TemporaryDirectory(prefix=f"gptpipe-{init}-") as work_dir:
            return finetune_and_self_train(self.params, self.prepared, initial, self.reader.tokenizer, Path(work_dir),
                                           train, select_on_val=train is None)

    def curve(self, finetuned: dict, finetuned_gpt_alone: dict) -> list[dict]:
        """Per label budget: the pre-trained and scratch models fine-tuned on it, TF-IDF on the same labels, and
        the pre-trained GPT without its TF-IDF half; `all` reuses the delivered classifier's scores."""
        rows = []
        for budget in self.params.evaluate.label_budgets:
            per_class = None if budget == "all" else budget
            sample = self.train if per_class is None else per_class_sample(self.train, self.reader.labels, per_class,
                                                                          self.params.seed)
            run = None if per_class is None else self.score("pretrained", per_class)
            pretrained = (finetuned, finetuned_gpt_alone) if run is None else (run["test"], run["test_gpt_alone"])
            tfidf = scores(self.test["label"].to_list(), tfidf_logreg(sample, self.test, self.params.seed),
                           self.reader.labels)
            rows.append({"labels_per_class": per_class, "train_examples": sample.height,
                         **{name: {"accuracy": result["accuracy"], "macro_f1": result["macro_f1"]}
                            for name, result in (("pretrained", pretrained[0]),
                                                 ("scratch", self.score("scratch", per_class)["test"]),
                                                 ("tfidf_logreg", tfidf), ("pretrained_gpt_alone", pretrained[1]))}})
        return rows


def plot_confusion(truth: list[str], predicted: list[str], labels: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
    ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation=45, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_label_efficiency(rows: list[dict], classes: int, path: Path) -> None:
    """Macro-F1 against labels per class (log axis); `all` is drawn at the train split's mean examples per class."""
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [row["labels_per_class"] or row["train_examples"] / classes for row in rows]
    for name, style in (("pretrained", "o-"), ("scratch", "s--"), ("tfidf_logreg", "^:")):
        ax.plot(xs, [row[name]["macro_f1"] for row in rows], style, label=name)
    ax.set(xscale="log", xlabel="labels per class", ylabel="test macro-F1", ylim=(0, 1.02),
           title="Label efficiency")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)


def evaluate(params: Params, prepared: Path, pretrained: Path, classifier_dir: Path, curves: Path, out: Path) -> dict:
    # setup
    train = pl.read_parquet(prepared / "train.parquet")
    test = pl.read_parquet(prepared / "test.parquet")
    truth = test["label"].to_list()
    classifier = load_classifier(classifier_dir)
    labels = classifier.labels
    cfg = params.evaluate
    # the fine-tuned model
    logits = classifier.predict_logits(test["text"].to_list())
    probs = classifier.fuse(logits, test["text"].to_list())
    predicted = [labels[i] for i in probs.argmax(dim=-1).tolist()]
    truth_idx = torch.tensor([labels.index(label) for label in truth])
    finetuned = scores(truth, predicted, labels, cfg.bootstrap_samples, params.seed)
    gpt_alone = scores(truth, [labels[i] for i in logits.argmax(dim=-1).tolist()], labels, cfg.bootstrap_samples,
                       params.seed)
    metrics = {
        "pretrain": {**json.loads((pretrained / "metrics.json").read_text()),
                     "config": json.loads((pretrained / "config.json").read_text())},
        "finetune": {**json.loads((classifier_dir / "metrics.json").read_text()), "test": finetuned,
                     "tfidf_weight": classifier.tfidf_weight if classifier.tfidf else 0.0,
                     "test_gpt_alone": gpt_alone,
                     "calibration": calibration(logits, truth_idx, classifier.temperature, probs)},
        "baselines": {},
    }
    # baselines on the same split
    if "tfidf_logreg" in cfg.baselines:
        metrics["baselines"]["tfidf_logreg"] = {"test": scores(truth, tfidf_logreg(train, test, params.seed), labels,
                                                               cfg.bootstrap_samples, params.seed)}
    lm = load_backbone(pretrained) if {"zero_shot", "few_shot"} & set(cfg.baselines) else None
    if "zero_shot" in cfg.baselines:
        print(f"evaluate: zero-shot prompting with {len(labels)} label names on {len(truth)} texts", flush=True)
        guesses = prompted_guesses(lm, classifier.tokenizer, test["text"].to_list(), labels,
                                   cfg.zero_shot_text_tokens)
        metrics["baselines"]["zero_shot"] = {"test": scores(truth, guesses, labels, cfg.bootstrap_samples,
                                                            params.seed)}
    if "few_shot" in cfg.baselines:
        print(f"evaluate: few-shot prompting with up to {cfg.few_shot_per_class} train texts per label on "
              f"{len(truth)} texts", flush=True)
        prompt = few_shot_prompt(classifier.tokenizer, train, labels, params, lm.config.context_length)
        guesses = prompted_guesses(lm, classifier.tokenizer, test["text"].to_list(), labels, prompt.text_tokens,
                                   prompt.shots)
        metrics["baselines"]["few_shot"] = {"test": scores(truth, guesses, labels, cfg.bootstrap_samples,
                                                           params.seed), "labels_per_class": prompt.per_class}
    runs = LabelEfficiency(params, prepared, pretrained, classifier, test)
    curve = runs.curve(finetuned, gpt_alone)
    if "scratch" in cfg.baselines:
        metrics["baselines"]["scratch"] = runs.score("scratch", cfg.scratch_labels_per_class)
    # reports
    plot_confusion(truth, predicted, labels, out / layout.CONFUSION_PLOT.name,
                   f"{delivered_rows(metrics)[0][0]} on {len(truth)} test texts: accuracy {finetuned['accuracy']:.3f}")
    write_json_atomic(out / layout.LABEL_EFFICIENCY.name, curve)
    plot_label_efficiency(curve, len(labels), out / layout.LABEL_EFFICIENCY_PLOT.name)
    pretraining = "continued pre-training" if metrics["pretrain"].get("foundation") else "pre-training"
    plot_curves({pretraining: curves / layout.PRETRAIN_CURVES.name,
                 "fine-tuning": curves / layout.FINETUNE_CURVES.name}, out / layout.CURVES_PLOT.name)
    write_bytes_atomic(out / layout.MISTAKES.name, confident_mistakes(test, probs, labels).encode())
    splits = {"train": train.height, "val": pl.read_parquet(prepared / "val.parquet").height, "test": test.height}
    write_bytes_atomic(out / layout.MODEL_CARD.name, model_card(params, metrics, curve, splits, labels).encode())
    write_json_atomic(out / layout.METRICS.name, metrics)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=layout.PREPARED)
    parser.add_argument("--pretrained", type=Path, default=layout.PRETRAINED)
    parser.add_argument("--classifier", type=Path, default=layout.CLASSIFIER)
    parser.add_argument("--curves", type=Path, default=layout.CURVES, help="the training stages' curves folders")
    parser.add_argument("--out", type=Path, default=layout.REPORTS)
    args = parser.parse_args()
    metrics = evaluate(load_params(args.params), args.prepared, args.pretrained, args.classifier, args.curves,
                       args.out)
    rows = delivered_rows(metrics)
    rows += [(f"{name} ({result['labels_per_class']}/class)" if result.get("labels_per_class") else name,
              result["test"]) for name, result in metrics["baselines"].items()]
    for name, result in rows:
        interval = "  95% CI {:.3f}-{:.3f}".format(*result["accuracy_ci95"]) if "accuracy_ci95" in result else ""
        print(f"evaluate: {name:<22} test accuracy {result['accuracy']:.3f}{interval}  macro-F1 "
              f"{result['macro_f1']:.3f}")
    calibrated = metrics["finetune"]["calibration"]
    print(f"evaluate: temperature {calibrated['temperature']:.2f}, test ECE {calibrated['test_ece_before']:.3f} -> "
          f"{calibrated['test_ece_after']:.3f}")


if __name__ == "__main__":
    exit_on_input_error(main)
