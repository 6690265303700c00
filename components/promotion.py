"""The promotion gate: a newly registered classifier becomes `champion` only if, scored with the champion on the
same test texts (its own test split), the 95% paired-bootstrap interval of its macro-F1 minus the champion's does
not reach below -`registry.promotion_tolerance`, and no class's F1 fell by more than `registry.max_class_f1_drop`;
otherwise it becomes `challenger`. Champions with another label set are compared on their own test scores."""

import hashlib
import json
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from components.bootstrap import paired_difference_intervals, resampled_class_scores
from components.held_out import normalise
from components.params import Params
from components.registry import CHALLENGER, CHAMPION, Registry, moved_to

if TYPE_CHECKING:
    from components.inference import LoadedClassifier


def split_digest(test: pl.DataFrame) -> dict:
    """How many test texts and a sha256 over the sorted (normalised text, label) pairs: equal digests, same test."""
    pairs = sorted(zip(map(normalise, test["text"].to_list()), test["label"].to_list(), strict=True))
    return {"texts": test.height,
            "sha256": hashlib.sha256(json.dumps(pairs, ensure_ascii=False).encode()).hexdigest()}


def loaded(folder: Path) -> "LoadedClassifier":
    """The classifier in `folder`. torch is imported here, when a model is scored, not with this module: every
    run's and flow's process imports it."""
    from components.inference import load_classifier

    return load_classifier(folder)


def predicted_labels(model: "LoadedClassifier", texts: list[str]) -> list[str]:
    return [model.labels[i] for i in model.predict_proba(texts).argmax(dim=-1).tolist()]


def paired_comparison(truth: list[str], candidate: list[str], champion: list[str], labels: list[str],
                      samples: int, seed: int) -> dict:
    """Both models' accuracy, macro-F1 and per-class F1 on the same texts, and 95% paired-bootstrap intervals of
    the candidate's scores minus the champion's."""
    index = {label: i for i, label in enumerate(labels)}
    truth_ids, every_text = np.array([index[label] for label in truth]), np.arange(len(truth))[None, :]
    result, ids = {"texts": len(truth), "bootstrap_samples": samples, "seed": seed}, {}
    for name, predicted in (("candidate", candidate), ("champion", champion)):
        ids[name] = np.array([index[label] for label in predicted])
        accuracy, f1 = resampled_class_scores(truth_ids, ids[name], len(labels), every_text)
        result[name] = {"accuracy": float(accuracy[0]), "macro_f1": float(f1[0].mean()),
                        "per_class_f1": {label: float(f1[0][i]) for label, i in index.items()}}
    intervals = paired_difference_intervals(truth_ids, ids["candidate"], ids["champion"], len(labels), samples, seed)
    result["difference"] = {
        **{key: result["candidate"][key] - result["champion"][key] for key in ("accuracy", "macro_f1")},
        **{f"{key}_ci95": interval for key, interval in intervals.items()}}
    return result


def largest_class_drop(old: dict[str, float], new: dict[str, float]) -> tuple[str | None, float]:
    drops = {label: f1 - new.get(label, 0.0) for label, f1 in old.items()}
    worst = max(drops, key=drops.get, default=None)
    return worst, max(0.0, drops.get(worst, 0.0))


def class_drop_refusal(old: dict[str, float], new: dict[str, float], max_drop: float) -> str | None:
    worst, drop = largest_class_drop(old, new)
    if drop > max_drop:
        return (f"F1 of class {worst!r} fell from {old[worst]:.4f} to {new.get(worst, 0):.4f}, more than "
                f"{max_drop}; kept as challenger")
    return None


def paired_decision(comparison: dict, champion_version: int, tolerance: float,
                    max_class_drop: float) -> tuple[bool, str]:
    new, old, difference = comparison["candidate"], comparison["champion"], comparison["difference"]
    low, high = difference["macro_f1_ci95"]
    head = (f"test macro-F1 {new['macro_f1']:.4f} vs champion v{champion_version}'s {old['macro_f1']:.4f} on the "
            f"same {comparison['texts']} test texts, difference {difference['macro_f1']:+.4f} "
            f"[95% CI {low:+.4f}, {high:+.4f}]")
    if low < -tolerance:
        return False, f"{head}: it may be worse by more than {tolerance}; kept as challenger"
    refusal = class_drop_refusal(old["per_class_f1"], new["per_class_f1"], max_class_drop)
    if refusal:
        return False, f"{head}, but {refusal}"
    return True, (f"{head}: no worse than the tolerance {tolerance} allows, largest class drop "
                  f"{largest_class_drop(old['per_class_f1'], new['per_class_f1'])[1]:.4f}")


