"""Register: publish the fine-tuned classifier as a new immutable registry version with its lineage, then
move the aliases through the promotion gate. Runs after the DVC stages, once per pipeline run."""

import hashlib
import json
import shutil
import subprocess
import tempfile
from pathlib import Path

import yaml

from components.params import Params, to_yaml
from components.registry import CHALLENGER, CHAMPION, LATEST, Registry, promotion_decision


def git_state(repo: Path) -> dict:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}


def dvc_lock_hashes(lock_file: Path) -> dict:
    """Content hashes of every stage output, as dvc.lock recorded them: the data, tokenizer and checkpoints."""
    if not lock_file.exists():
        return {}
    stages = (yaml.safe_load(lock_file.read_text()) or {}).get("stages", {})
    return {stage: {out["path"]: out.get("md5") for out in entry.get("outs", [])} for stage, entry in stages.items()}


def build_lineage(repo: Path, flow_run: dict | None) -> dict:
    pretrain = json.loads((repo / "models/pretrained/metrics.json").read_text())
    return {"git": git_state(repo), "dvc_lock": dvc_lock_hashes(repo / "dvc.lock"), "flow_run": flow_run,
            "training": {"pretrain_tokens": pretrain["train_tokens"], "pretrain_seconds": pretrain["seconds"]}}


def classifier_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode() + b"\0" + file.read_bytes())
    return digest.hexdigest()


def register(params: Params, repo: Path, flow_run: dict | None = None) -> dict:
    """Register models/classifier with reports/metrics.json and its lineage, unless the newest version already
    holds this exact classifier (a rerun with nothing changed); returns the version and the promotion decision."""
    metrics = json.loads((repo / "reports/metrics.json").read_text())
    summary = {"test_accuracy": metrics["finetune"]["test"]["accuracy"],
               "test_macro_f1": metrics["finetune"]["test"]["macro_f1"]}
    registry = Registry(params.registry.uri)
    name = params.registry.model_name
    digest = classifier_digest(repo / "models/classifier")
    newest = registry.aliases(name).get(LATEST)
    if newest and registry.manifest(name, newest).get("classifier_sha256") == digest:
        return {"name": name, "version": newest, "alias": LATEST, "reason": "unchanged, already registered",
                "uri": params.registry.uri, "registered": False, **summary}
    lineage = build_lineage(repo, flow_run)
    with tempfile.TemporaryDirectory(prefix="gptpipe-register-") as tmp:
        staging = Path(tmp)
        shutil.copytree(repo / "models/classifier", staging, dirs_exist_ok=True)
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        (staging / "lineage.json").write_text(json.dumps(lineage, indent=2) + "\n")
        (staging / "params.yaml").write_text(to_yaml(params))
        shutil.copy(repo / "reports/confusion_matrix.png", staging / "confusion_matrix.png")
        manifest = registry.register(name, staging, {"metrics": summary, "classifier_sha256": digest,
                                                     "git_commit": lineage["git"]["commit"],
                                                     "flow_run_id": (flow_run or {}).get("id")})
    champion_version = registry.aliases(name).get(CHAMPION)
    champion = registry.manifest(name, champion_version) if champion_version else None
    promote, reason = promotion_decision(manifest, champion, params.registry.promotion_tolerance)
    registry.set_alias(name, CHAMPION if promote else CHALLENGER, manifest["version"])
    return {"name": name, "version": manifest["version"], "alias": CHAMPION if promote else CHALLENGER,
            "reason": reason, "uri": params.registry.uri, "registered": True, **summary}
