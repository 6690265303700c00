"""Ingest: read the labeled data, normalise, drop duplicates, split train/val/test by seed.

    python -m components.ingest --out data/prepared
"""

import argparse
import json
import unicodedata
from pathlib import Path

import polars as pl
from sklearn.model_selection import train_test_split

from components.atomic import atomic_dir
from components.errors import InputError, exit_on_input_error
from components.params import Params, load_params
from components.sources import read_labeled

SPLITS = ("train", "val", "test")


def normalise(text: str) -> str:
    """NFC and collapsed whitespace, so that copies differing only in spacing count as duplicates."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def clean(frame: pl.DataFrame, source: str) -> tuple[pl.DataFrame, dict[str, int]]:
    read = frame.height
    frame = frame.with_columns(
        pl.col("text").map_elements(normalise, return_dtype=pl.String),
        pl.col("label").str.strip_chars(),
    )
    frame = frame.filter(pl.col("text").str.len_chars() > 0, pl.col("label").str.len_chars() > 0)
    blank = read - frame.height
    frame = frame.unique(subset="text", keep="first", maintain_order=True)
    if frame.height == 0:
        raise InputError(f"{source}: no rows with both a text and a label; check the file and column names")
    return frame, {"read": read, "blank_dropped": blank, "duplicates_dropped": read - blank - frame.height,
                   "kept": frame.height}


def stratified_split(frame: pl.DataFrame, fraction: float, seed: int, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    counts = frame["label"].value_counts()
    rare = counts.filter(pl.col("count") < 2)
    if rare.height:
        raise InputError(f"{source}: label {rare['label'][0]!r} has fewer than 2 examples, too few to split; "
                         "add examples or remove the label")
    keep, held = train_test_split(range(frame.height), test_size=fraction, random_state=seed,
                                  stratify=frame["label"].to_list())
    return frame[sorted(keep)], frame[sorted(held)]


def ingest(params: Params) -> tuple[dict[str, pl.DataFrame], dict]:
    """Read, clean and split; returns the splits and a report of what was kept and dropped."""
    labeled = params.data.labeled
    frame, report = clean(read_labeled(labeled.path, labeled.text_column, labeled.label_column), labeled.path)
    labels = sorted(frame["label"].unique().to_list())
    if len(labels) < 2:
        raise InputError(f"{labeled.path}: column {labeled.label_column!r} has a single class ({labels[0]!r}); "
                         "a classifier needs at least two")
    test_cfg = params.data.test
    if test_cfg.path:
        test, test_report = clean(read_labeled(test_cfg.path, test_cfg.text_column, test_cfg.label_column),
                                  test_cfg.path)
        unknown = sorted(set(test["label"].to_list()) - set(labels))
        if unknown:
            raise InputError(f"{test_cfg.path}: label {unknown[0]!r} does not occur in the training data "
                             f"({labeled.path}); fix the label or add training examples")
        # A text in both files would be tested on what was trained: keep it in test only.
        frame = frame.join(test.select("text"), on="text", how="anti")
        report["test_file"] = test_report
        rest = frame
    else:
        rest, test = stratified_split(frame, params.data.test_fraction, params.seed, labeled.path)
    val_share = params.data.val_fraction / (1 - (0 if test_cfg.path else params.data.test_fraction))
    train, val = stratified_split(rest, val_share, params.seed, labeled.path)
    splits = {"train": train, "val": val, "test": test}
    report["splits"] = {name: {"rows": split.height,
                               "per_label": dict(sorted(split["label"].value_counts().iter_rows()))}
                        for name, split in splits.items()}
    report["labels"] = labels
    return splits, report


def write_splits(splits: dict[str, pl.DataFrame], report: dict, out: Path) -> None:
    with atomic_dir(out) as staging:
        for name, split in splits.items():
            split.write_parquet(staging / f"{name}.parquet")
        (staging / "labels.json").write_text(json.dumps(report["labels"], indent=2) + "\n")
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    args = parser.parse_args()
    splits, report = ingest(load_params(args.params))
    write_splits(splits, report, args.out)
    sizes = ", ".join(f"{name} {split.height}" for name, split in splits.items())
    print(f"ingest: {report['read']} rows read, {report['kept']} kept; {sizes}; labels {report['labels']}")


if __name__ == "__main__":
    exit_on_input_error(main)
