"""LoRA adapters <-> PEFT's format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``save_adapter`` writes only the adapters (a few MB where the model is GBs), which
``peft.PeftModel.from_pretrained(transformers_model, dir)`` and vLLM's LoRA loading read
unchanged; ``load_adapter`` reads such a directory (ours or PEFT's) back onto a jaxalign
model. The merged model, for tools that know nothing of adapters, is
``hf_io.save_pretrained`` (it merges by itself).

Keys follow PEFT: ``base_model.model.<our NNX path>.lora_A.weight`` ([R, in]) and
``.lora_B.weight`` ([out, R]), so ``model.layers.0.self_attn.q_proj`` (A [D, R], B [R, N, H])
becomes ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` [R, D] and
``...lora_B.weight`` [N * H, R]: flatten the head axes, transpose, as ``hf_io`` does for
kernels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import save_file

from jaxalign.models import lora as lora_lib
from jaxalign.models.hf_io import CheckpointError, _gather, _open
from jaxalign.models.lora import TARGET_MODULES, LoraConfig, LoraLinear
from jaxalign.models.qwen2 import Qwen2ForCausalLM

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def peft_keys(path: str) -> tuple[str, str]:
    """``model.layers.0.self_attn.q_proj`` -> its PEFT ``(lora_A, lora_B)`` tensor keys."""
    return f"{PEFT_PREFIX}{path}.lora_A.weight", f"{PEFT_PREFIX}{path}.lora_B.weight"


def peft_adapter_config(cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """The ``adapter_config.json`` dictionary PEFT writes for this configuration."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.use_rslora,
        "target_modules": sorted(cfg.target_modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
    }


# --- export --------------------------------------------------------------------------------


def save_adapter(
    model: Qwen2ForCausalLM,
    out_dir: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = None,
) -> Path:
    """Writes ``model``'s adapters in PEFT's format.

    Args:
        model: a model with adapters (``lora.apply_lora``).
        base_model_name_or_path: recorded in ``adapter_config.json`` (PEFT and vLLM show
            it; loading takes the base model from the caller). Default: the directory the
            model was loaded from, if any.
        dtype: dtype of the written tensors (default: the adapters' own).

    Returns:
        The output directory.

    Raises:
        ValueError: when ``model`` has no adapters.
        CheckpointError: when writing fails.
    """
    modules = lora_lib.lora_modules(model)
    if not modules:
        raise ValueError("save_adapter: the model has no LoRA adapters (apply_lora first)")
    cfg = lora_lib.lora_config_of(model)
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "source_dir", None)
    out = Path(out_dir)
    main = jax.process_index() == 0
    tensors = {}
    for path, mod in modules.items():  # every process joins every gather
        a, b = mod.lora_A[...], mod.lora_B[...]
        if dtype is not None:
            a, b = a.astype(dtype), b.astype(dtype)
        a, b = _gather(a), _gather(b)
        a_key, b_key = peft_keys(path)
        r = cfg.rank
        tensors[a_key] = np.ascontiguousarray(a.reshape(-1, r).T)  # [*in, R] -> [R, in]
        tensors[b_key] = np.ascontiguousarray(b.reshape(r, -1).T)  # [R, *out] -> [out, R]
    if not main:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (out / ADAPTER_CONFIG).write_text(
            json.dumps(peft_adapter_config(cfg, base_model_name_or_path), indent=2,
                       sort_keys=True)
        )
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{out}: writing the adapter failed ({e})") from e
    return out


# --- import --------------------------------------------------------------------------------


