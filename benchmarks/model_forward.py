"""Forward and forward+backward throughput: jaxalign (jit) vs transformers (PyTorch), one run.

Both frameworks get the same Qwen2-shaped config, the same weights (exported by jaxalign,
loaded by transformers), the same batch, fp32 by default. Prints tokens/s for each and the
jaxalign / PyTorch ratio.

    python benchmarks/model_forward.py                   # ~21M params, batch 4 x 512, CPU
    python benchmarks/model_forward.py --preset 1p5b --dtype bfloat16 --batch 8 --seq 2048  # GPU

Needs torch (``pip install -e '.[test]'``).
"""

from __future__ import annotations

import argparse
import json
import os

# On GPU, JAX would otherwise reserve 75% of memory up front and starve PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models import init_model, qwen2p5_math_1p5b, save_pretrained
from jaxalign.models.qwen2 import Qwen2Config

PRESETS = {
    # ~21M parameters: the size the foundation issue's targets were measured at.
    "21m": lambda: Qwen2Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
    ),
    "1p5b": qwen2p5_math_1p5b,
}


def time_fn(fn, warmup: int, iters: int) -> float:
    """Median seconds per call (the function must block until done)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def jax_fns(model, ids):
    """ids [B, T + 1]: the model sees ids[:, :-1], the loss predicts ids[:, 1:]."""
    graphdef, state = nnx.split(model)

    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids[:, :-1])

    def loss_fn(state, ids):
        logits = nnx.merge(graphdef, state)(ids[:, :-1]).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))

    fwd = jax.jit(forward)
    fwd_bwd = jax.jit(jax.value_and_grad(loss_fn))
    ids = jnp.asarray(ids)
    return (
        lambda: jax.block_until_ready(fwd(state, ids)),
        lambda: jax.block_until_ready(fwd_bwd(state, ids)),
    )


def torch_fns(path, ids, dtype, device):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation="sdpa"
    ).to(device)
    ids_t = torch.tensor(ids, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.no_grad():
            _ = model(ids_t[:, :-1]).logits
        sync()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        logits = model(ids_t[:, :-1]).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids_t[:, 1:].reshape(-1)
        )
        loss.backward()
        sync()

    return forward, fwd_bwd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="21m", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--attention", default="xla", help="jaxalign attention_impl")
    ap.add_argument("--remat", default="none", help="jaxalign remat policy")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="device peak (TFLOP/s) for MFU, e.g. 989 for H100 SXM bf16 dense",
    )
    args = ap.parse_args()

    cfg = PRESETS[args.preset]().replace(
        dtype=jnp.dtype(args.dtype),
        param_dtype=jnp.dtype(args.dtype),
        attention_impl=args.attention,
        remat=args.remat,
    )
    model = init_model(cfg, seed=0)
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq + 1))
    tokens = args.batch * args.seq
    platform = jax.devices()[0].platform
    print(
        f"config {args.preset}: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch} x "
        f"{args.seq}, {args.dtype}, jax {jax.__version__} on {jax.devices()[0].device_kind}"
    )

    results = {
        "preset": args.preset,
        "params": cfg.num_params(),
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
        "device": jax.devices()[0].device_kind,
    }
    with tempfile.TemporaryDirectory() as tmp:
        # PyTorch runs first and empties its cache afterwards: JAX's allocator keeps what it
        # has grown to, which would starve PyTorch on a GPU.
        if not args.skip_torch:
            save_pretrained(model, tmp)
            device = "cuda" if platform == "gpu" else "cpu"
            t_fwd, t_fwd_bwd = torch_fns(tmp, ids, args.dtype, device)
            results["torch_fwd_tok_s"] = tokens / time_fn(t_fwd, 2, args.iters)
            results["torch_fwd_bwd_tok_s"] = tokens / time_fn(t_fwd_bwd, 2, args.iters)
            del t_fwd, t_fwd_bwd
            if device == "cuda":
                import gc

                import torch

                gc.collect()
                torch.cuda.empty_cache()

    fwd, fwd_bwd = jax_fns(model, ids)
    del model
    results["jax_fwd_tok_s"] = tokens / time_fn(fwd, 2, args.iters)
    results["jax_fwd_bwd_tok_s"] = tokens / time_fn(fwd_bwd, 2, args.iters)

    print(f"{'':>14} {'jaxalign tok/s':>15} {'torch tok/s':>12} {'ratio':>6}")
    for name, key in [("forward", "fwd"), ("forward+back", "fwd_bwd")]:
        j = results[f"jax_{key}_tok_s"]
        t = results.get(f"torch_{key}_tok_s")
        ratio = f"{j / t:6.2f}" if t else "   n/a"
        results[f"ratio_{key}"] = j / t if t else None
        print(f"{name:>14} {j:15,.0f} {t or float('nan'):12,.0f} {ratio}")
    if args.peak_tflops:
        for key, backward in [("fwd", False), ("fwd_bwd", True)]:
            flops = cfg.flops_per_token(args.seq, backward=backward)
            for fw in ("jax", "torch"):
                tok_s = results.get(f"{fw}_{key}_tok_s")
                if tok_s:
                    mfu = tok_s * flops / (args.peak_tflops * 1e12)
                    results[f"{fw}_{key}_mfu"] = mfu
                    print(f"MFU {fw:>5} {key:>7}: {100 * mfu:5.1f}% of {args.peak_tflops} TFLOP/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
