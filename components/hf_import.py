"""Import a published checkpoint in Hugging Face format (GPT-2, Llama, Qwen2) as a foundation to continue.

It may be named as a local folder, an s3:// prefix or `hf:ORG/NAME[@REVISION]` (downloaded with huggingface_hub
into its own cache, HF_HOME). Each is converted once into this repository's checkpoint folder (config.json,
model.safetensors, tokenizer.json, metrics.json) under the user's cache, keyed by what identifies its content: the
repository's resolved commit and the files' hashes (ETags on S3), and the window it is cut to.
"""

import hashlib
import json
import re
import tempfile
from pathlib import Path

import torch
import yaml
from botocore.exceptions import BotoCoreError, ClientError
from safetensors.torch import save_model
from tokenizers import Tokenizer

from components.atomic import atomic_dir
from components.checkpoints import HUB_PREFIX
from components.errors import InputError
from components.hf_format import family_named, from_hf, gpt_config, no_safetensors, read_weights
from components.model import GPT
from components.registry import cache_root
from components.sources import TransientStorageError, file_sha256, s3_client, s3_error, s3_keys, split_s3_uri
from components.special_tokens import END_OF_TEXT_NAMES, end_of_text_id

HUB_REF = re.compile(r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w./-]+))?")
# What a checkpoint folder holds that import reads: config, weights (one file or shards and their index),
# tokenizer, and the model card and licence files that state the licence.
WANTED = re.compile(r"(config\.json|tokenizer\.json|[^/]*\.safetensors(\.index\.json)?|README\.md|LICEN[CS]E[^/]*)")
# What a Hub download fetches: the small files import reads (config, tokenizer, shard index, model card, licence),
# then the safetensors weights.
SMALL_FILES = ["*.json", "README.md", "LICEN[CS]E*"]
CONVERSION = 1  # bump when the conversion's output changes, so that cached conversions are redone


def parse_hub_ref(init_from: str, key: str) -> tuple[str, str | None]:
    """`hf:ORG/NAME[@REVISION]` -> (repository, revision or None for the default branch)."""
    match = HUB_REF.fullmatch(init_from.removeprefix(HUB_PREFIX))
    if not match:
        raise InputError(f"{key}={init_from}: not a Hub repository; write hf:ORG/NAME or hf:ORG/NAME@REVISION "
                         "(a branch, tag or commit)")
    return match["repo"], match["revision"]


def hub_snapshot(init_from: str, key: str) -> Path:
    """The repository's files at the revision, from huggingface_hub's cache or downloaded into it (HF_ENDPOINT,
    HF_HOME, HF_TOKEN and HF_HUB_OFFLINE apply); pickled .bin weights are never fetched."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub.errors import (
        CachedRepoTreeNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import tqdm

    class Quietly(tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})

    repo, revision = parse_hub_ref(init_from, key)
    where = f"{key}={init_from}"
    try:
        # The small files first, without progress bars: that caches the listing of the revision's files, so one
        # without safetensors weights is refused in one line before any weights are fetched.
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=SMALL_FILES, tqdm_class=Quietly))
        try:
            listed = [file.path for file in get_cached_repo_tree(repo, revision=folder.name)]
        except CachedRepoTreeNotFoundError:  # a cache filled without listings: read_weights refuses instead
            listed = None
        if listed is not None and not any(name.endswith(".safetensors") for name in listed):
            raise no_safetensors(where, listed)
        return Path(snapshot_download(repo, revision=folder.name, allow_patterns=["*.safetensors"]))
    except GatedRepoError:
        raise InputError(f"{where}: the repository is gated; accept its licence on the Hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise InputError(f"{where}: {repo} has no revision {revision}; name one of its branches, tags or "
                         "commits") from None
    except RepositoryNotFoundError:
        raise InputError(f"{where}: no such repository on the Hub (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise InputError(f"{where}: the Hub cannot be reached and the revision is not in the local cache (HF_HOME); "
                         "connect, or copy the checkpoint into a folder and name the folder") from None
    except HfHubHTTPError as error:
        reason = " ".join(str(error).split())
        status = error.response.status_code if error.response is not None else None
        if status is not None and status >= 500:
            raise TransientStorageError(f"{where}: the Hub did not answer ({reason}); the step can be "
                                        "retried") from None
        raise InputError(f"{where}: the Hub refused the download ({reason})") from None


def local_identity(folder: Path) -> dict[str, str]:
    return {file.name: file_sha256(file) for file in sorted(folder.iterdir()) if WANTED.fullmatch(file.name)}


def s3_identity(prefix: str) -> dict[str, str]:
    """The checkpoint's files under an s3:// prefix, each with its ETag, which changes with its content."""
    bucket, key = split_s3_uri(prefix)
    client = s3_client()
    start = key.rstrip("/") + "/" if key else ""
    try:
        return {name[len(start):]: client.head_object(Bucket=bucket, Key=name)["ETag"]
                for name in s3_keys(client, prefix) if WANTED.fullmatch(name[len(start):])}
    except (BotoCoreError, ClientError) as error:
        raise s3_error(prefix, error) from None


