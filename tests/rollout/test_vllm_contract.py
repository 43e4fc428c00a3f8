"""Our calls into vLLM match its API (skipped where vllm does not import).

vLLM cannot run on these machines, so ``jaxalign.rollout.vllm_engine`` is never exercised
end to end here; this checks, by signature and by constructing the cheap objects, that
what it passes is what the installed vLLM takes. Written against vLLM 0.33.0.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import typing

import pytest

vllm = pytest.importorskip("vllm")

from jaxalign.rollout import vllm_engine  # noqa: E402
from jaxalign.rollout.types import SamplingParams  # noqa: E402


def test_llm_accepts_our_kwargs():
    kwargs = vllm_engine.llm_kwargs("/models/x", vllm_engine.VllmOptions(max_model_len=4096))
    init = inspect.signature(vllm.LLM.__init__).parameters
    engine_args = {f.name for f in dataclasses.fields(vllm.EngineArgs)}
    for name in kwargs:
        named = name in init and init[name].kind is not inspect.Parameter.VAR_KEYWORD
        # LLM forwards **kwargs to EngineArgs.
        assert named or name in engine_args, f"vllm.LLM does not take {name!r}"
    # logprobs_mode is a Literal alias; arg_utils postpones annotations, so resolve the name
    # in its module (get_type_hints trips over unrelated fields).
    mode = next(f.type for f in dataclasses.fields(vllm.EngineArgs) if f.name == "logprobs_mode")
    if isinstance(mode, str):
        mode = vars(sys.modules[vllm.EngineArgs.__module__])[mode]
    assert "raw_logprobs" in typing.get_args(mode)
    assert vllm_engine.WORKER_EXTENSION.endswith(".WeightReloadExtension")


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(
            n=4,
            temperature=0.7,
            top_p=0.9,
            top_k=20,
            max_tokens=64,
            min_tokens=2,
            stop=("</answer>",),
            include_stop_str_in_output=True,
            stop_token_ids=(5,),
            seed=3,
            logprobs=False,
        ),
        SamplingParams(temperature=0, top_k=-1),
    ],
)
def test_sampling_params_map_onto_vllm(params):
    theirs = vllm.SamplingParams(**vllm_engine.sampling_kwargs(params))
    assert theirs.n == params.n and theirs.max_tokens == params.max_tokens
    assert theirs.min_tokens == params.min_tokens and theirs.seed == params.seed
    assert theirs.temperature == params.temperature and theirs.top_p == params.top_p
    assert list(theirs.stop or []) == list(params.stop)
    assert list(theirs.stop_token_ids or []) == list(params.stop_token_ids)
    assert theirs.include_stop_str_in_output == params.include_stop_str_in_output
    assert theirs.logprobs == (0 if params.logprobs else None)
    assert theirs.skip_special_tokens is False


def test_llm_methods_we_call():
    rpc = inspect.signature(vllm.LLM.collective_rpc).parameters
    assert {"method", "timeout", "args"} <= set(rpc)
    assert "use_tqdm" in inspect.signature(vllm.LLM.generate).parameters
    for name in ("reset_prefix_cache", "get_tokenizer"):
        assert callable(getattr(vllm.LLM, name))
    from vllm.outputs import CompletionOutput, RequestOutput

    fields = set(inspect.signature(CompletionOutput).parameters)
    assert {"text", "token_ids", "logprobs", "finish_reason", "stop_reason"} <= fields
    assert "prompt_token_ids" in inspect.signature(RequestOutput).parameters


def test_worker_extension_fits_the_gpu_worker():
    gpu_worker = pytest.importorskip("vllm.v1.worker.gpu_worker")
    runner = pytest.importorskip("vllm.v1.worker.gpu_model_runner")
    # vLLM refuses an extension whose attributes the worker already has.
    ours = [a for a in dir(vllm_engine.WeightReloadExtension) if not a.startswith("__")]
    assert ours == [vllm_engine.RELOAD_METHOD]
    assert not hasattr(gpu_worker.Worker, vllm_engine.RELOAD_METHOD)
    assert callable(runner.GPUModelRunner.get_model)
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    assert "weights" in inspect.signature(Qwen2ForCausalLM.load_weights).parameters
