"""What logging the training curves costs: the same pre-training steps with the curves logger (DVCLive, a row of
every curve per step, gradient norm and learning rate) and without, alternated in one run; prints JSON.

    python benchmarks/curves_overhead.py [--steps 40] [--repeats 3] [--d-model 256] [--batch-size 16]

A step is timed from one batch's start to the next's, so it includes what the logger does after the step;
`logging_share` is the time spent inside the logger and the curves callback per step, over the logged runs' mean
step; `run_seconds` the whole runs, the logger's start included.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch

from components.curves import StepLogger
from components.model import GPT, GPTConfig
from components.pretrain import LanguageModel, RandomWindows
from components.training import OptimizerCurves, cpu_has_fast_bf16, make_trainer, resolve_precision


class StepClock(L.Callback):
    def __init__(self):
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())


class Stopwatch:
    """Adds up the seconds spent in the wrapped methods."""

    def __init__(self):
        self.seconds = 0.0

    def wrap(self, owner: type, name: str) -> None:
        method = getattr(owner, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        setattr(owner, name, timed)


def train(config: GPTConfig, token_file: Path, batch_size: int, steps: int, precision: str,
          curves: Path | None) -> tuple[list[float], float]:
    """Per-step seconds of one pre-training run of `steps` + 1 steps, and the seconds of the whole run."""
    torch.manual_seed(0)
    train_cfg = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 1, "max_steps": steps,
                 "weight_decay": 0.1}
    module = LanguageModel(config.to_dict(), train_cfg, "benchmark")
    data = torch.utils.data.DataLoader(RandomWindows(token_file, "uint16", config.context_length, batch_size, 0),
                                       batch_size=None)
    clock = StepClock()
    with tempfile.TemporaryDirectory() as root:
        trainer = make_trainer(precision, Path(root), [clock], curves=curves, max_steps=steps + 1,
                               gradient_clip_val=1.0, limit_val_batches=0, enable_progress_bar=False,
                               enable_checkpointing=False)
        started = time.perf_counter()
        trainer.fit(module, data)
        seconds = time.perf_counter() - started
    return [later - earlier for earlier, later in zip(clock.starts, clock.starts[1:], strict=False)], seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps of each run left out of the timing")
    parser.add_argument("--repeats", type=int, default=3, help="runs with and without the logger, alternated")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    config = GPTConfig(vocab_size=args.vocab, context_length=args.context, n_layer=args.layers,
                       n_head=max(1, args.d_model // 64), d_model=args.d_model)
    logging = Stopwatch()
    logging.wrap(StepLogger, "log_metrics")
    logging.wrap(OptimizerCurves, "on_before_optimizer_step")
    steps, runs = {"with": [], "without": []}, {"with": [], "without": []}
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, args.vocab, 2_000_000, dtype=np.uint16).tofile(token_file)
        for repeat in range(args.repeats):
            for variant in (("with", "without") if repeat % 2 == 0 else ("without", "with")):
                curves = Path(tmp) / f"curves-{repeat}" if variant == "with" else None
                step_seconds, run_seconds = train(config, token_file, args.batch_size, args.steps, args.precision,
                                                  curves)
                steps[variant] += step_seconds[args.warmup:]
                runs[variant].append(run_seconds)
    median = {variant: statistics.median(seconds) for variant, seconds in steps.items()}
    logging_per_step = logging.seconds / (args.repeats * (args.steps + 1))
    print(json.dumps({
        "benchmark": "curves_overhead", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
        "precision": resolve_precision(args.precision), "n_params": GPT(config).num_params(non_embedding=False),
        "config": config.to_dict(), "batch_size": args.batch_size, "steps_per_run": args.steps,
        "repeats": args.repeats,
        "median_step_seconds": {variant: round(value, 4) for variant, value in median.items()},
        "mean_step_seconds": {variant: round(statistics.fmean(s), 4) for variant, s in steps.items()},
        "with_vs_without": round(median["with"] / median["without"], 4),
        "logging_ms_per_step": round(1000 * logging_per_step, 3),
        "logging_share": round(logging_per_step / statistics.fmean(steps["with"]), 4),
        "run_seconds": {variant: [round(s, 2) for s in seconds] for variant, seconds in runs.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
