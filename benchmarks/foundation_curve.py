"""What more foundation pre-training buys: test accuracy at 10 labels per class on BBC News and the dev sets,
continuing each of several foundation checkpoints (e.g. after a quarter, all and twice its tokens) on the task's
text with the default recipe, then fine-tuning over several seeds (each draws another labeled sample and training
order, on the same split), TF-IDF on the same labels beside it; prints JSON.

    python benchmarks/foundation_curve.py --foundation PATH... [--task-only] [--seeds 1 2 3] [--only trec] \
        [--plot docs/foundation_curve.png]
    python benchmarks/foundation_curve.py --rows OUTPUT.json --plot docs/foundation_curve.png   # redraw only

`--task-only` adds the curve's point at no foundation tokens: pre-training on the task's text alone, at the same
step budget, as `benchmarks/devsets.py` runs it.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import polars as pl
from devsets import RECIPES, ROOT, make_project, write_params  # the script folder is on sys.path
from few_label_recipes import run_cell, tfidf_cell

from components.figures import plt, save_figure

LABELS_PER_CLASS = 10


def continue_foundation(project: Path) -> None:
    """The project's stages up to pretrain (`dvc repro pretrain`): its foundation continued on the task's text."""
    done = subprocess.run(["dvc", "repro", "pretrain"], cwd=project, capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"})
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-2000:])


def ten_per_class(project: Path, seeds: list[int]) -> dict:
    prepared = project / "data/prepared"
    test = pl.read_parquet(prepared / "test.parquet")
    cells = []
    for seed in seeds:
        cell = run_cell(project / "params.yaml", prepared, project / "models/pretrained", [f"seed={seed}"],
                        LABELS_PER_CLASS, test)
        cells.append({"seed": seed, **cell, "tfidf_logreg": tfidf_cell(prepared, LABELS_PER_CLASS, seed, test)})
    accuracies = [cell["accuracy"] for cell in cells]
    return {"mean_accuracy": round(statistics.fmean(accuracies), 4),
            "spread": round(max(accuracies) - min(accuracies), 4),
            "tfidf_mean_accuracy": round(statistics.fmean(cell["tfidf_logreg"]["accuracy"] for cell in cells), 4),
            "seeds": cells}


def plot(rows: list[dict], path: Path) -> None:
    """Mean 10-label accuracy (the seeds' range as bars) against foundation tokens, TF-IDF on the same labels."""
    fig, ax = plt.subplots(figsize=(6, 3.6))
    key = f"at_{LABELS_PER_CLASS}_per_class"
    for dataset in dict.fromkeys(row["dataset"] for row in rows):
        points = sorted((row for row in rows if row["dataset"] == dataset), key=lambda row: row["foundation_tokens"])
        tokens = [row["foundation_tokens"] / 1e6 for row in points]
        accuracies = [[seed["accuracy"] for seed in row[key]["seeds"]] for row in points]
        means = [row[key]["mean_accuracy"] for row in points]
        ax.errorbar(tokens, means, yerr=[[m - min(a) for m, a in zip(means, accuracies, strict=True)],
                                         [max(a) - m for m, a in zip(means, accuracies, strict=True)]],
                    marker="o", capsize=4, label=f"{dataset}: fine-tuned GPT")
        ax.plot(tokens, [row[key]["tfidf_mean_accuracy"] for row in points], linestyle="--",
                label=f"{dataset}: TF-IDF, same labels")
    ax.set_xlabel("foundation pre-training tokens (millions; 0 = the task's text only)")
    ax.set_ylabel(f"test accuracy, {LABELS_PER_CLASS} labels per class")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--foundation", type=Path, nargs="*", default=[])
    parser.add_argument("--task-only", action="store_true", help="add the point at no foundation tokens")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--devsets", type=Path, default=ROOT.parent / "shared/devsets")
    parser.add_argument("--only", nargs="*", default=[], help="dev set names besides BBC News (default: none)")
    parser.add_argument("--plot", type=Path, help="draw the curve to this PNG")
    parser.add_argument("--rows", type=Path, help="an earlier run's output: draw it, run nothing")
    args = parser.parse_args()
    if args.rows:
        if not args.plot:
            parser.error("--rows draws an earlier output: name the PNG with --plot")
        plot(json.loads(args.rows.read_text()), args.plot)
        return
    points = [(str(foundation), foundation) for foundation in args.foundation]
    if args.task_only:
        points.append(("task-only", None))
    rows = []
    with tempfile.TemporaryDirectory(prefix="gptpipe-curve-") as workdir:
        for label, foundation in points:
            for name in ["bbc_news", *args.only]:
                project = make_project(Path(workdir) / f"{Path(label).name}-{name}")
                overrides = [] if name == "bbc_news" else [f"data.labeled.path={args.devsets / name / 'train.csv'}",
                                                           f"data.test.path={args.devsets / name / 'test.csv'}"]
                if foundation is None:
                    overrides += RECIPES["task_only"]
                else:
                    shutil.rmtree(project / "models/foundation")
                    shutil.copytree(foundation, project / "models/foundation")
                write_params(project, overrides)
                continue_foundation(project)
                row = {"foundation": label, "foundation_tokens": 0, "dataset": name}
                if foundation is not None:
                    metrics = json.loads((foundation / "metrics.json").read_text())
                    row |= {"foundation_tokens": metrics["tokens_seen"],
                            "foundation_val_perplexity": round(metrics["val_perplexity"], 1)}
                rows.append({**row, f"at_{LABELS_PER_CLASS}_per_class": ten_per_class(project, args.seeds)})
                print(json.dumps(rows[-1]), file=sys.stderr)
    print(json.dumps(rows, indent=2))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
