"""torch.compile against eager on this machine, compile time included: pre-training steps (one fixed shape) and
fine-tuning steps (per-batch padding, so the shapes vary), the shipped foundation's shape; prints JSON.

    python benchmarks/compile_speed.py [--steps 30]
"""

import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

from components.model import GPT, Classifier, GPTConfig
from components.training import cpu_has_fast_bf16


def timed_steps(model: torch.nn.Module, step, batches: list) -> dict:
    """Seconds of the first step (where compiling happens) and tokens/s of the rest."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_has_fast_bf16())
    seconds, tokens = [], 0
    for batch in batches:
        started = time.perf_counter()
        with autocast:
            loss = step(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
        tokens += batch[-1]
    steady = sum(seconds[1:])
    return {"first_step_seconds": round(seconds[0], 2), "total_seconds": round(sum(seconds), 2),
            "steady_tokens_per_second": round((tokens - batches[0][-1]) / steady)}


def pretrain_step(model: GPT, batch) -> torch.Tensor:
    x, y, _ = batch
    return F.cross_entropy(model(x).flatten(0, 1).float(), y.flatten())


def finetune_step(model: Classifier, batch) -> torch.Tensor:
    ids, mask, labels, _ = batch
    return F.cross_entropy(model(ids, mask).float(), labels)


def compare(make_model, step, batches: list, dynamic: bool | None) -> dict:
    torch.manual_seed(0)
    eager = timed_steps(make_model(), step, batches)
    torch.manual_seed(0)
    compiled = timed_steps(torch.compile(make_model(), dynamic=dynamic), step, batches)
    return {"eager": eager, "compiled": compiled,
            "steady_speedup": round(compiled["steady_tokens_per_second"] / eager["steady_tokens_per_second"], 2),
            "total_speedup": round(eager["total_seconds"] / compiled["total_seconds"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    config = GPTConfig()
    generator = torch.Generator().manual_seed(0)
    pretrain_batches = []
    for _ in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (16, config.context_length + 1), generator=generator)
        pretrain_batches.append((ids[:, :-1], ids[:, 1:], ids[:, :-1].numel()))
    finetune_batches = []
    for _ in range(args.steps):  # short texts padded per batch: every batch its own width
        width = int(torch.randint(16, 96, (1,), generator=generator))
        ids = torch.randint(0, config.vocab_size, (16, 1, width), generator=generator)
        finetune_batches.append((ids, torch.ones_like(ids), torch.randint(0, 4, (16,), generator=generator),
                                 ids.numel()))
    print(json.dumps({
        "machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
        "bf16": cpu_has_fast_bf16(), "steps": args.steps,
        "pretrain": compare(lambda: GPT(config), pretrain_step, pretrain_batches, dynamic=None),
        "finetune": compare(lambda: Classifier(GPT(config), 4), finetune_step, finetune_batches, dynamic=True),
    }, indent=2))


if __name__ == "__main__":
    main()
