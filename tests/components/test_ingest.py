import json
import subprocess
import sys

import polars as pl
import pytest
import yaml

from components.errors import InputError
from components.ingest import ingest, length_histogram, write_splits
from components.params import Params, load_params
from tests.conftest import support_tickets


def params_for(path, test=None, **data) -> Params:
    labeled = {"path": str(path), **{k: data.pop(k) for k in ("text_column", "label_column") if k in data}}
    return Params.model_validate({"data": {"labeled": labeled, "test": {"path": test and str(test)}, **data}})


def balanced(report: dict) -> bool:
    return report["read"] == report["kept"] + sum(report["dropped"].values())


@pytest.fixture
def tickets_csv(tmp_path):
    path = tmp_path / "tickets.csv"
    pl.DataFrame(support_tickets()).write_csv(path)
    return path


def test_splits_are_disjoint_and_reproducible(tickets_csv):
    splits, report = ingest(params_for(tickets_csv))
    again, _ = ingest(params_for(tickets_csv))
    assert splits["unlabeled"].height == 0  # nothing held back without data.labels_per_class
    texts = [set(splits[name]["text"]) for name in ("train", "val", "test")]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(t) for t in texts) == report["kept"] == 120 and balanced(report)
    for name in ("train", "val", "test"):
        assert splits[name].equals(again[name])
        assert set(splits[name]["label"]) == {"auth", "billing", "bug"}
        assert report["splits"][name]["chars"]["p50"] > 0


def test_growing_data_keeps_every_old_text_in_its_split(tmp_path, tickets_csv):
    before, _ = ingest(params_for(tickets_csv))
    grown = tmp_path / "grown.csv"
    extra = [{"text": f"Ticket {i}: new report number {i} about invoices", "label": "billing"} for i in range(12)]
    pl.DataFrame(extra + support_tickets()).write_csv(grown)  # new rows first: position in the file must not matter
    after, _ = ingest(params_for(grown))
    for name in before:
        assert set(before[name]["text"]) <= set(after[name]["text"])
    other_seed, _ = ingest(params_for(tickets_csv).model_copy(update={"seed": 2}))
    assert set(other_seed["test"]["text"]) != set(before["test"]["text"])


def test_duplicates_after_normalising_whitespace_are_dropped(tmp_path):
    rows = support_tickets() + [{"text": "Ticket 0:  my   " + support_tickets()[0]["text"][13:], "label": "billing"}]
    path = tmp_path / "dupes.jsonl"
    pl.DataFrame(rows).write_ndjson(path)
    _, report = ingest(params_for(path))
    assert report["read"] == 121 and report["dropped"]["duplicate"] == 1 and balanced(report)


def test_blank_texts_and_labels_are_dropped_and_counted(tmp_path):
    rows = support_tickets() + [{"text": "   ", "label": "bug"}, {"text": None, "label": "bug"},
                                {"text": "no label here", "label": " "}]
    path = tmp_path / "blanks.parquet"
    pl.DataFrame(rows).write_parquet(path)
    _, report = ingest(params_for(path))
    assert report["dropped"]["blank"] == 3 and report["kept"] == 120 and balanced(report)


