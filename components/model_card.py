"""The model card evaluate writes to reports/model_card.md: what the classifier is for, its data, its test
numbers with 95% intervals next to the baselines, its calibration and label efficiency, and its limits."""

from components.params import Params


def _interval(result: dict, key: str) -> str:
    low_high = result.get(f"{key}_ci95")
    return f"{result[key]:.3f} ({low_high[0]:.3f}-{low_high[1]:.3f})" if low_high else f"{result[key]:.3f}"


def delivered_rows(metrics: dict) -> list[tuple[str, dict]]:
    """The delivered classifier's test scores under its name, and where it has a TF-IDF half, its GPT's alone."""
    finetuned = metrics["finetune"]
    if finetuned.get("tfidf_weight") and "test_gpt_alone" in finetuned:
        return [("fine-tuned GPT x TF-IDF", finetuned["test"]), ("fine-tuned GPT alone", finetuned["test_gpt_alone"])]
    return [("fine-tuned GPT", finetuned["test"])]


def _results_table(metrics: dict) -> list[str]:
    rows = [(name, "all", result) for name, result in delivered_rows(metrics)]
    rows += [(name, result.get("labels_per_class") or "all", result["test"])
             for name, result in metrics["baselines"].items()]
    lines = ["| model | labels per class | accuracy (95% CI) | macro-F1 (95% CI) |", "|---|---|---|---|"]
    return lines + [f"| {name} | {budget} | {_interval(r, 'accuracy')} | {_interval(r, 'macro_f1')} |"
                    for name, budget, r in rows]


def _per_class_table(test: dict) -> list[str]:
    lines = ["| label | precision | recall | F1 | test support |", "|---|---:|---:|---:|---:|"]
    return lines + [f"| {label} | {s['precision']:.3f} | {s['recall']:.3f} | {s['f1']:.3f} | {s['support']} |"
                    for label, s in test["per_class"].items()]


def _curve_table(curve: list[dict]) -> list[str]:
    if not curve:
        return ["(no label budgets configured: `evaluate.label_budgets` is empty)"]
    lines = ["| labels per class | train examples | pre-trained GPT | scratch GPT | TF-IDF + logreg |",
             "|---|---:|---:|---:|---:|"]
    return lines + [f"| {row['labels_per_class'] or 'all'} | {row['train_examples']} | "
                    f"{row['pretrained']['macro_f1']:.3f} | {row['scratch']['macro_f1']:.3f} | "
                    f"{row['tfidf_logreg']['macro_f1']:.3f} |" for row in curve]


def _limits(params: Params, metrics: dict, splits: dict) -> list[str]:
    context, finetuned = metrics["pretrain"]["config"]["context_length"], metrics["finetune"]["test"]
    low, high = finetuned.get("accuracy_ci95", (finetuned["accuracy"], finetuned["accuracy"]))
    limits = [
        f"- It reads at most the first {params.finetune.max_chunks * context} tokens of a text "
        f"({params.finetune.max_chunks} window(s) of {context}); the rest is ignored.",
        f"- It always answers one of its {len(finetuned['per_class'])} labels, also for text that fits none; "
        "a low top probability is the only sign of that.",
        f"- The test split has {splits['test']} texts: test accuracy is known only to about "
        f"{low:.3f}-{high:.3f} (95% bootstrap interval), and per-class numbers rest on fewer texts still.",
        "- Train, validation and test texts come from the same source; accuracy on text from elsewhere "
        "(other years, outlets, writing styles) is not measured here.",
    ]
    best_baseline = max(metrics["baselines"].items(), key=lambda item: item[1]["test"]["macro_f1"], default=None)
    if best_baseline and best_baseline[1]["test"]["macro_f1"] > finetuned["macro_f1"]:
        name, result = best_baseline
        limits.append(f"- The `{name}` baseline scores a higher test macro-F1 ({result['test']['macro_f1']:.3f} vs "
                      f"{finetuned['macro_f1']:.3f}) on this data; prefer it where its cost and form suit.")
    return limits


