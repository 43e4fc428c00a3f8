"""The decode-step choices of the JAX sampler, each timed against its alternative in one run.

    python benchmarks/decode_ops.py                 # 21M-model shapes: batch 32, vocab 8192
    python benchmarks/decode_ops.py --preset demo   # demo-model shapes: vocab 512

Times one jitted call (median of ``--iters`` after a warm-up) of:
- greedy choice: ``jnp.argmax`` vs ``sampling.first_argmax`` (a max and a min-reduction);
- sampling: ``jax.random.categorical`` (a Gumbel number per vocabulary entry, per-row keys)
  vs ``sampling.categorical`` (one uniform per row, two-level inverse CDF);
- one-query attention over the cache: keys stored [B, K, S, H] vs [B, K, H, S] (the
  ``KVCache`` layout, timed through the model's ``attend_cached``), scores + softmax +
  values, fp32;
- the step's largest matmul shape, [B, D] x [D, F] fp32, in XLA vs PyTorch (``torch.mm``,
  if torch is installed), as GFLOP/s: what the decode step's matmuls can reach.
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.qwen2 import attend_cached
from jaxalign.rollout.sampling import categorical, first_argmax

PRESETS = {  # batch, vocab, kv heads, query heads per kv head, cache slots, head dim, D, F
    "21m": dict(b=32, v=8192, k=2, g=4, s=192, h=64, d=512, f=1408),
    "demo": dict(b=32, v=512, k=2, g=2, s=192, h=32, d=128, f=384),
}


def median_ms(fn, *args, iters):  # fn may also be a PyTorch call (synchronous on CPU)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def attention_keys_bksh(q, k, v, mask):  # k [B, K, S, H]: the score reduction runs over H
    # (unscaled scores: attention_keys_bkhs undoes attend_cached's 1/sqrt(H) to compare)
    s = jnp.sum(q[:, :, :, None, :] * k[:, :, None], axis=-1)
    p = jax.nn.softmax(jnp.where(mask[:, None, None], s, -1e30), axis=-1)
    return jnp.sum(p[..., None] * v[:, :, None], axis=-2)


def attention_keys_bkhs(q, k, v, mask):  # the model's own decode attention (KVCache layout)
    b, kv, g, h = q.shape
    q = q.reshape(b, 1, kv * g, h) * jnp.asarray(h**0.5, q.dtype)  # attend_cached scales q
    out = attend_cached(q, k, v, mask[:, None, None, :])  # [B, 1, N, H]
    return out.reshape(b, kv, g, h)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="21m", choices=sorted(PRESETS))
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    c = PRESETS[args.preset]
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(c["b"], c["v"])), jnp.float32)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), jnp.arange(c["b"]))
    q = jnp.asarray(rng.normal(size=(c["b"], c["k"], c["g"], c["h"])), jnp.float32)
    k = jnp.asarray(rng.normal(size=(c["b"], c["k"], c["s"], c["h"])), jnp.float32)
    v = jnp.asarray(rng.normal(size=(c["b"], c["k"], c["s"], c["h"])), jnp.float32)
    mask = jnp.asarray(rng.random((c["b"], c["s"])) < 0.8)
    k_t = jnp.swapaxes(k, -1, -2)
    np.testing.assert_allclose(
        attention_keys_bksh(q, k, v, mask), attention_keys_bkhs(q, k_t, v, mask), atol=1e-5
    )

    gumbel = jax.jit(jax.vmap(lambda key, row: jax.random.categorical(key, row)))
    rows = [
        ("greedy", "jnp.argmax", median_ms(jax.jit(lambda x: jnp.argmax(x, -1)), logits,
                                           iters=args.iters),
         "first_argmax", median_ms(jax.jit(first_argmax), logits, iters=args.iters)),
        ("sample", "jax.random.categorical", median_ms(gumbel, keys, logits, iters=args.iters),
         "categorical", median_ms(jax.jit(categorical), keys, logits, iters=args.iters)),
        ("attention", "keys [B,K,S,H]",
         median_ms(jax.jit(attention_keys_bksh), q, k, v, mask, iters=args.iters),
         "keys [B,K,H,S]",
         median_ms(jax.jit(attention_keys_bkhs), q, k_t, v, mask, iters=args.iters)),
    ]
    x = jnp.asarray(rng.normal(size=(c["b"], c["d"])), jnp.float32)
    w = jnp.asarray(rng.normal(size=(c["d"], c["f"])), jnp.float32)
    gflop = 2 * c["b"] * c["d"] * c["f"] / 1e9
    jax_mm = gflop / median_ms(jax.jit(jnp.matmul), x, w, iters=args.iters) * 1e3
    try:
        import torch

        torch.set_num_threads(os.cpu_count())
        xt, wt = torch.from_numpy(np.array(x)), torch.from_numpy(np.array(w))
        torch_mm = gflop / median_ms(lambda: torch.mm(xt, wt), iters=args.iters) * 1e3
    except ImportError:
        torch_mm = float("nan")
    print(f"{args.preset}: {c}, {jax.devices()[0].device_kind}")
    print(f"{'op':>10} {'alternative':>24} {'ms':>7} {'jaxalign':>16} {'ms':>7} {'speed-up':>8}")
    for op, alt, t_alt, ours, t_ours in rows:
        print(f"{op:>10} {alt:>24} {t_alt:7.3f} {ours:>16} {t_ours:7.3f} {t_alt / t_ours:8.1f}")
    print(f"matmul [{c['b']}, {c['d']}] x [{c['d']}, {c['f']}] fp32: XLA {jax_mm:.0f} GFLOP/s, "
          f"torch.mm {torch_mm:.0f} GFLOP/s")


if __name__ == "__main__":
    main()
