"""Predict: label texts with a registered classifier, as JSON lines `{"text", "label", "probs"}`."""

import json
from collections.abc import Iterator
from pathlib import Path


from components.errors import InputError
from components.inference import LoadedClassifier, load_classifier
from components.registry import Registry
from components.sources import read_table, read_text_file


def load_registered(registry_uri: str, ref: str) -> tuple[LoadedClassifier, dict]:
    registry = Registry(registry_uri)
    manifest = registry.resolve(ref)
    return load_classifier(registry.fetch(manifest)), manifest


def read_input_texts(path: Path, text_column: str) -> list[str]:
    """A .txt file gives one text per non-empty line; CSV, TSV, JSONL and Parquet give their text column."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise InputError(f"{path}: file not found; pass an existing file to --input")
        return [line for line in read_text_file(path).splitlines() if line.strip()]
    return read_table(path, [text_column])[text_column].fill_null("").to_list()


def predict(classifier: LoadedClassifier, texts: list[str]) -> Iterator[dict]:
    probs = classifier.predict_proba(texts)
    for text, row in zip(texts, probs.tolist(), strict=True):
        scores = {label: round(p, 6) for label, p in zip(classifier.labels, row, strict=True)}
        yield {"text": text, "label": max(scores, key=scores.get), "probs": scores}


def to_json_lines(rows: Iterator[dict]) -> Iterator[str]:
    return (json.dumps(row, ensure_ascii=False) for row in rows)


