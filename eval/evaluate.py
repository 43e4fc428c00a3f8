"""Evaluate a model on math benchmarks: prompts -> rollouts -> verifier -> report and plots.

    # a HF directory, greedy, the five benchmarks, the JAX engine (CPU, TPU or GPU):
    python eval/evaluate.py --model /models/Qwen2.5-Math-1.5B --engine jax --out evals/base
    # CS336's zero-shot MATH baseline on a GPU: vLLM, r1_zero, temperature 1, 1024 tokens
    python eval/evaluate.py --model /models/Qwen2.5-Math-1.5B --engine vllm \\
        --benchmarks math500 --prompt r1_zero --temperature 1.0 --top-p 1.0 \\
        --max-tokens 1024 --out evals/math500-r1zero
    # a training run directory (its hf/ export, else the latest orbax checkpoint), 4 samples
    python eval/evaluate.py --model runs/grpo-20250101-120000 --benchmarks gsm8k,amc23 \\
        --n 4 --temperature 1.0 --limit 64 --out evals/grpo
    # a running sidecar (python -m jaxalign.rollout.server), thinking budgets swept
    python eval/evaluate.py --engine sidecar:http://127.0.0.1:8000 --model /models/m \\
        --benchmarks aime24 --budget-forcing max_thinking=512,1024,2048,wait=0 --out evals/bf
    # an s1-trained model (configs/sft.py:s1) with s1's delimiters: thinking capped at 8192
    # tokens, ended by "<|im_start|>answer", forced with "\\n<|im_start|>answer\\nAnswer:", or
    # extended once with "Wait"; graded by the s1 reward (the answer after <|im_start|>answer)
    python eval/evaluate.py --model runs/s1-20250101-120000 --prompt s1 --benchmarks aime24 \\
        --budget-forcing max_thinking=8192,wait=0,1 --max-tokens 1024 --out evals/s1
    # any OpenAI-compatible completions server (vllm serve, SGLang), its only served model
    python eval/evaluate.py --engine openai:http://127.0.0.1:8000 --benchmarks math500 \\
        --out evals/served
    # score saved generations, no model (rows: benchmark, index or id, response)
    python eval/evaluate.py --responses evals/base/samples/gsm8k.jsonl --out evals/rescored

Benchmarks are names from ``jaxalign.data.BENCHMARKS`` read from ``--data-dir`` (default
``../shared/data``), a ``.jsonl`` file, or ``hf:NAME[:CONFIG]`` (a Hugging Face dataset,
split ``--split``); files and datasets take ``--fields question=...,answer=...``.

``--out`` receives:

* ``run.json``: the settings that determine the samples; a re-run with other settings
  into the same folder is refused (the samples would mix).
* ``samples/<benchmark>[@<budget>].jsonl``: one line per sample (prompt, response, gold,
  extracted answer, rewards, lengths, finish reason), appended after every batch. A re-run
  with the same ``--out`` skips finished examples; a kill loses at most the batch in flight.
* ``summary.json`` (every metric of ``jaxalign.evaluation.summarize`` per benchmark),
  ``report.md`` (the tables), ``accuracy.png``, ``lengths.png`` and, when budget forcing
  sweeps several budgets, ``budget.png``.

Every problem is sampled from its own seed, derived from ``--seed``, the benchmark's name
and the problem's id and text (``jaxalign.evaluation.problem_seeds``), not from its
position: benchmarks do not share sampling noise, and a resumed, reordered or re-limited
run draws for each problem what an uninterrupted in-order run draws (up to engine
nondeterminism). The budgets of a ``--budget-forcing`` sweep share a problem's seed, so
they differ by the budget alone.
Accuracy, lengths and truncation are computed by the same functions as training's
``eval/*`` metrics (``jaxalign.evaluation``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxalign import evaluation
from jaxalign.data import prompts
from jaxalign.data.datasets import (
    BENCHMARKS,
    DataError,
    FieldMap,
    load_benchmark,
    load_hf_dataset,
    load_jsonl,
    parse_field_map,
)
from jaxalign.data.prompts import TEMPLATE_NAMES
from jaxalign.rollout.server import HelpFormatter
from jaxalign.verify import DEFAULT_TIMEOUT

REPO_ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("jax", "vllm", "sidecar:URL[,URL...]", "openai:URL")
PROMPTS = (*TEMPLATE_NAMES, evaluation.CHAT, prompts.S1)
# --prompt s1: the chat template, no system message, the assistant turn opened with
# <|im_start|>think\n; the turn ends at <|im_end|>. Budget forcing with s1's delimiters:
# thinking ends at <|im_start|>answer, a forced end appends "\n<|im_start|>answer\nAnswer:",
# a wait appends "Wait" (Muennighoff et al. 2025). Graded by the s1 reward: the answer
# after <|im_start|>answer (its \boxed{}, else the text after "Answer:").
# How samples are seeded, recorded in run.json: an --out holding samples seeded another way
# (by batch, before issue #19) is not resumed, since the two kinds would mix in one file.
SEEDING = "per problem: sha256(seed, benchmark, id, question)"


class EvalError(Exception):
    """A problem with the command line or its inputs; the message says what to change."""


@dataclasses.dataclass
class EvalConfig:
    """The command line, parsed (see ``parse_args`` for each flag's help)."""

    out: str
    model: str | None = None
    benchmarks: list[str] | None = None
    engine: str = "jax"
    prompt: str = "r1_zero"
    reward: str | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 1024
    seed: int = 0
    budget_forcing: str | None = None
    limit: int | None = None
    data_dir: str | None = None
    split: str = "test"
    fields: str | None = None
    responses: str | None = None
    batch_size: int = 256
    engine_batch: int = 64
    dtype: str = "float32"
    num_workers: int = min(8, os.cpu_count() or 1)
    grading_timeout: float = DEFAULT_TIMEOUT
    progress: bool = True
    plots: bool = True


class UnderscoreAliasParser(argparse.ArgumentParser):
    """Flags are spelled with dashes (``--max-tokens``, as ``--help`` shows them); the
    underscore spelling of every flag (``--max_tokens 8``, ``--max_tokens=8``) is an alias.

    Aliases are rewritten before parsing rather than registered, so ``--help`` lists each
    flag once and a flag added later gets its alias without anyone remembering to add it.
    Only tokens before a bare ``--`` that name a flag (or a prefix of one, which argparse
    accepts as an abbreviation) are rewritten, so values are left alone and an unknown flag
    is reported as typed.
    """

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._dashed(args), namespace)

    def _dashed(self, args: list[str]) -> list[str]:
        flags = [s for s in self._option_string_actions if s.startswith("--")]
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                return out + args[i:]
            name, eq, value = arg.partition("=")
            dashed = "--" + name[2:].replace("_", "-")
            if (name.startswith("--") and dashed != name
                    and any(f.startswith(dashed) for f in flags)):
                arg = dashed + eq + value
            out.append(arg)
        return out


