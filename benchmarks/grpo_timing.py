"""A GRPO run's wall time by phase, through the real loop (``jaxalign.train.run``).

    python benchmarks/grpo_timing.py                    # CPU: the demo policy, 10 steps
    python benchmarks/grpo_timing.py --preset 1p5b      # one GPU: Qwen2.5-Math-1.5B shape

Runs ``configs/grpo.py`` (no SFT warm start, held-out evaluation only at the end) for
``--steps`` steps and reads the per-step ``time/*`` metrics from the run's
``metrics.jsonl``: generate (the rollout engine), score (the verifier), gather (multi-
process), batch (advantages, padding), old log-probs (one trainer forward over the rollout
batch), train (the updates), weight sync (trainer -> engine; for the in-process JAX
engine a device_put whose copy overlaps the next rollout). Step 1 includes compilation
and is reported apart; the table is the mean of steps 2..N.

``--preset 1p5b`` uses Qwen2.5-Math-1.5B's shape with random weights and the byte
tokenizer on the synthetic task (no downloads): random weights never stop early, so
every completion runs to ``--max-tokens``, the slowest case.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import tempfile

import numpy as np

from jaxalign import train
from jaxalign.config import qwen2p5_math_1p5b_model
from jaxalign.models import qwen2p5_math_1p5b

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCH_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
               "rope_theta", "tie_word_embeddings")
PHASES = ("generate", "score", "gather", "batch", "old_log_probs", "train", "weight_sync")


def load_config(preset: str):
    spec = importlib.util.spec_from_file_location("grpo_cfg", REPO / "configs" / "grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def build_config(args, workdir: str):
    cfg = load_config("demo")
    cfg.workdir = workdir
    cfg.warmstart.sft_steps = 0
    cfg.grpo.n_grpo_steps = args.steps
    cfg.eval.every = 0  # the last step is still evaluated (not part of the step times)
    cfg.data.num_eval = 32
    cfg.checkpoint.save_every = 0
    cfg.checkpoint.export_hf = False
    cfg.log.wandb_mode = "disabled"
    if args.preset == "1p5b":
        # The real preset's model settings (bf16, cuDNN, remat, chunked loss), its shape
        # with random weights instead of the hub checkpoint.
        qwen2p5_math_1p5b_model(cfg)
        shape = qwen2p5_math_1p5b()
        cfg.model.path, cfg.model.preset = "", "small"
        cfg.model.arch = {k: getattr(shape, k) for k in ARCH_FIELDS}
        cfg.grpo.rollout_batch_size = 256
        cfg.grpo.train_batch_size = 256
        cfg.optim.grad_accum_steps = 32
        cfg.engine.max_batch_size = 256
        cfg.train.width_multiple = 64  # cuDNN attention: padded widths a multiple of 64
        cfg.sampling.stop = ()
    default_tokens = 512 if args.preset == "1p5b" else cfg.sampling.max_tokens
    cfg.sampling.max_tokens = args.max_tokens or default_tokens
    return cfg


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="demo", choices=["demo", "1p5b"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=0, help="0: demo 48, 1p5b 512")
    ap.add_argument("--workdir", default="", help="default: a temporary directory")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be >= 2 (step 1 includes compilation)")
    with tempfile.TemporaryDirectory() as tmp:
        cfg = build_config(args, args.workdir or tmp)
        train.run(cfg)
        lines = []
        for path in pathlib.Path(cfg.workdir).rglob("metrics.jsonl"):
            lines += [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    steps = sorted((r for r in lines if "time/step_s" in r), key=lambda r: r["step"])
    if len(steps) != args.steps:
        raise SystemExit(f"expected {args.steps} steps in metrics.jsonl, found {len(steps)}")
    g = cfg.grpo
    print(f"{args.preset}: {args.steps} GRPO steps, {g.rollout_batch_size} rollouts "
          f"({g.rollout_batch_size // g.group_size} prompts x {g.group_size}) of <= "
          f"{cfg.sampling.max_tokens} tokens, train batch {g.train_batch_size}")
    later = steps[1:]
    total = np.mean([r["time/step_s"] for r in later])
    print(f"{'phase':>14} {'step 1 s':>9} {'steps 2..N s':>13} {'share':>6}")
    for phase in PHASES:
        first = steps[0][f"time/{phase}_s"]
        mean = float(np.mean([r[f"time/{phase}_s"] for r in later]))
        print(f"{phase:>14} {first:9.3f} {mean:13.3f} {mean / total:6.1%}")
    print(f"{'step':>14} {steps[0]['time/step_s']:9.3f} {total:13.3f}")
    tok = np.mean([r["time/rollout_tokens_per_s"] for r in later])
    print(f"rollout tokens/s (steps 2..N): {tok:,.0f}; mean response length "
          f"{np.mean([r['train/response_length'] for r in later]):.1f}")


if __name__ == "__main__":
    main()
