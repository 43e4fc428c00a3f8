"""Our calls into vLLM match its API (skipped where vllm does not import).

vLLM cannot run on these machines (no GPU), so ``jaxalign.rollout.vllm_engine`` is never
exercised end to end here; this checks, by signature and by constructing the cheap
objects, that what it passes is what the installed vLLM takes, and that the behaviours it
works around are still there. The trainer's environment has no vLLM (it lives in its own,
see ``launch/vllm_env.sh``), so in the main test run this file is skipped; run it against
real wheels, each in a fresh CPU-only environment, with

    launch/vllm_env.sh --check 0.10.0 0.11.0 0.33.0 0.34.0

Passed: vLLM 0.10.0, 0.11.0, 0.33.0, 0.34.0 (the versions and cost are in
``launch/README.md``). ``fake_vllm/`` and ``test_vllm_defects.py`` reproduce the behaviours
checked here to test the sidecar's handling of them.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import sys
import textwrap
import typing

import pytest

vllm = pytest.importorskip("vllm")

from jaxalign.rollout import vllm_engine  # noqa: E402
from jaxalign.rollout.types import SamplingParams  # noqa: E402


def _version() -> tuple[int, int]:
    major, minor = vllm.__version__.split(".")[:2]
    return int(major), int(minor)


def test_the_installed_vllm_is_in_the_supported_range():
    from packaging.specifiers import SpecifierSet

    assert vllm.__version__.split("+")[0] in SpecifierSet(vllm_engine.SUPPORTED_VLLM)


def test_llm_accepts_our_kwargs():
    kwargs = vllm_engine.llm_kwargs("/models/x", vllm_engine.VllmOptions(max_model_len=4096,
                                                                         max_lora_rank=16))
    assert kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 16
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
    "params, seed",
    [
        (SamplingParams(), 0),
        (
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
            vllm_engine.prompt_seed(3, 5),
        ),
        (SamplingParams(temperature=0, top_k=-1, n=3), 2**32 - 1),  # greedy n > 1
        (SamplingParams(temperature=0.5), None),  # VllmOptions(seeded=False)
    ],
)
def test_sampling_params_map_onto_vllm(params, seed):
    theirs = vllm.SamplingParams(**vllm_engine.sampling_kwargs(params, seed))
    assert theirs.n == (1 if params.temperature == 0 else params.n)
    assert theirs.max_tokens == params.max_tokens
    assert theirs.min_tokens == params.min_tokens and theirs.seed == seed
    assert theirs.temperature == params.temperature and theirs.top_p == params.top_p
    assert list(theirs.stop or []) == list(params.stop)
    assert list(theirs.stop_token_ids or []) == list(params.stop_token_ids)
    assert theirs.include_stop_str_in_output == params.include_stop_str_in_output
    assert theirs.logprobs == (0 if params.logprobs else None)
    assert theirs.skip_special_tokens is False


def test_vllm_refusals_are_request_errors_to_us():
    # vLLM refuses greedy n > 1 (why VllmEngine samples greedy once), with an error that
    # VllmEngine maps to VllmRequestError (400): ValueError on 0.10/0.11,
    # VLLMValidationError (not a ValueError) on 0.33+.
    request_errors, dead_errors = vllm_engine._vllm_errors(vllm)
    with pytest.raises(Exception) as info:
        vllm.SamplingParams(n=2, temperature=0)
    assert isinstance(info.value, request_errors), type(info.value).__mro__
    if _version() >= (0, 33):
        assert not isinstance(info.value, ValueError)  # the reason request_errors has two
    from vllm.v1.engine.exceptions import EngineDeadError

    assert EngineDeadError in dead_errors


def test_llm_methods_we_call():
    rpc = inspect.signature(vllm.LLM.collective_rpc).parameters
    assert {"method", "timeout", "args"} <= set(rpc)
    generate = inspect.signature(vllm.LLM.generate).parameters
    assert "use_tqdm" in generate
    assert "Sequence" in str(generate["sampling_params"].annotation)  # one per prompt
    for name in ("reset_prefix_cache", "get_tokenizer"):
        assert callable(getattr(vllm.LLM, name))
    assert "lora_request" in generate  # adapter-only updates (VllmEngine.load_adapter)
    from vllm.lora.request import LoRARequest

    request = LoRARequest("jaxalign-v3", 4, "/dev/shm/adapter")
    assert (request.lora_name, request.lora_int_id, request.lora_path) == (
        "jaxalign-v3", 4, "/dev/shm/adapter")
    from vllm.outputs import CompletionOutput, RequestOutput

    fields = set(inspect.signature(CompletionOutput).parameters)
    assert {"text", "token_ids", "logprobs", "finish_reason", "stop_reason"} <= fields
    assert "prompt_token_ids" in inspect.signature(RequestOutput).parameters


def test_reset_prefix_cache_returns_what_we_expect():
    # 0.10/0.11: LLM says -> bool, but the V1 LLMEngine returns nothing (None); 0.33+: bool.
    from vllm.v1.engine.llm_engine import LLMEngine

    source = inspect.getsource(LLMEngine.reset_prefix_cache)
    returns = "return self.engine_core.reset_prefix_cache" in source.replace("\n", " ")
    assert returns == (_version() >= (0, 33)), source


def test_uniprocess_executor_ignores_the_rpc_timeout():
    # Why update_weights enforces its own deadline: with tensor_parallel_size=1 the
    # executor runs the method inline and never reads `timeout`.
    name = "vllm.v1.executor.uniproc_executor"
    if importlib.util.find_spec(name) is None:  # 0.10/0.11: V1 reuses the V0 executor's
        name = "vllm.executor.uniproc_executor"
    rpc = importlib.import_module(name).UniProcExecutor.collective_rpc
    assert "timeout" in inspect.signature(rpc).parameters
    (func,) = ast.parse(textwrap.dedent(inspect.getsource(rpc))).body
    used = {n.id for stmt in func.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
    assert "timeout" not in used


def test_worker_extension_fits_the_gpu_worker():
    # Imported, not importorskip'ed: a check that skips here has checked nothing.
    gpu_worker = importlib.import_module("vllm.v1.worker.gpu_worker")
    try:  # 0.34 moved the runner
        runner = importlib.import_module("vllm.v1.worker.gpu.model_runner")
    except ModuleNotFoundError:
        runner = importlib.import_module("vllm.v1.worker.gpu_model_runner")
    # vLLM resolves the extension by qualified name and refuses one whose attributes the
    # worker already has (worker_base.py: "conflicts between worker and
    # worker_extension_cls").
    try:
        from vllm.utils.import_utils import resolve_obj_by_qualname
    except ImportError:  # before 0.11.1
        from vllm.utils import resolve_obj_by_qualname
    ext = resolve_obj_by_qualname(vllm_engine.WORKER_EXTENSION)
    assert ext is vllm_engine.WeightReloadExtension
    ours = [a for a in dir(ext) if not a.startswith("__")]
    assert ours == [vllm_engine.RELOAD_METHOD]
    assert not any(hasattr(gpu_worker.Worker, a) for a in ours)
    assert callable(runner.GPUModelRunner.get_model)
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    assert "weights" in inspect.signature(Qwen2ForCausalLM.load_weights).parameters
