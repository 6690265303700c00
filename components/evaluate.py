"""Evaluate: score the fine-tuned classifier and the baselines on the same held-out test split.

    python -m components.evaluate --prepared data/prepared --pretrained models/pretrained \
        --classifier models/classifier --out reports
"""

import argparse
import json
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import ConfusionMatrixDisplay, accuracy_score, f1_score, precision_recall_fscore_support
from tokenizers import Tokenizer

from components.atomic import write_bytes_atomic, write_json_atomic
from components.errors import exit_on_input_error
from components.finetune import finetune
from components.inference import load_backbone, load_classifier
from components.model import GPT
from components.params import Params, load_params

ZERO_SHOT_PROMPT = "\nThis text is about"


def scores(truth: list[str], predicted: list[str], labels: list[str]) -> dict:
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    return {"accuracy": accuracy_score(truth, predicted),
            "macro_f1": f1_score(truth, predicted, labels=labels, average="macro", zero_division=0),
            "per_class": {label: {"precision": p, "recall": r, "f1": f, "support": int(s)}
                          for label, p, r, f, s in zip(labels, precision, recall, f1, support, strict=True)}}


def tfidf_logreg(train: pl.DataFrame, test: pl.DataFrame, seed: int) -> list[str]:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
    model.fit(vectorizer.fit_transform(train["text"].to_list()), train["label"].to_list())
    return model.predict(vectorizer.transform(test["text"].to_list())).tolist()


@torch.no_grad()
def zero_shot(lm: GPT, tokenizer: Tokenizer, texts: list[str], labels: list[str], text_tokens: int) -> list[str]:
    """Prompt the pre-trained LM with each label name after the text and pick the most likely one, each score
    taken relative to the label's likelihood with no text, so that a label that is merely frequent does not win."""
    lm.eval()
    label_ids = [tokenizer.encode(" " + label).ids for label in labels]
    prompt_ids = tokenizer.encode(ZERO_SHOT_PROMPT).ids

    def label_logprobs(prefix: list[int]) -> list[float]:
        sequences = [(prefix + prompt_ids + ids)[-lm.config.context_length:] for ids in label_ids]
        width = max(len(s) for s in sequences)
        batch = torch.tensor([s + [0] * (width - len(s)) for s in sequences])
        logprobs = F.log_softmax(lm(batch).float(), dim=-1)
        return [sum(logprobs[row, len(s) - len(ids) - 1 + k, tok].item() for k, tok in enumerate(ids))
                for row, (s, ids) in enumerate(zip(sequences, label_ids, strict=True))]

    prior = np.array(label_logprobs([]))
    encoded = tokenizer.encode_batch_fast(texts)
    return [labels[int(np.argmax(np.array(label_logprobs(e.ids[:text_tokens])) - prior))] for e in encoded]


def plot_confusion(truth: list[str], predicted: list[str], labels: list[str], path: Path, title: str) -> None:
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
    ConfusionMatrixDisplay.from_predictions(truth, predicted, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation=45, cmap="Blues")
    ax.set_title(title)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(suffix=".png") as staging:
        fig.savefig(staging.name, dpi=110)
        write_bytes_atomic(path, Path(staging.name).read_bytes())
    plt.close(fig)


def evaluate(params: Params, prepared: Path, pretrained: Path, classifier_dir: Path, out: Path) -> dict:
    train = pl.read_parquet(prepared / "train.parquet")
    test = pl.read_parquet(prepared / "test.parquet")
    truth = test["label"].to_list()
    classifier = load_classifier(classifier_dir)
    labels = classifier.labels
    probs = classifier.predict_proba(test["text"].to_list())
    predicted = [labels[i] for i in probs.argmax(dim=-1).tolist()]
    metrics = {
        "pretrain": json.loads((pretrained / "metrics.json").read_text()),
        "finetune": {**json.loads((classifier_dir / "metrics.json").read_text()),
                     "test": scores(truth, predicted, labels)},
        "baselines": {},
    }
    baselines = params.evaluate.baselines
    if "tfidf_logreg" in baselines:
        metrics["baselines"]["tfidf_logreg"] = {"test": scores(truth, tfidf_logreg(train, test, params.seed), labels)}
    if "zero_shot" in baselines:
        guesses = zero_shot(load_backbone(pretrained), classifier.tokenizer, test["text"].to_list(), labels,
                            params.evaluate.zero_shot_text_tokens)
        metrics["baselines"]["zero_shot"] = {"test": scores(truth, guesses, labels)}
    if "scratch" in baselines:
        fresh = GPT(load_backbone(pretrained).config)
        with tempfile.TemporaryDirectory(prefix="gptpipe-scratch-") as work_dir:
            scratch, _ = finetune(params, prepared, fresh, classifier.tokenizer, Path(work_dir))
        classifier.model = scratch
        scratch_probs = classifier.predict_proba(test["text"].to_list())
        metrics["baselines"]["scratch"] = {"test": scores(truth, [labels[i] for i in scratch_probs.argmax(-1)],
                                                          labels)}
    plot_confusion(truth, predicted, labels, out / "confusion_matrix.png",
                   f"Fine-tuned GPT on {len(truth)} test texts: accuracy {metrics['finetune']['test']['accuracy']:.3f}")
    write_json_atomic(out / "metrics.json", metrics)
    return metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--classifier", type=Path, default=Path("models/classifier"))
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args()
    metrics = evaluate(load_params(args.params), args.prepared, args.pretrained, args.classifier, args.out)
    rows = [("fine-tuned GPT", metrics["finetune"]["test"])]
    rows += [(name, result["test"]) for name, result in metrics["baselines"].items()]
    for name, result in rows:
        print(f"evaluate: {name:<16} test accuracy {result['accuracy']:.3f}  macro-F1 {result['macro_f1']:.3f}")


if __name__ == "__main__":
    exit_on_input_error(main)
