"""Hugging Face checkpoints <-> NNX parameters.

Because the NNX model uses HF attribute names and calls every parameter ``weight`` or
``bias``, a parameter's NNX path is its safetensors key. The only differences are layouts:
HF stores linear layers as [out, in]; we store them as [*in, *out] with heads split out
(q_proj [D, N, H], o_proj [N, H, D]) so heads can be sharded. ``_TRANSFORMS`` is that table.

Loading reads one tensor at a time from memory-mapped safetensors files, converts it and
places it (sharded across ``mesh`` when given, each device receiving only its slice), so
the host never holds more than one full tensor beyond the mapped file. Export writes
safetensors shards of bounded size plus ``config.json`` (and the tokenizer), loadable by
``transformers.AutoModelForCausalLM.from_pretrained`` and vLLM.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxalign import sharding as sharding_lib
from jaxalign.models import lora as lora_lib
from jaxalign.models.qwen2 import Qwen2Config, Qwen2ForCausalLM, abstract_model

SAFE_SINGLE = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)
# Keys some older checkpoints carry that hold no parameters.
_IGNORED_KEYS = re.compile(r".*rotary_emb\.inv_freq$")


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, malformed or does not match the model."""


# --- layout table -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Transform:
    to_jax: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (hf array, our shape)
    to_hf: Callable[[np.ndarray, tuple[int, ...]], np.ndarray]  # (our array, our shape)
    hf_shape: Callable[[tuple[int, ...]], tuple[int, ...]]  # our shape -> HF shape


def _linear(in_ndim: int) -> _Transform:
    def hf_shape(shape):
        return (int(np.prod(shape[in_ndim:])), int(np.prod(shape[:in_ndim])))

    return _Transform(
        to_jax=lambda w, shape: w.T.reshape(shape),
        to_hf=lambda w, shape: w.reshape(hf_shape(shape)[::-1]).T,
        hf_shape=hf_shape,
    )


_RESHAPE = _Transform(
    to_jax=lambda w, shape: w.reshape(shape),
    to_hf=lambda w, shape: w.reshape(-1),
    hf_shape=lambda shape: (int(np.prod(shape)),),
)
_IDENTITY = _Transform(lambda w, shape: w, lambda w, shape: w, lambda shape: tuple(shape))

