"""A stand-in for ``vllm`` that reproduces the behaviours issue #15 found, and nothing else.

Used by ``tests/rollout/test_vllm_defects.py``, in process (``sys.modules``) and as a
package on ``PYTHONPATH`` for a real ``python -m jaxalign.rollout.server --backend vllm``.
What it reproduces (each read from vLLM's source):

* ``LLM.reset_prefix_cache()`` returns None (vLLM 0.10 and 0.11; ``FAKE_VLLM_RESET=false``
  makes it return False, as 0.33 does when it cannot reset).
* ``LLM.collective_rpc(timeout=)`` ignores the timeout (the uniprocess executor of
  ``tensor_parallel_size=1``): ``FAKE_VLLM_RPC=hang`` blocks until ``release`` is set.
  Worker errors come back as a bare ``Exception`` carrying the message (``SyncMPClient``):
  ``FAKE_VLLM_RPC=bad_checkpoint`` / ``error``.
* Request validation raises ``VLLMValidationError``, which is not a ``ValueError`` (0.33):
  greedy with ``n > 1``, and a prompt plus ``max_tokens`` over ``MAX_MODEL_LEN``.
* Seeds: a request's noise depends on (seed + sample index, position) only, so two prompts
  of equal length with the same seed get the same tokens.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import types

MAX_MODEL_LEN = 64


class VLLMClientError(Exception):
    """As vllm.exceptions.VLLMClientError: the request's fault, not a ValueError."""


class VLLMValidationError(VLLMClientError):
    pass


exceptions = types.SimpleNamespace(
    VLLMClientError=VLLMClientError, VLLMValidationError=VLLMValidationError
)


class SamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)
        if self.temperature == 0 and self.n > 1:  # vLLM's _verify_greedy_sampling
            raise VLLMValidationError(f"n must be 1 when using greedy sampling, got {self.n}.")


@dataclasses.dataclass
class Logprob:
    logprob: float


@dataclasses.dataclass
class CompletionOutput:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str
    stop_reason: int | str | None = None


@dataclasses.dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class _Tokenizer:
    def __call__(self, text):
        return {"input_ids": [b % 50 for b in text.encode()]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + t % 26) for t in ids)


class LLM:
    last: LLM | None = None  # the most recent instance, for in-process tests

    def __init__(self, model, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.rpc = os.environ.get("FAKE_VLLM_RPC", "ok")
        self.reset_result = False if os.environ.get("FAKE_VLLM_RESET") == "false" else None
        self.release = threading.Event()
        self.requests: list[list[SamplingParams]] = []  # the sampling of each generate call
        self.reloads = 0
        self.lora_requests: list = []  # the lora_request of each generate call
        LLM.last = self

    def get_tokenizer(self):
        return _Tokenizer()

    def generate(self, prompts, sampling_params, *, use_tqdm=True, lora_request=None):
        if lora_request is not None and not self.kwargs.get("enable_lora"):
            raise ValueError("LoRA is not enabled")  # as vLLM refuses it
        self.lora_requests.append(lora_request)
        if not isinstance(sampling_params, list):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError("The lengths of prompts and params must be the same.")
        self.requests.append(list(sampling_params))
        out = []
        for prompt, sp in zip(prompts, sampling_params, strict=True):
            ids = prompt["prompt_token_ids"]
            if len(ids) + sp.max_tokens > MAX_MODEL_LEN:
                raise VLLMValidationError(
                    f"prompt of {len(ids)} tokens plus max_tokens={sp.max_tokens} exceeds "
                    f"max_model_len={MAX_MODEL_LEN}"
                )
            rows = []
            for j in range(sp.n):
                # Noise from (seed + j, position): prompt content plays no part.
                seed = 0 if sp.seed is None else sp.seed + j
                tokens = [hash((seed, pos)) % 50 for pos in range(sp.max_tokens)]
                if sp.temperature == 0:
                    tokens = [(sum(ids) + pos) % 50 for pos in range(sp.max_tokens)]
                logprobs = [{t: Logprob(-1.0)} for t in tokens] if sp.logprobs == 0 else None
                text = _Tokenizer().decode(tokens)
                rows.append(CompletionOutput(text, tokens, logprobs, "length"))
            out.append(RequestOutput(list(ids), rows))
        return out

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        if self.rpc == "hang":  # the uniprocess executor never looks at timeout
            self.release.wait()
        elif self.rpc == "bad_checkpoint":
            raise Exception(
                f"Call to collective_rpc method failed: jaxalign: bad checkpoint: {args[0]}: "
                "3 parameter(s) not reloaded"
            )
        elif self.rpc == "error":
            raise RuntimeError("Worker failed with error 'CUDA error: out of memory'")
        self.reloads += 1
        return [1]

    def reset_prefix_cache(self):
        return self.reset_result
