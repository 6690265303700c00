"""Peak memory of real next-token training steps on CPU against `components/memory.py`'s estimate. Each case runs
twice, each time in a fresh process: with glibc's default allocator (the process peak a run sees) and with
MALLOC_MMAP_THRESHOLD_=65536, which hands every freed large block back at once (the peak of the live tensors).
Prints JSON.

    python benchmarks/memory_estimate.py [--cases gpt2-124m-full llama-small-lora]
"""

import argparse
import json
import os
import resource
import subprocess
import sys

import psutil
import torch
import torch.nn.functional as F

from components.memory import GB, training_memory
from components.model import GPT, GPTConfig, add_lora

LLAMA_SMALL = dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384, n_kv_head=2, norm="rmsnorm",
                   positions="rotary", mlp="swiglu", mlp_hidden=1024, bias=False, tie_embeddings=False)
CASES = {  # model shape, precision, strategy, windows of 256 tokens a step
    "gpt2-124m-full": (dict(vocab_size=50257, n_layer=12, n_head=12, d_model=768), "32-true", "full", 8),
    "gpt2-small-bf16-full": (dict(vocab_size=8192, n_layer=6, n_head=6, d_model=384), "bf16-mixed", "full", 16),
    "llama-small-full": (LLAMA_SMALL, "32-true", "full", 16),
    "llama-small-lora": (LLAMA_SMALL, "32-true", "lora", 16),
}
STEPS = 2  # the second holds AdamW's moments


def measure(case: str) -> int:
    """Bytes the process grew by while building the model and training it for STEPS steps."""
    shape, precision, strategy, sequences = CASES[case]
    config = GPTConfig(context_length=256, **shape)
    x, y = torch.randint(0, config.vocab_size, (2, sequences, 256))
    before = psutil.Process().memory_info().rss
    model = GPT(config)
    if strategy == "lora":
        model.requires_grad_(False)
        add_lora(model, rank=8, alpha=16)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for _ in range(STEPS):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed"):
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def run(case: str, live_only: bool) -> float:
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536"} if live_only else {})}
    done = subprocess.run([sys.executable, __file__, "--measure", case], env=env, capture_output=True, text=True,
                          check=True)
    return int(done.stdout) / GB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--measure", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in this process
    args = parser.parse_args()
    if args.measure:
        print(measure(args.measure))
        return
    results = []
    for case in args.cases:
        shape, precision, strategy, sequences = CASES[case]
        need = training_memory(GPTConfig(context_length=256, **shape), precision, sequences, strategy)
        results.append({"case": case, "precision": precision, "strategy": strategy, "sequences": sequences,
                        "estimate_gb": round(need.total / GB, 2),
                        "process_peak_gb": round(run(case, live_only=False), 2),
                        "live_peak_gb": round(run(case, live_only=True), 2)})
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