def self_training_note(finetuned: dict, rounds: int) -> str:
    if not finetuned.get("pseudo_labeled"):
        return ""
    labeler = f"the model fine-tuned on the {finetuned['train_examples']} labeled ones"
    if rounds > 1:
        labeler += f", relabeled in {rounds} rounds by the model of the round before"
    return (f" Self-trained: {finetuned['pseudo_labeled']} texts without labels, labeled by {labeler} (its surest "
            "guesses), joined them in the last fine-tune.")


def fusion_note(finetuned: dict) -> str:
    if not finetuned.get("tfidf_weight"):
        return ""
    return (" Its probabilities are the GPT's times those of TF-IDF + logistic regression fitted on the same labels "
            "(and on self-training's guesses where there were any), "
            f"raised to the power {finetuned['tfidf_weight']:g}, renormalised (`finetune.tfidf_weight`).")


def model_card(params: Params, metrics: dict, curve: list[dict], splits: dict, labels: list[str]) -> str:
    cfg, pretrain = params.finetune, metrics["pretrain"]
    model, foundation = pretrain["config"], pretrain.get("foundation")
    tokens = pretrain.get("train_tokens", 0)
    if foundation and foundation.get("architecture"):  # a published checkpoint, imported
        revision = f" at revision {foundation['revision']}" if foundation.get("revision") else ""
        origin = (f"the published checkpoint `{foundation['name']}` ({foundation['architecture']}{revision}; licence "
                  f"as its files state it: {foundation['licence']}), continued on this task's text for {tokens:,} "
                  "tokens")
    elif foundation:
        origin = f"the broad foundation `{foundation['name']}`, continued on this task's text for {tokens:,} tokens"
    else:
        origin = f"next-token prediction on this task's text only ({tokens:,} tokens)"
    calibrated = metrics["finetune"]["calibration"]
    lines = [
        f"# Model card: `{params.registry.model_name}`",
        "",
        "## What it is for",
        f"Sorting texts into one of {len(labels)} labels: {', '.join(f'`{label}`' for label in labels)}. It returns "
        "a probability per label (temperature-scaled on the validation split).",
        "",
        "## Model",
        f"A GPT decoder ({model['n_layer']} layers, {model['n_head']} heads, width {model['d_model']}, context "
        f"{model['context_length']}, {pretrain.get('n_params', 0):,} parameters) pre-trained from {origin}"
        f" (validation perplexity {pretrain.get('val_perplexity', float('nan')):.1f}), then fine-tuned with "
        f"strategy `{cfg.strategy}`, `{cfg.pooling}` pooling over up to {cfg.max_chunks} window(s) per text, "
        f"{metrics['finetune'].get('epochs_trained', cfg.epochs)} epoch(s), best epoch by validation macro-F1 "
        f"({metrics['finetune'].get('val_macro_f1', float('nan')):.3f})."
        f"{self_training_note(metrics['finetune'], cfg.pseudo_label_rounds)}{fusion_note(metrics['finetune'])}",
        "",
        "## Data",
        f"Labeled data `{params.data.labeled.path}`, split by seed {params.seed}: {splits['train']} train, "
        f"{splits['val']} validation, {splits['test']} test texts. Test texts never entered pre-training.",
        "",
        f"## Test results ({splits['test']} texts, 95% bootstrap intervals, "
        f"{params.evaluate.bootstrap_samples} resamples)",
        *_results_table(metrics),
        "",
        *_per_class_table(metrics["finetune"]["test"]),
        "",
        "## Calibration",
        f"Temperature {calibrated['temperature']:.2f}, fitted on the validation split: test expected calibration "
        f"error {calibrated['test_ece_before']:.3f} before and {calibrated['test_ece_after']:.3f} after "
        f"({calibrated['bins']} bins); test NLL {calibrated['test_nll_before']:.3f} -> "
        f"{calibrated['test_nll_after']:.3f}; the delivered probabilities (TF-IDF fused in, where it is): "
        f"{calibrated['test_ece_delivered']:.3f}. The most confident mistakes are in `mistakes.md`.",
        "",
        "## Label efficiency (test macro-F1)",
        *_curve_table(curve),
        "",
        "## Limits",
        *_limits(params, metrics, splits),
    ]
    return "\n".join(lines) + "\n"
