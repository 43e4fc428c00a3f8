"""Decode throughput: jaxalign's JaxEngine vs transformers ``generate``, same run, same weights.

    python benchmarks/rollout.py                      # 21M model, batch 32, 64 + 128 tokens
    python benchmarks/rollout.py --preset demo        # a ~2M-parameter demo-sized model
    python benchmarks/rollout.py --preset 1p5b --dtype bfloat16 --batch 64 --prompt 256 \
        --new 512                                     # Qwen2.5-Math-1.5B shape, one GPU

Both generate exactly ``--new`` tokens per row (no EOS), greedy and sampled
(temperature 1); generated tokens/s are medians over ``--iters`` calls after one warm-up
(the JAX warm-up includes compilation, which is reported separately).
Needs torch (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import init_model, save_pretrained
from jaxalign.models.qwen2 import Qwen2Config
from jaxalign.rollout import JaxEngine, SamplingParams

PRESETS = {
    "21m": dict(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    # Qwen2.5-Math-1.5B's shape (random weights): for a GPU.
    "1p5b": dict(
        vocab_size=151936,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
    ),
    "demo": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}


def median_time(fn, iters):
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="21m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    cfg = Qwen2Config(
        **PRESETS[args.preset],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype=jnp.dtype(args.dtype),
        param_dtype=jnp.dtype(args.dtype),
    )
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, cfg.vocab_size, (args.batch, args.prompt))
    new_tokens = args.batch * args.new
    print(
        f"{args.preset}: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch}, prompt "
        f"{args.prompt}, {args.new} new tokens, {args.dtype}, {jax.devices()[0].device_kind}"
    )

    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=args.batch)
    results = {}
    for mode, temperature in [("greedy", 0.0), ("sampled", 1.0)]:
        params = SamplingParams(temperature=temperature, max_tokens=args.new, seed=0)

        def run(params=params):
            out = engine.generate(prompts.tolist(), params)
            assert all(len(c[0].token_ids) == args.new for c in out)

        t = time.perf_counter()
        run()
        results[f"jax_{mode}_first_call_s"] = time.perf_counter() - t
        results[f"jax_{mode}"] = new_tokens / median_time(run, args.iters)

    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        ref = (
            transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=getattr(torch, args.dtype))
            .to(device)
            .eval()
        )
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)
    for mode, sample in [("greedy", False), ("sampled", True)]:

        def run_torch(sample=sample):
            with torch.no_grad():
                out = ref.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=args.new,
                    min_new_tokens=args.new,
                    do_sample=sample,
                    temperature=1.0 if sample else None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=0,
                    eos_token_id=None,
                )
            assert out.shape[1] == args.prompt + args.new

        run_torch()
        results[f"torch_{mode}"] = new_tokens / median_time(run_torch, args.iters)

    print(
        f"{'':>8} {'jaxalign tok/s':>15} {'transformers tok/s':>19} {'ratio':>6} "
        f"{'jax 1st call (compile) s':>25}"
    )
    for mode in ("greedy", "sampled"):
        j, t = results[f"jax_{mode}"], results[f"torch_{mode}"]
        print(
            f"{mode:>8} {j:15,.0f} {t:19,.0f} {j / t:6.2f} "
            f"{results[f'jax_{mode}_first_call_s']:25.1f}"
        )


if __name__ == "__main__":
    main()
