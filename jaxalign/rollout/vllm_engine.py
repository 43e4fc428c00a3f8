"""The vLLM adapter: the only module in jaxalign that imports vllm (lazily, on use).

``VllmEngine`` implements the ``RolloutEngine`` interface over ``vllm.LLM`` (bf16, prefix
caching, ``gpu_memory_utilization`` from the sidecar's flags), mapping our
``SamplingParams`` onto vLLM's and asking for *raw* log-probs (``logprobs_mode=
"raw_logprobs"``: the model's distribution before temperature, top-k and top-p, the same
quantity ``JaxEngine`` returns and a training forward pass recomputes).

Weights are reloaded in place without restarting the engine: ``WeightReloadExtension`` is
mixed into every vLLM worker (``worker_extension_cls``); ``update_weights`` calls its
method on all workers with ``LLM.collective_rpc`` (with a timeout: every sync has a
deadline); each worker streams the tensors of the safetensors directory into its model's
``load_weights`` (which handles vLLM's fused qkv / gate-up layouts and tensor-parallel
slicing), checks that every parameter was written, and then the driver resets the prefix
cache, whose KV blocks were computed by the old weights.

Written against vLLM 0.33.0 (read from its wheel's source, since vLLM cannot run here):
``LLM(model, *, dtype, seed, gpu_memory_utilization, tensor_parallel_size, enforce_eager,
**kwargs -> EngineArgs)`` with ``EngineArgs.enable_prefix_caching``, ``.max_model_len``,
``.logprobs_mode`` (``"raw_logprobs"`` is also its default there) and
``.worker_extension_cls`` (a qualified name; its methods must not clash with the worker's,
so ours is not called ``update_weights``/``reload_weights``, which the 0.33 GPU worker
has); ``LLM.generate(prompts, sampling_params, *, use_tqdm)`` with token prompts as
``{"prompt_token_ids": [...]}``; ``LLM.collective_rpc(method, timeout=None, args=(),
kwargs=None)``; ``LLM.reset_prefix_cache() -> bool``; ``LLM.get_tokenizer()``; worker side
``self.model_runner.get_model().load_weights(weights: Iterable[(name, tensor)]) ->
set[str]`` as in vLLM's ``examples/offline_inference/rlhf_utils.py``. The contract test
(``tests/rollout/test_vllm_contract.py``) checks these signatures wherever vllm imports.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxalign.rollout.types import Completion, Prompt, SamplingParams

# The worker method collective_rpc calls; prefixed so it never shadows a vLLM worker method.
RELOAD_METHOD = "jaxalign_reload_weights"
WORKER_EXTENSION = f"{__name__}.WeightReloadExtension"


@dataclasses.dataclass(frozen=True)
class VllmOptions:
    """Engine settings (the sidecar's command-line flags).

    Attributes:
        dtype: weights and compute dtype.
        gpu_memory_utilization: fraction of GPU memory vLLM may take (weights + KV cache).
        tensor_parallel_size: GPUs per engine.
        max_model_len: context length (default: the model's).
        seed: engine seed (requests carry their own).
        enforce_eager: no CUDA graphs (faster start, slower decode).
    """

    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False


def llm_kwargs(model_dir: str | os.PathLike, options: VllmOptions) -> dict[str, Any]:
    """Keyword arguments for ``vllm.LLM`` (a function so the contract test can check them)."""
    kwargs: dict[str, Any] = dict(
        model=str(model_dir),
        dtype=options.dtype,
        seed=options.seed,
        gpu_memory_utilization=options.gpu_memory_utilization,
        tensor_parallel_size=options.tensor_parallel_size,
        enforce_eager=options.enforce_eager,
        enable_prefix_caching=True,
        logprobs_mode="raw_logprobs",
        worker_extension_cls=WORKER_EXTENSION,
    )
    if options.max_model_len is not None:
        kwargs["max_model_len"] = options.max_model_len
    return kwargs


def sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` with our semantics.

    Same names and meanings for the shared fields. ``logprobs=0`` asks for the sampled
    token's log-prob only; ``skip_special_tokens=False`` decodes text the way ``JaxEngine``
    does (special tokens such as ``<think>`` stay in the text).
    """
    return dict(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0 and -1 both disable, as ours
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop=list(params.stop) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        stop_token_ids=list(params.stop_token_ids) or None,
        seed=params.seed,
        logprobs=0 if params.logprobs else None,
        skip_special_tokens=False,
    )


class VllmEngine:
    """Generates with ``vllm.LLM`` in this process; reloads weights from HF directories.

    Args:
        model_dir: the Hugging Face checkpoint directory the engine starts from.
        options: engine settings.
    """

    def __init__(self, model_dir: str | os.PathLike, options: VllmOptions | None = None):
        try:
            import vllm  # the only place jaxalign imports vllm
        except ImportError as e:
            raise ImportError(
                f"--backend vllm needs vLLM ({e}); install it on the GPU host with "
                "pip install 'jaxalign[gpu]', or use --backend jax"
            ) from e

        self.options = options or VllmOptions()
        self.llm = vllm.LLM(**llm_kwargs(model_dir, self.options))
        self.tokenizer = self.llm.get_tokenizer()
        self.weights_version = 0
        self._sampling_params_cls = vllm.SamplingParams

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams) -> list[list[Completion]]:
        """Samples ``params.n`` completions per prompt (strings or token ids)."""
        inputs = [
            p if isinstance(p, str) else {"prompt_token_ids": [int(t) for t in p]} for p in prompts
        ]
        sampling = self._sampling_params_cls(**sampling_kwargs(params))
        outputs = self.llm.generate(inputs, sampling, use_tqdm=False)
        version = self.weights_version
        return [
            [self._completion(o, list(req.prompt_token_ids), params, version) for o in req.outputs]
            for req in outputs
        ]

    def _completion(self, out, prompt_ids: list[int], params: SamplingParams, version: int):
        ids = [int(t) for t in out.token_ids]
        logprobs = None
        if params.logprobs:
            # Each position maps token id -> Logprob; with logprobs=0 only the sampled one.
            logprobs = [float(out.logprobs[i][t].logprob) for i, t in enumerate(ids)]
        if out.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a completion with {out.finish_reason!r}")
        text, stop_reason = out.text, out.stop_reason
        if out.finish_reason == "stop" and not isinstance(stop_reason, str) and ids:
            # EOS or a stop token: vLLM reports EOS as None; ours names the token id and the
            # text stops before it, as JaxEngine decodes it.
            stop_reason = ids[-1]
            text = self.tokenizer.decode(ids[:-1], skip_special_tokens=False)
        return Completion(
            text=text,
            token_ids=ids,
            logprobs=logprobs,
            finish_reason=out.finish_reason,
            stop_reason=stop_reason,
            prompt_token_ids=prompt_ids,
            weights_version=version,
        )

    def update_weights(self, weights: Any, version: int | None = None, *, timeout=None) -> int:
        """Loads the checkpoint directory ``weights`` on every worker, in place.

        Args:
            weights: a Hugging Face checkpoint directory (same architecture).
            version: the new weights version (default: the current one plus one).
            timeout: seconds before ``collective_rpc`` raises ``TimeoutError`` (the weights
                are then in an unknown state: some tensors may be new).

        Returns:
            The new weights version.
        """
        path = Path(weights)
        if not path.is_dir():
            raise ValueError(f"{path}: VllmEngine.update_weights takes a checkpoint directory")
        self.llm.collective_rpc(RELOAD_METHOD, timeout=timeout, args=(str(path),))
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after the reload")
        self.weights_version = self.weights_version + 1 if version is None else int(version)
        return self.weights_version

    def close(self) -> None:
        del self.llm


class WeightReloadExtension:
    """Mixed into each vLLM worker by ``worker_extension_cls``; ``self`` is the worker.

    Importable without vllm (the workers import it by name), so it only touches vLLM through
    the worker's attributes.
    """

    def jaxalign_reload_weights(self, path: str) -> int:
        """Streams ``path/*.safetensors`` into the model; returns the parameters written."""
        import torch
        from safetensors import safe_open

        runner = self.model_runner  # type: ignore[attr-defined]
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        files = sorted(Path(path).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{path}: no *.safetensors files")

        def tensors():
            for file in files:  # one tensor at a time: no second copy of the model
                with safe_open(str(file), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)

        loaded = model.load_weights(tensors())
        # The same completeness check vLLM's own loader makes: a parameter the checkpoint
        # did not cover would keep the old policy's values silently.
        expected = {name for name, _ in model.named_parameters()}
        missing = sorted(expected - set(loaded or ()))
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} parameter(s) not reloaded, e.g. {missing[:3]}"
            )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(loaded)
