"""The Hugging Face layout of the families this GPT can hold (GPT-2, Llama, Qwen2): their config.json read into a
`GPTConfig` and written back, and their weight names mapped onto this model's and back."""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from components.errors import InputError
from components.model import GPTConfig

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class Family:
    architecture: str  # the transformers class a checkpoint of this family names in config.json
    model_type: str
    prefix: str  # before the body's weight names; the output head has none
    layer: str  # a block's weight names start with this, numbered
    modules: dict[str, tuple[str, ...]]  # this model's module -> the family's modules, concatenated on the output dim
    conv1d: bool = False  # GPT-2 stores its linear layers as Conv1D, weights (in, out)


LLAMA_MODULES = {
    "tok_emb": ("embed_tokens",), "ln_f": ("norm",), "ln_attn": ("input_layernorm",),
    "ln_mlp": ("post_attention_layernorm",), "attn.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.proj": ("self_attn.o_proj",), "mlp.gate": ("mlp.gate_proj",), "mlp.up": ("mlp.up_proj",),
    "mlp.down": ("mlp.down_proj",),
}
FAMILIES = {
    "gpt2": Family("GPT2LMHeadModel", "gpt2", "transformer.", "h.", {
        "tok_emb": ("wte",), "pos_emb": ("wpe",), "ln_f": ("ln_f",), "ln_attn": ("ln_1",), "ln_mlp": ("ln_2",),
        "attn.qkv": ("attn.c_attn",), "attn.proj": ("attn.c_proj",), "mlp.up": ("mlp.c_fc",),
        "mlp.down": ("mlp.c_proj",)}, conv1d=True),
    "llama": Family("LlamaForCausalLM", "llama", "model.", "layers.", LLAMA_MODULES),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", "model.", "layers.", LLAMA_MODULES),
}
SUPPORTED = ", ".join(family.architecture for family in FAMILIES.values())
# Buffers some published files carry beside the weights: GPT-2's causal masks, old Llama files' rotary frequencies.
SKIPPED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def family_named(hf: dict, where: str) -> str:
    """The family a Hugging Face config.json describes, by its architecture (or model type)."""
    names = hf.get("architectures") or []
    for name, family in FAMILIES.items():
        if family.architecture in names or (not names and hf.get("model_type") == family.model_type):
            return name
    found = ", ".join(names) or hf.get("model_type") or "none named"
    raise InputError(f"{where}: architecture {found} is not supported; this pipeline imports {SUPPORTED}")