def build_parser() -> UnderscoreAliasParser:
    """The command line's parser (``parse_args`` turns its result into an ``EvalConfig``)."""
    ap = UnderscoreAliasParser(
        prog="python eval/evaluate.py",
        description="Evaluate a model on math benchmarks (see the module docstring). Every "
        "flag also takes its underscore spelling (--max_tokens for --max-tokens).",
        formatter_class=HelpFormatter,
    )
    d = EvalConfig(out="")
    ap.add_argument("--model", metavar="PATH",
                    help="HF directory or hub id, or a jaxalign run directory")
    ap.add_argument("--benchmarks", metavar="LIST",
                    help=f"comma-separated: {', '.join(BENCHMARKS)}, a .jsonl file or "
                    "hf:NAME[:CONFIG] (default: all five; with --responses: its own)")
    ap.add_argument("--engine", default=d.engine, help=" | ".join(ENGINES))
    ap.add_argument("--prompt", default=d.prompt,
                    help=f"{' | '.join(PROMPTS)}, a template file, or text with {{question}}")
    ap.add_argument("--reward", metavar="SPEC",
                    help="a reward spec as training's data.reward: "
                    f"{' | '.join(sorted(evaluation.REWARDS))} | package.module:function | a "
                    "weighted sum such as 'r1_zero + 0.1*my_rewards:fn' (default: r1_zero for "
                    "--prompt r1_zero, else question_only, which grades the last \\boxed{})")
    ap.add_argument("--n", type=int, default=d.n, metavar="N", help="samples per problem")
    ap.add_argument("--temperature", type=float, default=d.temperature, metavar="T",
                    help="sampling temperature; 0 is greedy")
    ap.add_argument("--top-p", type=float, default=d.top_p, metavar="P",
                    help="nucleus sampling: the probability mass of tokens kept")
    ap.add_argument("--max-tokens", type=int, default=d.max_tokens, metavar="N",
                    help="new tokens per response; under budget forcing, of the answer phase")
    ap.add_argument("--seed", type=int, default=d.seed, metavar="N",
                    help="sampling seed; each problem's own seed is derived from it")
    ap.add_argument("--budget-forcing", metavar="SPEC",
                    help="max_thinking=N[,N...][,wait=W[,W...]]: several values sweep")
    ap.add_argument("--limit", type=int, metavar="K", help="first K problems of each benchmark")
    ap.add_argument("--out", required=True, metavar="DIR",
                    help="output folder (re-use it to resume)")
    ap.add_argument("--data-dir", metavar="DIR", help="folder with one subfolder per benchmark "
                    "(default: ../shared/data)")
    ap.add_argument("--split", default=d.split, metavar="NAME",
                    help="which NAME.jsonl of a benchmark folder, or split of an hf: dataset")
    ap.add_argument("--fields", metavar="MAP", help="for .jsonl / hf: benchmarks: "
                    "question=F,answer=F[,id=F][,parse=none|gsm8k|boxed]")
    ap.add_argument("--responses", metavar="FILE", help="JSONL of saved responses to score "
                    "instead of generating (fields: benchmark, index or id, response[, sample, "
                    "length, finish_reason])")
    ap.add_argument("--batch-size", type=int, default=d.batch_size, metavar="N",
                    help="problems generated, scored and saved together: the most a kill "
                    "can lose")
    ap.add_argument("--engine-batch", type=int, default=d.engine_batch, metavar="N",
                    help="jax engine: rows per micro-batch; openai: requests in flight")
    ap.add_argument("--dtype", default=d.dtype,
                    help="compute dtype: float32 | bfloat16 | float16")
    ap.add_argument("--num-workers", type=int, default=d.num_workers, metavar="N",
                    help="verifier processes, 0: grade in this process (default: min(8, CPU "
                    "cores), here %(default)s)")
    ap.add_argument("--grading-timeout", type=float, default=d.grading_timeout,
                    metavar="SECONDS",
                    help="per grading call; a timeout scores 0 and is counted")
    ap.add_argument("--no-progress", dest="progress", action="store_false",
                    help="no progress bars")
    ap.add_argument("--no-plots", dest="plots", action="store_false", help="no PNG plots")
    return ap


def parse_args(argv: Sequence[str] | None = None) -> EvalConfig:
    """The command line (``sys.argv[1:]`` by default) as an ``EvalConfig``."""
    a = build_parser().parse_args(argv)
    benchmarks = None if a.benchmarks is None else [b.strip() for b in a.benchmarks.split(",")
                                                    if b.strip()]
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    return EvalConfig(**{k: v for k, v in vars(a).items() if k in fields and k != "benchmarks"},
                      benchmarks=benchmarks)


# --- checking the command line -------------------------------------------------------------


