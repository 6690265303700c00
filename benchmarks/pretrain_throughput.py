"""Pre-training throughput: the project's Lightning step against a plain PyTorch loop over the same model,
batch and precision, measured in the same run; prints JSON.

    python benchmarks/pretrain_throughput.py [--steps 20] [--d-model 256] [--precisions 32-true bf16-mixed]
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from components.model import GPT, GPTConfig
from components.pretrain import LanguageModel, RandomWindows
from components.training import TokenThroughput, cpu_has_fast_bf16, make_trainer


def plain_loop(config: GPTConfig, batches: list, precision: str, warmup: int) -> float:
    torch.manual_seed(0)
    model = GPT(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    tokens, seconds = 0, 0.0
    for index, (x, y) in enumerate(batches):
        started = time.perf_counter()
        with autocast:
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if index >= warmup:
            seconds += time.perf_counter() - started
            tokens += x.numel()
    return tokens / seconds


def lightning_path(config: GPTConfig, token_file: Path, batch_size: int, steps: int, precision: str,
                   warmup: int) -> float:
    torch.manual_seed(0)
    train = {"learning_rate": 1e-3, "min_learning_rate": 1e-4, "warmup_steps": 1, "max_steps": steps,
             "weight_decay": 0.1}
    module = LanguageModel(config.to_dict(), train, "benchmark")
    data = torch.utils.data.DataLoader(RandomWindows(token_file, "uint16", config.context_length, batch_size, 0),
                                       batch_size=None)
    throughput = TokenThroughput(batch_size * config.context_length, module.model.flops_per_token(), skip=warmup)
    with tempfile.TemporaryDirectory() as root:
        trainer = make_trainer(precision, Path(root), [throughput], max_steps=steps, gradient_clip_val=1.0,
                               limit_val_batches=0, enable_progress_bar=False, enable_checkpointing=False)
        trainer.fit(module, data)
    return throughput.tokens_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    config = GPTConfig(vocab_size=args.vocab, context_length=args.context, n_layer=args.layers,
                       n_head=max(1, args.d_model // 64), d_model=args.d_model)
    with tempfile.TemporaryDirectory() as tmp:
        token_file = Path(tmp) / "tokens.bin"
        np.random.default_rng(0).integers(0, args.vocab, 2_000_000, dtype=np.uint16).tofile(token_file)
        windows = RandomWindows(token_file, "uint16", args.context, args.batch_size, 0, num_batches=args.steps)
        batches = list(windows)
        results = {}
        for precision in args.precisions:
            plain = plain_loop(config, batches, precision, args.warmup)
            project = lightning_path(config, token_file, args.batch_size, args.steps, precision, args.warmup)
            results[precision] = {"plain_tokens_per_second": round(plain, 1),
                                  "lightning_tokens_per_second": round(project, 1),
                                  "lightning_vs_plain": round(project / plain, 3)}
    if "32-true" in results and "bf16-mixed" in results:
        results["bf16_vs_fp32"] = round(results["bf16-mixed"]["lightning_tokens_per_second"]
                                        / results["32-true"]["lightning_tokens_per_second"], 3)
    print(json.dumps({"benchmark": "pretrain_throughput", "machine": platform.processor() or platform.machine(),
                      "threads": torch.get_num_threads(), "cpu_fast_bf16": cpu_has_fast_bf16(),
                      "n_params": GPT(config).num_params(non_embedding=False), "config": config.to_dict(),
                      "batch_size": args.batch_size, "steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