def rope_settings(hf: dict, where: str) -> tuple[float, dict | None]:
    """Rotary theta and Llama 3.1 scaling from either config layout: `rope_theta` + `rope_scaling` (older files)
    or `rope_parameters` (transformers 5)."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise InputError(f"{where}: partial_rotary_factor is not supported; every head dimension must rotate")
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise InputError(f"{where}: rope type {kind!r} is not supported (default and llama3 are)")
    return theta, {"factor": float(rope["factor"]), "low_freq_factor": float(rope["low_freq_factor"]),
                   "high_freq_factor": float(rope["high_freq_factor"]),
                   "original_max_position_embeddings": int(rope.get("original_max_position_embeddings",
                                                                    hf["max_position_embeddings"]))}


def gpt_config(hf: dict, family: str, context_length: int, where: str) -> GPTConfig:
    """This model's config for a Hugging Face one; the window is `context_length` or the checkpoint's positions,
    whichever is smaller."""
    if family == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise InputError(f"{where}: activation_function {hf['activation_function']!r} is not supported; GPT-2 "
                             "checkpoints use gelu_new")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise InputError(f"{where}: attention scaling other than 1/sqrt(head size) is not supported")
        return GPTConfig(vocab_size=hf["vocab_size"], context_length=min(context_length, hf["n_positions"]),
                         n_layer=hf["n_layer"], n_head=hf["n_head"], d_model=hf["n_embd"], mlp_hidden=hf.get("n_inner"),
                         norm_eps=hf.get("layer_norm_epsilon", 1e-5),
                         tie_embeddings=hf.get("tie_word_embeddings", True))
    if hf.get("hidden_act", "silu") != "silu":
        raise InputError(f"{where}: hidden_act {hf['hidden_act']!r} is not supported; Llama-family MLPs use silu")
    heads, width = hf["num_attention_heads"], hf["hidden_size"]
    if hf.get("head_dim") not in (None, width // heads):
        raise InputError(f"{where}: head_dim {hf['head_dim']} differs from hidden_size / num_attention_heads; "
                         "not supported")
    if hf.get("use_sliding_window"):
        raise InputError(f"{where}: sliding-window attention is not supported; set use_sliding_window false")
    if hf.get("attention_bias", False) != hf.get("mlp_bias", False):
        raise InputError(f"{where}: attention_bias and mlp_bias differ; not supported")
    theta, scaling = rope_settings(hf, where)
    return GPTConfig(vocab_size=hf["vocab_size"], context_length=min(context_length, hf["max_position_embeddings"]),
                     n_layer=hf["num_hidden_layers"], n_head=heads, d_model=width,
                     n_kv_head=hf.get("num_key_value_heads") or heads, norm="rmsnorm",
                     norm_eps=hf.get("rms_norm_eps", 1e-6), positions="rotary", rope_theta=theta, rope_scaling=scaling,
                     mlp="swiglu", mlp_hidden=hf["intermediate_size"], bias=hf.get("attention_bias", False),
                     qkv_bias=True if family == "qwen2" else None,
                     tie_embeddings=hf.get("tie_word_embeddings", False))


def family_of(config: GPTConfig) -> str:
    """The Hugging Face family whose layout holds this model, or an InputError when none does."""
    layers = (config.norm, config.positions, config.mlp)
    if layers == ("layernorm", "learned", "gelu") and config.bias and config.qkv_bias is not False \
            and config.kv_heads == config.n_head:
        return "gpt2"
    if layers == ("rmsnorm", "rotary", "swiglu"):
        if config.qkv_bias and not config.bias:
            return "qwen2"
        if config.qkv_bias in (None, config.bias):
            return "llama"
    raise InputError(f"a model with {', '.join(layers)}, bias {config.bias} and q/k/v bias {config.qkv_bias} fits "
                     f"no Hugging Face family this pipeline writes ({SUPPORTED})")


def hf_config(config: GPTConfig, family: str, special: dict[str, int | None]) -> dict:
    """The Hugging Face config.json of this model; `special` holds bos/eos/pad token ids."""
    common = {"architectures": [FAMILIES[family].architecture], "model_type": FAMILIES[family].model_type,
              "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
              "torch_dtype": "float32", **{f"{role}_token_id": token for role, token in special.items()}}
    if family == "gpt2":
        return {**common, "n_positions": config.context_length, "n_embd": config.d_model, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": config.mlp_hidden, "activation_function": "gelu_new",
                "layer_norm_epsilon": config.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    rope = {"rope_type": "llama3" if config.rope_scaling else "default", "rope_theta": config.rope_theta,
            **(config.rope_scaling or {})}
    extra = {"attention_bias": config.bias, "mlp_bias": config.bias} if family == "llama" else {}
    return {**common, **extra, "hidden_size": config.d_model,
            "intermediate_size": config.mlp_width, "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": config.kv_heads, "max_position_embeddings": config.context_length,
            "rms_norm_eps": config.norm_eps, "hidden_act": "silu", "rope_theta": config.rope_theta,
            "rope_parameters": rope, **({"rope_scaling": rope} if config.rope_scaling else {})}


def weight_names(model_keys: list[str], family: str) -> dict[str, tuple[str, ...]]:
    """Each of this model's weight names -> the family's names whose tensors it holds, in concatenation order."""
    spec = FAMILIES[family]
    names = {}
    for key in model_keys:
        module, _, kind = key.rpartition(".")
        if module == "lm_head":
            names[key] = (key,)
            continue
        path = module.split(".")
        if path[0] == "blocks":
            layer, inner = path[1], ".".join(path[2:])
            names[key] = tuple(f"{spec.prefix}{spec.layer}{layer}.{theirs}.{kind}" for theirs in spec.modules[inner])
        else:
            names[key] = tuple(f"{spec.prefix}{theirs}.{kind}" for theirs in spec.modules[module])
    return names


def is_conv1d_weight(family: str, key: str, tensor: torch.Tensor) -> bool:
    return FAMILIES[family].conv1d and key.startswith("blocks.") and key.endswith(".weight") and tensor.dim() == 2


def from_hf(tensors: dict[str, torch.Tensor], config: GPTConfig, family: str, model_keys: list[str],
            where: str) -> dict[str, torch.Tensor]:
    """This model's state dict from a family's tensors (prefix optional, as GPT-2's original files lack it)."""
    prefix = FAMILIES[family].prefix
    tensors = {(name if name.startswith(prefix) or name == "lm_head.weight" else prefix + name): tensor
               for name, tensor in tensors.items() if not name.endswith(SKIPPED_SUFFIXES)}
    if config.tie_embeddings:
        model_keys = [key for key in model_keys if key != "lm_head.weight"]
    names = weight_names(model_keys, family)
    missing = [name for theirs in names.values() for name in theirs if name not in tensors]
    unused = sorted(set(tensors) - {name for theirs in names.values() for name in theirs} - {"lm_head.weight"})
    if missing or unused:
        detail = f"missing {missing[:3]}" if missing else f"unexpected {unused[:3]}"
        raise InputError(f"{where}: the weights do not match config.json ({detail}); the folder mixes two models")
    state = {}
    for key, theirs in names.items():
        parts = [tensors[name].T if is_conv1d_weight(family, key, tensors[name]) else tensors[name] for name in theirs]
        state[key] = torch.cat(parts).float() if len(parts) > 1 else parts[0].float()
    if "pos_emb.weight" in state:  # the window may be shorter than the checkpoint's positions
        state["pos_emb.weight"] = state["pos_emb.weight"][: config.context_length].clone()
    return state


def to_hf(state: dict[str, torch.Tensor], config: GPTConfig, family: str) -> dict[str, torch.Tensor]:
    """The family's tensors for this model's state dict (the tied head left out, as transformers saves it)."""
    keys = [key for key in state if not (key == "lm_head.weight" and config.tie_embeddings)]
    tensors = {}
    for key, theirs in weight_names(keys, family).items():
        tensor = state[key]
        if key.endswith("attn.qkv.weight") or key.endswith("attn.qkv.bias"):
            kv = config.kv_heads * config.head_dim
            parts = tensor.split([config.d_model, kv, kv]) if len(theirs) == 3 else [tensor]
        else:
            parts = [tensor]
        for name, part in zip(theirs, parts, strict=True):
            part = part.T if is_conv1d_weight(family, key, part) else part
            tensors[name] = part.contiguous().clone()
    return tensors


def no_safetensors(where: str, names: list[str]) -> InputError:
    """The refusal of a checkpoint whose files (`names`) hold no safetensors weights, naming its pickles."""
    pickles = sorted(name for name in names if name.endswith(".bin"))
    found = f" (only {', '.join(pickles)}: pickles, refused because loading one can run code)" if pickles else ""
    return InputError(f"{where}: no .safetensors weights{found}; use a revision or copy of the checkpoint saved "
                      "with safetensors (save_pretrained writes them by default)")


def read_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors files (one file, or the shards an index names). Pickled .bin
    weights are refused: loading one runs whatever code it holds."""
    index = folder / f"{WEIGHTS_FILE}.index.json"
    if index.exists():  # sharded: the index names the files
        files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
    elif (folder / WEIGHTS_FILE).exists():  # not other safetensors beside it, such as an export's classifier head
        files = [folder / WEIGHTS_FILE]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise no_safetensors(where, [p.name for p in folder.glob("*.bin")])
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as weights:
            tensors.update({name: weights.get_tensor(name) for name in weights.keys()})
    return tensors