def parse_budgets(spec: str | None) -> list:
    """``max_thinking=256,512,wait=0,1`` -> the ``BudgetForcing`` grid (or ``[None]``).

    A value without ``key=`` continues the previous key's list; several values of a key
    sweep them (all combinations of ``max_thinking`` and ``wait``).
    """
    if not spec:
        return [None]
    from jaxalign.rollout.budget import BudgetForcing

    values: dict[str, list[int]] = {}
    key = None
    for item in (s.strip() for s in spec.split(",")):
        if "=" in item:
            key, item = (s.strip() for s in item.split("=", 1))
            if key not in ("max_thinking", "wait"):
                raise EvalError(f"--budget-forcing: unknown key {key!r}; use max_thinking=N"
                                "[,N...] and optionally wait=W[,W...]")
            values.setdefault(key, [])
        if key is None or not item.lstrip("-").isdigit():
            raise EvalError(f"--budget-forcing {spec!r}: expected max_thinking=N[,N...]"
                            "[,wait=W[,W...]] with integer values")
        values[key].append(int(item))
    if "max_thinking" not in values:
        raise EvalError(f"--budget-forcing {spec!r}: max_thinking=N is required")
    try:
        return [BudgetForcing(max_thinking_tokens=t, num_waits=w)
                for t in values["max_thinking"] for w in values.get("wait", [0])]
    except ValueError as e:
        raise EvalError(f"--budget-forcing {spec!r}: {e}") from None


def budget_label(budget) -> str:
    """``think512`` or ``think512-wait1``: the suffix of a budget-forced run's name."""
    label = f"think{budget.max_thinking_tokens}"
    return label + (f"-wait{budget.num_waits}" if budget.num_waits else "")


def resolve_prompt(prompt: str) -> str:
    """A shipped template name, ``"chat"``, or template text (read from a file if one)."""
    if prompt in PROMPTS:
        return prompt
    text = Path(prompt).read_text(encoding="utf-8") if os.path.isfile(prompt) else prompt
    if "{question}" not in text:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise EvalError(
            f"--prompt {shown!r}: not one of {', '.join(PROMPTS)}, and as a template (file or "
            "text) it has no {question} placeholder to put the problem in"
        )
    return text


def parse_engine(spec: str) -> tuple[str, list[str]]:
    """``"jax"``, ``"vllm"``, ``"sidecar:URL[,URL]"`` or ``"openai:URL"`` -> (kind, urls)."""
    if spec in ("jax", "vllm"):
        return spec, []
    if spec.startswith("sidecar:"):
        urls = [u.strip() for u in spec[len("sidecar:"):].split(",") if u.strip()]
        if urls:
            return "sidecar", urls
    if spec.startswith("openai:"):
        url = spec[len("openai:"):].strip()
        if url.startswith(("http://", "https://")) and "," not in url:
            return "openai", [url]
    raise EvalError(f"--engine {spec!r}; choose one of {', '.join(ENGINES)} "
                    "(e.g. sidecar:http://127.0.0.1:8000 or openai:http://127.0.0.1:8000)")


def parse_fields(spec: str | None) -> FieldMap:
    """``question=problem,answer=answer,id=uid,parse=boxed`` -> ``FieldMap`` (the grammar of
    training's ``data.fields``: ``datasets.parse_field_map``)."""
    try:
        return parse_field_map(spec) or FieldMap()
    except ValueError as e:
        raise EvalError(f"--{e}") from None


def default_data_dir() -> Path:
    """``../shared/data`` from the working directory, else next to this checkout."""
    for candidate in (Path("../shared/data"), REPO_ROOT.parent / "shared" / "data"):
        if candidate.is_dir():
            return candidate
    return Path("../shared/data")


def benchmark_name(spec: str) -> str:
    """The name a benchmark spec is reported under (file stem for JSONL files)."""
    if spec.startswith("hf:"):  # hf:openai/gsm8k:main -> gsm8k_main
        dataset, _, config = spec[3:].partition(":")
        return Path(dataset).name + (f"_{config}" if config else "")
    if spec.endswith(".jsonl"):
        return Path(spec).stem
    return spec


def load_benchmarks(cfg: EvalConfig, specs: Sequence[str]) -> dict[str, list]:
    """Each benchmark's examples (the first ``--limit``), keyed by its name."""
    data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
    fields = parse_fields(cfg.fields)
    out: dict[str, list] = {}
    for spec in specs:
        name = benchmark_name(spec)
        if name in out:
            raise EvalError(f"--benchmarks: {name!r} appears twice")
        try:
            if spec in BENCHMARKS:
                path = data_dir / spec / f"{cfg.split}.jsonl"
                if not path.is_file():
                    raise EvalError(f"benchmark {spec}: {path} not found; pass --data-dir (the "
                                    "folder holding gsm8k/, math500/, ...) or another --split")
                examples = load_benchmark(spec, data_dir, cfg.split)
            elif spec.startswith("hf:"):
                dataset, _, config = spec[3:].partition(":")
                kwargs = {"name": config} if config else {}
                try:
                    examples = load_hf_dataset(dataset, cfg.split, fields, **kwargs)
                except (DataError, EvalError):
                    raise
                except Exception as e:  # offline, unknown dataset or split: one message
                    raise EvalError(f"benchmark {spec}: cannot load the Hugging Face dataset "
                                    f"{dataset!r} split {cfg.split!r} ({type(e).__name__}: "
                                    f"{e})") from None
            elif spec.endswith(".jsonl") or os.path.isfile(spec):
                if not os.path.isfile(spec):
                    raise EvalError(f"benchmark file {spec}: no such file")
                examples = load_jsonl(spec, fields)
            else:
                raise EvalError(
                    f"unknown benchmark {spec!r}; known: {', '.join(BENCHMARKS)} (or a .jsonl "
                    "file, or hf:NAME[:CONFIG] for a Hugging Face dataset)"
                )
        except DataError as e:
            raise EvalError(f"benchmark {spec}: {e} (for a .jsonl or hf: dataset, map its "
                            "fields with --fields question=...,answer=...)") from None
        if not examples:
            raise EvalError(f"benchmark {spec}: no examples")
        out[name] = examples[: cfg.limit] if cfg.limit else examples
    return out


