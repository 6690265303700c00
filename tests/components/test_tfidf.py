"""TF-IDF + logistic regression as the classifier's bag-of-words half: the same probabilities as scikit-learn's,
kept exactly through its JSON + safetensors files."""

import numpy as np
import polars as pl
import pytest
from sklearn.linear_model import LogisticRegression

from components.errors import InputError
from components.tfidf import VOCABULARY_FILE, WEIGHTS_FILE, TfidfLogreg, vectorizer
from tests.conftest import support_tickets

TICKETS = pl.DataFrame(support_tickets(rows_per_label=20))
LABELS = sorted(set(TICKETS["label"]))
UNSEEN = ["my invoice and password both broke", "refund please", "nothing in the vocabulary here"]


@pytest.mark.parametrize("classes", [3, 2])
def test_probabilities_are_scikit_learns_and_survive_a_round_trip(classes, tmp_path):
    train = TICKETS.filter(pl.col("label").is_in(LABELS[:classes]))
    fitted = TfidfLogreg.fit(train, LABELS[:classes], seed=0)
    features = vectorizer()
    reference = LogisticRegression(C=10.0, max_iter=2000, random_state=0)
    reference.fit(features.fit_transform(train["text"].to_list()), train["label"].to_list())
    expected = reference.predict_proba(features.transform(UNSEEN))  # classes_ sorted, as LABELS
    assert np.abs(fitted.log_proba(UNSEEN).exp().numpy() - expected).max() < 1e-6
    assert fitted.predict(UNSEEN) == reference.predict(features.transform(UNSEEN)).tolist()

    fitted.save(tmp_path)
    loaded = TfidfLogreg.load(tmp_path)
    assert loaded.labels == LABELS[:classes]
    assert np.array_equal(loaded.log_proba(UNSEEN).numpy(), fitted.log_proba(UNSEEN).numpy())


def test_a_label_without_training_rows_gets_no_probability():
    train = TICKETS.filter(pl.col("label") != LABELS[1])
    fitted = TfidfLogreg.fit(train, LABELS, seed=0)
    probs = fitted.log_proba(UNSEEN).exp()
    assert probs.shape == (len(UNSEEN), len(LABELS))
    assert probs[:, 1].max() < 1e-6 and np.allclose(probs.sum(dim=1), 1, atol=1e-6)


def test_class_shares_keep_rows_picked_per_class_from_setting_the_prior():
    labeled = TICKETS.group_by("label", maintain_order=True).head(3)
    skewed = pl.concat([labeled, TICKETS.filter(pl.col("label") == LABELS[0]).tail(15).select(labeled.columns)])
    nothing_known = ["nothing in the vocabulary here"]
    share_of_first = {}
    for shares in (None, {label: 1 / 3 for label in LABELS}):
        fitted = TfidfLogreg.fit(skewed, LABELS, seed=0, class_shares=shares)
        share_of_first[shares is None] = fitted.log_proba(nothing_known).exp()[0, 0].item()
    assert share_of_first[True] > 0.5  # unweighted, the 18 rows make the first label the default guess
    assert abs(share_of_first[False] - 1 / 3) < abs(share_of_first[True] - 1 / 3)
    balanced = TfidfLogreg.fit(labeled, LABELS, seed=0, class_shares={label: 1 / 3 for label in LABELS})
    plain = TfidfLogreg.fit(labeled, LABELS, seed=0)  # rows already in the shares: the same fit
    assert np.allclose(balanced.log_proba(UNSEEN).numpy(), plain.log_proba(UNSEEN).numpy())


@pytest.mark.parametrize("broken, content", [(VOCABULARY_FILE, "{not json"), (WEIGHTS_FILE, "not safetensors")])
def test_an_unreadable_half_is_one_line_naming_the_folder(broken, content, tmp_path):
    TfidfLogreg.fit(TICKETS, LABELS, seed=0).save(tmp_path)
    (tmp_path / broken).write_text(content)
    with pytest.raises(InputError, match=f"{tmp_path}/{VOCABULARY_FILE}, {WEIGHTS_FILE}: the classifier's TF-IDF half"):
        TfidfLogreg.load(tmp_path)
