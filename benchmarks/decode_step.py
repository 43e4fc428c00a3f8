"""Where a decode step's time goes: jaxalign's cached forward vs transformers', same weights.

    python benchmarks/decode_step.py                  # 21M model, batch 32, 64 + 128 tokens
    python benchmarks/decode_step.py --preset demo

The ratio in ``benchmarks/rollout.py`` is bounded by these two steps: if PyTorch's step
is mostly kernels (not Python), a jitted step cannot win by removing overhead. Prints:
- jaxalign: the ``JaxEngine``'s prefill ms, and ms per step of ``--new`` cached
  single-token forwards in one jitted ``fori_loop`` (greedy feedback, the engine's decode
  without its bookkeeping);
- transformers: the same prefill and per-step ms (eager, ``DynamicCache``), and the
  step's top PyTorch operators by self CPU time (``torch.profiler``);
- the step's matmul FLOPs and the GFLOP/s each side reaches on them.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rollout import PRESETS

from jaxalign.models import init_model, save_pretrained
from jaxalign.models.qwen2 import Qwen2Config
from jaxalign.rollout import JaxEngine
from jaxalign.rollout.sampling import first_argmax


def jax_times(model, prompts, new):
    engine = JaxEngine(model, eos_token_ids=(), pad_token_id=0, max_batch_size=len(prompts))
    graphdef, state = engine.graphdef, engine.state
    b = len(prompts)

    def prefill(state, ids):  # the engine's own prefill (its carry holds logits and cache)
        rows = jnp.arange(b, dtype=jnp.int32)
        carry = engine._prefill(state, ids, jnp.ones_like(ids, jnp.bool_), rows,
                                jnp.zeros(b, jnp.uint32), rows.astype(jnp.uint32),
                                jnp.zeros(b, jnp.bool_), jnp.int32(0),
                                max_tokens=new, room=new, pad_id=0)
        return carry.logits, carry.cache

    @functools.partial(jax.jit, donate_argnums=(2,))
    def decode(state, logits, cache):
        m = nnx.merge(graphdef, state)

        def body(_, carry):
            logits, cache = carry
            tok = first_argmax(logits.astype(jnp.float32))[:, None]
            out, cache = m(tok, jnp.ones_like(tok, jnp.bool_), cache=cache)
            return out[:, -1], cache

        return jax.lax.fori_loop(0, new, body, (logits, cache))

    ids = jnp.asarray(prompts, jnp.int32)
    pre, dec = [], []
    for _ in range(3):  # the first round compiles
        t = time.perf_counter()
        logits, cache = jax.block_until_ready(prefill(state, ids))
        pre.append(time.perf_counter() - t)
        t = time.perf_counter()
        jax.block_until_ready(decode(state, logits, cache))
        dec.append((time.perf_counter() - t) / new)
    return 1e3 * min(pre[1:]), 1e3 * min(dec[1:])


def torch_times(model_dir, prompts, new):
    import torch
    import transformers
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(os.cpu_count())
    ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)
    pre, dec = [], []
    with torch.no_grad():
        for _ in range(3):
            t = time.perf_counter()
            out = ref(ids, use_cache=True)
            pre.append(time.perf_counter() - t)
            cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            t = time.perf_counter()
            for _ in range(new):
                out = ref(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            dec.append((time.perf_counter() - t) / new)
        steps = 16
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                out = ref(tok, past_key_values=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:5]
    top = [(e.key, e.self_cpu_time_total / 1e3 / steps) for e in ops]  # ms per step
    return 1e3 * min(pre[1:]), 1e3 * min(dec[1:]), top


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="21m", choices=["21m", "demo"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    args = ap.parse_args()
    cfg = Qwen2Config(
        **PRESETS[args.preset],
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )
    model = init_model(cfg, seed=0)
    prompts = np.random.default_rng(0).integers(1, cfg.vocab_size, (args.batch, args.prompt))
    jax_pre, jax_step = jax_times(model, prompts, args.new)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        torch_pre, torch_step, top = torch_times(tmp, prompts, args.new)
    # Every parameter is a matmul weight once per token (the tied embedding as the LM head;
    # norms are negligible).
    gflop = 2 * args.batch * cfg.num_params() / 1e9
    print(
        f"{args.preset}: {cfg.num_params() / 1e6:.1f}M params, batch {args.batch}, prompt "
        f"{args.prompt}, {args.new} steps, fp32, {jax.devices()[0].device_kind}; "
        f"{gflop:.2f} GFLOP of matmuls per step"
    )
    print(f"{'':>13} {'prefill ms':>11} {'step ms':>8} {'GFLOP/s in step':>16}")
    rows = [("jaxalign", jax_pre, jax_step), ("transformers", torch_pre, torch_step)]
    for name, pre, step in rows:
        print(f"{name:>13} {pre:11.1f} {step:8.2f} {gflop / step * 1e3:16.0f}")
    print("transformers step, top operators by self CPU time (ms per step):")
    for key, ms in top:
        print(f"  {key:<50} {ms:6.2f}")


if __name__ == "__main__":
    main()