# --- models --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where the weights come from.

    Attributes:
        kind: ``"hf"`` (a HF directory or hub id) or ``"run"`` (a jaxalign run directory
            without an ``hf/`` export: rebuilt from its config and latest checkpoint).
        path: the HF directory / hub id, or the run directory.
        step: the checkpoint step of a ``"run"``.
    """

    kind: str
    path: str
    step: int | None = None

    def describe(self) -> str:
        return self.path if self.step is None else f"{self.path} (checkpoint step {self.step})"


def resolve_model(path: str) -> ModelSource:
    """Classifies ``--model``: a HF directory, a run directory, or a hub id.

    A run directory (``runs/<name>-<ts>/``: ``config.json`` with ``checkpoints/`` or
    ``hf/``) is evaluated through its ``hf/`` export when present, else its latest orbax
    checkpoint.
    """
    p = Path(path).expanduser()
    if not p.exists():
        if not path.startswith((".", "/", "~")) and path.count("/") == 1:
            return ModelSource("hf", path)  # a hub id; from_pretrained downloads it
        raise EvalError(f"--model {path}: no such directory (and not a Hugging Face hub id)")
    if not p.is_dir():
        raise EvalError(f"--model {path}: not a directory")
    if (p / "hf" / "config.json").is_file():
        return ModelSource("hf", str(p / "hf"))
    if (p / "checkpoints").is_dir() and (p / "config.json").is_file():
        step = _latest_step(p / "checkpoints")
        if step is None:
            raise EvalError(f"--model {path}: a run directory without hf/ and with no "
                            "checkpoint in checkpoints/")
        return ModelSource("run", str(p), step)
    if (p / "config.json").is_file() and any(p.glob("*.safetensors")):
        return ModelSource("hf", str(p))
    raise EvalError(f"--model {path}: neither a HF model directory (config.json and "
                    "*.safetensors) nor a jaxalign run directory (config.json with hf/ or "
                    "checkpoints/)")


def _latest_step(directory: Path) -> int | None:
    steps = [int(d.name) for d in directory.iterdir() if d.is_dir() and d.name.isdigit()]
    return max(steps, default=None)


def load_model(source: ModelSource, dtype: str):
    """``(model, tokenizer)`` for the JAX engine; a run is converted on the fly.

    A run directory's model is rebuilt from its ``config.json`` (the ``model`` block: a
    checkpoint path or a random preset with the byte tokenizer), then its parameters are
    restored from the latest orbax checkpoint (parameters only; the optimizer state is not
    read).
    """
    import jax.numpy as jnp

    from jaxalign.models import CheckpointError, from_pretrained, load_tokenizer

    if source.kind == "hf":
        try:
            model = from_pretrained(source.path, dtype=jnp.dtype(dtype))
            return model, load_tokenizer(source.path)
        except CheckpointError as e:
            raise EvalError(f"--model {source.path}: {e}") from None
    return restore_run(Path(source.path), source.step, dtype)


def restore_run(run_dir: Path, step: int, dtype: str):
    """The policy of ``run_dir`` at checkpoint ``step``: ``(model, tokenizer)``."""
    from jaxalign.checkpoint import restore_policy

    try:
        model, tokenizer, _ = restore_policy(run_dir, step, dtype)
    except ValueError as e:
        raise EvalError(f"--model {run_dir}: {e}") from None
    return model, tokenizer


def hf_dir_for(source: ModelSource, out: Path) -> str:
    """A HF directory of the weights (a run is exported once, bf16, under ``--out``)."""
    if source.kind == "hf":
        return source.path
    target = out / f"converted-hf-step{source.step}"
    if not (target / "config.json").is_file():
        import jax.numpy as jnp

        from jaxalign.models import save_pretrained

        model, tokenizer = restore_run(Path(source.path), source.step, "bfloat16")
        save_pretrained(model, target, tokenizer=tokenizer, dtype=jnp.bfloat16)
    return str(target)


def build_engine(cfg: EvalConfig, source: ModelSource | None, out: Path):
    """``(engine, tokenizer)`` for ``--engine``; tokenizer may be None for a sidecar."""
    kind, urls = parse_engine(cfg.engine)
    if kind == "jax":
        from jaxalign.rollout import JaxEngine

        model, tokenizer = load_model(source, cfg.dtype)
        return JaxEngine(model, tokenizer, max_batch_size=cfg.engine_batch), tokenizer
    if kind == "vllm":
        from jaxalign.rollout import VllmEngine
        from jaxalign.rollout.vllm_engine import VllmOptions

        model_dir = hf_dir_for(source, out)
        try:
            engine = VllmEngine(model_dir, VllmOptions(seed=cfg.seed))
        except ImportError as e:
            raise EvalError(f"--engine vllm needs vLLM, which does not import here ({e}); "
                            "run this script in the vLLM environment (launch/vllm_env.sh), "
                            "or serve the model with vLLM and use --engine openai:URL, or use "
                            "--engine jax") from None
        return engine, engine.tokenizer
    if kind == "openai":
        try:
            return OpenAIEngine(urls[0], model=cfg.model, concurrency=cfg.engine_batch), None
        except OpenAIError as e:
            raise EvalError(f"--engine {cfg.engine}: {e}") from None
    from jaxalign.rollout import SidecarEngine, SidecarError

    try:
        engine = SidecarEngine(urls, startup_timeout=30.0)
    except (SidecarError, ValueError) as e:
        raise EvalError(f"--engine {cfg.engine}: {e}") from None
    # The tokenizer (for chat prompts and budget forcing): --model's, else the sidecar's own
    # --model directory when this host can read it.
    if source is not None and source.kind == "hf":
        model_dir = source.path
    else:
        model_dir = next(iter(engine.health().values())).get("model")
        model_dir = model_dir if model_dir and Path(model_dir).is_dir() else None
    if model_dir is None:
        return engine, None
    from jaxalign.models import CheckpointError, load_tokenizer

    try:
        return engine, load_tokenizer(model_dir)
    except CheckpointError as e:
        raise EvalError(f"--model {model_dir}: {e}") from None


# --- an OpenAI-compatible completions server ------------------------------------------------


class OpenAIError(RuntimeError):
    """An OpenAI-compatible server refused a request or could not be reached."""


class OpenAIEngine:
    """Generates with any OpenAI-compatible ``POST /v1/completions`` server.

    A stock ``vllm serve``, SGLang, or anything else speaking the completions API: one
    request per prompt (``model``, ``prompt``, ``max_tokens``, ``temperature``, ``top_p``,
    ``n``, ``stop``, ``seed``, ``logprobs: 1``), up to ``concurrency`` in flight (the
    server batches them). Prompt ``i`` is seeded like ``VllmEngine`` seeds it:
    ``seeds[i]`` when given (``generate_seeded``), else ``prompt_seed(params.seed, i)``.

    What the API does not carry: token ids (``token_ids`` holds -1 per token, counted from
    the returned log-probs' tokens, else the usage count when ``n == 1``; so lengths and
    truncation are right, ids are not) and the stop string, which servers cut from the
    text: it is put back when ``include_stop_str_in_output`` and the server names it
    (``stop_reason``: vLLM; ``matched_stop``: SGLang). A server that names none cannot
    tell EOS from a stop string, so nothing is appended (a warning says so, once).

    Args:
        url: the server, ``http://HOST:PORT`` (a trailing ``/v1`` is accepted).
        model: the served model's name (default: the first of ``GET /v1/models``).
        concurrency: requests in flight.
        timeout: seconds per request.
    """

    def __init__(self, url: str, *, model: str | None = None, concurrency: int = 16,
                 timeout: float = 600.0):
        self.base = url.rstrip("/").removesuffix("/v1")
        self.concurrency = max(1, concurrency)
        self.timeout = timeout
        self.weights_version = 0
        self._warned = False
        self.model = model or self._served_model()

    def _http(self, method: str, path: str, payload: dict | None = None) -> dict:
        import urllib.error
        import urllib.request

        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if os.environ.get("OPENAI_API_KEY"):
            req.add_header("Authorization", f"Bearer {os.environ['OPENAI_API_KEY']}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            body = e.read()[:500].decode(errors="replace")
            raise OpenAIError(f"{method} {self.base}{path}: HTTP {e.code}: {body}") from None
        except (OSError, ValueError) as e:  # refused, timed out, not JSON
            raise OpenAIError(f"{method} {self.base}{path}: {type(e).__name__}: {e}") from None

    def _served_model(self) -> str:
        models = self._http("GET", "/v1/models").get("data") or []
        if not models:
            raise OpenAIError(f"{self.base}/v1/models lists no model; pass --model NAME")
        return models[0]["id"]

    def generate(self, prompts, params, *, seeds=None):
        """``params.n`` completions per prompt (texts); ``seeds``: one per prompt."""
        import concurrent.futures

        from jaxalign.rollout.vllm_engine import prompt_seed

        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        if any(not isinstance(p, str) for p in prompts):
            raise ValueError("--engine openai takes text prompts")
        if seeds is None:
            seeds = [prompt_seed(params.seed, i) for i in range(len(prompts))]
        with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(lambda ps: self._one(ps[0], params, int(ps[1])),
                                 zip(prompts, seeds, strict=True)))

    def _one(self, prompt: str, params, seed: int) -> list:
        from jaxalign.rollout import Completion

        answer = self._http("POST", "/v1/completions", {
            "model": self.model, "prompt": prompt, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "n": params.n,
            "stop": list(params.stop) or None, "seed": seed, "logprobs": 1,
        })
        choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != params.n:
            raise OpenAIError(f"{self.base}: {len(choices)} choices for n={params.n}")
        usage = (answer.get("usage") or {}).get("completion_tokens")
        out = []
        for choice in choices:
            text, finish = choice.get("text") or "", choice.get("finish_reason")
            stop = choice.get("stop_reason", choice.get("matched_stop"))
            named = "stop_reason" in choice or "matched_stop" in choice
            if finish == "stop" and params.include_stop_str_in_output and params.stop:
                if isinstance(stop, str):
                    text += stop
                elif not named and not self._warned:
                    self._warned = True
                    print(f"warning: {self.base} does not say which stop string ended a "
                          "completion; responses are scored without it", file=sys.stderr)
            tokens = (choice.get("logprobs") or {}).get("tokens")
            count = len(tokens) if tokens is not None else (usage if params.n == 1 else 0)
            out.append(Completion(
                text=text, token_ids=[-1] * int(count or 0), logprobs=None,
                finish_reason="length" if finish == "length" else "stop",
                stop_reason=stop if isinstance(stop, str | int) else None,
            ))
        return out


# --- saved responses -----------------------------------------------------------------------


def read_responses(path: str, benchmarks: dict[str, list], default_benchmark: str | None):
    """Rows of a responses JSONL -> ``{benchmark: {(index, sample): (Response, prompt)}}``.

    Each row needs ``response`` (or ``text``), ``index`` (0-based row of the benchmark) or
    ``id``, and ``benchmark`` unless a single benchmark is given. Optional: ``sample``
    (default: order of appearance), ``length`` or ``token_ids`` (tokens), ``finish_reason``,
    ``prompt``. A torn last line is ignored. Rows of other benchmarks are skipped.
    """
    by_id = {name: {e.id: i for i, e in enumerate(ex) if e.id is not None}
             for name, ex in benchmarks.items()}
    out: dict[str, dict] = {name: {} for name in benchmarks}
    next_sample: dict[tuple[str, int], int] = {}
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                continue  # a torn last line of an interrupted writer
            raise EvalError(f"{where}: invalid JSON ({e.msg})") from None
        name = row.get("benchmark", default_benchmark)
        if name is None:
            raise EvalError(f"{where}: no 'benchmark' field (or pass one --benchmarks)")
        if name not in out:
            continue
        text = row.get("response", row.get("text"))
        if not isinstance(text, str):
            raise EvalError(f"{where}: no 'response' text")
        if "index" in row:
            index = row["index"]
            if not isinstance(index, int) or not 0 <= index < len(benchmarks[name]):
                raise EvalError(f"{where}: index {index!r} is not a row of {name} (0.."
                                f"{len(benchmarks[name]) - 1}; --limit applies)")
        elif str(row.get("id")) in by_id[name] or row.get("id") in by_id[name]:
            index = by_id[name].get(row["id"], by_id[name].get(str(row["id"])))
        else:
            raise EvalError(f"{where}: needs 'index' (or an 'id' of {name})")
        sample = row.get("sample", next_sample.get((name, index), 0))
        next_sample[(name, index)] = int(sample) + 1
        length = row.get("length")
        if length is None and isinstance(row.get("token_ids"), list):
            length = len(row["token_ids"])
        response = evaluation.Response(text, length, row.get("finish_reason"),
                                       row.get("prompt_length"))
        out[name][(index, int(sample))] = (response, row.get("prompt"))
    return out


def _benchmarks_in(path: str) -> list[str]:
    names: dict[str, None] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("benchmark"), str):
            names[row["benchmark"]] = None
    return list(names)


# --- the run -------------------------------------------------------------------------------


def check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Refuses to resume into ``out`` with settings other than those its samples used."""
    path = out / "run.json"
    if not path.is_file():
        return
    before = json.loads(path.read_text()).get("settings", {})
    changed = [f"{k}: {before.get(k)!r} there, {v!r} now" for k, v in settings.items()
               if before.get(k) != v]
    if changed:
        raise EvalError(f"--out {out} holds samples made with other settings ("
                        + "; ".join(changed) + "): use another --out, or the same settings "
                        "to resume")


