"""Pretrain: next-token prediction on the token stream, resumable after a crash or kill.

    python -m components.pretrain --tokens data/tokens --out models/pretrained
"""

import argparse
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import save_model
from torch.utils.data import DataLoader, IterableDataset
from torchmetrics import MeanMetric

from components import layout
from components.atomic import atomic_dir, write_bytes_atomic
from components.checkpoints import Foundation, resolve_foundation
from components.curves import publish_curves
from components.errors import InputError, exit_on_input_error
from components.memory import check_fits, training_memory
from components.model import GPT, GPTConfig, load_weights
from components.params import Params, PretrainParams, load_params
from components.registry import open_store
from components.training import TokenThroughput, adamw, make_trainer, resolve_precision, warmup_cosine

RESUME_ROOT = Path(".gptpipe/resume/pretrain")


class RandomWindows(IterableDataset):
    """Batches of random context windows from memory-mapped token files (one path, or a list of shards: a window
    never crosses a shard's end, and a shard is picked in proportion to the windows it holds). Global batch `i`
    depends only on (seed, i), so a resumed run continues with exactly the batches it would have seen; under data
    parallelism each of `world_size` ranks takes its own slice of it, so ranks never overlap and any number of
    processes trains on the same data as one."""

    def __init__(self, path: Path | list[Path], dtype: str, context: int, batch_size: int, seed: int,
                 first_batch: int = 0, rank: int = 0, num_batches: int | None = None, world_size: int = 1):
        self.path, self.dtype, self.context, self.batch_size = path, dtype, context, batch_size
        self.seed, self.first_batch, self.rank, self.num_batches = seed, first_batch, rank, num_batches
        self.world_size = world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        paths = list(self.path) if isinstance(self.path, list | tuple) else [self.path]
        shards = [np.memmap(path, dtype=self.dtype, mode="r") if Path(path).stat().st_size else np.empty(0, self.dtype)
                  for path in paths]
        # Global start i lies in the shard where the running count of possible starts first exceeds i.
        ends = np.cumsum([max(len(shard) - self.context - 1, 0) for shard in shards])
        if not len(ends) or ends[-1] == 0:
            raise ValueError(f"{paths[0]}: no shard holds {self.context + 1} tokens, one context window")
        offsets = np.arange(self.context + 1)
        index = self.first_batch
        while self.num_batches is None or index < self.first_batch + self.num_batches:
            rng = np.random.default_rng([self.seed, index])
            starts = rng.integers(0, ends[-1], size=self.batch_size)
            per_rank = self.batch_size // self.world_size
            starts = starts[self.rank * per_rank : (self.rank + 1) * per_rank]
            which = np.searchsorted(ends, starts, side="right")
            starts = starts - np.concatenate(([0], ends))[which]
            windows = np.empty((len(starts), self.context + 1), dtype=np.int64)  # (B, T+1)
            for shard in np.unique(which):
                rows = which == shard
                windows[rows] = shards[shard][starts[rows, None] + offsets]
            windows = torch.from_numpy(windows)
            yield windows[:, :-1], windows[:, 1:]
            index += 1


