"""TF-IDF + logistic regression: the baseline every model is compared with, self-training's second view, and the
bag-of-words half of the delivered classifier (`finetune.tfidf_weight`). Saved as JSON and safetensors (no pickle),
so a registry can hand it to anything that reads those."""

import json
from pathlib import Path

import numpy as np
import polars as pl
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from components.errors import InputError

VOCABULARY_FILE, WEIGHTS_FILE = "tfidf.json", "tfidf.safetensors"
NGRAMS = (1, 2)


def vectorizer(vocabulary: dict[str, int] | None = None) -> TfidfVectorizer:
    return TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True, min_df=2, vocabulary=vocabulary)


class TfidfLogreg:
    """1-2-gram TF-IDF features and a logistic regression over `labels`; `log_proba` gives columns in that order."""

    def __init__(self, vocabulary: dict[str, int], idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 labels: list[str]):
        self.vectorizer = vectorizer(vocabulary)
        self.vectorizer.idf_ = idf
        self.coef, self.intercept, self.labels = coef, intercept, labels

    @classmethod
    def fit(cls, train: pl.DataFrame, labels: list[str], seed: int,
            class_shares: dict[str, float] | None = None) -> "TfidfLogreg":
        """Fitted on `train`'s text and label columns; a label of `labels` absent from `train` is never predicted.
        With `class_shares` (label -> fraction), each label's rows together weigh that share of all rows: rows
        picked per class by another model's confidence would otherwise set the classes' prior."""
        fitted = vectorizer()
        counts = dict(train["label"].value_counts().iter_rows())
        class_weight = ({label: class_shares[label] * train.height / count for label, count in counts.items()}
                        if class_shares else None)
        model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed, class_weight=class_weight)
        model.fit(fitted.fit_transform(train["text"].to_list()), train["label"].to_list())
        coef, intercept = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # one row for the second class: the first's score is its negative
            coef, intercept = np.concatenate([-coef, coef]) / 2, np.concatenate([-intercept, intercept]) / 2
        rows = {label: row for row, label in enumerate(model.classes_)}
        # A label without training rows scores far below any seen one, so its probability is ~0.
        full_coef = np.zeros((len(labels), coef.shape[1]))
        full_intercept = np.full(len(labels), -1e4)
        for column, label in enumerate(labels):
            if label in rows:
                full_coef[column], full_intercept[column] = coef[rows[label]], intercept[rows[label]]
        return cls(fitted.vocabulary_, fitted.idf_, full_coef, full_intercept, labels)

    def scores(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.vectorizer.transform(texts) @ self.coef.T) + self.intercept

    def log_proba(self, texts: list[str]) -> torch.Tensor:
        """Log-probabilities (N, labels), as LogisticRegression.predict_proba gives them."""
        return torch.log_softmax(torch.from_numpy(self.scores(texts)).float(), dim=-1)

    def predict(self, texts: list[str]) -> list[str]:
        return [self.labels[i] for i in self.scores(texts).argmax(axis=1).tolist()]

    def save(self, folder: Path) -> None:
        vocabulary = {term: int(index) for term, index in self.vectorizer.vocabulary_.items()}
        (folder / VOCABULARY_FILE).write_text(json.dumps(
            {"labels": self.labels, "ngram_range": list(NGRAMS), "sublinear_tf": True, "norm": "l2",
             "vocabulary": vocabulary}, ensure_ascii=False) + "\n")
        save_file({"idf": self.vectorizer.idf_, "coef": self.coef, "intercept": self.intercept},
                  str(folder / WEIGHTS_FILE))

    @classmethod
    def load(cls, folder: Path) -> "TfidfLogreg":
        try:
            meta = json.loads((folder / VOCABULARY_FILE).read_text())
            tensors = load_file(str(folder / WEIGHTS_FILE))
            return cls(meta["vocabulary"], tensors["idf"], tensors["coef"], tensors["intercept"], meta["labels"])
        except (OSError, KeyError, ValueError, SafetensorError) as error:
            raise InputError(f"{folder}/{VOCABULARY_FILE}, {WEIGHTS_FILE}: the classifier's TF-IDF half cannot be "
                             f"read ({error}); re-run the finetune stage that wrote the folder") from None


def tfidf_logreg(train: pl.DataFrame, test: pl.DataFrame, seed: int) -> list[str]:
    """Labels for `test`'s texts from TF-IDF + logistic regression fitted on `train`."""
    labels = sorted(set(train["label"].to_list()))
    return TfidfLogreg.fit(train, labels, seed).predict(test["text"].to_list())