def _write_run_json(out: Path, settings: dict[str, Any], cfg: EvalConfig) -> None:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "run.json"
    record = json.loads(path.read_text()) if path.is_file() else {"settings": settings,
                                                                  "invocations": []}
    record["invocations"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                  "argv": sys.argv, "config": dataclasses.asdict(cfg)})
    path.write_text(json.dumps(record, indent=2))


def _engine_errors() -> tuple[type[Exception], ...]:
    """Errors of an engine that are the environment's, not a bug: reported in one line."""
    from jaxalign.rollout import SidecarError

    return (SidecarError, OpenAIError)


def _progress(cfg: EvalConfig, name: str, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=name, unit="problem", disable=not cfg.progress,
                dynamic_ncols=True)


@dataclasses.dataclass
class Plan:
    """What ``run`` will do, worked out from the flags before any model is loaded.

    Attributes:
        template: the prompt template (a name or text with ``{question}``).
        reward: the verifier reward.
        budgets: budget-forcing settings to sweep (``[None]``: none).
        sampling: sampling parameters (its seed is replaced by each problem's own).
        source: where the weights come from (None: saved responses, or a sidecar alone).
        engine: ``"jax"``, ``"vllm"``, ``"sidecar"`` or ``"responses"``.
        benchmarks: examples per benchmark name.
        settings: what determines the samples (``run.json``; a resume must match).
    """

    template: str
    reward: str
    budgets: list
    sampling: Any
    source: ModelSource | None
    engine: str
    benchmarks: dict[str, list]
    settings: dict[str, Any]


