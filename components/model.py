"""A compact GPT (pre-norm decoder, fused attention) and the classifier that wraps it.

One config describes the GPT this repository trains (LayerNorm, learned positions, GELU, biases, tied embeddings:
GPT-2's shape) and the published families it imports (Llama: RMSNorm, rotary positions, SwiGLU, grouped-query
attention, no biases; Qwen2: the same with q/k/v biases), the way LitGPT's one `Config` covers its families."""

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_model

from components.errors import InputError

KeyValues = tuple[torch.Tensor, torch.Tensor]  # one layer's attention keys and values, each (B, n_kv, T, hs)
Rotation = tuple[torch.Tensor, torch.Tensor]  # cos and sin of each position's rotary angles, (T, hs) or (B, 1, T, hs)


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 8192
    context_length: int = 256  # the window trained and read; with rotary positions, not a limit of the weights
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 256
    dropout: float = 0.0
    n_kv_head: int | None = None  # grouped-query attention: key/value heads shared by n_head / n_kv_head queries each
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = 1e-5
    positions: Literal["learned", "rotary"] = "learned"
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama 3.1's: factor, low/high_freq_factor, original_max_position_embeddings
    mlp: Literal["gelu", "swiglu"] = "gelu"  # GELU is the tanh form (GPT-2's gelu_new)
    mlp_hidden: int | None = None  # None: 4 x d_model
    bias: bool = True  # on every linear layer of attention and MLP
    qkv_bias: bool | None = None  # None: as `bias`; Qwen2 has biases on q, k, v only
    tie_embeddings: bool = True

    def __post_init__(self):
        problems = []
        if self.d_model % self.n_head:
            problems.append(f"d_model {self.d_model} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.kv_heads:
            problems.append(f"n_head {self.n_head} is not a multiple of n_kv_head {self.kv_heads}")
        if self.positions == "rotary" and self.head_dim % 2:
            problems.append(f"rotary positions need an even head size, not {self.head_dim}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def mlp_width(self) -> int:
        return self.mlp_hidden or 4 * self.d_model

    @property
    def qkv_biased(self) -> bool:
        return self.bias if self.qkv_bias is None else self.qkv_bias

    def to_dict(self) -> dict:
        return asdict(self)


def norm_layer(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps)


def rotary_frequencies(config: GPTConfig) -> torch.Tensor:
    """Inverse frequencies (hs / 2,) of rotary positions (Su et al. 2021), with Llama 3.1's rescaling of the low
    frequencies when `rope_scaling` is set (as transformers' `_compute_llama3_parameters`)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if not config.rope_scaling:
        return inv_freq
    scaling = config.rope_scaling
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelength = 2 * math.pi / inv_freq
    scaled = torch.where(wavelength > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(medium, smoothed, scaled)


def rotate(x: torch.Tensor, rotation: Rotation) -> torch.Tensor:
    """Rotary positions in the "rotate half" layout of Llama checkpoints: the first and second halves of each head
    are the pairs rotated, not interleaved neighbours."""
    cos, sin = rotation
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.kv_heads, config.head_dim
        self.qkv = nn.Linear(config.d_model, (self.n_head + 2 * self.n_kv_head) * self.head_dim, bias=config.qkv_biased)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor, rotation: Rotation | None = None, past: KeyValues | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KeyValues]:
        """`past`: keys and values of earlier tokens (batch 1 or B), which every new token may attend to, or, with
        `attn_mask` (B, 1, T, P + T; True where a token may look), those the mask allows."""
        B, T, C = x.shape
        kv_width = self.n_kv_head * self.head_dim
        q, k, v = self.qkv(x).split([C, kv_width, kv_width], dim=2)
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, nh, T, hs)
        k, v = (t.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2) for t in (k, v))  # (B, n_kv, T, hs)
        if rotation is not None:
            q, k = rotate(q, rotation), rotate(k, rotation)
        mask, causal = attn_mask, attn_mask is None
        if past is not None:
            P = past[0].size(2)
            k = torch.cat([past[0].expand(B, -1, -1, -1), k], dim=2)  # (B, n_kv, P + T, hs)
            v = torch.cat([past[1].expand(B, -1, -1, -1), v], dim=2)
            if mask is None:
                mask = torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(diagonal=P)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.proj(y.transpose(1, 2).reshape(B, T, C)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_width
        # SwiGLU (Shazeer 2020): silu(gate(x)) * up(x); the GELU MLP has no gate.
        self.gate = nn.Linear(config.d_model, hidden, bias=config.bias) if config.mlp == "swiglu" else None
        self.up = nn.Linear(config.d_model, hidden, bias=config.bias)
        self.down = nn.Linear(hidden, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(self.up(x), approximate="tanh") if self.gate is None else F.silu(self.gate(x)) * self.up(x)
        return self.dropout(self.down(hidden))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_attn = norm_layer(config)
        self.attn = CausalSelfAttention(config)
        self.ln_mlp = norm_layer(config)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, rotation: Rotation | None = None, past: KeyValues | None = None,
                attn_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, KeyValues]:
        attended, cache = self.attn(self.ln_attn(x), rotation, past, attn_mask)
        x = x + attended
        return x + self.mlp(self.ln_mlp(x)), cache


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = norm_layer(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight  # tied input and output embeddings
        if config.positions == "rotary":
            self.register_buffer("inv_freq", rotary_frequencies(config), persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layer) so the residual stream's variance stays put.
        for name, param in self.named_parameters():
            if name.endswith(("attn.proj.weight", "mlp.down.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, counting the tied embedding once; nanoGPT leaves out position embeddings for MFU."""
        total = sum(p.numel() for p in self.parameters())
        return total - self.pos_emb.weight.numel() if non_embedding and self.pos_emb is not None else total

    def rotation(self, positions: torch.Tensor, dtype: torch.dtype) -> Rotation:
        """cos and sin of the rotary angles at `positions` (T,) or (B, T), computed in fp32, shaped to broadcast
        over heads."""
        angles = positions[..., None].float() * self.inv_freq.float()  # (..., T, hs / 2)
        angles = torch.cat([angles, angles], dim=-1)
        if positions.dim() == 2:
            angles = angles[:, None]  # (B, 1, T, hs)
        return angles.cos().to(dtype), angles.sin().to(dtype)

    def hidden_states(self, idx: torch.Tensor, past: list[KeyValues] | None = None,
                      positions: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, list[KeyValues]]:
        """Final states of `idx` (B, T), and each layer's keys and values; with `past` (from an earlier call on
        the tokens before `idx`), the new tokens continue that prefix without recomputing it. `positions` (B, T)
        and `attn_mask` (B, 1, T, P + T) let each row continue its own prefix from its own position."""
        start = past[0][0].size(2) if past else 0
        # Checked on sizes where it can be: a check on values would fix the length when exporting the graph (ONNX).
        last = start + idx.size(1) - 1 if positions is None else int(positions.max())
        if last >= self.config.context_length:
            raise ValueError(f"position {last} is past the context length {self.config.context_length}")
        if positions is None:
            positions = torch.arange(start, start + idx.size(1), device=idx.device)
        x = self.tok_emb(idx)  # (B, T, C)
        rotation = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            rotation = self.rotation(positions, x.dtype)
        x = self.drop(x)
        caches = []
        for layer, block in enumerate(self.blocks):
            x, cache = block(x, rotation, past[layer] if past else None, attn_mask)
            caches.append(cache)
        return self.ln_f(x), caches

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden_states(idx)[0])  # (B, T, vocab)

    def flops_per_token(self) -> int:
        """nanoGPT's estimate for one forward and backward pass: 6N + 12 L H Q T."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_head * (c.d_model // c.n_head) * c.context_length


class Classifier(nn.Module):
    """A pre-trained GPT body with a linear head over pooled token states.

    A text comes as one window (B, T) or as up to K consecutive windows (B, K, T), so that a text longer than the
    context is read whole; each window is pooled on its own and the windows' vectors are averaged."""

    def __init__(self, backbone: GPT, num_classes: int, pooling: str = "mean"):
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.head = nn.Linear(backbone.config.d_model, num_classes)
        nn.init.normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def pool(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """states (N, T, C), mask (N, T) -> (N, C)."""
        if self.pooling == "last":
            last = mask.sum(dim=1).long().clamp(min=1) - 1
            return states[torch.arange(states.size(0), device=states.device), last]
        weights = mask.unsqueeze(-1).to(states.dtype)
        return (states * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def combine(self, windows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Logits (B, classes) from each text's pooled windows (B, K, C) and their masks (B, K, T): a mean over
        windows weighted by their tokens, i.e. the mean over the whole text; `last` weighs them alike."""
        weight = mask.sum(dim=2) if self.pooling == "mean" else mask.any(dim=2)
        weight = weight.unsqueeze(-1).to(windows.dtype)
        return self.head((windows * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1))

    def forward(self, idx: torch.Tensor, mask: torch.Tensor, lm_loss: bool = False):
        """idx, mask (B, T) or (B, K, T), mask 1 for real tokens; returns logits (B, classes), and with `lm_loss`
        also the next-token loss on the same windows (GPT-1's auxiliary objective)."""
        batch = idx.size(0)
        flat_idx, flat_mask = idx.reshape(-1, idx.size(-1)), mask.reshape(-1, mask.size(-1))
        rows = flat_mask.any(dim=1).nonzero().squeeze(1)  # windows holding text; padding windows cost nothing
        states = self.backbone.hidden_states(flat_idx[rows])[0]  # (N, T, C)
        pooled = self.pool(states, flat_mask[rows])
        windows = pooled.new_zeros(flat_idx.size(0), pooled.size(1)).index_copy(0, rows, pooled)
        logits = self.combine(windows.view(batch, -1, pooled.size(1)), flat_mask.view(batch, -1, flat_mask.size(1)))
        if not lm_loss:
            return logits
        targets = flat_idx[rows][:, 1:].masked_fill(flat_mask[rows][:, 1:] == 0, -100)
        lm_logits = self.backbone.lm_head(states[:, :-1])
        return logits, F.cross_entropy(lm_logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update B A scaled by alpha / rank (Hu et al. 2021); B starts
    at zero, so training starts from the pre-trained function."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.T @ self.lora_b.T) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the update folded into its weight: the same function, no adapter code."""
        self.base.weight += (self.lora_b @ self.lora_a).to(self.base.weight.dtype) * self.scale
        return self.base


LORA_TARGETS = (("attn", "qkv"), ("attn", "proj"), ("mlp", "gate"), ("mlp", "up"), ("mlp", "down"))


def add_lora(model: GPT, rank: int, alpha: float) -> list[LoRALinear]:
    """Wrap every block's attention qkv/proj and MLP gate (SwiGLU only)/up/down in LoRA adapters; returns the
    adapters."""
    adapters = []
    for block in model.blocks:
        for part, name in LORA_TARGETS:
            parent = getattr(block, part)
            if getattr(parent, name) is None:
                continue
            adapter = LoRALinear(getattr(parent, name), rank, alpha)
            setattr(parent, name, adapter)
            adapters.append(adapter)
    return adapters


def merge_lora(model: GPT) -> GPT:
    """Fold every adapter into its base weight, so the state_dict has the plain GPT keys again."""
    for block in model.blocks:
        for part, name in LORA_TARGETS:
            parent = getattr(block, part)
            if isinstance(getattr(parent, name), LoRALinear):
                setattr(parent, name, getattr(parent, name).merged())
    return model


def load_weights(module: torch.nn.Module, file: Path) -> None:
    """Load safetensors weights (tied embeddings handled), refusing a file written for another shape."""
    try:
        load_model(module, file, strict=True)
    except RuntimeError as error:
        raise InputError(f"{file}: weights do not match the config beside them ({str(error).splitlines()[0]}); "
                         "the folder mixes two trainings, re-run the stage that wrote it") from None
