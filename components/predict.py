"""Predict: label texts with a registered classifier, as JSON lines `{"text", "label", "probs"}`, or as the
input table with `label` and `prob_<label>` columns added."""

import io
import json
from collections.abc import Iterator
from pathlib import Path

import polars as pl

from components.atomic import write_bytes_atomic
from components.errors import InputError
from components.inference import LoadedClassifier, load_classifier
from components.registry import Registry
from components.sources import TABLE_SUFFIXES, read_table, read_text_file, table_separator


def load_registered(registry_uri: str, ref: str) -> tuple[LoadedClassifier, dict]:
    registry = Registry(registry_uri)
    manifest = registry.resolve(ref)
    return load_classifier(registry.fetch(manifest)), manifest


def read_input(path: Path, text_column: str) -> pl.DataFrame:
    """A .txt file gives one text per non-empty line; CSV, TSV, JSONL and Parquet keep all their columns."""
    if not path.is_file():
        raise InputError(f"{path}: file not found; pass an existing file to --input")
    if path.suffix.lower() != ".txt":
        return read_table(path, [text_column])
    return pl.DataFrame({text_column: [line for line in read_text_file(path).splitlines() if line.strip()]})


def predict(classifier: LoadedClassifier, texts: list[str]) -> Iterator[dict]:
    probs = classifier.predict_proba(texts)
    for text, row in zip(texts, probs.tolist(), strict=True):
        scores = {label: round(p, 6) for label, p in zip(classifier.labels, row, strict=True)}
        yield {"text": text, "label": max(scores, key=scores.get), "probs": scores}


def to_json_lines(rows: Iterator[dict]) -> Iterator[str]:
    return (json.dumps(row, ensure_ascii=False) for row in rows)


def label_table(classifier: LoadedClassifier, frame: pl.DataFrame, text_column: str) -> pl.DataFrame:
    rows = list(predict(classifier, frame[text_column].fill_null("").cast(pl.String).to_list()))
    return frame.with_columns(
        pl.Series("label", [row["label"] for row in rows], dtype=pl.String),
        *(pl.Series(f"prob_{label}", [row["probs"][label] for row in rows]) for label in classifier.labels),
    )


def write_table(frame: pl.DataFrame, path: Path) -> None:
    suffix = path.suffix.lower()
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"--output {path}: unsupported file type {suffix!r}; use one of {sorted(TABLE_SUFFIXES)}")
    buffer = io.BytesIO()
    if suffix == ".parquet":
        frame.write_parquet(buffer)
    elif suffix in (".jsonl", ".ndjson"):
        frame.write_ndjson(buffer)
    else:
        frame.write_csv(buffer, separator=table_separator(suffix))
    write_bytes_atomic(path, buffer.getvalue())
