"""Where a pre-trained checkpoint folder comes from: a local folder (the shipped foundation, models/pretrained),
a registered foundation model, or a published checkpoint in Hugging Face format (converted on import); and the
record that names it in metrics and lineage."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from components.errors import InputError
from components.registry import Registry

SCRATCH = "scratch"
REGISTRY_PREFIX = "registry:"


@dataclass(frozen=True)
class Foundation:
    folder: Path
    record: dict  # what metrics.json and the lineage say the run started from


def check_checkpoint(folder: Path, named_by: str) -> Path:
    missing = [name for name in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / name).exists()]
    if missing:
        raise InputError(f"{named_by}: {folder} is not a pre-trained checkpoint (no {', '.join(missing)}); name a "
                         "foundation folder such as models/foundation, or a registered foundation model")
    return folder


def locate_checkpoint(model: str, registry_uri: str) -> Path:
    """A local checkpoint folder, or a registered foundation model (NAME@ALIAS, NAME:VERSION) fetched locally."""
    folder = Path(model)
    if folder.is_dir():
        return check_checkpoint(folder, f"--model {model}")
    registry = Registry(registry_uri)
    return check_checkpoint(registry.fetch(registry.resolve(model)), f"--model {model}")


HUB_PREFIX = "hf:"


def is_published(init_from: str) -> bool:
    """Whether `init_from` names a Hugging Face-format checkpoint rather than one of this repository's folders."""
    if init_from.startswith((HUB_PREFIX, "s3://")):
        return True
    config = Path(init_from) / "config.json"
    return config.is_file() and "model_type" in json.loads(config.read_text())


def weights_digest(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def resolve_foundation(init_from: str, registry_uri: str, context_length: int,
                       key: str = "pretrain.init_from") -> Foundation | None:
    """The checkpoint `init_from` names (None for `scratch`), with the record that identifies it; a published one
    is cut to a window of `context_length` (or its own positions, if fewer)."""
    if init_from == SCRATCH:
        return None
    if is_published(init_from):
        from components.hf_import import import_checkpoint  # torch and the converters: only for such checkpoints

        return Foundation(*import_checkpoint(init_from, context_length, key))
    if init_from.startswith(REGISTRY_PREFIX):
        registry = Registry(registry_uri)
        manifest = registry.resolve(init_from.removeprefix(REGISTRY_PREFIX))
        folder = check_checkpoint(registry.fetch(manifest), f"{key}={init_from}")
        return Foundation(folder, {"name": manifest["name"], "version": manifest["version"], "registry": registry_uri,
                                   "sha256": weights_digest(folder)})
    folder = Path(init_from)
    if not folder.is_dir():
        raise InputError(f"{key}={init_from}: no such folder; name a foundation folder (models/foundation ships "
                         "with gptpipe), registry:NAME@ALIAS, a Hugging Face checkpoint (folder, s3:// prefix, "
                         "hf:ORG/NAME[@REVISION]), or scratch")
    check_checkpoint(folder, f"{key}={init_from}")
    card = json.loads((folder / "metrics.json").read_text()) if (folder / "metrics.json").exists() else {}
    return Foundation(folder, {"name": card.get("name", folder.name), "path": init_from,
                               "train_tokens": card.get("train_tokens"), "sha256": weights_digest(folder)})
