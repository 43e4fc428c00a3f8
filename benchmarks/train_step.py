"""Full SFT train-step throughput and MFU: the step ``jaxalign.trainer.Trainer`` runs.

The step is what training runs: forward (optionally with the chunked vocabulary
projection), the SFT loss on response tokens, backward, global-norm clipping and the AdamW
update, one ``jax.jit`` with donated parameters and optimizer state. MFU is model FLOPs
(``Qwen2Config.flops_per_token``: 6 x matmul params + attention, per token, fwd+bwd) per
second over a peak: on CPU the peak is *measured* here (a large fp32 ``jnp.dot``), so the
ratio says how close the step gets to this machine's matmul speed; on GPU pass the data
sheet's peak with ``--peak-tflops`` (989 for H100 SXM dense bf16).

    python benchmarks/train_step.py                            # ~21M params, 4 x 512, CPU
    python benchmarks/train_step.py --preset 1p5b --dtype bfloat16 --batch 4 --seq 2048 \\
        --attention cudnn --remat full --chunk 512 --peak-tflops 989      # one H100
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.algorithms.sft import sft_loss_fn
from jaxalign.models import init_model, qwen2p5_math_1p5b
from jaxalign.models.qwen2 import Qwen2Config
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainer import Trainer

PRESETS = {
    "21m": lambda **kw: Qwen2Config(
        vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, **kw),
    "1p5b": qwen2p5_math_1p5b,
}


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32, iters: int = 10) -> float:
    """FLOP/s of one large square ``jnp.dot`` on the default device (median of ``iters``)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        f(a, a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="21m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="xla")
    ap.add_argument("--remat", default="none")
    ap.add_argument("--chunk", type=int, default=0, help="chunked vocabulary projection")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=0.0,
                    help="device peak; 0 measures a large fp32 matmul instead")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args()

    cfg = PRESETS[args.preset](dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype),
                               attention_impl=args.attention, remat=args.remat)
    model = init_model(cfg, seed=0)
    tx, _ = make_optimizer(OptimConfig(lr=1e-5, total_steps=1000, weight_decay=1e-4))
    trainer = Trainer.create(model, tx, sft_loss_fn(chunk_size=args.chunk))
    del model
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, (args.batch, args.seq + 1)).astype(np.int32)
    mask = np.ones((args.batch, args.seq), bool)
    mask[:, : args.seq // 4] = False  # a prompt quarter without loss, as in SFT
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": mask}

    t0 = time.perf_counter()
    jax.block_until_ready(trainer.train_step(batch))
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(trainer.train_step(batch))
    times = []
    for _ in range(args.iters):
        t = time.perf_counter()
        jax.block_until_ready(trainer.train_step(batch))
        times.append(time.perf_counter() - t)
    step_s = float(np.median(times))
    tokens = args.batch * args.seq
    flops = cfg.flops_per_token(args.seq) * tokens
    peak = args.peak_tflops * 1e12 if args.peak_tflops else matmul_peak_flops()
    out = {
        "preset": args.preset, "params": cfg.num_params(), "batch": args.batch, "seq": args.seq,
        "dtype": args.dtype, "attention": args.attention, "remat": args.remat,
        "chunk": args.chunk, "device": str(jax.devices()[0].device_kind),
        "compile_s": round(compile_s, 1), "step_s": round(step_s, 4),
        "tokens_per_s": round(tokens / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 4),
        "peak_tflops": round(peak / 1e12, 4),
        "peak": "given" if args.peak_tflops else "measured fp32 matmul",
        "mfu": round(flops / step_s / peak, 4),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
