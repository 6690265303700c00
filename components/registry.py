"""A model registry on a local folder or s3://bucket/prefix: named models, immutable versions, moving aliases.

Layout under the registry root, per model name:
    NAME/blobs/<uuid>/...           the files of one version, uploaded first
    NAME/versions/<N>.json          the version's manifest, created once and never overwritten: a version
                                    exists only once this lands, so a crash mid-upload leaves nothing visible
    NAME/aliases/<alias>.json       {"version": N, "previous": [...], "write": <id>, "decision": {...}}, moved by
                                    compare-and-swap (S3 If-Match, a lock file locally); `latest` is implicit: the
                                    highest N; a move by the promotion gate carries its decision
    NAME/decisions/<N>.json         the promotion decision taken for version N, created once the aliases moved:
                                    a version without one has not finished registering

Nothing escapes: names and aliases match NAME_PATTERN, versions VERSION_PATTERN, at every entry point; every
key is a plain relative path and every local path built from one is resolved and refused outside its root (the
registry folder, the download cache); every file of a version is checked on download and on each load from the
cache against the sha256 its manifest recorded when the version was created.
"""

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from botocore.exceptions import BotoCoreError, ClientError

from components.atomic import write_bytes_atomic
from components.errors import InputError
from components.sources import file_sha256, s3_client, s3_error, split_s3_uri

ALIAS_WRITE_ATTEMPTS = 20
LATEST = "latest"
CHAMPION = "champion"
CHALLENGER = "challenger"


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"  # model names and aliases; never '.' or '..'
VERSION_PATTERN = r"^[1-9][0-9]{0,8}$"  # versions: positive integers
BLOB_PATTERN = r"^[0-9a-f]{32}$"  # a version's upload id (uuid4 hex)
SHA256_PATTERN = r"^[0-9a-f]{64}$"
_NAME = re.compile(NAME_PATTERN.removesuffix("$") + r"\Z")  # `$` alone would also accept a trailing newline
_VERSION = re.compile(VERSION_PATTERN.removesuffix("$") + r"\Z")
_BLOB = re.compile(BLOB_PATTERN.removesuffix("$") + r"\Z")
_SHA256 = re.compile(SHA256_PATTERN.removesuffix("$") + r"\Z")


def check_name(value: object, what: str = "model name") -> str:
    """A model name or alias as it may be used in a key and a path, else an InputError naming it and the pattern."""
    if not isinstance(value, str) or not _NAME.match(value) or value in (".", ".."):
        raise InputError(f"registry: {what} {value!r} is not allowed; names and aliases match {NAME_PATTERN} "
                         "(letters, digits, '_', '.', '-'; not '.' or '..')")
    return value


def check_alias(value: object) -> str:
    return check_name(value, "alias")


def check_version(value: object) -> int:
    """A version number (an int, or its decimal string) as an int, else an InputError naming it and the pattern."""
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not _VERSION.match(text):
        raise InputError(f"registry: version {value!r} is not allowed; versions are positive integers "
                         f"matching {VERSION_PATTERN}, as in bbc:3")
    return int(text)


def check_key(key: object, what: str = "key") -> str:
    """A store key (or a file's path inside a version): a relative path of non-empty parts, none '.' or '..'."""
    if (not isinstance(key, str) or not key or key.startswith("/") or "\\" in key or "\0" in key
            or any(part in ("", ".", "..") for part in key.split("/"))):
        raise InputError(f"registry: {what} {key!r} is not allowed; keys are relative paths of parts joined by '/', "
                         "no part empty, '.' or '..', no backslash or NUL")
    return key


def inside(root: Path, relative: str, what: str) -> Path:
    """`root / relative`, resolved (links followed), refused unless it stays inside the resolved `root`."""
    base = root.resolve()
    path = (base / check_key(relative, what)).resolve()
    if path == base or not path.is_relative_to(base):
        raise InputError(f"registry: {what} {relative!r} resolves to {path}, outside {base}; refused")
    return path


def cache_root(kind: str = "registry") -> Path:
    """The user's cache of `kind` (registry downloads, imported checkpoints), outside any checkout."""
    return Path(os.environ.get("GPTPIPE_CACHE", Path.home() / ".cache" / "gptpipe")) / kind


