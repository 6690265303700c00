"""Will it fit: the memory a training step needs, estimated from the model's config before any weights load, and
the memory free where it would run; a run that cannot fit stops before it starts."""

import math
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import psutil
import torch

from components.errors import InputError
from components.model import GPTConfig

Strategy = Literal["full", "ulmfit", "lora", "linear_probe"]  # finetune.strategy; pre-training trains in full
MARGIN = 0.2  # allocator fragmentation, the optimizer step's temporaries, kernels' workspaces
GB = 1e9
# A container's memory limit, usage, and statistics with the reclaimable page cache's key: cgroup v2, then v1.
CGROUP_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)


def block_linears(config: GPTConfig) -> list[tuple[int, int, bool]]:
    """(inputs, outputs, bias) of each linear layer of one block: attention qkv and output, MLP (gate), up, down."""
    d, hidden = config.d_model, config.mlp_width
    qkv = (d, (config.n_head + 2 * config.kv_heads) * config.head_dim, config.qkv_biased)
    mlp = [(d, hidden, config.bias)] * (2 if config.mlp == "swiglu" else 1) + [(hidden, d, config.bias)]
    return [qkv, (d, d, config.bias), *mlp]


def parameter_count(config: GPTConfig) -> int:
    """Parameters of `GPT(config)`, a tied embedding counted once, from the shapes alone (nothing allocated)."""
    norm = config.d_model * (2 if config.norm == "layernorm" else 1)  # LayerNorm has a bias, RMSNorm a gain only
    block = sum(n_in * n_out + (n_out if bias else 0) for n_in, n_out, bias in block_linears(config)) + 2 * norm
    embeddings = config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    positions = config.context_length * config.d_model if config.positions == "learned" else 0
    return embeddings + positions + config.n_layer * block + norm


def lora_parameter_count(config: GPTConfig, rank: int) -> int:
    """Parameters of the adapters `add_lora` puts on every linear layer of every block."""
    return config.n_layer * rank * sum(n_in + n_out for n_in, n_out, _ in block_linears(config))


def keeps_scores(config: GPTConfig, precision: str) -> bool:
    """Whether attention may take PyTorch's math path, which keeps every head's s x s scores for the backward
    pass: with dropout (the CPU's fused kernel has none; counted on GPUs too) or with grouped-query attention in
    fp32 (the GPU's flash kernel is 16-bit only, its memory-efficient one has no GQA). The fused kernels keep
    O(s) per head."""
    return config.dropout > 0 or (config.kv_heads != config.n_head and precision == "32-true")


def layer_activations(config: GPTConfig, sequences: int, value_bytes: int, scores: bool) -> int:
    """Bytes one block keeps for the backward pass: Korthikanti et al. 2022's 34sbh + 5as^2b (16-bit values,
    1-byte dropout masks) written for this block's shapes: the inputs of both norms, of qkv, MLP and output
    projection, Q, K, V and the attention output, the MLP's hidden values (GELU: 2, SwiGLU: 4 of its width),
    dropout masks, and on the math path the fp32 scores (with dropout, their mask and dropped copy)."""
    s, b, h, a = config.context_length, sequences, config.d_model, config.n_head
    kv = h if scores else config.kv_heads * config.head_dim  # the math path keeps K and V repeated to every head
    hidden = (4 if config.mlp == "swiglu" else 2) * config.mlp_width
    values = s * b * (7 * h + 2 * kv + hidden) * value_bytes
    masks = 2 * s * b * h if config.dropout else 0
    score_bytes = a * s * s * b * (4 + (5 if config.dropout else 0)) if scores else 0
    return values + masks + score_bytes


@dataclass(frozen=True)
class MemoryEstimate:
    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return round((self.weights + self.gradients + self.optimizer + self.activations) * (1 + MARGIN))


def training_memory(config: GPTConfig, precision: str, sequences: int, strategy: Strategy = "full",
                    lora_rank: int = 8, classes: int = 0, lm_loss: bool = True) -> MemoryEstimate:
    """Peak bytes of one training step on one device: `sequences` windows of `config.context_length` tokens per
    micro-step, under a resolved Lightning precision; `classes` adds a classifier head, `lm_loss` the next-token
    logits. Weights, gradients and AdamW's two moments in the weights' dtype (fp32 under mixed precision, which
    adds autocast's 16-bit copy of the weights), activations in the compute dtype, plus MARGIN."""
    weight_bytes = 2 if precision.endswith("16-true") else 4
    value_bytes = 4 if precision == "32-true" else 2
    head = classes * (config.d_model + 1)
    adapters = lora_parameter_count(config, lora_rank) if strategy == "lora" else 0
    parameters = parameter_count(config) + head + adapters
    trainable = {"full": parameters, "ulmfit": parameters, "lora": adapters + head, "linear_probe": head}[strategy]
    tokens = sequences * config.context_length
    # A frozen body (linear probe) keeps nothing for the backward pass: one block's values at a time.
    layers = 1 if strategy == "linear_probe" else config.n_layer
    activations = (layers * layer_activations(config, sequences, value_bytes, keeps_scores(config, precision))
                   + 2 * tokens * config.d_model * value_bytes)  # the final norm's and the head's inputs
    if lm_loss:  # logits, their fp32 log-softmax kept for the backward pass, and its fp32 gradient
        activations += tokens * config.vocab_size * (value_bytes + 8)
    mixed_copy = 2 * parameters if precision.endswith("-mixed") else 0
    return MemoryEstimate(parameters=parameters, weights=parameters * weight_bytes + mixed_copy,
                          gradients=trainable * weight_bytes, optimizer=2 * trainable * weight_bytes,
                          activations=activations)


def cgroup_free() -> float:
    """A container's memory limit less its working set (usage without the reclaimable page cache, as `docker
    stats` counts it); infinite outside a limited cgroup."""
    for limit_file, usage_file, stat_file, cache_key in CGROUP_FILES:
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
            stat = dict(line.split() for line in Path(stat_file).read_text().splitlines())
        except OSError:
            continue
        return math.inf if limit == "max" else int(limit) - usage + int(stat.get(cache_key, 0))
    return math.inf


def free_memory() -> tuple[int, str]:
    """Bytes free where Lightning would train, and that place in words: the GPU, else this machine's RAM (the
    container's limit when lower)."""
    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], f"the GPU ({torch.cuda.get_device_name()})"
    free = min(psutil.virtual_memory().available, cgroup_free())
    return int(free), f"this machine's RAM ({platform.machine()} CPU)"


def check_fits(need: MemoryEstimate, what: str, fix: str, processes: int = 1) -> None:
    """Stop with an InputError naming `what`, the need, the memory free and `fix` when `need` does not fit;
    `processes` training processes on this machine share its RAM (each GPU is a process's own)."""
    if int(os.environ.get("LOCAL_RANK", 0)):
        return  # the machine's first process checks for all: the others start while it already holds its share
    free, device = free_memory()
    total = need.total * (1 if torch.cuda.is_available() else processes)
    if total > free:
        raise InputError(f"{what} needs about {total / GB:,.1f} GB; {device} has {free / GB:,.1f} GB free: {fix}")