def test_other_column_names_from_params(tmp_path):
    path = tmp_path / "tickets.tsv"
    pl.DataFrame(support_tickets()).rename({"text": "body", "label": "queue"}).write_csv(path, separator="\t")
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
    ("text,label\n", "no rows"),
    ("text,label\n" + "".join(f"t{i},only\n" for i in range(9)), "single class"),
    ("text,label\n" + "".join(f"t{i},{'a' if i else 'b'}\n" for i in range(9)),
     "label 'b' in column 'label' has 1 example"),
])
def test_bad_input_names_file_and_fix(tmp_path, content, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(InputError, match=message) as error:
        ingest(params_for(path))
    assert str(path) in str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.csv: file not found"):
        ingest(params_for(tmp_path / "nope.csv"))


def test_undecodable_row_fails_naming_file_and_line(tmp_path, tickets_csv):
    path = tmp_path / "latin1.csv"
    path.write_bytes(tickets_csv.read_bytes() + "Ticket x: caf\xe9 refund,billing\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.csv: line 122 is not UTF-8 .*data.undecodable: skip"):
        ingest(params_for(path))
    _, report = ingest(params_for(path, undecodable="skip"))
    assert report["dropped"]["undecodable"] == 1 and report["kept"] == 120 and balanced(report)


def test_undecodable_file_in_label_folders(tmp_path):
    for row in support_tickets(rows_per_label=10):
        folder = tmp_path / "corpus" / row["label"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{len(list(folder.iterdir()))}.txt").write_text(row["text"])
    bad = tmp_path / "corpus/bug/bad.txt"
    bad.write_bytes(b"fine line\nbroken \xff line\n")
    with pytest.raises(InputError, match=f"{bad}: line 2 is not UTF-8"):
        ingest(params_for(tmp_path / "corpus"))
    _, report = ingest(params_for(tmp_path / "corpus", undecodable="skip"))
    assert report["dropped"]["undecodable"] == 1 and report["kept"] == 30


def test_builtin_corpus_with_its_windows_1252_file_still_reads():
    from components.sources import read_labeled

    frame = read_labeled("builtin:bbc_news", "text", "label")
    assert frame.height == 2225 and frame["text"].str.contains("\u00a3").any()


def test_test_file_with_unknown_label(tmp_path, tickets_csv):
    test = tmp_path / "test.csv"
    pl.DataFrame([{"text": "new words", "label": "shipping"}]).write_csv(test)
    with pytest.raises(InputError, match=f"{test}: label 'shipping' in column 'label' does not occur"):
        ingest(params_for(tickets_csv, test=test))


def test_texts_in_both_labeled_and_test_file_count_as_leakage(tmp_path, tickets_csv):
    rows = support_tickets()
    test = tmp_path / "test.jsonl"
    fresh = [{"text": f"Ticket new {i}: password reset fails", "label": "auth"} for i in range(5)]
    leaked = [{"text": "  " + row["text"].replace(" ", "   "), "label": row["label"]} for row in rows[:4]]
    pl.DataFrame(fresh + leaked).write_ndjson(test)
    splits, report = ingest(params_for(tickets_csv, test=test))
    assert report["dropped"]["leakage"] == 4 and balanced(report)
    assert splits["test"].height == 9  # the labeled file is larger: the copies leave it, not the test file
    trained = set(splits["train"]["text"]) | set(splits["val"]["text"])
    assert not trained & set(splits["test"]["text"])


def test_a_labeled_text_quoting_a_whole_test_text_is_dropped(tmp_path, tickets_csv):
    """A follow-up that quotes a test text (50 characters or more) would teach its answer; a short one cannot."""
    splits, _ = ingest(params_for(tickets_csv))
    quoted, short = splits["test"]["text"][0], "my refund"
    follow_ups = [{"text": f"Following up on this: {quoted} Still waiting.", "label": "billing"},
                  {"text": f"Follow-up: {short} is still missing, please check", "label": "billing"}]
    grown = tmp_path / "grown.csv"
    pl.DataFrame(support_tickets() + follow_ups).write_csv(grown)
    after, report = ingest(params_for(grown))
    trained = set(after["train"]["text"]) | set(after["val"]["text"])
    assert len(quoted) >= 50 and not any(quoted in text for text in trained) and quoted in set(after["test"]["text"])
    assert report["dropped"]["leakage"] == 1 and balanced(report)
    assert report["kept"] == 121  # the short quote stays


def test_labels_per_class_caps_train_only_and_deterministically(tickets_csv):
    full, _ = ingest(params_for(tickets_csv))
    capped, report = ingest(params_for(tickets_csv, labels_per_class=5))
    again, _ = ingest(params_for(tickets_csv, labels_per_class=5))
    assert dict(capped["train"]["label"].value_counts().iter_rows()) == {"auth": 5, "billing": 5, "bug": 5}
    assert capped["train"].equals(again["train"])
    assert set(capped["train"]["text"]) <= set(full["train"]["text"])
    assert capped["val"].equals(full["val"]) and capped["test"].equals(full["test"])
    assert report["dropped"]["labels_per_class"] == full["train"].height - 15 and balanced(report)
    # The texts whose labels were held back stay, without labels, for pre-training and self-training.
    assert capped["unlabeled"].columns == ["text"]
    assert sorted(capped["unlabeled"]["text"]) == sorted(set(full["train"]["text"]) - set(capped["train"]["text"]))


def test_wrong_param_type_names_the_key(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"data": {"labels_per_class": "ten",
                                                                   "undecodable": "ignore"}}))
    with pytest.raises(InputError, match="data.labels_per_class") as error:
        load_params(tmp_path / "params.yaml")
    assert "data.undecodable" in str(error.value)


def test_written_splits_labels_and_report(tmp_path, tickets_csv):
    splits, report = ingest(params_for(tickets_csv))
    write_splits(splits, report, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "labels.json", "report.json", "test.parquet", "train.parquet", "unlabeled.parquet", "val.parquet"]
    assert json.loads((tmp_path / "out/labels.json").read_text()) == ["auth", "billing", "bug"]
    assert length_histogram(splits)[:8] == b"\x89PNG\r\n\x1a\n"


def run_ingest(cwd, params: dict) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, "-m", "components.ingest"], cwd=cwd, capture_output=True, text=True)


def test_entry_point_writes_splits_report_and_plot(tmp_path, tickets_csv):
    done = run_ingest(tmp_path, {"data": {"labeled": {"path": str(tickets_csv)}}})
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "reports/data.json").read_text())
    assert report["splits"]["train"]["rows"] == pl.read_parquet(tmp_path / "data/prepared/train.parquet").height
    assert (tmp_path / "reports/data_lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("content", "expected"), [
    (b"text,queue\nhi,a\n", "column 'label' not found"),
    (b"text,label\nok,a\nbad \xff,b\n", "line 3 is not UTF-8"),
])
def test_entry_point_exits_2_with_one_line_and_writes_nothing(tmp_path, content, expected):
    path = tmp_path / "tickets.csv"
    path.write_bytes(content)
    done = run_ingest(tmp_path, {"data": {"labeled": {"path": str(path)}}})
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and expected in done.stderr and str(path) in done.stderr
    assert not (tmp_path / "data").exists() and not (tmp_path / "reports").exists()
