import pytest
import torch

from components.inference import load_backbone
from components.layout import FOUNDATION
from components.model import GPT, Classifier, GPTConfig, add_lora, merge_lora

TINY = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=8)


def test_logits_shape_and_tied_embeddings():
    model = GPT(TINY)
    idx = torch.randint(0, 64, (3, 10))
    assert model(idx).shape == (3, 10, 64)
    assert model.lm_head.weight is model.tok_emb.weight
    counted = sum(p.numel() for p in model.parameters())
    assert model.num_params(non_embedding=False) == counted


def test_attention_is_causal():
    model = GPT(TINY).eval()
    idx = torch.randint(0, 64, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 64
    with torch.no_grad():
        assert torch.allclose(model(idx)[0, :8], model(changed)[0, :8], atol=1e-6)


def test_mean_pooling_ignores_padding():
    torch.manual_seed(0)
    classifier = Classifier(GPT(TINY), num_classes=3, pooling="mean").eval()
    idx = torch.randint(0, 64, (1, 5))
    padded = torch.cat([idx, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 4)], dim=1).long()
    with torch.no_grad():
        assert torch.allclose(classifier(idx, torch.ones(1, 5).long()), classifier(padded, mask), atol=1e-5)


# Llama's switches (RMSNorm, rotary, SwiGLU, grouped-query attention, no biases, untied head) and Qwen2's q/k/v biases.
LLAMA_LIKE = GPTConfig(vocab_size=64, context_length=16, n_layer=2, n_head=4, d_model=16, n_kv_head=2, norm="rmsnorm",
                       norm_eps=1e-6, positions="rotary", rope_theta=500.0, mlp="swiglu", mlp_hidden=24, bias=False,
                       tie_embeddings=False)
QWEN_LIKE = GPTConfig(**{**LLAMA_LIKE.to_dict(), "qkv_bias": True})
SWITCHED = pytest.mark.parametrize("config", [TINY, LLAMA_LIKE, QWEN_LIKE], ids=["gpt2", "llama", "qwen2"])


def test_the_shipped_foundation_computes_what_it_always_did():
    # Logits of models/foundation on fixed ids, computed by the GPT before the config switches existed.
    model = load_backbone(FOUNDATION).eval()
    idx = (torch.arange(64) * 131 % 8192).view(2, 32)
    with torch.no_grad():
        logits = model(idx)
    assert logits[0, -1, :4].tolist() == pytest.approx([0.243896, -10.887146, 0.191411, 1.611083], abs=1e-4)
    assert logits[1, 5, 100:104].tolist() == pytest.approx([-0.430852, -1.970510, 0.703241, -0.498186], abs=1e-4)
    assert logits.abs().double().mean().item() == pytest.approx(2.779391, abs=1e-5)


def test_a_config_written_before_the_switches_reads_as_the_gpt_it_described():
    old = {"vocab_size": 64, "context_length": 16, "n_layer": 2, "n_head": 2, "d_model": 8, "dropout": 0.0}
    config = GPTConfig(**old)
    assert (config.norm, config.positions, config.mlp, config.kv_heads) == ("layernorm", "learned", "gelu", 2)
    assert config.bias and config.tie_embeddings
    assert set(GPT(config).state_dict()) == set(GPT(TINY).state_dict())


@SWITCHED
def test_every_family_is_causal(config):
    model = GPT(config).eval()
    idx = torch.randint(0, 64, (2, 12))
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 64
    with torch.no_grad():
        assert torch.allclose(model(idx)[:, :8], model(changed)[:, :8], atol=1e-6)


@SWITCHED
def test_continuing_cached_keys_and_values_equals_one_pass(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    idx = torch.randint(0, 64, (2, 14))
    with torch.no_grad():
        whole = model.hidden_states(idx)[0]
        _, past = model.hidden_states(idx[:, :9])
        continued = model.hidden_states(idx[:, 9:], past)[0]
        # each row continuing from its own position, as zero-shot scoring does
        positions = torch.arange(9, 14).expand(2, -1)
        mask = torch.ones(5, 14, dtype=torch.bool).tril(diagonal=9).expand(2, 1, -1, -1)
        per_row = model.hidden_states(idx[:, 9:], past, positions, mask)[0]
    assert torch.allclose(continued, whole[:, 9:], atol=1e-5)
    assert torch.allclose(per_row, whole[:, 9:], atol=1e-5)


def test_switches_shape_the_layers():
    llama, qwen = GPT(LLAMA_LIKE), GPT(QWEN_LIKE)
    attn = llama.blocks[0].attn
    assert attn.qkv.weight.shape == ((4 + 2 * 2) * 4, 16)  # 4 query heads, 2 key/value heads of size 4
    assert attn.qkv.bias is None and attn.proj.bias is None and llama.blocks[0].mlp.up.bias is None
    assert qwen.blocks[0].attn.qkv.bias is not None and qwen.blocks[0].attn.proj.bias is None
    assert isinstance(llama.ln_f, torch.nn.RMSNorm) and llama.ln_f.eps == 1e-6
    assert llama.pos_emb is None and llama.lm_head.weight is not llama.tok_emb.weight
    assert llama.blocks[0].mlp.gate.weight.shape == (24, 16)


def test_contradictory_shapes_are_refused_in_one_message():
    with pytest.raises(ValueError, match="not a multiple of n_head 3.*not a multiple of n_kv_head 2"):
        GPTConfig(d_model=16, n_head=3, n_kv_head=2)


@pytest.mark.parametrize("config", [TINY, LLAMA_LIKE], ids=["gpt2", "llama"])
def test_lora_merges_back_to_the_plain_keys(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    keys = set(model.state_dict())
    adapters = add_lora(model, rank=2, alpha=4)
    assert len(adapters) == config.n_layer * (5 if config.mlp == "swiglu" else 4)
    with torch.no_grad():
        for adapter in adapters:
            adapter.lora_b.normal_()
        idx = torch.randint(0, 64, (1, 10))
        adapted = model(idx)
        merged = merge_lora(model)(idx)
    assert set(model.state_dict()) == keys
    assert torch.allclose(adapted, merged, atol=1e-4)
