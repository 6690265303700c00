"""A model registry on a local folder or s3://bucket/prefix: named models, immutable versions, moving aliases.

Layout under the registry root, per model name:
    NAME/blobs/<uuid>/...           the files of one version, uploaded first
    NAME/versions/<N>.json          the version's manifest, created once and never overwritten: a version
                                    exists only once this lands, so a crash mid-upload leaves nothing visible
    NAME/aliases/<alias>.json       {"version": N, "previous": [...]}, moved by compare-and-swap (S3 If-Match,
                                    a lock file locally); `latest` is implicit: the highest N
"""

import fcntl
import hashlib
import json
import os
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
from components.sources import s3_client, s3_error, split_s3_uri

ALIAS_WRITE_ATTEMPTS = 20
LATEST = "latest"
CHAMPION = "champion"
CHALLENGER = "challenger"


def cache_root() -> Path:
    return Path(os.environ.get("GPTPIPE_CACHE", Path.home() / ".cache" / "gptpipe")) / "registry"


class LocalStore:
    def __init__(self, root: str):
        self.root = Path(root)
        self.uri = str(self.root)

    def put(self, key: str, data: bytes, create_only: bool = False) -> bool:
        """Write `key`; with create_only, return False instead of replacing an existing object."""
        path = self.root / key
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
        path = self.root / key
        return path.read_bytes() if path.is_file() else None

    def read(self, key: str) -> tuple[bytes | None, str | None]:
        """The object and a tag that changes whenever it is rewritten (for put_if)."""
        data = self.get(key)
        return data, hashlib.sha256(data).hexdigest() if data is not None else None

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap: write only if the object still has `tag` (None: does not exist yet), under a lock
        file so that another process's check and write cannot interleave with this one's."""
        lock = self.root / ".locks" / f"{key}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            if self.read(key)[1] != tag:
                return False
            return self.put(key, data)

    def keys(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(key for p in base.rglob("*") if p.is_file() and not (p.name.startswith(".") and ".tmp-" in p.name)
                      and not (key := str(p.relative_to(self.root))).startswith(".locks/"))

    def upload(self, key: str, file: Path) -> None:
        self.put(key, file.read_bytes())

    def download(self, key: str, file: Path) -> None:
        shutil.copyfile(self.root / key, file)


class S3Store:
    def __init__(self, uri: str):
        self.uri = uri
        self.bucket, prefix = split_s3_uri(uri)
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = s3_client()

    def put(self, key: str, data: bytes, create_only: bool = False) -> bool:
        extra = {"IfNoneMatch": "*"} if create_only else {}  # S3 conditional write: create, never overwrite
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **extra)
            return True
        except ClientError as error:
            if create_only and error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            raise

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None
            raise

    def read(self, key: str) -> tuple[bytes | None, str | None]:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return None, None
            raise
        return answer["Body"].read(), answer["ETag"]

    def put_if(self, key: str, data: bytes, tag: str | None) -> bool:
        """Compare-and-swap with S3 conditional writes: If-Match on the ETag read, If-None-Match to create."""
        condition = {"IfMatch": tag} if tag else {"IfNoneMatch": "*"}
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data, **condition)
            return True
        except ClientError as error:
            if error.response["Error"]["Code"] in ("PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey",
                                                   "412", "409"):
                return False
            raise

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + prefix)
        return sorted(obj["Key"][len(self.prefix):] for page in pages for obj in page.get("Contents", []))

    def upload(self, key: str, file: Path) -> None:
        self.client.upload_file(str(file), self.bucket, self.prefix + key)

    def download(self, key: str, file: Path) -> None:
        self.client.download_file(self.bucket, self.prefix + key, str(file))


def open_store(uri: str) -> LocalStore | S3Store:
    return S3Store(uri) if uri.startswith("s3://") else LocalStore(uri)


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: int | None = None
    alias: str | None = None

    @classmethod
    def parse(cls, ref: str) -> "ModelRef":
        """NAME, NAME@ALIAS or NAME:VERSION; a bare name means NAME@latest."""
        if ":" in ref:
            name, _, version = ref.partition(":")
            if not version.isdigit():
                raise InputError(f"--model {ref}: version must be a number, as in {name}:3")
            return cls(name, version=int(version))
        name, _, alias = ref.partition("@")
        return cls(name, alias=alias or LATEST)


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
        return sorted({key.split("/")[0] for key in self._call("list", self.store.keys, "") if "/versions/" in key})

    def versions(self, name: str) -> list[int]:
        keys = self._call("list", self.store.keys, f"{name}/versions/")
        return sorted(int(Path(key).stem) for key in keys if key.endswith(".json"))

    def manifest(self, name: str, version: int) -> dict:
        data = self._call("read", self.store.get, f"{name}/versions/{version}.json")
        if data is None:
            raise InputError(f"registry {self.uri}: model {name} has no version {version}; "
                             f"`gptpipe registry list` shows what exists")
        return json.loads(data)

    def aliases(self, name: str) -> dict[str, int]:
        found = {}
        for key in self._call("list", self.store.keys, f"{name}/aliases/"):
            found[Path(key).stem] = json.loads(self._call("read", self.store.get, key))["version"]
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
        data = self._call("read", self.store.get, f"{name}/aliases/{alias}.json")
        return json.loads(data) if data else None

    def update_alias(self, name: str, alias: str, change: Callable[[dict | None], dict | None]) -> dict | None:
        """Apply `change` to the alias record (None when it does not exist; returning None leaves it) as a
        compare-and-swap: when another writer moved the alias in between, read it again and decide again, so two
        promotions at once never both win and the history never loses an entry."""
        key = f"{name}/aliases/{alias}.json"
        for _ in range(ALIAS_WRITE_ATTEMPTS):
            data, tag = self._call("read", self.store.read, key)
            record = json.loads(data) if data else None
            updated = change(record)
            if updated is None:
                return record
            if self._call("write", self.store.put_if, key, json.dumps(updated).encode(), tag):
                return updated
        raise RuntimeError(f"registry {self.uri}: {name}@{alias} kept changing under {ALIAS_WRITE_ATTEMPTS} attempts")

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point `alias` at `version`, remembering where it pointed before so that rollback can return."""
        if alias == LATEST:
            raise InputError("alias 'latest' always names the newest version and cannot be set")
        self.manifest(name, version)
        self.update_alias(name, alias, lambda record: moved_to(record, version))

    def rollback(self, name: str, alias: str = "champion") -> int:
        """Move `alias` back to the version it named before its last move; returns that version."""
        def back(record: dict | None) -> dict:
            if not record or not record["previous"]:
                raise InputError(f"registry {self.uri}: {name}@{alias} has no earlier version to roll back to")
            return {"version": record["previous"][-1], "previous": record["previous"][:-1]}

        return self.update_alias(name, alias, back)["version"]

    def register(self, name: str, folder: Path, metadata: dict) -> dict:
        """Upload every file in `folder`, then claim the next version number with a create-only write; a
        concurrent registration that claimed it first makes this one take the next number."""
        blob = f"{name}/blobs/{uuid.uuid4().hex}"
        files = {}
        for file in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            relative = str(file.relative_to(folder))
            self._call("upload", self.store.upload, f"{blob}/{relative}", file)
            files[relative] = hashlib.sha256(file.read_bytes()).hexdigest()
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
        target = cache_root() / hashlib.sha256(where.encode()).hexdigest()[:16] / manifest["blob"]
        if target.is_dir():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=target.parent))
        for relative, digest in manifest["files"].items():
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            self._call("download", self.store.download, f"{manifest['blob']}/{relative}", staging / relative)
            if hashlib.sha256((staging / relative).read_bytes()).hexdigest() != digest:
                shutil.rmtree(staging, ignore_errors=True)
                raise InputError(f"registry {self.uri}: {manifest['name']}:{manifest['version']}/{relative} does not "
                                 "match its recorded hash; the stored copy is damaged, register the model again")
        try:
            os.replace(staging, target)
        except OSError:  # another process cached it first
            shutil.rmtree(staging, ignore_errors=True)
        return target