def s3_download(prefix: str, names: list[str], folder: Path) -> None:
    bucket, key = split_s3_uri(prefix)
    client = s3_client()
    try:
        for name in names:
            client.download_file(bucket, f"{key.rstrip('/')}/{name}" if key else name, str(folder / name))
    except (BotoCoreError, ClientError) as error:
        raise s3_error(prefix, error) from None


def stated_licence(folder: Path) -> str:
    """The licence as the checkpoint's files state it: the model card's `license` (Hub metadata), else the name
    of a licence file, else `not stated`."""
    card = folder / "README.md"
    if card.is_file():
        front = card.read_text(errors="replace").split("---")
        if len(front) > 2 and not front[0].strip():
            try:
                meta = yaml.safe_load(front[1]) or {}
            except yaml.YAMLError:
                meta = {}
            if isinstance(meta, dict) and meta.get("license"):
                named = meta.get("license_name")
                return f"{meta['license']} ({named})" if named else str(meta["license"])
    licence_files = sorted(p.name for p in folder.iterdir() if re.fullmatch(r"LICEN[CS]E.*", p.name))
    return f"see {licence_files[0]}" if licence_files else "not stated"


def convert(folder: Path, context_length: int, source: dict, out: Path, where: str) -> None:
    """Write `folder`'s checkpoint as this repository's checkpoint folder `out`, or an InputError naming what is
    missing or unsupported; nothing is written then."""
    config_file, tokenizer_file = folder / "config.json", folder / "tokenizer.json"
    if not config_file.is_file():
        raise InputError(f"{where}: no config.json; name a folder written by save_pretrained")
    hf = json.loads(config_file.read_text())
    family = family_named(hf, f"{where} config.json")
    if not tokenizer_file.is_file():
        raise InputError(f"{where}: no tokenizer.json (the tokenizers-library file); re-save the tokenizer with "
                         "AutoTokenizer.save_pretrained, which writes it")
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    if end_of_text_id(tokenizer) is None:
        raise InputError(f"{where} tokenizer.json: none of the end-of-text tokens {', '.join(END_OF_TEXT_NAMES)}; "
                         "this tokenizer is not supported")
    config = gpt_config(hf, family, context_length, f"{where} config.json")
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise InputError(f"{where} tokenizer.json: {tokenizer.get_vocab_size()} ids do not fit the model's "
                         f"{config.vocab_size} embeddings; the folder mixes two models")
    with torch.device("meta"):  # shapes only: the weights come from the checkpoint
        model = GPT(config)
    state = from_hf(read_weights(folder, where), config, family, list(model.state_dict()), where)
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.tok_emb.weight
    with atomic_dir(out) as staging:
        save_model(model, str(staging / "model.safetensors"))
        (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
        (staging / "tokenizer.json").write_bytes(tokenizer_file.read_bytes())
        card = {"name": source["name"], "kind": "imported", "architecture": hf.get("architectures", [family])[0],
                "licence": stated_licence(folder), "source": source,
                "sha256": file_sha256(staging / "model.safetensors")}
        (staging / "metrics.json").write_text(json.dumps(card, indent=2) + "\n")


def import_checkpoint(init_from: str, context_length: int, key: str) -> tuple[Path, dict]:
    """The converted checkpoint folder of what `init_from` names, and the record that identifies it (name, source,
    revision, files' hashes, architecture, licence, sha256 of the converted weights)."""
    where = f"{key}={init_from}"
    if init_from.startswith(HUB_PREFIX):
        folder = hub_snapshot(init_from, key)
        source = {"name": parse_hub_ref(init_from, key)[0], "uri": init_from, "revision": folder.name,
                  "files": local_identity(folder)}
    elif init_from.startswith("s3://"):
        folder = None
        source = {"name": init_from.rstrip("/").rsplit("/", 1)[-1], "uri": init_from, "revision": None,
                  "files": s3_identity(init_from)}
    else:
        folder = Path(init_from)
        source = {"name": folder.resolve().name, "uri": init_from, "revision": None, "files": local_identity(folder)}
    identity = json.dumps({"source": source, "context_length": context_length, "conversion": CONVERSION},
                          sort_keys=True)
    out = cache_root("imported") / hashlib.sha256(identity.encode()).hexdigest()[:16]
    if not (out / "metrics.json").is_file():
        if folder is not None:
            convert(folder, context_length, source, out, where)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(prefix=".download-", dir=out.parent) as download:
                if not any(name.endswith(".safetensors") for name in source["files"]):
                    read_weights(Path(download), where)  # refuses with the reason, before anything is downloaded
                s3_download(init_from, list(source["files"]), Path(download))
                convert(Path(download), context_length, source, out, where)
    card = json.loads((out / "metrics.json").read_text())
    return out, {**source, "architecture": card["architecture"], "licence": card["licence"],
                 "sha256": card["sha256"]}
