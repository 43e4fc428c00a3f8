"""Smoke run of the model stack on CPU, no downloads.

    python -m jaxalign.models [--out runs/tiny-model]

Builds a tiny random Qwen2 and a local character tokenizer, exports them as a Hugging Face
directory, loads that directory back with ``from_pretrained`` / ``AutoTokenizer``, checks the
round trip is exact, scores a prompt (per-token log-probs) and greedy-decodes a few tokens.
The weights are random, so the decoded text is noise: this checks the plumbing, not a model.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import nnx

from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import from_pretrained, init_model, save_pretrained, tiny


def main():
    ap = argparse.ArgumentParser(description="Smoke run of the jaxalign model stack.")
    ap.add_argument("--out", default="runs/tiny-model")
    ap.add_argument("--prompt", default="What is 12 + 30? <think>")
    ap.add_argument("--new-tokens", type=int, default=12)
    args = ap.parse_args()

    t0 = time.perf_counter()
    tokenizer = byte_tokenizer()
    cfg = tiny(vocab_size=len(tokenizer))
    model = init_model(cfg, seed=0)
    out = save_pretrained(model, args.out, tokenizer=tokenizer)
    loaded = from_pretrained(out, dtype=jnp.float32)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(nnx.state(model, nnx.Param)),
            jax.tree.leaves(nnx.state(loaded, nnx.Param)),
            strict=True,
        )
    )
    ids = np.asarray([tokenizer(args.prompt)["input_ids"]])
    logits = loaded(ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[0, :-1], axis=-1)
    token_logp = np.asarray(jnp.take_along_axis(logp, ids[0, 1:, None], axis=-1)[:, 0])

    forward = nnx.jit(lambda m, x: m(x)[:, -1].argmax(-1))
    seq = ids
    for _ in range(args.new_tokens):  # no KV cache yet: re-runs the whole prefix
        seq = np.concatenate([seq, np.asarray(forward(loaded, seq))[:, None]], axis=1)

    print(
        f"model: {cfg.num_params():,} params, exported to {out} and reloaded "
        f"({'bitwise identical' if same else 'MISMATCH'})"
    )
    print(f"prompt: {args.prompt!r} ({ids.shape[1]} tokens)")
    print(
        f"mean log-prob of the prompt tokens under the random model: {token_logp.mean():.3f} "
        f"(uniform would be {-np.log(cfg.vocab_size):.3f})"
    )
    print(f"greedy continuation: {tokenizer.decode(seq[0, ids.shape[1] :])!r}")
    print(f"done in {time.perf_counter() - t0:.1f}s")
    if not same:
        raise SystemExit("export round trip changed the parameters")


if __name__ == "__main__":
    main()
