"""The policy and its tokenizer from a config's ``model`` block (checkpoint or random preset),
with LoRA adapters when the config's ``lora`` block asks for them."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxalign.config import check
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import qwen2
from jaxalign.models.hf_io import from_pretrained, load_tokenizer
from jaxalign.models.lora import apply_lora, lora_config_from_block
from jaxalign.models.qwen2 import init_model


def build_model_and_tokenizer(model_cfg: ml_collections.ConfigDict, mesh=None,
                              lora: ml_collections.ConfigDict | None = None):
    """The policy and its tokenizer, from a checkpoint or a random preset.

    A preset builds a random Qwen2 with the locally built byte-level tokenizer (no download);
    ``model_cfg.arch`` overrides preset fields (e.g. ``num_hidden_layers``).

    Args:
        model_cfg: the config's ``model`` block.
        mesh: load a checkpoint straight onto this mesh (sharded by ``PARAM_RULES``).
        lora: the config's ``lora`` block; rank > 0 adds adapters (``lora.apply_lora``:
            A from ``model.seed``, B zero, so the outputs are unchanged; the base cast to
            ``lora.base_dtype``). The trainer places them by their logical axes.

    The result is deterministic in ``model_cfg`` and ``lora`` (a random preset from
    ``model.seed``, a checkpoint as stored): a LoRA run's checkpoints hold only the adapters
    and their optimizer state, and a resume rebuilds the frozen base here.
    """
    runtime: dict[str, Any] = dict(
        dtype=jnp.dtype(model_cfg.dtype),
        param_dtype=jnp.dtype(model_cfg.param_dtype),
        attention_impl=model_cfg.attention_impl,
        remat=model_cfg.remat,
    )
    if model_cfg.path:
        model = from_pretrained(model_cfg.path, mesh=mesh, **runtime)
        tokenizer = load_tokenizer(model_cfg.path)
    else:
        tokenizer = byte_tokenizer()
        presets = {"tiny": qwen2.tiny, "small": qwen2.small}
        check(model_cfg.preset in presets,
              f"config.model.preset={model_cfg.preset!r}; choose one of {sorted(presets)}")
        arch = dict(model_cfg.arch)
        cfg = presets[model_cfg.preset](vocab_size=len(tokenizer), **arch, **runtime)
        model = init_model(cfg, seed=model_cfg.seed)
    lora_cfg = None if lora is None else lora_config_from_block(lora)
    if lora_cfg is not None:
        apply_lora(model, lora_cfg, seed=model_cfg.seed)
    return model, tokenizer