def moved_to(record: dict | None, version: int) -> dict:
    record = record or {"version": None, "previous": []}
    return {"version": version,
            "previous": record["previous"] + ([record["version"]] if record["version"] is not None else [])}


def promotion_decision(candidate: dict, champion: dict | None, tolerance: float,
                       max_class_drop: float) -> tuple[bool, str]:
    """Champion if there is none yet, or if the candidate's test macro-F1 is within `tolerance` of the
    champion's and no class's F1 fell by more than `max_class_drop`; otherwise the reason it is not."""
    if champion is None:
        return True, "no champion yet"
    new, old = candidate["metrics"], champion["metrics"]
    against = f"champion v{champion['version']}"
    if new["test_macro_f1"] < old["test_macro_f1"] - tolerance:
        return False, (f"test macro-F1 {new['test_macro_f1']:.4f} is worse than {against}'s "
                       f"{old['test_macro_f1']:.4f} by more than {tolerance}; kept as challenger")
    old_classes, new_classes = old.get("per_class_f1", {}), new.get("per_class_f1", {})
    drops = {label: f1 - new_classes.get(label, 0.0) for label, f1 in old_classes.items()}
    worst = max(drops, key=drops.get, default=None)
    if worst is not None and drops[worst] > max_class_drop:
        return False, (f"F1 of class {worst!r} fell from {old_classes[worst]:.4f} to {new_classes.get(worst, 0):.4f}, "
                       f"more than {max_class_drop}; kept as challenger")
    return True, (f"test macro-F1 {new['test_macro_f1']:.4f} vs {against}'s {old['test_macro_f1']:.4f} "
                  f"(tolerance {tolerance}, largest class drop {max(0.0, drops.get(worst, 0.0)):.4f})")
