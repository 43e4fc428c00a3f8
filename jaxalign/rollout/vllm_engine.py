"""The vLLM adapter: the only module in jaxalign that imports vllm (lazily, on use).

``VllmEngine`` implements the ``RolloutEngine`` interface over ``vllm.LLM`` (bf16, prefix
caching, ``gpu_memory_utilization`` from the sidecar's flags), mapping our
``SamplingParams`` onto vLLM's and asking for *raw* log-probs (``logprobs_mode=
"raw_logprobs"``: the model's distribution before temperature, top-k and top-p, the same
quantity ``JaxEngine`` returns and a training forward pass recomputes).

Weights are reloaded in place without restarting the engine: ``WeightReloadExtension`` is
mixed into every vLLM worker (``worker_extension_cls``); ``update_weights`` calls its
method on all workers with ``LLM.collective_rpc``; each worker streams the tensors of the
safetensors directory into its model's ``load_weights`` (which handles vLLM's fused qkv /
gate-up layouts and tensor-parallel slicing), checks that every parameter was written, and
then the driver resets the prefix cache, whose KV blocks were computed by the old weights.

Supported vLLM: ``SUPPORTED_VLLM`` (0.10.0 to 0.34.x), checked by the contract test
(``tests/rollout/test_vllm_contract.py``, run against real wheels by
``launch/vllm_env.sh --check``). What differs inside that range, and how it is handled:

* ``LLM.reset_prefix_cache()`` returns None on 0.10 and 0.11 (their V1 engine drops the
  value) and a bool on 0.33 and 0.34 (False: it could not reset). None counts as done, False as a
  failure.
* Deadlines. ``collective_rpc(timeout=)`` is not a deadline: the uniprocess executor
  (``tensor_parallel_size=1``) ignores it and the multiprocess client waits on the engine
  core without one; with TP>1 a timed-out call leaves the late reply queued for the next
  one. So the reload runs in a thread we stop waiting for at the deadline, and a reload
  that failed or timed out marks the engine dead (``VllmEngineDead`` from then on): its
  weights are a mix of two policies and a stale reply may still arrive. The sidecar then
  exits and is restarted from its ``--model`` (``jaxalign.rollout.server``); nothing is
  retried in place.
* Request errors. vLLM refuses bad requests with ``ValueError`` in 0.10 and 0.11 and with
  ``VLLMValidationError`` (a ``VLLMClientError``, not a ``ValueError``) in 0.33 and 0.34; both
  become ``VllmRequestError`` (a ``ValueError``: the sidecar answers 400). Errors raised in
  a worker come back as a bare ``Exception`` or ``RuntimeError`` carrying the message, so
  our worker tags a bad checkpoint with ``BAD_CHECKPOINT`` and the driver maps it back.
* Greedy with ``n > 1``: vLLM refuses it, ``JaxEngine`` returns ``n`` copies of the greedy
  completion. One behaviour for both: greedy is sampled once and copied ``n`` times.

Seeds. vLLM seeds each request's sampler with its own ``torch.Generator``, and from
``n > 1`` gives sample ``j`` the seed ``seed + j``; two requests with the same seed draw the
same noise, position by position. So prompt ``i`` of a call is sampled with its own seed
``prompt_seed(params.seed, i)`` (``seed`` itself for prompt 0, so a one-prompt call is
seeded with exactly ``params.seed``), or with ``seeds[i]`` when ``generate(seeds=...)``
gives one per prompt (``jaxalign.evaluation.generate_seeded``): prompt ``i`` then draws
what it draws alone with ``seed=seeds[i]``, the same contract as ``JaxEngine``. A seeded
request is sampled on vLLM's PyTorch-native path, one row at a time: FlashInfer's sampler
(and ROCm's fused one) takes no per-request generators. ``VllmOptions(seeded=False)``
(sidecar flag ``--vllm-unseeded``) sends no seed: faster sampling, not reproducible.

Written against vLLM 0.33.0 and checked against 0.10.0, 0.11.0 and 0.34.0 (read from their
wheels' source, since vLLM cannot run here): ``LLM(model, *, dtype, seed,
gpu_memory_utilization, tensor_parallel_size, enforce_eager, **kwargs -> EngineArgs)``
with ``EngineArgs.enable_prefix_caching``, ``.max_model_len``, ``.logprobs_mode``
(``"raw_logprobs"`` is also its default there) and ``.worker_extension_cls`` (a qualified
name; its methods must not clash with the worker's, so ours is not called
``update_weights``/``reload_weights``, which the 0.33 GPU worker has); ``LLM.generate(prompts,
sampling_params (one or one per prompt), *, use_tqdm)`` with token prompts as
``{"prompt_token_ids": [...]}``; ``LLM.collective_rpc(method, timeout=None, args=(),
kwargs=None)``; ``LLM.reset_prefix_cache()``; ``LLM.get_tokenizer()``; worker side
``self.model_runner.get_model().load_weights(weights: Iterable[(name, tensor)]) ->
set[str]`` as in vLLM's ``examples/offline_inference/rlhf_utils.py``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxalign.rollout.types import Completion, Prompt, SamplingParams

# The worker method collective_rpc calls; prefixed so it never shadows a vLLM worker method.
RELOAD_METHOD = "jaxalign_reload_weights"
WORKER_EXTENSION = f"{__name__}.WeightReloadExtension"
# The vLLM releases this module is written and checked for (the contract test passed on
# 0.10.0, 0.11.0, 0.33.0 and 0.34.0). Below 0.10 there is no EngineArgs.logprobs_mode (the
# raw log-probs); nothing newer than 0.34 is checked. launch/vllm_env.sh installs one.
SUPPORTED_VLLM = ">=0.10.0,<0.35"
# Tags a worker's refusal of a checkpoint: the message crosses vLLM's process boundary as
# a bare Exception or RuntimeError, and this marks it as the request's fault (400).
BAD_CHECKPOINT = "jaxalign: bad checkpoint"


class VllmRequestError(ValueError):
    """vLLM refused the request (its validation): the caller's fault, a 400 at the sidecar."""