class LanguageModel(L.LightningModule):
    def __init__(self, config: dict, train: dict, data_fingerprint: str):
        super().__init__()
        self.save_hyperparameters(logger=False)  # resume compares these: a changed config or corpus starts fresh
        self.model = GPT(GPTConfig(**config))
        self.train_cfg = train
        self.val_loss = MeanMetric()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x).flatten(0, 1), y.flatten())
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_loss.update(F.cross_entropy(self.model(x).flatten(0, 1), y.flatten()))

    def on_validation_epoch_end(self) -> None:
        loss = self.val_loss.compute()  # over every rank's slice of the windows
        self.val_loss.reset()
        self.log_dict({"val_loss": loss, "val_perplexity": loss.exp()}, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        cfg = self.train_cfg
        # Weight decay on matrices only, as in GPT-2 / nanoGPT; biases and LayerNorm gains stay undecayed.
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg["weight_decay"]},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        clipped_in_mixed_precision = bool(cfg["grad_clip"]) and "mixed" in str(self.trainer.precision)
        optimizer = adamw(groups, self.device, clipped_in_mixed_precision, lr=cfg["learning_rate"], betas=(0.9, 0.95))
        floor = cfg["min_learning_rate"] / cfg["learning_rate"]
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, cfg["warmup_steps"], cfg["max_steps"], floor))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class WindowData(L.LightningDataModule):
    def __init__(self, tokens: Path, manifest: dict, context: int, batch_size: int, seed: int, val_batches: int):
        super().__init__()
        self.tokens, self.manifest, self.context = tokens, manifest, context
        self.batch_size, self.seed, self.val_batches = batch_size, seed, val_batches

    def windows(self, split: str, **kwargs) -> DataLoader:
        entry = self.manifest[split]
        files = [self.tokens / shard["file"] for shard in entry.get("shards", [entry])]
        data = RandomWindows(files, entry["dtype"], self.context, self.batch_size, self.seed, **kwargs)
        return DataLoader(data, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        # Read after Lightning restored a checkpoint: continue from the batch after the last one trained.
        trainer = self.trainer
        return self.windows("train", first_batch=trainer.global_step * trainer.accumulate_grad_batches,
                            rank=trainer.global_rank, world_size=trainer.world_size)

    def val_dataloader(self) -> DataLoader:
        # The same held-out windows at every validation, so the curve compares like with like.
        trainer = self.trainer
        return self.windows("val", num_batches=self.val_batches, first_batch=0, rank=trainer.global_rank,
                            world_size=trainer.world_size)


def check_corpus(manifest: dict, context: int, tokens: Path) -> None:
    for split in ("train", "val"):
        if manifest[split]["tokens"] <= context + 1:
            raise InputError(f"{tokens / manifest[split]['file']}: only {manifest[split]['tokens']} {split} tokens, "
                             f"fewer than model.context_length + 2 ({context + 2}); add text or lower the context")


def check_memory(config: GPTConfig, cfg: PretrainParams, key: str) -> None:
    """Stop before any weights load when a training step cannot fit in the memory free where it would run."""
    per_device = cfg.batch_size // (cfg.devices * cfg.num_nodes)
    precision = resolve_precision(cfg.precision)
    need = training_memory(config, precision, per_device)
    check_fits(need, f"pre-training a {need.parameters:,}-parameter GPT ({per_device} x "
               f"{config.context_length} tokens a step per device, {precision})",
               f"lower {key}.batch_size (raising {key}.accumulate_grad_batches keeps the batch), or run the stage "
               "where more memory is free (the gpu work pool)", processes=cfg.devices)


def read_checkpoint(path: Path) -> dict:
    """A Lightning checkpoint, unpickled with `weights_only`: a mirrored one may come from a shared bucket."""
    return torch.load(path, map_location="cpu", weights_only=True)


def save_pretrained(model: GPT, tokens: Path, summary: dict, out: Path) -> None:
    """The checkpoint folder describes itself: weights, model config, tokenizer and how it was trained."""
    with atomic_dir(out) as staging:
        save_model(model, str(staging / "model.safetensors"))
        (staging / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        shutil.copy(tokens / "tokenizer.json", staging / "tokenizer.json")
        (staging / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")


def resume_key(seed: int, config: GPTConfig, cfg: PretrainParams, data_fingerprint: str) -> str:
    """Names the resume folder: everything that changes what training computes; not how often it validates or
    checkpoints, nor how many devices share the (global) batch."""
    operational = {"val_every_n_steps", "val_batches", "checkpoint_every_n_steps", "checkpoint_uri", "compile",
                   "devices", "num_nodes", "strategy", "init_from"}
    identity = {"seed": seed, "model": config.to_dict(), "data": data_fingerprint,
                "train": cfg.model_dump(exclude=operational)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def restore_mirrored(mirror, key: str, last: Path) -> None:
    """Bring a checkpoint another worker mirrored to `last`, atomically: a kill mid-copy leaves no truncated file."""
    if last.exists() or mirror is None:
        return
    if (remote := mirror.get(key)) is not None:
        write_bytes_atomic(last, remote)


def train_language_model(seed: int, config: GPTConfig, cfg: PretrainParams, tokens: Path, manifest: dict,
                         resume_root: Path, curves: Path, init_weights: Path | None = None,
                         key: str = "pretrain") -> tuple[GPT, dict, L.Trainer]:
    """Next-token training on the token shards in `tokens`, from `init_weights` (a safetensors file) or from
    random weights; resumes from the last checkpoint of this exact configuration, its training curves too.
    Writes the curves to `curves`; returns the model, a summary and the trainer (for further validation).
    `key` is where `cfg` sits in params.yaml, for error messages."""
    # setup
    L.seed_everything(seed, workers=True, verbose=False)
    check_corpus(manifest, config.context_length, tokens)
    if cfg.max_steps:  # 0 steps only validates the starting weights
        check_memory(config, cfg, key)
    fingerprint = manifest["train"]["sha256"] + manifest["val"]["sha256"]
    if init_weights is not None:
        fingerprint += hashlib.sha256(init_weights.read_bytes()).hexdigest()
    module = LanguageModel(config.to_dict(), cfg.model_dump(), fingerprint)
    if init_weights is not None:
        load_weights(module.model, init_weights)
    resume_dir = resume_root / resume_key(seed, config, cfg, fingerprint)
    data = WindowData(tokens, manifest, config.context_length, cfg.batch_size, seed, cfg.val_batches)
    throughput = TokenThroughput(cfg.batch_size * config.context_length, module.model.flops_per_token())
    checkpoints = ModelCheckpoint(dirpath=resume_dir, filename="last", every_n_train_steps=cfg.checkpoint_every_n_steps,
                                  save_top_k=1, enable_version_counter=False, save_on_exception=False)
    mirror = open_store(cfg.checkpoint_uri) if cfg.checkpoint_uri else None

    def mirror_checkpoint(path: Path) -> None:
        mirror.upload(f"{resume_dir.name}/{path.name}", path)

    # the last checkpoint of this exact configuration, if one survived a crash here or, mirrored, on another worker
    last = resume_dir / "last.ckpt"
    restore_mirrored(mirror, f"{resume_dir.name}/last.ckpt", last)
    resumed_from = read_checkpoint(last)["global_step"] if last.exists() else 0
    trainer = make_trainer(cfg.precision, resume_dir, [throughput, checkpoints],
                           mirror=mirror_checkpoint if mirror else None,
                           curves=resume_dir / "curves" if cfg.max_steps else None, resume_at=resumed_from,
                           max_steps=max(cfg.max_steps, 1), accumulate_grad_batches=cfg.accumulate_grad_batches,
                           devices=cfg.devices, num_nodes=cfg.num_nodes, strategy=cfg.strategy,
                           val_check_interval=cfg.val_every_n_steps * cfg.accumulate_grad_batches,
                           check_val_every_n_epoch=None, limit_val_batches=cfg.val_batches,
                           gradient_clip_val=cfg.grad_clip or None)
    # loop; 0 steps keeps the starting weights as they are
    started = time.perf_counter()
    if cfg.max_steps:
        trainer.fit(torch.compile(module) if cfg.compile else module, datamodule=data,
                    ckpt_path=last if last.exists() else None, weights_only=True)
    train_loss = trainer.callback_metrics.get("train_loss")  # the last step's, as the curve's last row
    # validate (the curves hold training's validations: this one repeats the last, or falls off their schedule)
    trainer.loggers = []
    val_loss = trainer.validate(module, datamodule=data, verbose=False)[0]["val_loss"]
    summary = {"val_loss": val_loss, "val_perplexity": math.exp(val_loss),
               "train_loss": float(train_loss) if train_loss is not None else None,
               "tokens_per_second": throughput.tokens_per_second, "mfu": throughput.mfu,
               "n_params": module.model.num_params(non_embedding=False),
               "train_tokens": cfg.max_steps * cfg.accumulate_grad_batches * cfg.batch_size * config.context_length,
               "steps": cfg.max_steps, "resumed_from_step": resumed_from,
               "seconds": time.perf_counter() - started, "precision": resolve_precision(cfg.precision),
               "devices": trainer.world_size}
    if trainer.is_global_zero:
        publish_curves(resume_dir / "curves", curves)
        shutil.rmtree(resume_dir, ignore_errors=True)
    return module.model, summary, trainer


def pretrain(params: Params, tokens: Path, out: Path, curves: Path, foundation: Foundation | None = None,
             resume_root: Path = RESUME_ROOT) -> dict:
    """Pre-train on the task's token stream: continued from `foundation` (whose tokenizer encoded the stream;
    ULMFiT's second stage) or, when None, from random weights with the shape in `params.model`; the training
    curves go to `curves`."""
    manifest = json.loads((tokens / "manifest.json").read_text())
    if foundation is not None:
        config = GPTConfig(**json.loads((foundation.folder / "config.json").read_text()))
        init = foundation.folder / "model.safetensors"
    else:
        config = GPTConfig(vocab_size=manifest["vocab_size"], **params.model.model_dump())
        init = None
    model, summary, trainer = train_language_model(params.seed, config, params.pretrain, tokens, manifest,
                                                   resume_root, curves, init)
    summary["foundation"] = foundation.record if foundation else None
    if trainer.is_global_zero:  # under DDP every rank runs this function; one writes
        save_pretrained(model, tokens, summary, out)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--tokens", type=Path, default=layout.TOKENS)
    parser.add_argument("--out", type=Path, default=layout.PRETRAINED)
    parser.add_argument("--curves", type=Path, default=layout.PRETRAIN_CURVES)
    args = parser.parse_args()
    params = load_params(args.params)
    foundation = resolve_foundation(params.pretrain.init_from, params.registry.uri, params.model.context_length)
    summary = pretrain(params, args.tokens, args.out, args.curves, foundation)
    start = f"continued from {foundation.record['name']}" if foundation else "from scratch"
    print(f"pretrain ({start}, {params.pretrain.max_steps} steps): val perplexity {summary['val_perplexity']:.1f}, "
          f"{summary['tokens_per_second']:,.0f} tokens/s, {summary['n_params']:,} parameters")


if __name__ == "__main__":
    exit_on_input_error(main)
