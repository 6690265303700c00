"""Training throughput of published checkpoints' shapes on this machine, against the shipped foundation's shape
measured in the same run: GPT-2 124M and SmolLM2-135M (random weights, their real widths, depths, heads and
vocabularies), each as continued pre-training (next-token loss, batch of `pretrain.batch_size` windows) and as
fine-tuning (a 5-class head on mean-pooled windows, batch of `finetune.batch_size`), every weight trained with
AdamW, at the window the pipeline trains (256). Prints JSON: tokens/s of each, the ratio to the shipped shape,
and what the training of `make run` on BBC News would take at that speed (its pre-training and fine-tuning
tokens: 150 steps and 376 steps of 16 windows of 256; evaluate's label-budget fine-tunes add about half again).

    python benchmarks/published_shapes.py [--steps 4]
"""

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F
from pretrain_throughput import plain_loop  # the same script folder: the plain next-token training loop

from components.model import GPT, Classifier, GPTConfig
from components.training import cpu_has_fast_bf16

WINDOW = 256
SHAPES = {
    "shipped foundation": GPTConfig(),
    "GPT-2 124M": GPTConfig(vocab_size=50257, context_length=WINDOW, n_layer=12, n_head=12, d_model=768),
    "SmolLM2-135M": GPTConfig(vocab_size=49152, context_length=WINDOW, n_layer=30, n_head=9, n_kv_head=3,
                              d_model=576, mlp="swiglu", mlp_hidden=1536, norm="rmsnorm", positions="rotary",
                              rope_theta=100000.0, bias=False),
}
BATCH = 16  # pretrain.batch_size and finetune.batch_size as shipped
MAKE_RUN_TOKENS = {"pretrain": 150 * BATCH * WINDOW, "finetune": 376 * BATCH * WINDOW}


def finetune_tokens_per_second(config: GPTConfig, steps: int, precision: str) -> float:
    torch.manual_seed(0)
    classifier = Classifier(GPT(config), num_classes=5)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=1e-4, weight_decay=0.01)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    idx = torch.randint(0, config.vocab_size, (BATCH, 1, WINDOW))
    mask, labels = torch.ones_like(idx), torch.randint(0, 5, (BATCH,))
    seconds = 0.0
    for step in range(steps + 1):  # the first step warms kernels and the allocator
        started = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(classifier(idx, mask).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += (time.perf_counter() - started) if step else 0.0
    return steps * BATCH * WINDOW / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    precision = "bf16-mixed" if cpu_has_fast_bf16() else "32-true"
    results = {}
    for name, config in SHAPES.items():
        torch.manual_seed(0)
        batches = [(x[:, :-1].contiguous(), x[:, 1:].contiguous())
                   for x in torch.randint(0, config.vocab_size, (args.steps + 1, BATCH, WINDOW + 1))]
        speeds = {"pretrain": plain_loop(config, batches, precision, warmup=1),
                  "finetune": finetune_tokens_per_second(config, args.steps, precision)}
        results[name] = {"parameters": sum(p.numel() for p in GPT(config).parameters()),
                         "tokens_per_s": {stage: round(speed) for stage, speed in speeds.items()},
                         "make_run_training_min": round(sum(MAKE_RUN_TOKENS[s] / v for s, v in speeds.items()) / 60, 1)}
    reference = results["shipped foundation"]["tokens_per_s"]
    for result in results.values():
        result["ratio_to_shipped"] = {stage: round(speed / reference[stage], 3)
                                      for stage, speed in result["tokens_per_s"].items()}
    print(json.dumps({"precision": precision, "batch": f"{BATCH} x {WINDOW}", "steps_timed": args.steps,
                      "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "load_average_1_5_15": [round(load, 2) for load in os.getloadavg()], "shapes": results},
                     indent=2))


if __name__ == "__main__":
    main()