class VllmEngineDead(RuntimeError):
    """The engine cannot serve any more: a reload failed or timed out (its weights are a mix
    of two policies, a late reply may still be queued) or vLLM reported its engine dead.
    The process holding it should exit and be restarted; nothing is retried in place."""


def prompt_seed(seed: int, index: int) -> int:
    """The vLLM seed of prompt ``index`` of a call seeded with ``seed``.

    ``seed`` itself for prompt 0 (a one-prompt call is seeded with exactly ``seed``), else
    the low 31 bits of ``sha256("seed:index")``: unrelated seeds, so prompts of equal length
    never share their noise. 31 bits leave room for vLLM's ``seed + j`` of sample ``j``.
    """
    if index == 0:
        return int(seed)
    digest = hashlib.sha256(f"{int(seed)}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


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
        seeded: send each prompt's seed to vLLM (reproducible samples). False sends none:
            vLLM may then use FlashInfer's sampler, which is faster, but the samples
            depend on the batch and are not reproducible.
        max_lora_rank: > 0 enables LoRA adapters up to this rank (``load_adapter``: the
            trainer then sends the adapter alone, a few MB, instead of every weight).
    """

    dtype: str = "bfloat16"
    gpu_memory_utilization: float = 0.9
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    seed: int = 0
    enforce_eager: bool = False
    seeded: bool = True
    max_lora_rank: int = 0


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
    if options.max_lora_rank > 0:  # one adapter at a time: the policy's current one
        kwargs.update(enable_lora=True, max_lora_rank=options.max_lora_rank, max_loras=1)
    return kwargs


def sampling_kwargs(params: SamplingParams, seed: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` with our semantics, for one prompt.

    Same names and meanings for the shared fields. ``seed`` is the prompt's own seed
    (``prompt_seed``; None: unseeded); ``params.seed`` is not sent as it is, since vLLM
    would give every prompt the same noise. Greedy asks for one sample (vLLM refuses
    ``n > 1`` at temperature 0; ``VllmEngine`` copies it ``n`` times, as ``JaxEngine``
    returns ``n`` equal rows). ``logprobs=0`` asks for the sampled token's log-prob only;
    ``skip_special_tokens=False`` decodes text the way ``JaxEngine`` does (special tokens
    such as ``<think>`` stay in the text).
    """
    return dict(
        n=1 if params.temperature == 0 else params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,  # 0 and -1 both disable, as ours
        max_tokens=params.max_tokens,
        min_tokens=params.min_tokens,
        stop=list(params.stop) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        stop_token_ids=list(params.stop_token_ids) or None,
        seed=seed,
        logprobs=0 if params.logprobs else None,
        skip_special_tokens=False,
    )


def _vllm_errors(
    vllm: Any,
) -> tuple[tuple[type[BaseException], ...], tuple[type[BaseException], ...]]:
    """(request errors, engine-dead errors) of the installed vLLM, whichever it has."""
    request: list[type[BaseException]] = [ValueError]
    dead: list[type[BaseException]] = []
    exceptions = getattr(vllm, "exceptions", None)
    client_error = getattr(exceptions, "VLLMClientError", None)  # 0.33+
    if isinstance(client_error, type):
        request.append(client_error)
    try:
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError:
        pass
    else:
        dead.append(EngineDeadError)
    return tuple(request), tuple(dead)


def _run_with_deadline(fn: Callable[[], Any], timeout: float | None, what: str) -> Any:
    """``fn()``, or ``TimeoutError`` after ``timeout`` seconds (``fn`` is then abandoned,
    still running in a daemon thread: vLLM's calls cannot be cancelled)."""
    if timeout is None:
        return fn()
    outcome: dict[str, Any] = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the waiting thread
            outcome["error"] = e

    worker = threading.Thread(target=run, name="vllm-reload", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(
            f"{what} did not finish within {timeout:.1f} s (vLLM's collective_rpc timeout "
            "is not enforced with tensor_parallel_size=1; the call may still be running)"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


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
                f"--backend vllm needs vLLM {SUPPORTED_VLLM} ({e}); it lives in an "
                "environment of its own (launch/vllm_env.sh; launch/sidecar.sh --vllm-env "
                "DIR), or use --backend jax"
            ) from e

        self.options = options or VllmOptions()
        self.llm = vllm.LLM(**llm_kwargs(model_dir, self.options))
        self.tokenizer = self.llm.get_tokenizer()
        self.weights_version = 0
        self.dead: str | None = None  # why the engine can no longer serve (VllmEngineDead)
        self._sampling_params_cls = vllm.SamplingParams
        self._request_errors, self._dead_errors = _vllm_errors(vllm)
        self._lora_request = None  # the adapter every generate applies (load_adapter)

    def _check_alive(self) -> None:
        if self.dead is not None:
            raise VllmEngineDead(f"the vLLM engine is unusable: {self.dead}; restart it")

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Samples ``params.n`` completions per prompt (strings or token ids).

        Args:
            prompts: prompt texts or token-id lists.
            params: sampling parameters; ``params.seed`` seeds prompt ``i`` with
                ``prompt_seed(params.seed, i)``.
            seeds: one seed per prompt, replacing that: prompt ``i`` draws what it draws
                alone with ``seed=seeds[i]``.

        Raises:
            VllmRequestError: vLLM refused the request (a ``ValueError``).
            VllmEngineDead: the engine cannot serve (after a failed reload, or vLLM's own).
        """
        self._check_alive()
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if not self.options.seeded:
            prompt_seeds: list[int | None] = [None] * len(prompts)
        elif seeds is None:
            prompt_seeds = [prompt_seed(params.seed, i) for i in range(len(prompts))]
        else:  # prompt_seed(s, 0) == s: what the prompt draws alone with seed=s
            prompt_seeds = [int(s) for s in seeds]
        inputs = [
            p if isinstance(p, str) else {"prompt_token_ids": [int(t) for t in p]} for p in prompts
        ]
        try:
            sampling = [
                self._sampling_params_cls(**sampling_kwargs(params, s)) for s in prompt_seeds
            ]
            lora = {"lora_request": self._lora_request} if self._lora_request else {}
            outputs = (self.llm.generate(inputs, sampling, use_tqdm=False, **lora)
                       if inputs else [])
        except self._dead_errors as e:
            self.dead = f"vLLM reported its engine dead ({type(e).__name__}: {e})"
            raise VllmEngineDead(self.dead) from e
        except self._request_errors as e:
            raise VllmRequestError(f"vLLM refused the request: {e}") from e
        version = self.weights_version
        rows = []
        for req in outputs:
            row = [
                self._completion(o, list(req.prompt_token_ids), params, version)
                for o in req.outputs
            ]
            if params.temperature == 0:  # greedy: one sample, copied (see sampling_kwargs)
                row = [row[0]] + [copy.deepcopy(row[0]) for _ in range(params.n - 1)]
            rows.append(row)
        return rows

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

        A reload that fails or misses its deadline leaves the engine dead (``VllmEngineDead``
        from then on): some tensors may be new, and a late reply may still be queued, so
        only a fresh engine is trustworthy. Checks made before the workers are asked (the
        directory and its safetensors files) leave it alive.

        Args:
            weights: a Hugging Face checkpoint directory (same architecture).
            version: the new weights version (default: the current one plus one).
            timeout: seconds the reload (and the prefix-cache reset) may take; enforced
                here, since vLLM's ``collective_rpc(timeout=)`` is not always.

        Returns:
            The new weights version.

        Raises:
            ValueError: not a checkpoint directory (the engine is untouched).
            VllmRequestError: a worker refused the checkpoint (engine now dead).
            TimeoutError: the deadline passed (engine now dead).
            VllmEngineDead: any other failure, or the engine was dead already.
        """
        self._check_alive()
        path = Path(weights)
        if not path.is_dir():
            raise ValueError(f"{path}: VllmEngine.update_weights takes a checkpoint directory")
        if not any(path.glob("*.safetensors")):
            raise ValueError(f"{path}: no *.safetensors files")

        def reload():
            self.llm.collective_rpc(RELOAD_METHOD, timeout=timeout, args=(str(path),))
            return self.llm.reset_prefix_cache()

        try:
            reset = _run_with_deadline(reload, timeout, "the weight reload")
        except TimeoutError as e:
            self.dead = f"a weight reload timed out ({e})"
            raise TimeoutError(str(e)) from None
        except BaseException as e:
            self.dead = f"a weight reload failed ({type(e).__name__}: {e})"
            if BAD_CHECKPOINT in str(e):
                raise VllmRequestError(f"{path}: {e}") from e
            raise VllmEngineDead(self.dead) from e
        # None on vLLM 0.10/0.11 (no value returned: done); False on 0.33+ when vLLM could
        # not reset, and then the cache still holds KV blocks of the old weights.
        if reset is False:
            self.dead = "vLLM could not reset its prefix cache after a weight reload"
            raise VllmEngineDead(self.dead)
        self._lora_request = None  # new full weights: the adapted policy itself
        self.weights_version = self.weights_version + 1 if version is None else int(version)
        return self.weights_version

    def load_adapter(self, adapter_dir: str | os.PathLike, version: int) -> int:
        """Serves the base weights with the PEFT adapter in ``adapter_dir`` from now on.

        vLLM loads the adapter (a ``LoRARequest`` named after the version) when the next
        generate asks for it; nothing changes in place, so a refused adapter leaves the
        engine serving. Needs ``VllmOptions.max_lora_rank`` >= the adapter's rank.

        Raises:
            VllmRequestError: LoRA is off, or the adapter's rank is above the maximum.
        """
        self._check_alive()
        rank = _adapter_rank(Path(adapter_dir))
        if self.options.max_lora_rank <= 0:
            raise VllmRequestError("adapter updates need LoRA on in vLLM: start the sidecar "
                                   "with --max-lora-rank R (R >= the adapter's rank)")
        if rank > self.options.max_lora_rank:
            raise VllmRequestError(f"{adapter_dir}: adapter rank {rank} is above the sidecar's "
                                   f"--max-lora-rank {self.options.max_lora_rank}")
        from vllm.lora.request import LoRARequest

        # the int id must be > 0 and new for each adapter (vLLM caches adapters by id)
        self._lora_request = LoRARequest(f"jaxalign-v{version}", int(version) + 1,
                                         str(adapter_dir))
        self.weights_version = int(version)
        return self.weights_version

    def close(self) -> None:
        del self.llm


def _adapter_rank(adapter_dir: Path) -> int:
    """The rank ``r`` in a PEFT adapter directory's ``adapter_config.json``."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        return int(config["r"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise VllmRequestError(f"{adapter_dir}: not a PEFT adapter ({e})") from None


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
            raise FileNotFoundError(f"{BAD_CHECKPOINT}: {path}: no *.safetensors files")

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
                f"{BAD_CHECKPOINT}: {path}: {len(missing)} parameter(s) not reloaded, "
                f"e.g. {missing[:3]}"
            )
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return len(loaded)