def own_split_decision(candidate: dict, champion: dict, tolerance: float, max_class_drop: float) -> tuple[bool, str]:
    """The gate on each version's own recorded test scores, for champions that cannot be scored on these texts."""
    new, old = candidate["metrics"], champion["metrics"]
    against = f"champion v{champion['version']}"
    if new["test_macro_f1"] < old["test_macro_f1"] - tolerance:
        return False, (f"test macro-F1 {new['test_macro_f1']:.4f} is worse than {against}'s "
                       f"{old['test_macro_f1']:.4f} by more than {tolerance}; kept as challenger")
    old_classes, new_classes = old.get("per_class_f1", {}), new.get("per_class_f1", {})
    refusal = class_drop_refusal(old_classes, new_classes, max_class_drop)
    if refusal:
        return False, refusal
    return True, (f"test macro-F1 {new['test_macro_f1']:.4f} vs {against}'s {old['test_macro_f1']:.4f} "
                  f"(tolerance {tolerance}, largest class drop {largest_class_drop(old_classes, new_classes)[1]:.4f})")


def promotion_decision(candidate: dict, champion: dict | None, tolerance: float, max_class_drop: float,
                       comparison: dict | None = None) -> tuple[bool, str]:
    """Whether the candidate (a manifest) replaces the champion (a manifest, None when there is none yet), and
    why: on their `paired_comparison` when given, else on their own recorded test scores."""
    if champion is None:
        return True, "no champion yet"
    if comparison is None:
        return own_split_decision(candidate, champion, tolerance, max_class_drop)
    return paired_decision(comparison, champion["version"], tolerance, max_class_drop)


class Gate:
    """The candidate's test texts and predictions, scored once, and each champion's on them, scored once
    (the compare-and-swap asks again when another registration moved the champion in between)."""

    def __init__(self, registry: Registry, candidate: dict, classifier: Path, test: pl.DataFrame, params: Params):
        self.registry, self.manifest, self.classifier, self.params = registry, candidate, classifier, params
        self.texts, self.truth = test["text"].to_list(), test["label"].to_list()
        self.split = split_digest(test)
        self.champions: dict[int, tuple[list[str], dict | None]] = {}

    @cached_property
    def model(self) -> "LoadedClassifier":
        return loaded(self.classifier)

    @cached_property
    def predicted(self) -> list[str]:
        return predicted_labels(self.model, self.texts)

    def compare(self, champion: dict) -> tuple[list[str], dict | None]:
        """A champion's (a manifest's) labels, and its paired comparison with the candidate (None when the label
        sets differ)."""
        version = champion["version"]
        if version not in self.champions:
            model = loaded(self.registry.fetch(champion))
            comparison = None
            if set(model.labels) == set(self.model.labels):
                comparison = {**paired_comparison(self.truth, self.predicted, predicted_labels(model, self.texts),
                                                  self.model.labels, self.params.evaluate.bootstrap_samples,
                                                  self.params.seed),
                              "test_split_sha256": self.split["sha256"]}
            self.champions[version] = model.labels, comparison
        return self.champions[version]

    def decide(self, champion: dict | None) -> dict:
        """The decision against `champion` (a manifest; None when there is none), as the registry records it."""
        gate = self.params.registry
        labels, comparison = self.compare(champion) if champion else (None, None)
        promote, reason = promotion_decision(self.manifest, champion, gate.promotion_tolerance,
                                             gate.max_class_f1_drop, comparison)
        if champion and comparison is None:
            reason = (f"champion v{champion['version']} has labels {sorted(labels)} and this version "
                      f"{sorted(self.model.labels)}, so they cannot be scored on the same texts; compared on their "
                      f"own test splits: {reason}")
        return self.decision(CHAMPION if promote else CHALLENGER, reason, champion, comparison)

    def decision(self, alias: str, reason: str, champion: dict | None = None, comparison: dict | None = None) -> dict:
        return {"version": self.manifest["version"], "alias": alias, "reason": reason,
                "champion": champion["version"] if champion else None, "comparison": comparison,
                "test_split": self.split, "decided": datetime.now(UTC).isoformat(timespec="seconds")}


def promote(registry: Registry, candidate: dict, classifier: Path, test: pl.DataFrame, params: Params) -> dict:
    """Pass a registered classifier (its manifest, its folder, its test split) through the gate: `champion` moves
    to it against the champion as it is at the moment of the write (compare-and-swap), else `challenger` does;
    then the decision is recorded, which marks the registration finished. Run again after a failure in between,
    it takes the decision again and leaves an alias that an earlier attempt already moved to this version as it is
    (no second history entry)."""
    name, version = candidate["name"], candidate["version"]
    gate, decision = Gate(registry, candidate, classifier, test, params), {}

    def champion_move(record: dict | None) -> dict | None:
        if record and record["version"] == version:  # an earlier attempt's write landed
            # (a champion moved before decisions were recorded has none in its alias record)
            decision.update(record.get("decision") or gate.decision(CHAMPION, "champion already"))
            return None
        decision.clear()
        decision.update(gate.decide(registry.manifest(name, record["version"]) if record else None))
        return {**moved_to(record, version), "decision": decision} if decision["alias"] == CHAMPION else None

    registry.update_alias(name, CHAMPION, champion_move)
    if decision["alias"] == CHALLENGER:
        registry.update_alias(name, CHALLENGER, lambda record: None if record and record["version"] == version
                              else {**moved_to(record, version), "decision": decision})
    registry.record_decision(name, version, decision)
    return decision
