"""What more foundation pre-training buys: test accuracy at 10 labels per class on BBC News and the dev sets,
continuing each of several foundation checkpoints (e.g. after a quarter and all of its tokens) with the default
recipe; prints JSON.

    python benchmarks/foundation_curve.py --foundation PATH... [--devsets ../shared/devsets] [--only trec]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
from devsets import ROOT, make_project, write_params  # the script folder is on sys.path
from tokenizers import Tokenizer

from components.evaluate import LabelEfficiency
from components.inference import LoadedClassifier, load_backbone
from components.model import Classifier
from components.params import load_params

LABELS_PER_CLASS = 10


def ten_per_class(project: Path) -> dict:
    """Continue the project's foundation (`dvc repro pretrain`), then fine-tune on 10 labels per class."""
    done = subprocess.run(["dvc", "repro", "pretrain"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])
    params = load_params(project / "params.yaml")
    prepared, pretrained = project / "data/prepared", project / "models/pretrained"
    labels = json.loads((prepared / "labels.json").read_text())
    tokenizer = Tokenizer.from_file(str(pretrained / "tokenizer.json"))
    untrained = Classifier(load_backbone(pretrained), len(labels), params.finetune.pooling)
    reader = LoadedClassifier(untrained, tokenizer, labels, 1.0, params.finetune.max_chunks)
    test = pl.read_parquet(prepared / "test.parquet")
    result = LabelEfficiency(params, prepared, pretrained, reader, test).score("pretrained", LABELS_PER_CLASS)
    return {"accuracy": round(result["test"]["accuracy"], 4), "macro_f1": round(result["test"]["macro_f1"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--foundation", type=Path, nargs="+", required=True)
    parser.add_argument("--devsets", type=Path, default=ROOT.parent / "shared/devsets")
    parser.add_argument("--only", nargs="*", default=[], help="dev set names besides BBC News (default: none)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptpipe-curve-") as workdir:
        for foundation in args.foundation:
            tokens = json.loads((foundation / "metrics.json").read_text())["tokens_seen"]
            for name in ["bbc_news", *args.only]:
                project = make_project(Path(workdir) / f"{foundation.name}-{name}")
                shutil.rmtree(project / "models/foundation")
                shutil.copytree(foundation, project / "models/foundation")
                write_params(project, [] if name == "bbc_news" else [
                    f"data.labeled.path={args.devsets / name / 'train.csv'}",
                    f"data.test.path={args.devsets / name / 'test.csv'}"])
                rows.append({"foundation": str(foundation), "foundation_tokens": tokens, "dataset": name,
                             f"at_{LABELS_PER_CLASS}_per_class": ten_per_class(project)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
