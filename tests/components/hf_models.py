"""Tiny published-format checkpoints of each family, built and saved by `transformers` itself with random weights
and a tokenizer trained here."""

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

TEXTS = ["The quarterly results beat expectations as revenue grew across every region.",
         "A new striker joined the club on a three-year contract before the season opener.",
         "Parliament debated the budget late into the night, and the vote was close.",
         "The film festival opened with a documentary about coastal towns and their music.",
         "Engineers released a patch for the login bug that locked users out of accounts."] * 4
MIXED_LENGTHS = ["Revenue grew.", "The striker scored twice in the second half of the derby on Sunday evening.",
                 "A close vote.", "Engineers released a patch for the login bug that locked users out."]
# Llama-family tokenizers start each text with a token of their own and end it with another.
SPECIALS = {"gpt2": ["<|endoftext|>"], "llama": ["<|begin_of_text|>", "<|end_of_text|>"], "qwen2": ["<|endoftext|>"]}


def tiny_tokenizer(family: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, min_frequency=1, show_progress=False,
                                  special_tokens=SPECIALS[family], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TEXTS, trainer)
    if family == "llama":
        tokenizer.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                                 special_tokens=[("<|begin_of_text|>", 0)])
    return tokenizer


def hf_model(family: str, vocab_size: int, seed: int = 0):
    """A tiny random model of the family with every weight drawn at random (transformers zeroes biases and sets
    norms to one, which would hide a wrongly mapped bias or norm)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                           bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attn_pdrop=0.0))
    elif family == "llama":  # untied head, grouped-query attention, Llama 3.1's rotary scaling
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 128}))
    else:  # tied head, q/k/v biases, an embedding padded past the tokenizer's ids
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=vocab_size + 16, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(1 + 0.1 * torch.randn_like(param) if "norm" in name or "ln_" in name
                        else 0.05 * torch.randn_like(param))
    return model.eval()


def save_published(family: str, folder: Path, seed: int = 0, licence: str = "apache-2.0"):
    """Write a tiny checkpoint of `family` as the Hub holds one: config, safetensors, tokenizer, model card."""
    tokenizer = tiny_tokenizer(family)
    model = hf_model(family, tokenizer.get_vocab_size(), seed)
    model.save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "README.md").write_text(f"---\nlicense: {licence}\n---\n# tiny {family}\n")
    return model
