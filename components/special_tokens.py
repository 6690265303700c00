"""The tokens with a role: end of text (after each text of the pre-training stream, and where generation stops) and
padding. The BPE trained here has its own; a published checkpoint's tokenizer names its end of text its own way,
and has no padding token (padding is masked, so its end of text serves)."""

from tokenizers import Tokenizer

END_OF_TEXT = "<|endoftext|>"
PADDING = "<|pad|>"
SPECIAL_TOKENS = [END_OF_TEXT, PADDING]
# This BPE's, GPT-2's, SmolLM2's and Qwen2's; Llama 3's; Llama 2's and TinyLlama's.
END_OF_TEXT_NAMES = (END_OF_TEXT, "<|end_of_text|>", "</s>")


def end_of_text_id(tokenizer: Tokenizer) -> int | None:
    for name in END_OF_TEXT_NAMES:
        if (token := tokenizer.token_to_id(name)) is not None:
            return token
    return None


def padding_id(tokenizer: Tokenizer) -> int:
    token = tokenizer.token_to_id(PADDING)
    return end_of_text_id(tokenizer) if token is None else token