class LocalStore:
    def __init__(self, root: str):
        self.root = Path(root)
        self.uri = str(self.root)

    def path(self, key: str) -> Path:
        """Where `key` lives: inside the registry folder, or an InputError."""
        return inside(self.root, key, "registry key")

    def put(self, key: str, data: bytes, create_only: bool = False) -> bool:
        """Write `key`; with create_only, return False instead of replacing an existing object."""
        path = self.path(key)
        if not create_only:
            write_bytes_atomic(path, data)
            return True
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=".tmp-", dir=path.parent) as staging:
            staging.write(data)
            staging.flush()
            try:
                os.link(staging.name, path)  # atomic create-if-absent, with the content already complete
                return True
            except FileExistsError:
                return False

    def get(self, key: str) -> bytes | None:
        path = self.path(key)
        return path.read_bytes() if path.is_file() else None

    def read(self, key: str) -> tuple[bytes | None, str | None]:
        """The object and a tag that changes whenever it is rewritten (for put_if)."""
        data = self.get(key)
        return data, hashlib.sha256(data).hexdigest() if data is not None else None

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap: write only if the object still has `tag` (None: does not exist yet), under a lock
        file so that another process's check and write cannot interleave with this one's."""
        lock = self.path(f".locks/{check_key(key)}.lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if self.read(key)[1] != tag:
                return False
            return self.put(key, data)

    def keys(self, prefix: str) -> list[str]:
        if not self.root.is_dir():
            return []
        root = self.root.resolve()
        base = self.path(prefix.rstrip("/")) if prefix else root
        if not base.is_dir():
            return []
        return sorted(key for p in base.rglob("*") if p.is_file() and not (p.name.startswith(".") and ".tmp-" in p.name)
                      and not (key := p.relative_to(root).as_posix()).startswith(".locks/"))

    def upload(self, key: str, file: Path) -> None:
        self.put(key, file.read_bytes())

    def download(self, key: str, file: Path) -> None:
        shutil.copyfile(self.path(key), file)


class S3Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = s3_client()

    def key(self, key: str) -> str:
        return self.prefix + check_key(key, "registry key")

    def put(self, key: str, data: bytes, create_only: bool = False) -> bool:
        extra = {"IfNoneMatch": "*"} if create_only else {}  # S3 conditional write: create, never overwrite
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data, **extra)
            return True
        except ClientError as error:
            if create_only and error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return self.holds(key, data)
            raise

    def holds(self, key: str, data: bytes) -> bool:
        """Whether a conditional write that failed its condition had in fact landed: when the store did the write
        but its answer was lost, boto3 sends it again and that retry fails against the first attempt's object.
        What is written is unique to the writer (a manifest names its own upload id, an alias record its own
        write id), so finding exactly these bytes means the write was ours."""
        return self.get(key) == data

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.key(key))["Body"].read()
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise

    def read(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(key))
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None, None
            raise
        return answer["Body"].read(), answer["ETag"]

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap with S3 conditional writes: If-Match on the ETag read, If-None-Match to create."""
        condition = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.key(key), Body=data, **condition)
            return True
        except ClientError as error:
            if error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                                   "412", "409"):
                return self.holds(key, data)
            raise

    def keys(self, prefix: str) -> list[str]:
        prefix = self.key(prefix.rstrip("/")) + "/" if prefix else self.prefix
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return sorted(obj["Key"][len(self.prefix):] for page in pages for obj in page.get("Contents", []))

    def upload(self, key: str, file: Path) -> None:
        self.client.upload_file(str(file), self.bucket, self.key(key))

    def download(self, key: str, file: Path) -> None:
        self.client.download_file(self.bucket, self.key(key), str(file))


def open_store(uri: str) -> LocalStore | S3Store:
    return S3Store(uri) if uri.startswith("s3://") else LocalStore(uri)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    def __post_init__(self):
        check_name(self.name)
        if self.version is not None:
            check_version(self.version)
        if self.alias is not None:
            check_alias(self.alias)
        if (self.version is None) == (self.alias is None):
            raise InputError(f"registry: model {self.name}: give a version or an alias, not both or neither")

    @classmethod
    def parse(cls, ref: str) -> "ModelRef":
        """NAME, NAME@ALIAS or NAME:VERSION; a bare name means NAME@latest."""
        if not isinstance(ref, str):
            raise InputError(f"registry: model reference {ref!r} is not NAME, NAME@ALIAS or NAME:VERSION")
        if ":" in ref:
            name, _, version = ref.partition(":")
            return cls(check_name(name), version=check_version(version))
        name, at, alias = ref.partition("@")
        return cls(check_name(name), alias=check_alias(alias) if at else LATEST)


