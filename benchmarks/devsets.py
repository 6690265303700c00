"""Quality on labeled sets other than BBC News: the pipeline (`dvc repro`, the same stages `make run` runs) on each
set's official train/test split, once continuing the shipped foundation (the default) and once pre-training on
the task's text only at the same step budget; prints one JSON table and writes it to --out as each set finishes.

    python benchmarks/devsets.py --devsets ../shared/devsets [--only trec ag_news] [--out reports/devsets.json]

Each row: test accuracy and macro-F1 at 10 labels per class and on all labels for the foundation recipe
(`foundation`), task-only pre-training (`task_only`), the same model without pre-training (`scratch`, 10 per
class), TF-IDF + logistic regression (`tfidf_logreg`) and zero-shot prompting of the continued foundation; the
models are the delivered classifiers (the GPT with its TF-IDF half), and `foundation_gpt_alone` is the foundation
recipe's GPT without that half.
"""

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from components.atomic import write_json_atomic
from components.params import Params, apply_overrides, read_raw, to_yaml

ROOT = Path(__file__).resolve().parents[1]
COPIED = ["components", "dvc.yaml", ".dvc/config", ".dvcignore", "models/foundation"]
RECIPES = {
    "foundation": [],  # params.yaml as shipped: continue the foundation on the task's text
    "task_only": ["pretrain.init_from=scratch", "pretrain.learning_rate=0.001", "pretrain.warmup_steps=25",
                  "evaluate.baselines=[]", "evaluate.label_budgets=[10]"],
}


def make_project(target: Path) -> Path:
    """A git + DVC checkout of the pipeline's code, params and shipped foundation (kept if one is there already)."""
    if (target / ".git").exists():
        return target
    for name in COPIED:
        source, destination = ROOT / name, target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if source.is_dir() else shutil.copy)(source, destination)
    for command in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "benchmark"]):
        subprocess.run(command, cwd=target, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b",
                            "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"})
    return target


def write_params(project: Path, overrides: list[str]) -> None:
    """params.yaml as shipped, with these overrides (and few bootstrap resamples: the table shows points)."""
    raw = apply_overrides(read_raw(ROOT / "params.yaml"), ["evaluate.bootstrap_samples=10", *overrides])
    (project / "params.yaml").write_text(to_yaml(Params.model_validate(raw)))


def run_recipe(project: Path, devset: Path, overrides: list[str], log) -> dict:
    write_params(project, [f"data.labeled.path={devset / 'train.csv'}", f"data.test.path={devset / 'test.csv'}",
                           *overrides])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.perf_counter()
    with (project / "repro.log").open("a") as out:
        done = subprocess.run(["dvc", "repro", "evaluate"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"dvc repro failed for {devset.name}; see {project / 'repro.log'}")
    log(f"{devset.name}: {' '.join(overrides) or 'defaults'} took {time.perf_counter() - started:.0f}s")
    metrics = json.loads((project / "reports/metrics.json").read_text())
    curve = json.loads((project / "reports/label_efficiency.json").read_text())
    return {"metrics": metrics, "curve": curve, "seconds": time.perf_counter() - started}


def scores(result: dict) -> dict:
    return {"accuracy": round(result["accuracy"], 4), "macro_f1": round(result["macro_f1"], 4)}


def devset_row(devset: Path, workdir: Path, log, with_task_only: bool = True) -> dict:
    """The set's row; without `with_task_only` its task-only cells are null (half the time)."""
    project = make_project(workdir / devset.name)
    base = run_recipe(project, devset, RECIPES["foundation"], log)
    narrow = run_recipe(project, devset, RECIPES["task_only"], log) if with_task_only else None
    at10 = next(row for row in base["curve"] if row["labels_per_class"] == 10)
    narrow10 = narrow and next(row for row in narrow["curve"] if row["labels_per_class"] == 10)
    baselines = base["metrics"]["baselines"]
    return {
        "devset": devset.name, "classes": len(base["metrics"]["finetune"]["test"]["per_class"]),
        "at_10_per_class": {"foundation": scores(at10["pretrained"]),
                            "foundation_gpt_alone": scores(at10["pretrained_gpt_alone"]),
                            "task_only": narrow10 and scores(narrow10["pretrained"]),
                            "scratch": scores(at10["scratch"]), "tfidf_logreg": scores(at10["tfidf_logreg"])},
        "all_labels": {"foundation": scores(base["metrics"]["finetune"]["test"]),
                       "foundation_gpt_alone": scores(base["metrics"]["finetune"]["test_gpt_alone"]),
                       "task_only": narrow and scores(narrow["metrics"]["finetune"]["test"]),
                       "tfidf_logreg": scores(baselines["tfidf_logreg"]["test"])},
        "zero_shot": scores(baselines["zero_shot"]["test"]),
        "foundation_val_perplexity": round(base["metrics"]["pretrain"]["val_perplexity"], 1),
        "task_only_val_perplexity": narrow and round(narrow["metrics"]["pretrain"]["val_perplexity"], 1),
        "seconds": {"foundation": round(base["seconds"]), "task_only": narrow and round(narrow["seconds"])},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devsets", type=Path, default=ROOT.parent / "shared/devsets")
    parser.add_argument("--only", nargs="*", help="devset folder names (default: all)")
    parser.add_argument("--out", type=Path, default=ROOT / "reports/devsets.json")
    parser.add_argument("--no-task-only", action="store_true", help="only the foundation recipe (half the time)")
    parser.add_argument("--workdir", type=Path, help="keep the projects here, so a stopped run resumes from its "
                        "checkpoints (default: a temporary folder); they keep the code they were made with, so "
                        "empty it after changing the code")
    args = parser.parse_args()
    names = args.only or sorted(p.name for p in args.devsets.iterdir() if (p / "train.csv").exists())
    rows = json.loads(args.out.read_text()) if args.out.exists() else []
    rows = [row for row in rows if row["devset"] not in names]
    folder = (contextlib.nullcontext(args.workdir) if args.workdir
              else tempfile.TemporaryDirectory(prefix="gptpipe-devsets-"))
    with folder as workdir:
        for name in names:
            rows.append(devset_row(args.devsets / name, Path(workdir), lambda line: print(line, file=sys.stderr),
                                   with_task_only=not args.no_task_only))
            write_json_atomic(args.out, rows)
    print(json.dumps({"params": yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain"], "devsets": rows},
                     indent=2))


if __name__ == "__main__":
    main()
