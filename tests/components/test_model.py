import torch

from components.model import GPT, Classifier, GPTConfig

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