class Registry:
    def __init__(self, uri: str):
        self.store = open_store(uri)
        self.uri = uri

    def _call(self, action: str, fn, *args):
        try:
            return fn(*args)
        except (BotoCoreError, ClientError) as error:
            raise s3_error(f"registry {self.uri} ({action})", error) from None

    def models(self) -> list[str]:
        """Names with at least one version; an object stored under a name the pattern refuses is not one."""
        keys = self._call("list", self.store.keys, "")
        return sorted({parts[0] for key in keys if len(parts := key.split("/")) == 3 and parts[1] == "versions"
                       and _NAME.match(parts[0]) and parts[0] not in (".", "..")})

    def versions(self, name: str) -> list[int]:
        prefix = f"{check_name(name)}/versions/"
        keys = self._call("list", self.store.keys, prefix)
        stems = (key[len(prefix):].removesuffix(".json") for key in keys if key.endswith(".json"))
        return sorted(int(stem) for stem in stems if _VERSION.match(stem))

    def manifest(self, name: str, version: int) -> dict:
        name, version = check_name(name), check_version(version)
        data = self._call("read", self.store.get, f"{name}/versions/{version}.json")
        if data is None:
            raise InputError(f"registry {self.uri}: model {name} has no version {version}; "
                             f"`gptpipe registry list` shows what exists")
        manifest = json.loads(data)
        if manifest.get("name") != name or manifest.get("version") != version:
            raise InputError(f"registry {self.uri}: {name}/versions/{version}.json names "
                             f"{manifest.get('name')!r} version {manifest.get('version')!r}; the registry is damaged")
        check_manifest(manifest, self.uri)
        return manifest

    def aliases(self, name: str) -> dict[str, int]:
        prefix = f"{check_name(name)}/aliases/"
        found = {}
        for key in self._call("list", self.store.keys, prefix):
            alias = key[len(prefix):].removesuffix(".json")
            if key.endswith(".json") and _NAME.match(alias) and alias != LATEST:
                found[alias] = json.loads(self._call("read", self.store.get, key))["version"]
        versions = self.versions(name)
        if versions:
            found[LATEST] = versions[-1]
        return found

    def resolve(self, ref: str | ModelRef) -> dict:
        ref = ModelRef.parse(ref) if isinstance(ref, str) else ref
        version = ref.version
        if version is None:
            version = self.aliases(ref.name).get(ref.alias)
            if version is None:
                raise InputError(f"registry {self.uri}: model {ref.name} has no alias {ref.alias!r}; "
                                 "`gptpipe registry list` shows its versions and aliases")
        return self.manifest(ref.name, version)

    def _alias_record(self, name: str, alias: str) -> dict | None:
        data = self._call("read", self.store.get, f"{check_name(name)}/aliases/{check_alias(alias)}.json")
        return json.loads(data) if data else None

    def update_alias(self, name: str, alias: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Apply `change` to the alias record (None when it does not exist; returning None leaves it) as a
        compare-and-swap: when another writer moved the alias in between, read it again and decide again, so two
        promotions at once never both win and the history never loses an entry."""
        key = f"{check_name(name)}/aliases/{check_alias(alias)}.json"
        for _ in range(ALIAS_WRITE_ATTEMPTS):
            data, tag = self._call("read", self.store.read, key)
            record = json.loads(data) if data else None
            updated = change(record)
            if updated is None:
                return record
            updated = {**updated, "write": uuid.uuid4().hex}  # makes this write's bytes its own (S3Store.holds)
            if self._call("write", self.store.put_if, key, json.dumps(updated).encode(), tag):
                return updated
        raise RuntimeError(f"registry {self.uri}: {name}@{alias} kept changing under {ALIAS_WRITE_ATTEMPTS} attempts")

    def decision(self, name: str, version: int) -> dict | None:
        """The promotion decision recorded for a version; None when none was (its registration did not finish)."""
        data = self._call("read", self.store.get, f"{check_name(name)}/decisions/{check_version(version)}.json")
        return json.loads(data) if data else None

    def record_decision(self, name: str, version: int, decision: dict) -> None:
        """Record a version's promotion decision once; a concurrent attempt that recorded one first keeps its own."""
        key = f"{check_name(name)}/decisions/{check_version(version)}.json"
        self._call("write", self.store.put, key, json.dumps(decision, indent=2).encode(), True)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` at `version`, remembering where it pointed before so that rollback can return."""
        name, alias, version = check_name(name), check_alias(alias), check_version(version)
        if alias == LATEST:
            raise InputError("alias 'latest' always names the newest version and cannot be set")
        self.manifest(name, version)
        self.update_alias(name, alias, lambda record: moved_to(record, version))

    def rollback(self, name: str, alias: str = "champion") -> int:
        """Move `alias` back to the version it named before its last move; returns that version."""
        name, alias = check_name(name), check_alias(alias)
        if alias == LATEST:
            raise InputError("alias 'latest' always names the newest version and cannot be rolled back")

        def back(record: dict | None) -> dict:
            if not record or not record["previous"]:
                raise InputError(f"registry {self.uri}: {name}@{alias} has no earlier version to roll back to")
            return {"version": record["previous"][-1], "previous": record["previous"][:-1]}

        return self.update_alias(name, alias, back)["version"]

    def register(self, name: str, folder: Path, metadata: dict) -> dict:
        """Upload every file in `folder`, then claim the next version number with a create-only write; a
        concurrent registration that claimed it first makes this one take the next number. The manifest records
        every file's sha256, hashed before its upload; a download or load checks each file against it."""
        name = check_name(name)
        reserved = set(metadata) & {"name", "version", "blob", "files", "created"}
        if reserved:
            raise ValueError(f"registry: metadata may not set {sorted(reserved)}; the registry writes them")
        blob = f"{name}/blobs/{uuid.uuid4().hex}"
        files = {}
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            relative = check_key(file.relative_to(folder).as_posix(), "file")
            files[relative] = file_sha256(file)
            self._call("upload", self.store.upload, f"{blob}/{relative}", file)
        version = (self.versions(name) or [0])[-1] + 1
        while True:
            manifest = {"name": name, "version": version, "blob": blob, "files": files,
                        "created": datetime.now(UTC).isoformat(timespec="seconds"), **metadata}
            if self._call("write", self.store.put, f"{name}/versions/{version}.json",
                          json.dumps(manifest, indent=2).encode(), True):
                return manifest
            version += 1

    def fetch(self, manifest: dict) -> Path:
        """A local copy of a version's files; versions are immutable, so a complete cached copy is reused. The
        cache is keyed by where the registry is and by the version's upload id, never by name and number alone:
        two registries (two checkouts' `registry/` folders, two S3 endpoints) both have a `bbc:1`."""
        where = str(Path(self.uri).resolve()) if isinstance(self.store, LocalStore) else \
            f"{os.environ.get('AWS_ENDPOINT_URL', '')}|{self.uri}"
        check_manifest(manifest, self.uri)
        label = f"{manifest['name']}:{manifest['version']}"
        root = cache_root()
        target = inside(root, f"{hashlib.sha256(where.encode()).hexdigest()[:16]}/{manifest['blob']}", "cache folder")
        if target.is_dir():
            for relative, digest in manifest["files"].items():
                cached = inside(target, relative, f"{label} file")
                if not cached.is_file() or file_sha256(cached) != digest:
                    raise InputError(f"registry {self.uri}: cached copy {cached} of {label}/{relative} does not match "
                                     f"the sha256 its manifest recorded ({digest[:12]}...); it was changed after "
                                     f"download: delete {target} to download the version again")
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
        try:
            for relative, digest in manifest["files"].items():
                local = inside(staging, relative, f"{label} file")
                local.parent.mkdir(parents=True, exist_ok=True)
                self._call("download", self.store.download, f"{manifest['blob']}/{relative}", local)
                if file_sha256(local) != digest:
                    raise InputError(f"registry {self.uri}: {label}/{relative} does not match the sha256 its manifest "
                                     f"recorded ({digest[:12]}...); the stored copy was changed or damaged, register "
                                     "the model again")
            os.replace(staging, target)
        except OSError:  # another process cached it first
            if not target.is_dir():
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return target


def check_manifest(manifest: dict, uri: str) -> None:
    """A version's manifest as fetch trusts it: a valid name and version, its own upload id, and a sha256 for each
    file, every file a relative path; otherwise an InputError naming what is wrong."""
    name, version = check_name(manifest.get("name")), check_version(manifest.get("version"))
    blob = manifest.get("blob")
    prefix = f"{name}/blobs/"
    if not isinstance(blob, str) or not blob.startswith(prefix) or not _BLOB.match(blob[len(prefix):]):
        raise InputError(f"registry {uri}: {name}:{version} names upload {blob!r}, not {prefix}<32 hex digits>; "
                         "the manifest is damaged")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise InputError(f"registry {uri}: {name}:{version} records no file digests; register the model again")
    for relative, digest in files.items():
        check_key(relative, f"{name}:{version} file")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise InputError(f"registry {uri}: {name}:{version}/{relative} has no sha256 recorded ({digest!r}); "
                             "register the model again")


def moved_to(record: dict | None, version: int) -> dict:
    record = record or {"version": None, "previous": []}
    return {"version": version,
            "previous": record["previous"] + ([record["version"]] if record["version"] is not None else [])}
