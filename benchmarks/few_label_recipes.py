"""Fine-tuning recipes compared on prepared splits and pre-trained checkpoints: test accuracy, macro-F1 and seconds
of each cell (checkpoint x recipe x label budget x seed), with TF-IDF + logistic regression on the same labels;
prints JSON lines as cells finish and a summary (mean and spread over seeds) at the end.

    python benchmarks/few_label_recipes.py --prepared data/prepared --pretrained pt150=models/pretrained \
        --budget 10 --seeds 1 2 3 --recipe default= --recipe lr1e-3=finetune.learning_rate=0.001

A recipe is NAME=OVERRIDE[,OVERRIDE...] on top of params.yaml (`--set` syntax); a budget is labels per class or
`all` (the whole train split, best epoch on val). The seed draws the labeled sample and the training order. Each
cell scores the delivered classifier (the recipe's `finetune.tfidf_weight`) and its GPT alone; `--tfidf-weights
0 1 2 ...` also scores the same fine-tuned GPT fused with TF-IDF at each of those weights (no more training);
`--scratch` adds each recipe from freshly initialised weights (evaluate's scratch baseline, same sample).
"""

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import polars as pl
from tokenizers import Tokenizer

from components.evaluate import LabelEfficiency, per_class_sample, scores
from components.inference import LoadedClassifier, load_backbone
from components.model import Classifier
from components.params import load_params
from components.tfidf import TfidfLogreg, tfidf_logreg


def named(pairs: list[str]) -> dict[str, str]:
    return dict(pair.split("=", 1) for pair in pairs)


def run_cell(params_file: Path, prepared: Path, pretrained: Path, overrides: list[str], budget: int | None,
             test: pl.DataFrame, tfidf_weights: list[float], init: str = "pretrained") -> dict:
    params = load_params(params_file, overrides)
    labels = json.loads((prepared / "labels.json").read_text())
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    # The label-budget runs read labels and tokenizer from it; their models start from `pretrained`.
    untrained = Classifier(load_backbone(pretrained), len(labels), params.finetune.pooling)
    reader = LoadedClassifier(untrained, tokenizer, labels, 1.0, params.finetune.max_chunks)
    runs = LabelEfficiency(params, prepared, pretrained, reader, test)
    train = None if budget is None else per_class_sample(runs.train, labels, budget, params.seed)
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # training's progress and notes: stdout holds only the JSON
        delivered, summary = runs.finetune_from(init, train)
        texts, truth = test["text"].to_list(), test["label"].to_list()
        logits = delivered.predict_logits(texts)
        seconds = time.perf_counter() - started

        def scored(probs) -> dict:
            result = scores(truth, [labels[i] for i in probs.argmax(-1).tolist()], labels)
            return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4)}

        cell = {**scored(delivered.fuse(logits, texts)), "gpt_alone": scored(logits),
                "epochs": summary["epochs_trained"], "seconds": round(seconds, 1)}
        if tfidf_weights:
            tfidf = delivered.tfidf or TfidfLogreg.fit(runs.train if train is None else train, labels, params.seed)
            at = functools.partial(dataclasses.replace, delivered, tfidf=tfidf)
            cell["by_tfidf_weight"] = {str(weight): scored(at(tfidf_weight=weight).fuse(logits, texts))
                                       for weight in tfidf_weights}
    return cell


def tfidf_cell(prepared: Path, budget: int | None, seed: int, test: pl.DataFrame) -> dict:
    train = pl.read_parquet(prepared / "train.parquet")
    labels = json.loads((prepared / "labels.json").read_text())
    sample = train if budget is None else per_class_sample(train, labels, budget, seed)
    result = scores(test["label"].to_list(), tfidf_logreg(sample, test, seed), labels)
    return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4)}


def summarise(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["checkpoint"], row["recipe"], row["budget"]), []).append(row)
    summary = []
    for (checkpoint, recipe, budget), cells in groups.items():
        accuracy = [cell["accuracy"] for cell in cells]
        summary.append({"checkpoint": checkpoint, "recipe": recipe, "budget": budget, "seeds": len(cells),
                        "accuracy": round(statistics.mean(accuracy), 4),
                        "accuracy_sd": round(statistics.stdev(accuracy), 4) if len(cells) > 1 else None,
                        "seconds": round(statistics.mean(cell["seconds"] for cell in cells), 1)})
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--pretrained", nargs="+", default=["pretrained=models/pretrained"],
                        help="NAME=FOLDER of each checkpoint")
    parser.add_argument("--recipe", action="append", default=None, help="NAME=OVERRIDE[,OVERRIDE...]; repeats")
    parser.add_argument("--budget", nargs="+", default=["10"], help="labels per class, or all")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337])
    parser.add_argument("--tfidf", action="store_true", help="also TF-IDF + logistic regression on each sample")
    parser.add_argument("--tfidf-weights", nargs="*", type=float, default=[],
                        help="also score each fine-tuned GPT fused with TF-IDF at these weights")
    parser.add_argument("--scratch", action="store_true", help="also each recipe from freshly initialised weights "
                        "of the checkpoint's shape (evaluate's scratch baseline), as checkpoint NAME:scratch")
    args = parser.parse_args()
    test = pl.read_parquet(args.prepared / "test.parquet")
    recipes = {name: [override for override in value.split(",") if override]
               for name, value in named(args.recipe or ["params.yaml="]).items()}
    inits = ["pretrained", "scratch"] if args.scratch else ["pretrained"]
    rows = []
    for budget_name in args.budget:
        budget = None if budget_name == "all" else int(budget_name)
        for seed in args.seeds:
            if args.tfidf:
                row = {"checkpoint": "-", "recipe": "tfidf_logreg", "budget": budget_name, "seed": seed,
                       **tfidf_cell(args.prepared, budget, seed, test), "seconds": 0.0}
                rows.append(row)
                print(json.dumps(row), flush=True)
            for (checkpoint, folder), init in itertools.product(named(args.pretrained).items(), inits):
                for recipe, overrides in recipes.items():
                    cell = run_cell(Path("params.yaml"), args.prepared, Path(folder), [f"seed={seed}", *overrides],
                                    budget, test, args.tfidf_weights, init)
                    name = checkpoint if init == "pretrained" else f"{checkpoint}:scratch"
                    row = {"checkpoint": name, "recipe": recipe, "budget": budget_name, "seed": seed, **cell}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print(json.dumps({"test_texts": test.height, "summary": summarise(rows)}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