def plan(cfg: EvalConfig) -> Plan:
    """Checks every flag and input that can be checked without a model; loads benchmarks."""
    template = resolve_prompt(cfg.prompt)
    reward = cfg.reward or evaluation.default_reward(template)
    try:
        evaluation.resolve_reward(reward)  # a bad spec is one line now, not after loading
    except ValueError as e:
        raise EvalError(f"--reward {reward!r}: {e}") from None
    budgets = parse_budgets(cfg.budget_forcing)
    if template == prompts.S1:
        from jaxalign.rollout.budget import S1_DELIMITERS

        budgets = [b if b is None else dataclasses.replace(b, **S1_DELIMITERS) for b in budgets]
    parse_fields(cfg.fields)
    if cfg.limit is not None and cfg.limit < 1:
        raise EvalError(f"--limit {cfg.limit} must be >= 1")
    if cfg.batch_size < 1 or cfg.engine_batch < 1:
        raise EvalError("--batch-size and --engine-batch must be >= 1")
    if cfg.num_workers < 0:
        raise EvalError(f"--num-workers {cfg.num_workers} must be >= 0")
    if cfg.dtype not in ("float32", "bfloat16", "float16"):
        raise EvalError(f"--dtype {cfg.dtype!r}; choose float32, bfloat16 or float16")
    source = None
    if cfg.responses is not None:
        if not os.path.isfile(cfg.responses):
            raise EvalError(f"--responses {cfg.responses}: no such file")
        if budgets != [None]:
            raise EvalError("--budget-forcing applies to generation, not to --responses")
        specs = cfg.benchmarks or _benchmarks_in(cfg.responses)
        if not specs:
            raise EvalError(f"--responses {cfg.responses}: no row names its benchmark; "
                            "pass --benchmarks")
        engine = "responses"
    else:
        engine, _ = parse_engine(cfg.engine)
        specs = cfg.benchmarks or list(BENCHMARKS)
        if cfg.model is None and engine not in ("sidecar", "openai"):
            raise EvalError(f"--engine {cfg.engine} needs --model (a HF directory or a run "
                            "directory), or pass --responses FILE to score saved generations")
        if engine == "openai":
            # The server holds the weights and tokenizer; --model is only the served name.
            if budgets != [None] or template in prompts.CHAT_TEMPLATES:
                raise EvalError(f"--engine {cfg.engine}: --budget-forcing and --prompt "
                                f"{'/'.join(prompts.CHAT_TEMPLATES)} need the model's tokenizer "
                                f"(here --prompt {cfg.prompt}); use --engine sidecar or jax")
        elif cfg.model is not None:
            source = resolve_model(cfg.model)
        if cfg.n > 1 and cfg.temperature == 0:
            # Allowed (pass@k then equals pass@1), but almost always a forgotten flag.
            print(f"warning: --n {cfg.n} at --temperature 0 (greedy) draws {cfg.n} identical "
                  "samples per problem; pass --temperature > 0 to sample, or --n 1",
                  file=sys.stderr)
    from jaxalign.rollout import SamplingParams

    stop = evaluation.default_stop(template, reward)  # chat and s1: <|im_end|>
    try:
        sampling = SamplingParams(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_tokens=cfg.max_tokens, stop=stop,
                                  include_stop_str_in_output=bool(stop), seed=cfg.seed,
                                  logprobs=False)
    except ValueError as e:
        message = str(e).replace("invalid SamplingParams", "invalid sampling flags")
        raise EvalError(message) from None
    if template not in prompts.CHAT_TEMPLATES:
        evaluation.build_prompt(template, "1+1")  # fails now rather than after loading

    if engine == "responses":
        settings = {"mode": "responses", "responses": os.path.abspath(cfg.responses)}
    else:
        model = source.describe() if source else f"(served by {cfg.engine})"
        if engine == "openai" and cfg.model:
            model = f"{cfg.model} (served by {cfg.engine})"
        settings = {"mode": "generate", "model": model, "n": cfg.n,
                    "temperature": cfg.temperature, "top_p": cfg.top_p,
                    "max_tokens": cfg.max_tokens, "seed": cfg.seed, "seeding": SEEDING}
    settings.update(prompt=template, reward=reward, split=cfg.split, fields=cfg.fields)
    return Plan(template, reward, budgets, sampling, source, engine,
                load_benchmarks(cfg, specs), settings)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluates as ``cfg`` says and writes everything under ``cfg.out``.

    Returns:
        The ``summary.json`` content: ``settings``, ``results`` (per run name: ``summarize``
        metrics plus ``benchmark`` and ``budget``) and ``progress`` (per run name: problems
        ``generated`` (or scored) now and ``skipped`` as already done).

    Raises:
        EvalError: a bad flag or input, found before any generation where possible.
    """
    p = plan(cfg)
    out = Path(cfg.out)
    check_settings(out, p.settings)
    if p.engine == "responses":
        runs, progress = score_saved(cfg, p, out)
    else:
        runs, progress = generate(cfg, p, out)
    results, records = {}, {}
    for run_name, (name, budget, indices) in runs.items():
        records[run_name] = evaluation.SampleStore(_samples_path(out, run_name)).rows(indices)
        budget_info = None if budget is None else {"max_thinking": budget.max_thinking_tokens,
                                                   "wait": budget.num_waits}
        results[run_name] = {"benchmark": name, "budget": budget_info,
                             **evaluation.summarize(records[run_name])}
    summary = _finite({"settings": {**p.settings, "engine": p.engine, "limit": cfg.limit},
                       "results": results, "progress": progress})
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "report.md").write_text(markdown_report(summary))
    if cfg.plots:
        write_plots(out, results, records)
    return summary


def _samples_path(out: Path, run_name: str) -> Path:
    return out / "samples" / f"{run_name}.jsonl"


def generate(cfg: EvalConfig, p: Plan, out: Path):
    """Generates and scores every problem not already in ``out``, batch by batch.

    Returns:
        ``(runs, progress)``: per run name ``(benchmark, budget, indices)`` and the counts
        of problems generated now and skipped.
    """
    engine, tokenizer = build_engine(cfg, p.source, out)
    template = p.template
    if p.template in prompts.CHAT_TEMPLATES:
        try:
            evaluation.build_prompt(evaluation.CHAT, "1+1", tokenizer)
            if p.template == prompts.S1:  # rendered once; each question fills {question}
                template = prompts.as_template_text(prompts.S1, tokenizer)
        except ValueError as e:
            raise EvalError(f"--prompt {p.template}: {e}") from None
    if p.budgets != [None] and tokenizer is None:
        raise EvalError("--budget-forcing needs the model's tokenizer: pass --model (the "
                        "HF directory the sidecar serves)")
    _write_run_json(out, p.settings, cfg)  # the inputs check out: from here on, results
    runs, progress = {}, {}
    for name, examples in p.benchmarks.items():
        for budget in p.budgets:
            run_name = name if budget is None else f"{name}@{budget_label(budget)}"
            store = evaluation.SampleStore(_samples_path(out, run_name))
            done = store.done(cfg.n)
            todo = [i for i in range(len(examples)) if i not in done]
            bar = _progress(cfg, run_name, len(examples), len(examples) - len(todo))
            # Seeded by benchmark name (not run name): the budgets of a sweep sample each
            # problem with the same noise, so they differ by the budget alone.
            seeds = evaluation.problem_seeds(cfg.seed, name, examples)
            # Batches only bound what a kill can lose: a problem's samples depend on its
            # own seed, not on its batch, so skipping done problems changes nothing.
            for start in range(0, len(examples), cfg.batch_size):
                batch = [i for i in range(start, min(start + cfg.batch_size, len(examples)))
                         if i not in done]
                if not batch:
                    continue
                try:
                    records = evaluation.rollout_and_score(
                        engine, [examples[i] for i in batch], template=template,
                        reward=p.reward, sampling=p.sampling, seeds=[seeds[i] for i in batch],
                        num_workers=cfg.num_workers, budget=budget, tokenizer=tokenizer,
                        timeout=cfg.grading_timeout, indices=batch)
                except _engine_errors() as e:  # e.g. a sidecar refusing an over-long prompt
                    raise EvalError(f"{run_name}: generation failed: {e} (finished batches "
                                    "are saved; fix the cause and re-run to resume)") from None
                store.append([{"benchmark": name, "run": run_name, **r} for r in records])
                bar.update(len(batch))
            bar.close()
            progress[run_name] = {"generated": len(todo), "skipped": len(examples) - len(todo)}
            runs[run_name] = (name, budget, list(range(len(examples))))
    if hasattr(engine, "close"):
        engine.close()
    return runs, progress


def score_saved(cfg: EvalConfig, p: Plan, out: Path):
    """Scores the ``--responses`` rows not already in ``out``; returns like ``generate``."""
    default = next(iter(p.benchmarks)) if len(p.benchmarks) == 1 else None
    saved = read_responses(cfg.responses, p.benchmarks, default)
    if not any(saved.values()):
        raise EvalError(f"--responses {cfg.responses}: no rows of {', '.join(p.benchmarks)}")
    _write_run_json(out, p.settings, cfg)
    runs, progress = {}, {}
    for name, examples in p.benchmarks.items():
        rows = saved[name]
        if not rows:
            print(f"note: {cfg.responses} has no rows of {name}; it is left out",
                  file=sys.stderr)
            continue
        store = evaluation.SampleStore(_samples_path(out, name))
        pending: dict[int, list[int]] = {}  # problem -> its sample numbers not yet scored
        for i, j in sorted(k for k in rows if k not in store):
            pending.setdefault(i, []).append(j)
        indices = sorted({i for i, _ in rows})
        todo = sorted(pending)
        bar = _progress(cfg, name, len(indices), len(indices) - len(todo))
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            samples = {i: pending[i] for i in batch}
            records = evaluation.score_responses(
                [examples[i] for i in batch],
                [_saved_prompt(rows, i, samples[i], p.template, examples[i]) for i in batch],
                [[rows[(i, j)][0] for j in samples[i]] for i in batch],
                reward=p.reward, num_workers=cfg.num_workers, timeout=cfg.grading_timeout,
                indices=batch)
            numbers = iter([j for i in batch for j in samples[i]])
            for r in records:
                r["sample"] = next(numbers)  # the file's sample numbers, not 0..n-1
            store.append([{"benchmark": name, "run": name, **r} for r in records])
            bar.update(len(batch))
        bar.close()
        progress[name] = {"generated": len(todo), "skipped": len(indices) - len(todo)}
        runs[name] = (name, None, indices)
    return runs, progress


def _saved_prompt(rows, index, samples, template, example) -> str | None:
    prompt = rows[(index, samples[0])][1]
    if prompt is None and template not in prompts.CHAT_TEMPLATES:
        prompt = evaluation.build_prompt(template, example.question)
    return prompt


def _finite(x):
    """NaN and inf -> None, so summary.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


