"""Few-label fine-tuning recipes compared on one pre-trained checkpoint: test accuracy and macro-F1 at N labels per
class for each variant of `finetune.*` (strategy, learning rate, pooling, epochs), the rest as in params.yaml;
prints JSON. Needs a workspace where `dvc repro pretrain` has run (data/prepared, models/pretrained).

    python benchmarks/few_label_recipes.py [--labels-per-class 10]
"""

import argparse
import json
import time
from pathlib import Path

import polars as pl
from tokenizers import Tokenizer

from components.evaluate import LabelEfficiency
from components.inference import LoadedClassifier, load_backbone
from components.model import Classifier
from components.params import load_params

VARIANTS = {
    "params.yaml": [],
    "lr 1e-4": ["finetune.learning_rate=0.0001"],
    "lr 1e-3": ["finetune.learning_rate=0.001"],
    "last-token pooling": ["finetune.pooling=last"],
    "ulmfit": ["finetune.strategy=ulmfit"],
    "linear probe": ["finetune.strategy=linear_probe", "finetune.learning_rate=0.01"],
    "60 steps": ["evaluate.budget_min_steps=60"],
    "aux LM loss 0.5": ["finetune.aux_lm_weight=0.5"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels-per-class", type=int, default=10)
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--pretrained", type=Path, default=Path("models/pretrained"))
    parser.add_argument("--only", nargs="*", help="variant names (default: all)")
    args = parser.parse_args()
    test = pl.read_parquet(args.prepared / "test.parquet")
    labels = json.loads((args.prepared / "labels.json").read_text())
    tokenizer = Tokenizer.from_file(str(args.pretrained / "tokenizer.json"))
    rows = []
    for name, overrides in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        params = load_params("params.yaml", overrides)
        # The label-budget runs read labels and tokenizer from it; their models start from models/pretrained.
        untrained = Classifier(load_backbone(args.pretrained), len(labels), params.finetune.pooling)
        reader = LoadedClassifier(untrained, tokenizer, labels, 1.0, params.finetune.max_chunks)
        started = time.perf_counter()
        result = LabelEfficiency(params, args.prepared, args.pretrained, reader, test).score(
            "pretrained", args.labels_per_class)
        rows.append({"variant": name, "overrides": overrides, "accuracy": round(result["test"]["accuracy"], 4),
                     "macro_f1": round(result["test"]["macro_f1"], 4), "epochs": result["epochs"],
                     "seconds": round(time.perf_counter() - started, 1)})
    print(json.dumps({"labels_per_class": args.labels_per_class, "test_texts": test.height, "variants": rows},
                     indent=2))


if __name__ == "__main__":
    main()