def read_adapter_config(adapter_dir: str | os.PathLike) -> LoraConfig:
    """``adapter_config.json`` -> ``LoraConfig``.

    Raises:
        CheckpointError: naming the file and field for a missing file, a non-LoRA adapter,
            or a PEFT feature jaxalign does not implement (DoRA, per-layer ranks, bias
            training, regex targets, extra trained modules).
    """
    file = Path(adapter_dir) / ADAPTER_CONFIG
    try:
        d = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{file}: not found (not a PEFT adapter directory)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise CheckpointError(f"{file}: {message}")

    need(d.get("peft_type") == "LORA", f"peft_type={d.get('peft_type')!r}; only LORA loads")
    for key in ("r", "lora_alpha", "target_modules"):
        need(key in d, f"missing field {key!r}")
    need(not d.get("use_dora"), "use_dora=true: DoRA adapters are not supported")
    need(d.get("bias", "none") == "none", f"bias={d.get('bias')!r}: only 'none' is supported")
    need(not d.get("fan_in_fan_out"), "fan_in_fan_out=true is not supported")
    for key in ("rank_pattern", "alpha_pattern"):
        need(not d.get(key), f"{key}={d.get(key)}: per-module ranks/alphas are not supported")
    for key in ("layers_to_transform", "modules_to_save", "layers_pattern"):
        need(not d.get(key), f"{key}={d.get(key)!r} is not supported (adapters on every "
                             "layer, no extra trained modules)")
    targets = d["target_modules"]
    if targets == "all-linear":  # PEFT: every linear layer but the output head
        targets = list(TARGET_MODULES)
    elif isinstance(targets, str):
        need(targets in TARGET_MODULES,
             f"target_modules={targets!r}: regular expressions are not supported; list "
             f"module names from {', '.join(TARGET_MODULES)}")
        targets = [targets]
    need(set(targets) <= set(TARGET_MODULES),
         f"target_modules={sorted(targets)}: jaxalign adapts only {', '.join(TARGET_MODULES)}")
    return LoraConfig(
        rank=int(d["r"]),
        alpha=float(d["lora_alpha"]),
        dropout=float(d.get("lora_dropout") or 0.0),
        target_modules=tuple(t for t in TARGET_MODULES if t in targets),
        use_rslora=bool(d.get("use_rslora", False)),
    )


def load_adapter(
    model: Qwen2ForCausalLM, adapter_dir: str | os.PathLike, *, base_dtype: Any = None
) -> Qwen2ForCausalLM:
    """Puts the adapter in ``adapter_dir`` onto ``model`` (in place; returns it).

    A plain model gets adapters built from ``adapter_config.json`` first (with
    ``base_dtype``); a model that already has adapters must have the same rank, alpha,
    targets and scaling, and its adapters are overwritten (keeping their dtype and
    sharding).

    Raises:
        CheckpointError: naming the file for a bad config, a missing or unexpected tensor,
            a shape mismatch, or adapters that differ from the model's.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_adapter_config(adapter_dir)
    have = lora_lib.lora_config_of(model)
    if have is None:
        cfg = LoraConfig(**{**cfg.__dict__, "base_dtype": base_dtype})
        lora_lib.apply_lora(model, cfg)
    else:
        same = (have.rank, have.alpha, set(have.target_modules), have.use_rslora) == (
            cfg.rank, cfg.alpha, set(cfg.target_modules), cfg.use_rslora)
        if not same:
            raise CheckpointError(
                f"{adapter_dir}: adapter (rank={cfg.rank}, alpha={cfg.alpha}, "
                f"targets={sorted(cfg.target_modules)}, rslora={cfg.use_rslora}) differs from "
                f"the model's (rank={have.rank}, alpha={have.alpha}, "
                f"targets={sorted(have.target_modules)}, rslora={have.use_rslora})"
            )
    file = adapter_dir / ADAPTER_WEIGHTS
    if not file.is_file():
        hint = " (found adapter_model.bin: re-save it with safetensors)" if (
            adapter_dir / "adapter_model.bin").is_file() else ""
        raise CheckpointError(f"{file}: not found{hint}")
    modules = lora_lib.lora_modules(model)
    with _open(file) as f:
        present = set(f.keys())
        expected = {k for path in modules for k in peft_keys(path)}
        missing, unexpected = sorted(expected - present), sorted(present - expected)
        if missing:
            raise CheckpointError(f"{file}: {len(missing)} adapter tensor(s) missing, e.g. "
                                  f"{missing[:3]} -- adapter for a different model?")
        if unexpected:
            raise CheckpointError(f"{file}: {len(unexpected)} unexpected tensor(s), e.g. "
                                  f"{unexpected[:3]} -- adapter for a different model?")
        for path, mod in modules.items():
            a_key, b_key = peft_keys(path)
            _set(mod, "lora_A", f.get_tensor(a_key), file, a_key)
            _set(mod, "lora_B", f.get_tensor(b_key), file, b_key)
    return model


def _set(mod: LoraLinear, name: str, tensor: np.ndarray, file: Path, key: str) -> None:
    var = getattr(mod, name)
    shape = tuple(var.shape)
    r = shape[-1] if name == "lora_A" else shape[0]
    flat = int(np.prod(shape)) // r
    hf_shape = (r, flat) if name == "lora_A" else (flat, r)
    if tuple(tensor.shape) != hf_shape:
        raise CheckpointError(
            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}; this model needs {hf_shape}"
        )
    value = np.ascontiguousarray(tensor.T).reshape(shape)  # PEFT's [R, in] / [out, R] -> ours
    old = var[...]
    new = jnp.asarray(value, dtype=old.dtype)
    if isinstance(old, jax.Array) and not isinstance(old, jax.core.Tracer):
        new = jax.device_put(new, old.sharding)
    var.set_value(new)