# --- the report ----------------------------------------------------------------------------


def _pct(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}%"


def _num(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.1f}"


def markdown_report(summary: dict[str, Any]) -> str:
    """``report.md``: settings, the main table, pass@k / maj@k when n > 1."""
    s = summary["settings"]
    lines = ["# Evaluation report", ""]
    for key in ("mode", "model", "responses", "engine", "reward", "n", "temperature", "top_p",
                "max_tokens", "seed", "split", "limit"):
        if s.get(key) is not None:
            lines.append(f"- {key}: `{s[key]}`")
    prompt = s["prompt"]
    lines.append(f"- prompt: `{prompt if prompt in PROMPTS else 'custom template'}`")
    lines += [
        "",
        "| benchmark | problems | samples | accuracy (95% CI) | format rate | F1 A1 | F1 A0 "
        "| F0 | length all / correct / incorrect | truncated | grading timeouts |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, r in summary["results"].items():
        lo, hi = r["accuracy_ci95"]
        c = r["counts"]
        lines.append(
            f"| {name} | {r['examples']} | {r['samples']} | {_pct(r['accuracy'])} "
            f"({_pct(lo)} to {_pct(hi)}) | {_pct(r['format_rate'])} | {c['format1_answer1']} "
            f"| {c['format1_answer0']} | {c['format0']} | {_num(r['response_length'])} / "
            f"{_num(r['response_length_correct'])} / {_num(r['response_length_incorrect'])} "
            f"| {r['truncated']} | {r['timeouts']} |"
        )
    lines += ["", "F1 A1: format and answer right; F1 A0: format right, answer wrong; F0: "
              "format wrong. Lengths in tokens. 95% CI: Wilson, over problems when there are "
              "several samples per problem."]
    multi = {k: r for k, r in summary["results"].items() if "pass@k" in r}
    if multi:
        lines += ["", "| benchmark | pass@k | maj@k |", "|---|---|---|"]
        for name, r in multi.items():
            p = ", ".join(f"@{k} {_pct(v)}" for k, v in r["pass@k"].items())
            m = ", ".join(f"@{k} {_pct(v)}" for k, v in r["maj@k"].items())
            lines.append(f"| {name} | {p} | {m} |")
    return "\n".join(lines) + "\n"


def write_plots(out: Path, results: dict[str, dict], records: dict[str, list]) -> list[Path]:
    """``accuracy.png``, ``lengths.png`` and (several budgets) ``budget.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    names = list(results)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(names) + 1.5), 3.5))
    acc = [100 * (results[k]["accuracy"] or 0.0) for k in names]  # None: no samples
    lo = [100 * (results[k]["accuracy_ci95"][0] or 0.0) for k in names]
    hi = [100 * (results[k]["accuracy_ci95"][1] or 0.0) for k in names]
    ci = [[max(0.0, a - low) for a, low in zip(acc, lo, strict=True)],
          [max(0.0, high - a) for a, high in zip(acc, hi, strict=True)]]
    ax.bar(range(len(names)), acc, yerr=ci, capsize=4, color="tab:blue")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy per benchmark (95% CI)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)
    written.append(out / "accuracy.png")

    cols = min(3, len(names))
    rows_ = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.0 * rows_), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        correct = [r["length"] for r in records[name]
                   if r.get("length") is not None and r["answer_reward"] > 0]
        wrong = [r["length"] for r in records[name]
                 if r.get("length") is not None and r["answer_reward"] <= 0]
        if correct or wrong:
            bins = min(40, max(5, len(set(correct + wrong))))
            ax.hist([wrong, correct], bins=bins, label=["incorrect", "correct"],
                    color=["tab:red", "tab:green"], alpha=0.7)
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("response length (tokens)")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out / "lengths.png", dpi=110)
    plt.close(fig)
    written.append(out / "lengths.png")

    budgeted = [k for k in names if results[k]["budget"] is not None]
    if len({json.dumps(results[k]["budget"]) for k in budgeted}) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        lines: dict[tuple[str, int], list] = {}
        for k in budgeted:
            b = results[k]["budget"]
            lines.setdefault((results[k]["benchmark"], b["wait"]), []).append(
                (b["max_thinking"], 100 * results[k]["accuracy"]))
        for (bench, wait), pts in lines.items():
            pts.sort()
            label = bench + (f" (wait {wait})" if wait else "")
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("thinking budget (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("accuracy vs thinking budget")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "budget.png", dpi=110)
        plt.close(fig)
        written.append(out / "budget.png")
    return written


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        summary = run(cfg)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((Path(cfg.out) / "report.md").read_text())
    done = sum(p["generated"] for p in summary["progress"].values())
    skipped = sum(p["skipped"] for p in summary["progress"].values())
    print(f"{done} problems evaluated now, {skipped} already done; wrote {cfg.out}/summary.json, "
          "report.md and samples/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
