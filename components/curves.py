"""Training curves. Each training stage logs them through DVCLive's Lightning logger into a folder of its own:
`metrics.json` (the last values) and `plots/metrics/{train,val}/NAME.tsv` (columns `step` and the value, one row
per logged optimizer step), which dvc.yaml declares as metrics and plots. A run resumed from a checkpoint keeps the
rows up to the checkpoint's step and continues them. `plot_curves` draws a run's curves as one PNG.
"""

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # stages run headless
import matplotlib.pyplot as plt
import polars as pl
from dvclive.fabric import DVCLiveLogger as FabricLogger
from dvclive.lightning import DVCLiveLogger

from components.atomic import atomic_dir, write_bytes_atomic
from components.figures import save_figure

VALUE_FOLDER = Path("plots/metrics")


class StepLogger(DVCLiveLogger):
    """DVCLive's Lightning logger, each row at the number of optimizer steps done (Lightning passes that number
    minus one, and DVCLive takes a first step of 0 for none given); without Lightning's `epoch` column; and
    writing the summary (`metrics.json`) at each validation and at the end rather than at every step, where
    DVCLive would also re-read every curve file, a cost that grows with the run."""

    def log_metrics(self, metrics, step=None, sync=False) -> None:  # Lightning's signature
        values = {name: value for name, value in metrics.items() if name != "epoch"}
        if values:
            FabricLogger.log_metrics(self, values, None if step is None else step + 1,
                                     sync=sync or any(name.startswith("val") for name in values))


def curves_logger(folder: Path, resume_at: int = 0) -> StepLogger:
    """A logger writing into `folder`: afresh, or, resuming from a checkpoint at step `resume_at`, continuing the
    curves there after dropping the rows logged past that step (the run trains those steps again)."""
    if resume_at:
        truncate_curves(folder, resume_at)
    # dvcyaml=False: dvc.yaml declares the folder itself; save_dvc_exp=False: under `dvc exp run` the experiment
    # is DVC's, and under `dvc repro` or on its own a run makes none.
    return StepLogger(dir=str(folder), resume=bool(resume_at), save_dvc_exp=False, dvcyaml=False)


def read_curves(folder: Path) -> dict[str, pl.DataFrame]:
    """`{"train/loss": frame with columns step and loss, ...}` for every curve in a curves folder."""
    values = folder / VALUE_FOLDER
    return {path.relative_to(values).with_suffix("").as_posix(): pl.read_csv(path, separator="\t")
            for path in sorted(values.rglob("*.tsv"))}


def truncate_curves(folder: Path, last_step: int) -> None:
    """Drop the rows of steps after `last_step`, each file rewritten in one rename."""
    for name, frame in read_curves(folder).items():
        kept = frame.filter(pl.col("step") <= last_step)
        if kept.height < frame.height:
            write_bytes_atomic(folder / VALUE_FOLDER / f"{name}.tsv", kept.write_csv(separator="\t").encode())


def publish_curves(work: Path, out: Path) -> None:
    """Copy the curves written in `work` to `out` in one rename (empty curves where nothing was trained)."""
    with atomic_dir(out) as staging:
        if work.is_dir():
            shutil.copytree(work, staging, dirs_exist_ok=True)
        (staging / VALUE_FOLDER).mkdir(parents=True, exist_ok=True)
        if not (staging / "metrics.json").exists():
            (staging / "metrics.json").write_text("{}\n")


def _draw(ax, curves: dict[str, pl.DataFrame], names: dict[str, str], first_color: int = 0) -> list:
    """Draw those of `names` ({curve: label}) that were logged; a curve of a few points gets markers."""
    lines = []
    for index, (name, label) in enumerate(names.items()):
        if name in curves:
            frame = curves[name]
            lines += ax.plot(frame["step"], frame[frame.columns[-1]], "o-" if frame.height < 30 else "-",
                             markersize=3, label=label, color=f"C{first_color + index}")
    return lines


def plot_curves(stages: dict[str, Path], path: Path) -> None:
    """One row per training stage (`{"continued pre-training": folder, ...}`), against optimizer steps: train and
    validation loss; the validation scores (perplexity, or accuracy and macro-F1); gradient norm before clipping,
    with the learning rate on a second axis."""
    fig, axes = plt.subplots(len(stages), 3, figsize=(13, 3.3 * len(stages)), squeeze=False, sharex="row")
    for (loss_ax, val_ax, opt_ax), (stage, folder) in zip(axes, stages.items(), strict=True):
        curves = read_curves(folder) if (folder / VALUE_FOLDER).is_dir() else {}
        lr_ax = opt_ax.twinx()
        panels = (
            (loss_ax, "loss", _draw(loss_ax, curves, {"train/loss": "train", "val/loss": "validation"})),
            (val_ax, "validation", _draw(val_ax, curves, {"val/perplexity": "perplexity", "val/accuracy": "accuracy",
                                                          "val/macro_f1": "macro-F1"})),
            (opt_ax, "optimizer", _draw(opt_ax, curves, {"train/grad_norm": "gradient norm"})
             + _draw(lr_ax, curves, {"train/lr": "learning rate"}, first_color=1)),
        )
        for ax, title, lines in panels:
            ax.set_title(f"{stage}: {title}", fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
            if lines:
                ax.legend(lines, [line.get_label() for line in lines], fontsize=8)
            else:
                ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    save_figure(fig, path)
