"""Generate: sample a continuation from a pre-trained checkpoint, for a quick look at what the LM learned."""

from pathlib import Path

import torch
from tokenizers import Tokenizer

from components.inference import load_backbone
from components.model import GPT
from components.special_tokens import end_of_text_id


@torch.no_grad()
def sample(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float, top_k: int,
           stop_id: int | None, seed: int) -> list[int]:
    """Top-k sampling, one token at a time, the context cropped to the model's window."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt_ids or [stop_id or 0]])
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.context_length:])[0, -1].float() / max(temperature, 1e-5)
        top = torch.topk(logits, min(top_k, logits.numel()))
        choice = top.indices[torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)]
        if choice.item() == stop_id:
            break
        ids = torch.cat([ids, choice.view(1, 1)], dim=1)
    return ids[0, len(prompt_ids):].tolist()


def generate(folder: Path, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8, top_k: int = 40,
             seed: int = 0) -> str:
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    model = load_backbone(folder)
    new_ids = sample(model, tokenizer.encode(prompt).ids, max_new_tokens, temperature, top_k,
                     end_of_text_id(tokenizer), seed)
    return prompt + tokenizer.decode(new_ids)
