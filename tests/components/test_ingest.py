import json

import polars as pl
import pytest

from components.errors import InputError
from components.ingest import ingest, write_splits
from components.params import Params
from tests.conftest import support_tickets


def params_for(path, **data) -> Params:
    return Params.model_validate({"data": {"labeled": {"path": str(path), **data}}})


@pytest.fixture
def tickets_csv(tmp_path):
    path = tmp_path / "tickets.csv"
    pl.DataFrame(support_tickets()).write_csv(path)
    return path


def test_splits_are_stratified_disjoint_and_reproducible(tickets_csv):
    splits, report = ingest(params_for(tickets_csv))
    again, _ = ingest(params_for(tickets_csv))
    texts = [set(split["text"]) for split in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == report["kept"] == 120
    for name in splits:
        assert splits[name].equals(again[name])
        assert set(splits[name]["label"]) == {"auth", "billing", "bug"}


def test_duplicates_after_normalising_whitespace_are_dropped(tmp_path):
    rows = support_tickets() + [{"text": "Ticket 0:  my   " + support_tickets()[0]["text"][13:], "label": "billing"}]
    path = tmp_path / "dupes.jsonl"
    pl.DataFrame(rows).write_ndjson(path)
    _, report = ingest(params_for(path))
    assert report["read"] == 121 and report["duplicates_dropped"] == 1


def test_other_column_names_from_params(tmp_path):
    path = tmp_path / "tickets.parquet"
    pl.DataFrame(support_tickets()).rename({"text": "body", "label": "queue"}).write_parquet(path)
    splits, _ = ingest(params_for(path, text_column="body", label_column="queue"))
    assert set(splits["train"].columns) == {"text", "label"}


def test_label_folders(tmp_path):
    for row in support_tickets(rows_per_label=10):
        folder = tmp_path / "corpus" / row["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.txt").write_text(row["text"])
    splits, report = ingest(params_for(tmp_path / "corpus"))
    assert report["kept"] == 30 and report["labels"] == ["auth", "billing", "bug"]


@pytest.mark.parametrize(("content", "message"), [
    ("text,category\nhello,a\n", "column 'label' not found"),
    ("", "empty"),
    ("text,label\n" + "".join(f"t{i},only\n" for i in range(9)), "single class"),
    ("text,label\n" + "".join(f"t{i},{'a' if i else 'b'}\n" for i in range(9)), "label 'b' has fewer than 2"),
])
def test_bad_input_names_file_and_fix(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        ingest(params_for(path))
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        ingest(params_for(tmp_path / "nope.csv"))


def test_test_file_with_unknown_label(tmp_path, tickets_csv):
    test = tmp_path / "test.csv"
    pl.DataFrame([{"text": "new words", "label": "shipping"}]).write_csv(test)
    with pytest.raises(InputError, match="'shipping' does not occur"):
        ingest(Params.model_validate({"data": {"labeled": {"path": str(tickets_csv)}, "test": {"path": str(test)}}}))


def test_written_splits_and_labels(tmp_path, tickets_csv):
    splits, report = ingest(params_for(tickets_csv))
    write_splits(splits, report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "labels.json", "report.json", "test.parquet", "train.parquet", "val.parquet"]
    assert json.loads((tmp_path / "out/labels.json").read_text()) == ["auth", "billing", "bug"]
