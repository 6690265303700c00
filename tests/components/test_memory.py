"""The memory estimate: parameter counts from a config equal the built model's, and the estimate of a known
model is in the range its arithmetic gives."""

import json
from dataclasses import replace

import pytest

from components.memory import GB, lora_parameter_count, parameter_count, training_memory
from components.model import GPT, GPTConfig, add_lora
from components.params import Params
from tests.conftest import FOUNDATION, ROOT

SHAPES = [
    GPTConfig(vocab_size=320, context_length=32, n_layer=2, n_head=2, d_model=16),  # GPT-2's shape
    GPTConfig(vocab_size=300, context_length=16, n_layer=3, n_head=4, d_model=32, n_kv_head=2, norm="rmsnorm",
              positions="rotary", mlp="swiglu", mlp_hidden=40, bias=False, tie_embeddings=False),  # Llama's
    GPTConfig(vocab_size=300, context_length=16, n_layer=2, n_head=4, d_model=32, n_kv_head=1, norm="rmsnorm",
              positions="rotary", mlp="swiglu", mlp_hidden=48, bias=False, qkv_bias=True),  # Qwen2's
    GPTConfig(vocab_size=260, context_length=24, n_layer=1, n_head=2, d_model=24, mlp_hidden=56, bias=False),
]
GPT2_SMALL = GPTConfig(vocab_size=50257, context_length=256, n_layer=12, n_head=12, d_model=768)


@pytest.mark.parametrize("config", SHAPES)
def test_parameter_counts_from_the_config_equal_the_built_models(config):
    model = GPT(config)
    assert parameter_count(config) == sum(p.numel() for p in model.parameters())
    adapters = add_lora(model, rank=4, alpha=8)
    assert lora_parameter_count(config, 4) == sum(a.lora_a.numel() + a.lora_b.numel() for a in adapters)


def test_gpt2_small_full_fine_tuning_estimate_follows_its_arithmetic():
    # GPT-2 small has 124,439,808 parameters with its 1,024 positions; cut to 256, 768 x 768 fewer.
    assert parameter_count(replace(GPT2_SMALL, context_length=1024)) == 124_439_808
    full = training_memory(GPT2_SMALL, "32-true", sequences=8)
    assert full.weights == full.gradients == 4 * 123_849_984  # fp32: 0.495 GB each
    assert full.optimizer == 2 * full.weights  # AdamW's two moments: 0.99 GB
    # Korthikanti et al.'s 34 bytes x tokens x width per layer in 16-bit, doubled for fp32: 1.28 GB for 12 layers
    # at 8 x 256 tokens; the logits (2,048 x 50,257) take 0.41 GB per fp32 copy, and three are alive at once.
    assert 1.0 * GB < full.activations < 4 * GB
    assert 3 * GB < full.total < 8 * GB
    # Mixed precision: fp32 weights plus a 16-bit copy, half-size activations.
    mixed = training_memory(GPT2_SMALL, "bf16-mixed", sequences=8)
    assert mixed.weights == 1.5 * full.weights and mixed.activations < 0.75 * full.activations


def test_lora_and_the_linear_probe_need_far_less_than_full_fine_tuning():
    def fine_tuning(strategy):
        return training_memory(GPT2_SMALL, "32-true", sequences=8, strategy=strategy, classes=5, lm_loss=False)

    full, lora, probe = fine_tuning("full"), fine_tuning("lora"), fine_tuning("linear_probe")
    assert lora.gradients + lora.optimizer < 0.01 * (full.gradients + full.optimizer)  # 0.7% of the weights train
    assert lora.total < 0.6 * full.total
    assert probe.total < 0.5 * lora.total  # a frozen body keeps no activations for a backward pass
    assert fine_tuning("ulmfit") == full  # gradual unfreezing ends up training every layer


def test_the_shipped_foundation_fits_easily_at_the_default_params():
    config = GPTConfig(**json.loads((ROOT / FOUNDATION / "config.json").read_text()))
    defaults = Params()
    pretrain = training_memory(config, "32-true", defaults.pretrain.batch_size)
    finetune = training_memory(config, "32-true", defaults.finetune.batch_size, defaults.finetune.strategy,
                               classes=5, lm_loss=False)
    assert pretrain.total < 1 * GB and finetune.total < 1 * GB
