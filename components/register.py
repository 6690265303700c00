"""Register: publish the fine-tuned classifier as a new immutable registry version with its lineage, then
move the aliases through the promotion gate (components/promotion.py). Runs after the DVC stages, once per
pipeline run; a rerun finishes a registration that stopped before its promotion decision was recorded."""

import hashlib
import json
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import polars as pl
import yaml

from components import layout
from components.params import Params, to_yaml
from components.promotion import promote, split_digest
from components.registry import LATEST, Registry

UNCHANGED = "unchanged, already registered"


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else ""


def head_commit(folder: Path) -> str | None:
    """The commit checked out where `folder` lies; None outside a git checkout."""
    return git(folder, "rev-parse", "HEAD") or None


def git_state(repo: Path) -> dict:
    # dvc.lock records this run's outputs (kept in the lineage as dvc_lock), not code: it alone leaves the code clean.
    changed = git(repo, "status", "--porcelain", "--", ".", ":(exclude)dvc.lock")
    return {"commit": head_commit(repo), "dirty": bool(changed)}


def dvc_lock_hashes(lock_file: Path) -> dict:
    """Content hashes of every stage output, as dvc.lock recorded them: the data, tokenizer and checkpoints."""
    if not lock_file.exists():
        return {}
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    return {stage: {out["path"]: out.get("md5") for out in entry.get("outs", [])} for stage, entry in stages.items()}


def build_lineage(repo: Path, flow_run: dict | None, foundation: dict, test_split: dict) -> dict:
    pretrain = json.loads((repo / layout.PRETRAINED / "metrics.json").read_text())
    return {"git": git_state(repo), "dvc_lock": dvc_lock_hashes(repo / "dvc.lock"), "flow_run": flow_run,
            "foundation": foundation, "test_split": test_split,
            "training": {"pretrain_tokens": pretrain["train_tokens"], "pretrain_seconds": pretrain["seconds"]}}


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def newest_holding(registry: Registry, name: str, digest: str) -> dict | None:
    """The manifest of the newest version of `name` when it holds content with this digest."""
    newest = registry.aliases(name).get(LATEST)
    manifest = registry.manifest(name, newest) if newest else None
    return manifest if manifest and manifest.get("content_sha256") == digest else None


def register_once(registry: Registry, name: str, digest: str, staged: Callable[[Path], dict]) -> tuple[dict, bool]:
    """Register what `staged` writes into a folder (returning the version's metadata), unless the newest
    version already holds content with this digest (a rerun with nothing changed). Returns (manifest, new)."""
    if manifest := newest_holding(registry, name, digest):
        return manifest, False
    with tempfile.TemporaryDirectory(prefix="gptpipe-register-") as tmp:
        metadata = staged(Path(tmp))
        return registry.register(name, Path(tmp), {**metadata, "content_sha256": digest}), True


def register_checkpoint(registry_uri: str, name: str, folder: Path) -> dict:
    """Register a pre-trained checkpoint folder as a foundation model (unless the newest version holds the same
    content), so tasks can continue from it with `pretrain.init_from: registry:NAME@latest`."""
    summary = json.loads((folder / "metrics.json").read_text())

    def stage(staging: Path) -> dict:
        shutil.copytree(folder, staging, dirs_exist_ok=True)
        return {"metrics": {"val_perplexity": summary["val_perplexity"]}, "kind": "foundation",
                "continued_from": summary.get("foundation") or summary.get("continued_from"),
                "git_commit": head_commit(folder)}

    manifest, _ = register_once(Registry(registry_uri), name, folder_digest(folder), stage)
    return manifest


def register_foundation(params: Params, repo: Path) -> dict:
    """This run's pre-trained checkpoint (the broad foundation continued on the task's text, or a task-only
    model) as its own model, so other runs can start from it; returns the record the lineage keeps."""
    pretrained = repo / layout.PRETRAINED
    manifest = register_checkpoint(params.registry.uri, params.registry.foundation_name, pretrained)
    return {"name": manifest["name"], "version": manifest["version"], "registry": params.registry.uri,
            "continued_from": manifest.get("continued_from")}


def registered_unchanged(params: Params, repo: Path) -> dict | None:
    """The newest registered version, when it holds this workspace's classifier and its promotion decision is
    recorded: registering again would change nothing."""
    registry, name = Registry(params.registry.uri), params.registry.model_name
    classifier = repo / layout.CLASSIFIER
    manifest = newest_holding(registry, name, folder_digest(classifier)) if classifier.is_dir() else None
    if not manifest or not registry.decision(name, manifest["version"]):
        return None
    return {"name": name, "version": manifest["version"], "uri": params.registry.uri, "alias": LATEST,
            "reason": UNCHANGED}


def register(params: Params, repo: Path, flow_run: dict | None = None) -> dict:
    """Register the pre-trained checkpoint and models/classifier (with reports/metrics.json and lineage), each
    only if changed, then pass the classifier through the promotion gate, unless its decision is recorded."""
    metrics = json.loads((repo / layout.METRICS).read_text())
    test = metrics["finetune"]["test"]
    test_rows = pl.read_parquet(repo / layout.PREPARED / "test.parquet")
    split = split_digest(test_rows)
    summary = {"test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
               "per_class_f1": {label: scores["f1"] for label, scores in test["per_class"].items()}}
    registry = Registry(params.registry.uri)
    foundation = register_foundation(params, repo)

    def stage(folder: Path) -> dict:
        lineage = build_lineage(repo, flow_run, foundation, split)
        shutil.copytree(repo / layout.CLASSIFIER, folder, dirs_exist_ok=True)
        (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (folder / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (folder / "params.yaml").write_text(to_yaml(params))
        for report in (layout.CONFUSION_PLOT, layout.MODEL_CARD):
            shutil.copy(repo / report, folder / report.name)
        return {"metrics": summary, "kind": "classifier", "foundation": foundation, "test_split": split,
                "git_commit": lineage["git"]["commit"], "flow_run_id": (flow_run or {}).get("id")}

    name = params.registry.model_name
    manifest, new = register_once(registry, name, folder_digest(repo / layout.CLASSIFIER), stage)
    result = {"name": name, "version": manifest["version"], "uri": params.registry.uri, "registered": new,
              "foundation": foundation, "test_split": split, **summary}
    if not new and registry.decision(name, manifest["version"]):
        return {**result, "alias": LATEST, "reason": UNCHANGED, "comparison": None}
    decision = promote(registry, manifest, repo / layout.CLASSIFIER, test_rows, params)
    return {**result, "alias": decision["alias"], "reason": decision["reason"], "comparison": decision["comparison"]}
