"""A byte-level Qwen2 tokenizer without merges, built locally for tests and the CPU demo.

Real runs use the checkpoint's own tokenizer (``transformers.AutoTokenizer``). The embedded
demo needs one that exists without a download. It is a real ``Qwen2Tokenizer`` (same
pre-tokenizer, byte-level alphabet and decoder as Qwen's) whose BPE has no merges, so
every byte is one token. Saved next to a Qwen2 config it reloads through ``AutoTokenizer``
as the same class, which is what vLLM and ``transformers`` will do with it too.
"""

from __future__ import annotations

from tokenizers import pre_tokenizers
from transformers import Qwen2Tokenizer

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Tags of the r1_zero format, one token each so a small policy can emit them in one step.
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def byte_tokenizer(special_tokens=R1_TAGS) -> Qwen2Tokenizer:
    """One token per byte, plus EOS, PAD and ``special_tokens`` (ids 0, 1, 2, ...)."""
    vocab: dict[str, int] = {EOS: 0, PAD: 1}
    for tok in special_tokens:
        vocab.setdefault(tok, len(vocab))
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        additional_special_tokens=list(special_tokens),
    )
