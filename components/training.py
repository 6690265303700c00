"""What pre-training and fine-tuning share: precision choice, atomic checkpoints, throughput, the Trainer."""

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.io import TorchCheckpointIO

from components.atomic import atomic_file
from components.curves import curves_logger


def cpu_has_fast_bf16() -> bool:
    """bf16 autocast only pays on CPUs with bf16 matrix units (AMX, AVX512-BF16); elsewhere it is emulated and
    tens of times slower than fp32 (measured on an AMD EPYC without them: 1 vs 139 GFLOP/s)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


# On a CPU, below this many real tokens a step bf16 autocast costs more (every weight cast again each step) than
# its faster matmuls save: fine-tuning the shipped model, fp32 ran 1.17x bf16 on questions (16 x 15 tokens a step),
# level on news snippets (16 x 68), 0.66x on articles (16 x 256) (benchmarks/classify_throughput.py, AMX Xeon).
CPU_BF16_MIN_STEP_TOKENS = 1024


def resolve_precision(precision: str, step_tokens: int | None = None) -> str:
    """`auto`: bf16-mixed where the hardware runs it fast (on a CPU, only for steps of `step_tokens` real tokens
    or more, when known), else full fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    big_enough = step_tokens is None or step_tokens >= CPU_BF16_MIN_STEP_TOKENS
    return "bf16-mixed" if cpu_has_fast_bf16() and big_enough else "32-true"


def warmup_cosine(step: int, warmup: int, total: int, floor: float) -> float:
    """Learning-rate multiplier: linear warmup, then cosine decay to `floor`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(groups: list[dict], device: torch.device, clipped_in_mixed_precision: bool = False,
          **settings: Any) -> torch.optim.AdamW:
    """AdamW with PyTorch's fused kernel on the devices that have one (CPU and CUDA): the default implementation
    loops over the parameters in Python, which on short-text batches costs more than the forward and backward.
    Lightning cannot clip a fused optimizer's gradients under mixed precision (it unscales them inside its step),
    so such a run keeps the default implementation."""
    fused = device.type in ("cpu", "cuda") and not clipped_in_mixed_precision
    return torch.optim.AdamW(groups, fused=fused, **settings)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write a checkpoint beside its target and rename it into place, so a kill mid-write never leaves a
    truncated file where a resume would read it; then copy it to `mirror` (a folder or s3:// store), from
    which a retry on another machine resumes."""

    def __init__(self, mirror: Callable[[Path], None] | None = None):
        self.mirror = mirror

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        with atomic_file(path) as staging:
            torch.save(checkpoint, staging)
        if self.mirror:
            self.mirror(path)


class TokenThroughput(L.Callback):
    """Steady-state training tokens/s (the first `skip` steps warm caches and are left out), shown on the
    progress bar; MFU too where the device's peak FLOPs are known."""

    def __init__(self, tokens_per_batch: int, flops_per_token: int, skip: int = 5):
        self.tokens_per_batch = tokens_per_batch
        self.flops_per_token = flops_per_token
        self.skip = skip
        self.tokens = 0
        self.seconds = 0.0
        self.peak_flops: int | None = None
        self._batches = 0
        self._started: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dtype = torch.bfloat16 if "bf16" in str(trainer.precision) else torch.float32
        device_peak = get_available_flops(trainer.strategy.root_device, dtype)
        self.peak_flops = device_peak * trainer.world_size if device_peak else None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches <= self.skip or self._started is None:
            return
        self.seconds += time.perf_counter() - self._started
        self.tokens += self.tokens_per_batch  # the global batch: all ranks step together
        pl_module.log("train_tokens_per_second", self.tokens_per_second, prog_bar=True, on_step=True,
                      rank_zero_only=True)
        if self.mfu is not None:
            pl_module.log("train_mfu", self.mfu, prog_bar=True, on_step=True, rank_zero_only=True)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def mfu(self) -> float | None:
        if not self.peak_flops or not self.seconds:
            return None
        return self.tokens_per_second * self.flops_per_token / self.peak_flops


class OptimizerCurves(L.Callback):
    """Log the learning rate (of the last parameter group: the top one for discriminative rates) and the gradient
    norm before clipping, at each optimizer step."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        pl_module.log_dict({"train_grad_norm": torch.nn.utils.get_total_norm(grads),
                            "train_lr": float(optimizer.param_groups[-1]["lr"])}, on_step=True, on_epoch=False)


def make_trainer(precision: str, root: Path, callbacks: list[L.Callback], mirror: Callable[[Path], None] | None = None,
                 curves: Path | None = None, resume_at: int = 0, **kwargs: Any) -> L.Trainer:
    """The Trainer of both training stages; with `curves`, it logs training curves every step into that folder
    (continuing them from step `resume_at` when resuming from a checkpoint)."""
    if kwargs.get("enable_progress_bar", True):
        # tqdm redraws with carriage returns, which the flow's log streaming turns into periodic progress lines.
        callbacks = [*callbacks, TQDMProgressBar(refresh_rate=10)]
    if curves is not None:
        callbacks = [*callbacks, OptimizerCurves()]
    kwargs.setdefault("devices", 1)
    return L.Trainer(
        accelerator="auto",
        precision=resolve_precision(precision),
        default_root_dir=root,
        logger=curves_logger(curves, resume_at) if curves is not None else False,
        log_every_n_steps=1,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO(mirror)],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kwargs,
    )
