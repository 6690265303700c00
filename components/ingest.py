"""Ingest: read the labeled data, normalise, drop duplicates and leaks, split train/val/test by a hash of each
text and the seed (stable as the data grows), report.

    python -m components.ingest --out data/prepared --report reports/data.json --plot reports/data_lengths.png
"""

import argparse
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from components import layout
from components.atomic import atomic_dir, write_bytes_atomic, write_json_atomic
from components.errors import InputError, exit_on_input_error
from components.held_out import HeldOutTexts, normalise
from components.params import Params, load_params
from components.sources import read_labeled

QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9, "p99": 0.99}


def clean(frame: pl.DataFrame, source: str) -> tuple[pl.DataFrame, dict[str, int]]:
    """Normalised texts and labels without blanks or duplicates (the first copy of a text is kept)."""
    read = frame.height
    frame = frame.with_columns(
        pl.col("text").fill_null("").map_elements(normalise, return_dtype=pl.String),
        pl.col("label").fill_null("").str.strip_chars(),
    )
    frame = frame.filter(pl.col("text").str.len_chars() > 0, pl.col("label").str.len_chars() > 0)
    blank = read - frame.height
    conflicts = frame.group_by("text").agg(pl.col("label").n_unique()).filter(pl.col("label") > 1).height
    frame = frame.unique(subset="text", keep="first", maintain_order=True)
    if frame.height == 0:
        raise InputError(f"{source}: no rows with both a text and a label; check the file and the column names "
                         "under data in params.yaml")
    return frame, {"read": read, "blank": blank, "duplicate": read - blank - frame.height,
                   "label_conflicts": conflicts}


def check_labels(frame: pl.DataFrame, needed: int, source: str, column: str) -> None:
    """Every label needs an example in each split cut from it."""
    counts = frame["label"].value_counts().sort(["count", "label"])
    if counts["count"][0] < needed:
        label, count = counts.row(0)
        splits = "train, val and test" if needed == 3 else "train and val"
        raise InputError(f"{source}: label {label!r} in column {column!r} has {count} example(s), fewer than the "
                         f"{needed} that {splits} need; add examples or remove the label")


def split_position(text: str, seed: int) -> float:
    """A text's place in [0, 1), from its normalised text and the seed alone: growing data never moves an old text
    to another split (a test text stays in test), and a text's split does not depend on its neighbours."""
    digest = hashlib.blake2b(text.encode(), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "big") / 2**64


def hash_split(frame: pl.DataFrame, fractions: dict[str, float], seed: int) -> dict[str, pl.DataFrame]:
    """Cut `frame` into the named splits by each text's `split_position`: the first split takes positions below its
    fraction, the next the following share, the last the rest. A label that none of a held-out split's positions
    reach lends it its lowest-positioned text left, so that every label is tested; only such a rare label's texts
    can change split as the data grows."""
    frame = frame.with_columns(position=pl.col("text").map_elements(lambda text: split_position(text, seed),
                                                                    return_dtype=pl.Float64))
    *held_out, last = fractions
    splits, low = {}, 0.0
    for name in held_out:
        high = low + fractions[name]
        natural = frame.filter((pl.col("position") >= low) & (pl.col("position") < high))
        rescued = (frame.filter(pl.col("position") >= high, ~pl.col("label").is_in(natural["label"].implode()))
                   .sort("position").group_by("label", maintain_order=True).first())
        splits[name] = pl.concat([natural, rescued.select(frame.columns)]).sort("position")
        frame = frame.join(splits[name].select("text"), on="text", how="anti", maintain_order="left")
        low = high
    splits[last] = frame
    return {name: split.drop("position") for name, split in splits.items()}


def cap_per_label(frame: pl.DataFrame, limit: int | None, seed: int) -> pl.DataFrame:
    """At most `limit` rows per label, chosen by seed; the rows keep their order."""
    if limit is None:
        return frame
    rng = np.random.default_rng([seed, limit])
    labels = frame["label"].to_numpy()
    keep = []
    for label in sorted(set(labels)):
        rows = np.flatnonzero(labels == label)
        keep.append(rows if len(rows) <= limit else rng.choice(rows, size=limit, replace=False))
    return frame[np.sort(np.concatenate(keep)).tolist()]


def length_stats(lengths: pl.Series) -> dict[str, float]:
    stats = {"min": int(lengths.min()), **{k: float(lengths.quantile(q, "nearest")) for k, q in QUANTILES.items()},
             "max": int(lengths.max()), "mean": round(float(lengths.mean()), 1)}
    return stats


def read_source(path: str, text_column: str, label_column: str, undecodable: str) -> tuple[pl.DataFrame, dict]:
    counts: Counter = Counter()
    frame, report = clean(read_labeled(path, text_column, label_column, undecodable, counts), path)
    report["undecodable"] = counts["undecodable"]
    report["read"] += counts["undecodable"]
    return frame, report


