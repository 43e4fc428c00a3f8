"""The policy and its tokenizer from a config's ``model`` block (checkpoint or random preset)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from jaxalign.config import check
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import qwen2
from jaxalign.models.hf_io import from_pretrained, load_tokenizer
from jaxalign.models.qwen2 import init_model


def build_model_and_tokenizer(model_cfg: ml_collections.ConfigDict, mesh=None):
    """The policy and its tokenizer, from a checkpoint or a random preset.

    A preset builds a random Qwen2 with the locally built byte-level tokenizer (no download);
    ``model_cfg.arch`` overrides preset fields (e.g. ``num_hidden_layers``).
    """
    runtime: dict[str, Any] = dict(
        dtype=jnp.dtype(model_cfg.dtype),
        param_dtype=jnp.dtype(model_cfg.param_dtype),
        attention_impl=model_cfg.attention_impl,
        remat=model_cfg.remat,
    )
    if model_cfg.path:
        model = from_pretrained(model_cfg.path, mesh=mesh, **runtime)
        return model, load_tokenizer(model_cfg.path)
    tokenizer = byte_tokenizer()
    presets = {"tiny": qwen2.tiny, "small": qwen2.small}
    check(model_cfg.preset in presets,
          f"config.model.preset={model_cfg.preset!r}; choose one of {sorted(presets)}")
    arch = dict(model_cfg.arch)
    cfg = presets[model_cfg.preset](vocab_size=len(tokenizer), **arch, **runtime)
    return init_model(cfg, seed=model_cfg.seed), tokenizer