_TRANSFORMS: list[tuple[re.Pattern, _Transform]] = [
    (re.compile(r"model\.layers\.\d+\.self_attn\.o_proj\.weight"), _linear(in_ndim=2)),
    (re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight"), _linear(in_ndim=1)),
    (re.compile(r"lm_head\.weight"), _linear(in_ndim=1)),
    (re.compile(r"model\.layers\.\d+\.self_attn\.[qkv]_proj\.bias"), _RESHAPE),
    (re.compile(r"model\.embed_tokens\.weight"), _IDENTITY),
    (re.compile(r"model\.(layers\.\d+\.)?\w*norm\.weight"), _IDENTITY),
]


def _transform_index(key: str) -> int:
    for i, (pattern, _) in enumerate(_TRANSFORMS):
        if pattern.fullmatch(key):
            return i
    raise KeyError(f"no HF layout rule for parameter {key!r}")


# Layout changes and casts run on the device, one tensor at a time, before the transfer to
# the host (export) or after the transfer from it (load): NumPy's strided transposes of
# [out, in] matrices are single-threaded and cache-unfriendly, XLA's are tiled (and, on an
# accelerator, nearly free), and a bfloat16 export cast on the device moves half the bytes.
# One compile per (rule, shape, dtype): about ten for a whole model.
@functools.partial(jax.jit, static_argnames=("rule", "dtype"))
def _to_hf_on_device(w: jax.Array, *, rule: int, dtype: Any) -> jax.Array:
    hf = _TRANSFORMS[rule][1].to_hf(w, tuple(w.shape))
    return hf if dtype is None else hf.astype(dtype)


@functools.partial(jax.jit, static_argnames=("rule", "shape", "dtype"))
def _to_jax_on_device(w: jax.Array, *, rule: int, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return _TRANSFORMS[rule][1].to_jax(w, shape).astype(dtype)


def _params_by_key(model: nnx.Module) -> dict[str, nnx.Variable]:
    return {
        ".".join(str(p) for p in path): var
        for path, var in nnx.iter_graph(model)
        if isinstance(var, nnx.Param)
    }


# --- resolving a model directory --------------------------------------------------------


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local directory, or a Hub id downloaded (safetensors, config, tokenizer) to the cache.

    Raises:
        CheckpointError: when the path is not a directory and the Hub cannot supply it.
    """
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    looks_like_id = re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None
    if not looks_like_id:
        raise CheckpointError(f"{text}: no such directory (and not a Hugging Face Hub id)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            repo_id=text,
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"],
        )
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        raise CheckpointError(
            f"{text}: not a local directory, and downloading it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {e}). Pass a local path to a model directory, or "
            "check the network / HF_HUB_OFFLINE / HF_TOKEN."
        ) from e
    return Path(local)


def load_config(path_or_hub_id: str | os.PathLike, **runtime: Any) -> Qwen2Config:
    """Reads ``config.json`` of a model directory (runtime settings as keyword arguments)."""
    model_dir = resolve_model_dir(path_or_hub_id)
    try:
        return Qwen2Config.from_json_file(model_dir / "config.json", **runtime)
    except (FileNotFoundError, ValueError) as e:
        raise CheckpointError(str(e)) from None


def load_tokenizer(path_or_hub_id: str | os.PathLike, **kwargs: Any):
    """The checkpoint's own tokenizer, via ``transformers.AutoTokenizer`` (nothing hand-written)."""
    import transformers

    model_dir = resolve_model_dir(path_or_hub_id)
    # transformers 5 quietly builds an *empty* Qwen2 tokenizer from a directory with no
    # tokenizer files; refuse that instead of training on a 1-token vocabulary.
    if not any((model_dir / f).is_file() for f in ("tokenizer.json", "vocab.json")):
        raise CheckpointError(
            f"{model_dir}: cannot load a tokenizer (no tokenizer.json or vocab.json there)"
        )
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir}: cannot load a tokenizer ({e})") from None


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """{tensor key: file} from the index or the single file."""
    index = model_dir / SAFE_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
        files = {name: model_dir / name for name in set(weight_map.values())}
        for f in files.values():
            if not f.is_file():
                raise CheckpointError(f"{f}: listed in {index.name} but missing")
        return {key: files[name] for key, name in weight_map.items()}
    single = model_dir / SAFE_SINGLE
    if single.is_file():
        with _open(single) as f:
            return {key: single for key in f.keys()}
    hint = ""
    if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
        hint = " (found PyTorch .bin weights: re-save them with safe_serialization=True)"
    raise CheckpointError(f"{model_dir}: no {SAFE_SINGLE} or {SAFE_INDEX}{hint}")


def _open(file: Path):
    try:
        return safe_open(str(file), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from None


# --- loading ----------------------------------------------------------------------------


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = None,
    mesh: jax.sharding.Mesh | None = None,
    rules=None,
    **runtime: Any,
) -> Qwen2ForCausalLM:
    """Loads a Hugging Face Qwen2 checkpoint into an NNX ``Qwen2ForCausalLM``.

    Args:
        path_or_hub_id: a local model directory (``config.json`` + ``model.safetensors`` or
            sharded ``model-*.safetensors`` with an index) or a Hub id such as
            ``Qwen/Qwen2.5-Math-1.5B`` (downloaded when the network allows).
        dtype: compute dtype (default bfloat16).
        param_dtype: parameter dtype (default float32).
        mesh: when given, every parameter is placed sharded over it by the logical-axis
            ``rules`` (default ``jaxalign.sharding.PARAM_RULES``), each device receiving only
            its slice.
        **runtime: further ``Qwen2Config`` runtime settings (``attention_impl``, ``remat``).

    Raises:
        CheckpointError: naming the file and the problem for a missing or truncated file, a
            non-Qwen2 config, a missing or unexpected tensor, or a shape mismatch.
    """
    model_dir = resolve_model_dir(path_or_hub_id)
    cfg = load_config(model_dir, dtype=dtype, param_dtype=param_dtype, **runtime)
    cfg = cfg.replace(hf_extra={**cfg.hf_extra, "_name_or_path": str(path_or_hub_id)})
    weight_map = _weight_map(model_dir)
    model = abstract_model(cfg)
    model.source_dir = str(model_dir)  # lets save_pretrained copy the tokenizer files
    params = _params_by_key(model)
    rules = sharding_lib.PARAM_RULES if rules is None else rules

    expected = set(params)
    present = {k for k in weight_map if not _IGNORED_KEYS.fullmatch(k)}
    if cfg.tie_word_embeddings:
        present.discard("lm_head.weight")  # some exporters write the tied copy; it is unused
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    if missing:
        raise CheckpointError(
            f"{model_dir}: {len(missing)} tensor(s) missing from the checkpoint, e.g. "
            f"{missing[:3]}"
            + (" (config says untied embeddings)" if "lm_head.weight" in missing else "")
        )
    if unexpected:
        raise CheckpointError(
            f"{model_dir}: {len(unexpected)} unexpected tensor(s) for this Qwen2 config, e.g. "
            f"{unexpected[:3]} -- is config.json from a different model?"
        )

    handles: dict[Path, Any] = {}
    try:
        for key, var in params.items():
            file = weight_map[key]
            if file not in handles:
                handles[file] = _open(file)
            shape, rule = tuple(var.shape), _transform_index(key)
            transform = _TRANSFORMS[rule][1]
            hf_shape = transform.hf_shape(shape)
            try:
                tensor = handles[file].get_tensor(key)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: cannot read tensor {key!r} ({e})") from None
            if tuple(tensor.shape) != hf_shape:
                raise CheckpointError(
                    f"{file}: tensor {key!r} has shape {tuple(tensor.shape)} but config.json "
                    f"implies {hf_shape}"
                )
            if mesh is None:
                value = _to_jax_on_device(
                    jnp.asarray(tensor), rule=rule, shape=shape,
                    dtype=jnp.dtype(cfg.param_dtype),
                )
            else:  # each device copies only its own slice of the host array
                value = transform.to_jax(tensor, shape).astype(cfg.param_dtype)
                value = _place(value, mesh, var.get_metadata()["logical_axes"], rules)
            var.set_value(value)
            del tensor, value
    finally:
        handles.clear()
    return model


def _place(value: np.ndarray, mesh, logical_axes, rules) -> jax.Array:
    sharding = sharding_lib.named_sharding(mesh, logical_axes, value.shape, rules)
    # Each addressable device copies only its own slice of the host array.
    return jax.make_array_from_callback(value.shape, sharding, lambda idx: value[idx])


# --- export -----------------------------------------------------------------------------


def _gather(x: jax.Array) -> np.ndarray:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def save_pretrained(
    model: Qwen2ForCausalLM,
    out_dir: str | os.PathLike,
    tokenizer=None,
    *,
    dtype: Any = None,
    max_shard_size: int = 5 * 2**30,
) -> Path:
    """Writes ``model`` as a Hugging Face directory.

    Writes ``config.json``, ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors``
    plus ``model.safetensors.index.json`` when larger than ``max_shard_size`` bytes), and the
    tokenizer: ``tokenizer.save_pretrained`` when given, else the tokenizer files of the
    directory the model was loaded from.

    A model with LoRA adapters is written merged (``lora.merge_lora``): a plain checkpoint
    that any tool loads; ``lora_io.save_adapter`` writes the adapter alone.

    Args:
        dtype: dtype of the written tensors (default: the parameter dtype). Use bfloat16 for
            a half-size export for vLLM.

    Returns:
        The output directory.
    """
    if lora_lib.has_lora(model):
        model = lora_lib.merge_lora(model)
    out = Path(out_dir)
    # Process 0 is the only writer; every process joins every gather. A failed write is
    # raised after the last gather, so it never leaves the other processes waiting.
    main = jax.process_index() == 0
    params = _params_by_key(model)
    out_dtype = jnp.dtype(dtype) if dtype is not None else None
    sizes = {k: int(np.prod(v.shape)) * (out_dtype or v.dtype).itemsize
             for k, v in params.items()}
    shards = _plan_shards(sizes, max_shard_size)
    write_error = _clear_stale_export(out) if main else None
    weight_map, write_error = _write_shards(params, shards, out, out_dtype, main, write_error)
    if not main:
        return out
    if write_error is not None:
        raise CheckpointError(f"{out}: writing the export failed ({write_error})") from write_error
    if len(shards) > 1:
        (out / SAFE_INDEX).write_text(json.dumps(
            {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map},
            indent=2))
    _write_config_and_tokenizer(model, out, out_dtype, tokenizer)
    return out


def _plan_shards(sizes: dict[str, int], max_shard_size: int) -> list[list[str]]:
    """Keys grouped into shards of at most ``max_shard_size`` bytes (in order; a tensor
    larger than that gets a shard of its own). Planned before any gather, so each shard's
    tensors are on the host only while it is written."""
    shards: list[list[str]] = [[]]
    current = 0
    for k, size in sizes.items():
        if shards[-1] and current + size > max_shard_size:
            shards.append([])
            current = 0
        shards[-1].append(k)
        current += size
    return shards


def _clear_stale_export(out: Path) -> OSError | None:
    """Creates ``out`` and removes an older export's shards and index (never leave them
    beside the new ones). Returns the error instead of raising (see ``save_pretrained``)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        for stale in list(out.glob("model*.safetensors")) + [out / SAFE_INDEX]:
            stale.unlink(missing_ok=True)
    except OSError as e:
        return e
    return None


def _write_shards(params: dict, shards: list[list[str]], out: Path, out_dtype, main: bool,
                  write_error: Exception | None) -> tuple[dict[str, str], Exception | None]:
    """Gathers every tensor (every process, in the same order), converted to HF's layout and
    ``out_dtype`` on device, and on process 0 writes each shard. Returns the weight map
    and the first write error (later shards are still gathered, not written)."""
    weight_map = {}
    names = ([SAFE_SINGLE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard_keys in zip(names, shards, strict=True):
        tensors = {}
        for k in shard_keys:
            value = params[k][...]
            rule = _transform_index(k)
            if (out_dtype is not None and out_dtype != value.dtype) or (
                    _TRANSFORMS[rule][1] is not _IDENTITY):
                value = _to_hf_on_device(value, rule=rule, dtype=out_dtype)
            host = _gather(value)
            if main and write_error is None:
                tensors[k] = np.ascontiguousarray(host)
            weight_map[k] = name
            del host
        if main and write_error is None:
            try:
                save_file(tensors, str(out / name), metadata={"format": "pt"})
            except (SafetensorError, OSError) as e:
                write_error = e
        del tensors
    return weight_map, write_error


def _write_config_and_tokenizer(model: Qwen2ForCausalLM, out: Path, out_dtype,
                                tokenizer) -> None:
    """``config.json`` (with the written dtype) and the tokenizer: ``tokenizer`` when given,
    else the tokenizer files of the directory the model was loaded from."""
    hf_cfg = model.config.to_hf_dict()
    hf_cfg["torch_dtype"] = str(jnp.dtype(out_dtype or model.config.param_dtype))
    hf_cfg.pop("dtype", None)
    hf_cfg.pop("_name_or_path", None)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
        return
    source = getattr(model, "source_dir", None)
    for name in TOKENIZER_FILES if source else ():
        src = Path(source) / name
        if src.is_file() and src.resolve() != (out / name).resolve():
            shutil.copy2(src, out / name)