def ingest(params: Params) -> tuple[dict[str, pl.DataFrame], dict]:
    """Read, clean and split; returns the splits and a report of what was kept and dropped, and why."""
    data, labeled = params.data, params.data.labeled
    frame, labeled_report = read_source(labeled.path, labeled.text_column, labeled.label_column, data.undecodable)
    labels = sorted(frame["label"].unique().to_list())
    if len(labels) < 2:
        raise InputError(f"{labeled.path}: column {labeled.label_column!r} has a single class ({labels[0]!r}); "
                         "a classifier needs at least two")
    reports = {"labeled": labeled_report}
    leakage = 0
    test_cfg = data.test
    if test_cfg.path:
        test, reports["test_file"] = read_source(test_cfg.path, test_cfg.text_column, test_cfg.label_column,
                                                 data.undecodable)
        unknown = sorted(set(test["label"].to_list()) - set(labels))
        if unknown:
            raise InputError(f"{test_cfg.path}: label {unknown[0]!r} in column {test_cfg.label_column!r} does not "
                             f"occur in the training data ({labeled.path}); fix the label or add training examples")
        # A text in both files would be tested on what was trained: drop it from the larger side.
        if frame.height >= test.height:
            shrunk = frame.join(test.select("text"), on="text", how="anti", maintain_order="left")
            leakage, frame = frame.height - shrunk.height, shrunk
        else:
            shrunk = test.join(frame.select("text"), on="text", how="anti", maintain_order="left")
            leakage, test = test.height - shrunk.height, shrunk
        if test.height == 0:
            raise InputError(f"{test_cfg.path}: every test text also occurs in {labeled.path}; "
                             "use a test set of unseen texts")
        check_labels(frame, 2, labeled.path, labeled.label_column)
    else:
        check_labels(frame, 3, labeled.path, labeled.label_column)
    fractions = {"val": data.val_fraction} if test_cfg.path else {"test": data.test_fraction,
                                                                    "val": data.val_fraction}
    cut = hash_split(frame, fractions | {"train": 1.0}, params.seed)
    test = test if test_cfg.path else cut["test"]
    # A longer text that quotes a whole test text (a follow-up article, a reply) would teach the test answer.
    quoting = HeldOutTexts(test["text"].to_list())
    train, val = (split.filter(~pl.Series(quoting.holding(split["text"].to_list()), dtype=pl.Boolean))
                  for split in (cut["train"], cut["val"]))
    leakage += cut["train"].height + cut["val"].height - train.height - val.height
    capped = cap_per_label(train, data.labels_per_class, params.seed)
    # Texts whose labels the cap holds back stay task text: pre-training and self-training read them.
    held_back = train.join(capped.select("text"), on="text", how="anti", maintain_order="left").select("text")
    splits = {"train": capped, "val": val, "test": test, "unlabeled": held_back}
    dropped = {reason: sum(r[reason] for r in reports.values()) for reason in ("blank", "duplicate", "undecodable")}
    dropped |= {"leakage": leakage, "labels_per_class": train.height - capped.height}
    report = {
        "read": sum(r["read"] for r in reports.values()),
        "kept": sum(split.height for name, split in splits.items() if name != "unlabeled"),
        "dropped": dropped,
        "label_conflicts": sum(r["label_conflicts"] for r in reports.values()),
        "sources": {name: {"path": path, **reports[name]} for name, path in
                    (("labeled", labeled.path), ("test_file", test_cfg.path)) if name in reports},
        "labels": labels,
        "labels_per_class": data.labels_per_class,
        "splits": {name: {"rows": split.height,
                          **({"per_label": dict(sorted(split["label"].value_counts().iter_rows()))}
                             if "label" in split.columns else {}),
                          "chars": length_stats(split["text"].str.len_chars()) if split.height else None}
                   for name, split in splits.items()},
    }
    return splits, report


def length_histogram(splits: dict[str, pl.DataFrame]) -> bytes:
    """Text lengths in characters per split, on log-spaced bins, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = {name: split["text"].str.len_chars().to_numpy() for name, split in splits.items() if split.height}
    longest = max(int(values.max()) for values in lengths.values())
    bins = np.geomspace(1, max(longest, 2) + 1, 40)
    figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in lengths.items():
        axis.hist(values, bins=bins, histtype="step", linewidth=1.5, label=f"{name} ({len(values)})")
    axis.set(xscale="log", xlabel="characters per text", ylabel="texts", title="Text lengths by split")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(figure)
    return buffer.getvalue()


def write_splits(splits: dict[str, pl.DataFrame], report: dict, out: Path) -> None:
    with atomic_dir(out) as staging:
        for name, split in splits.items():
            split.write_parquet(staging / f"{name}.parquet")
        (staging / "labels.json").write_text(json.dumps(report["labels"], indent=2) + "\n")
        (staging / "report.json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=layout.PREPARED)
    parser.add_argument("--report", type=Path, default=layout.DATA_REPORT)
    parser.add_argument("--plot", type=Path, default=layout.LENGTHS_PLOT)
    args = parser.parse_args()
    splits, report = ingest(load_params(args.params))
    plot = length_histogram(splits)
    write_splits(splits, report, args.out)
    write_json_atomic(args.report, report)
    write_bytes_atomic(args.plot, plot)
    sizes = ", ".join(f"{name} {split.height}" for name, split in splits.items())
    dropped = ", ".join(f"{count} {reason}" for reason, count in report["dropped"].items() if count)
    print(f"ingest: {report['read']} rows read, {report['kept']} kept (dropped: {dropped or 'none'}); {sizes}; "
          f"labels {report['labels']}")


if __name__ == "__main__":
    exit_on_input_error(main)
