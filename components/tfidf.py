"""TF-IDF + logistic regression: the baseline every model is compared with, and self-training's second view."""

import polars as pl
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression


def tfidf_logreg(train: pl.DataFrame, test: pl.DataFrame, seed: int) -> list[str]:
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=2)
    model = LogisticRegression(C=10.0, max_iter=2000, random_state=seed)
    model.fit(vectorizer.fit_transform(train["text"].to_list()), train["label"].to_list())
    return model.predict(vectorizer.transform(test["text"].to_list())).tolist()
