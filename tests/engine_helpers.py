"""Helpers shared by the JaxEngine throughput and slot-refill tests."""

import numpy as np

from jaxalign.data.tokenizer import byte_tokenizer

TOK = byte_tokenizer()
# 12 of the ~270 tokens end a row: with a random model lengths are roughly geometric (mean
# ~22), so rows finish all along the way (the batch compacts, slots free for waiting rows).
EOS_IDS = tuple(range(40, 52))


def random_prompts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [rng.integers(60, 250, n).tolist() for n in lengths]


def token_ids(out):
    return [[c.token_ids for c in cs] for cs in out]


def shapes_of(engine, kind):
    return sorted(s for s in engine.shapes_seen if s[0] == kind)
