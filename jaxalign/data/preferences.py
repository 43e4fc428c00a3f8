"""Preference pairs for DPO: JSONL rows, generated pairs, and resumable batches of both responses.

    pairs = load_preference_jsonl("prefs.jsonl")          # {"prompt", "chosen", "rejected"} rows
    pairs = synthetic_preference_pairs(problems, seed=0)  # right vs wrong final answer
    data = tokenize_pairs(pairs, tokenizer, max_tokens=257, skip=False)
    it = make_preference_iterator(data, pad_id, batch_size=16, seq_buckets=(96,), seed=0)
    batch = next(it)  # chosen_* and rejected_* [16, 96]; get_state / set_state as SFT's

Rows are validated as SFT rows are (``jaxalign.data.datasets``): a bad row, one that is not
valid UTF-8 or JSON, not an object, or whose ``prompt``, ``chosen`` or ``rejected`` is
missing, not text or empty, or whose two responses are the same text (the pair says
nothing), is ``DataError("path:line: reason")``; with ``skip_invalid`` bad rows are skipped
and counted in a warning. Text is kept exactly as written.

Tokenization is SFT's (``jaxalign.data.pipeline.make_sft_iterator``): the prompt with the
tokenizer's special tokens, each response without them and followed by EOS, prompt and
response tokenized separately so the response mask is exact. Both responses of a pair share
one width, the smallest of ``seq_buckets`` that holds the longest row of the *global* batch,
so the jitted step compiles at most ``len(seq_buckets)`` times and every process picks the
same width. A pair whose prompt plus longer response does not fit the largest width is an
error naming the rows and how many there are, or, with ``skip``, dropped and counted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxalign.data import datasets
from jaxalign.data.datasets import DataError, MathExample
from jaxalign.data.pipeline import BatchIterator, _checksum, _global_batches, _shard
from jaxalign.data.synthetic import DEMO_TEMPLATE, sft_trace
from jaxalign.data.tokenize import check_buckets, collate_prompt_and_output, pick_bucket

logger = logging.getLogger(__name__)

# The arrays of one side of a pair, as ``collate_prompt_and_output`` names them.
SIDE_KEYS = ("input_ids", "labels", "response_mask")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """A prompt and two responses to it, the ``chosen`` one preferred.

    Attributes:
        prompt: the text the responses continue (already formatted; no template is applied).
        chosen: the preferred response.
        rejected: the dispreferred response.
        source: where the pair came from (``"path:line"``, ``"synthetic:7"``), for messages.
    """

    prompt: str
    chosen: str
    rejected: str
    source: str | None = None


def preference_from_row(row: Any, *, source: str | None = None) -> PreferencePair:
    """One validated pair from a decoded row; ``ValueError`` says what is wrong."""
    row = datasets._object(row)
    prompt, chosen, rejected = (datasets._text(row, f) for f in ("prompt", "chosen", "rejected"))
    if chosen == rejected:
        raise ValueError("fields 'chosen' and 'rejected' are the same text (no preference)")
    return PreferencePair(prompt, chosen, rejected, source)


def load_preference_jsonl(path: str | os.PathLike, *, skip_invalid: bool = False
                          ) -> list[PreferencePair]:
    """Pairs from a JSONL file of ``{"prompt", "chosen", "rejected"}`` objects.

    Raises:
        DataError: a bad row (unless ``skip_invalid``), ``"path:line: reason"``; a file
            without (valid) rows, ``"path: reason"``.
        FileNotFoundError: no such file.
    """
    path = os.fspath(path)
    return datasets._collect(
        datasets._jsonl_rows(path),
        lambda raw, where: preference_from_row(datasets._json_row(raw), source=where),
        what=path,
        skip_invalid=skip_invalid,
    )


def synthetic_preference_pairs(examples: Sequence[MathExample], template: str = DEMO_TEMPLATE,
                               *, seed: int = 0) -> list[PreferencePair]:
    """Pairs from generated arithmetic problems (``jaxalign.data.synthetic``).

    ``chosen`` is the correct r1_zero trace; ``rejected`` the same trace whose number in
    ``<answer>`` is off by 1-3 (kept non-negative): the steps are identical, so the only
    thing that separates them is whether the answer copies the last step's result.
    """
    rng = random.Random(seed)
    pairs = []
    for e in examples:
        slip = rng.choice([-3, -2, -1, 1, 2, 3])
        if int(e.answer) + slip < 0:
            slip = -slip
        prompt, chosen = sft_trace(e, template)
        _, rejected = sft_trace(e, template, slip=slip)
        pairs.append(PreferencePair(prompt, chosen, rejected, e.source))
    return pairs


# --- tokenization and batches ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenizedPairs:
    """Token ids of N pairs (EOS ends every response). ``sources`` name them in messages."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    sources: list[str]

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def lengths(self) -> np.ndarray:
        """``[N]`` tokens of the longer row of each pair (prompt + response)."""
        return np.array([len(p) + max(len(c), len(r)) for p, c, r in
                         zip(self.prompt_ids, self.chosen_ids, self.rejected_ids, strict=True)],
                        dtype=np.int64)

    def subset(self, index: Sequence[int]) -> TokenizedPairs:
        return TokenizedPairs([self.prompt_ids[i] for i in index],
                              [self.chosen_ids[i] for i in index],
                              [self.rejected_ids[i] for i in index],
                              [self.sources[i] for i in index])


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer: Any, *, max_tokens: int,
                   skip: bool, what: str = "preference pairs", fix: str = "") -> TokenizedPairs:
    """Token ids of every pair, held to ``max_tokens`` per row (prompt + longer response).

    Args:
        pairs: the pairs.
        tokenizer: a ``transformers`` tokenizer with EOS (SFT's tokenization).
        max_tokens: the most tokens a row may have (a width ``T`` holds ``T + 1``).
        skip: drop over-long pairs (counted in a warning) instead of raising.
        what: what the pairs are, for messages.
        fix: appended to the error: what to change.

    Raises:
        DataError: over-long pairs and not ``skip`` (how many, the first few by source and
            length, the limit), or none left after skipping.
    """
    if not pairs:
        raise DataError(what, "no pairs")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token (it ends every response)")
    eos = [tokenizer.eos_token_id]
    prompt_ids = tokenizer([p.prompt for p in pairs])["input_ids"]
    chosen = tokenizer([p.chosen for p in pairs], add_special_tokens=False)["input_ids"]
    rejected = tokenizer([p.rejected for p in pairs], add_special_tokens=False)["input_ids"]
    data = TokenizedPairs([list(p) for p in prompt_ids], [list(c) + eos for c in chosen],
                          [list(r) + eos for r in rejected],
                          [p.source or f"pair {i}" for i, p in enumerate(pairs)])
    lengths = data.lengths()
    over = np.flatnonzero(lengths > max_tokens)
    if not len(over):
        return data
    shown = ", ".join(f"{data.sources[i]}: {lengths[i]} tokens" for i in over[:5])
    more = f" and {len(over) - 5} more" if len(over) > 5 else ""
    summary = (f"{len(over)} of {len(data)} pairs have a row (prompt + response + EOS) longer "
               f"than {max_tokens} tokens ({shown}{more})")
    if not skip:
        raise DataError(what, f"{summary}; {fix}" if fix else summary)
    kept = np.flatnonzero(lengths <= max_tokens)
    if not len(kept):
        raise DataError(what, f"no pairs left: {summary}")
    logger.warning("skipped %s", summary)
    return data.subset(kept.tolist())


def collate_pairs(data: TokenizedPairs, pad_id: int, width: int) -> dict[str, np.ndarray]:
    """The pairs of ``data`` as one batch of width ``width``.

    Returns:
        ``chosen_input_ids``, ``chosen_labels`` ``[B, T]`` int32, ``chosen_response_mask``
        ``[B, T]`` bool, and the same three ``rejected_*`` arrays (``jaxalign.data.tokenize``'s
        layout: labels are the inputs shifted left by one, the mask covers the response).
    """
    out = {}
    for side, ids in (("chosen", data.chosen_ids), ("rejected", data.rejected_ids)):
        batch = collate_prompt_and_output(data.prompt_ids, ids, pad_id, pad_to=width)
        out.update({f"{side}_{k}": batch[k] for k in SIDE_KEYS})
    return out


def make_preference_iterator(
    data: TokenizedPairs,
    pad_id: int,
    *,
    batch_size: int,
    seq_buckets: Sequence[int],
    seed: int,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
) -> BatchIterator[dict[str, np.ndarray]]:
    """Shuffled, sharded, bucketed, resumable batches of pairs (``make_sft_iterator``'s rules).

    Args:
        data: tokenized pairs, every row within ``max(seq_buckets) + 1`` tokens
            (``tokenize_pairs``).
        pad_id: the tokenizer's pad id.
        batch_size: pairs per batch on this process.
        seq_buckets: the allowed widths ``T``.
        seed: the shuffling seed.
        num_epochs: passes over the data; None repeats forever.
        shard_index, shard_count: this process's shard (default: the JAX process's).

    Returns:
        A ``BatchIterator`` of ``collate_pairs`` batches, ``[batch_size, T]`` with ``T`` in
        ``seq_buckets``, with ``get_state`` / ``set_state``.
    """
    shard_index, shard_count = _shard(shard_index, shard_count, batch_size)
    buckets = check_buckets(seq_buckets)
    lengths = data.lengths()
    if lengths.max() > buckets[-1] + 1:
        raise ValueError(f"a pair of {lengths.max()} tokens does not fit the widest bucket "
                         f"{buckets[-1]}: tokenize_pairs(max_tokens={buckets[-1] + 1}) first")
    global_batch = batch_size * shard_count
    lo, hi = shard_index * batch_size, (shard_index + 1) * batch_size  # this process's rows

    def local_batch(indices: np.ndarray) -> dict[str, np.ndarray]:  # indices: [global batch]
        width = pick_bucket(int(lengths[indices].max()), buckets)
        return collate_pairs(data.subset(indices[lo:hi].tolist()), pad_id, width)

    dataset = _global_batches(len(data), global_batch, seed, num_epochs).map(local_batch)
    fingerprint = {
        "kind": "preferences",
        "seed": seed,
        "global_batch_size": global_batch,
        "seq_buckets": list(buckets),
        "num_examples": len(data),
        "checksum": _checksum(data.prompt_ids, [c + [-1] + r for c, r in
                                                zip(data.chosen_ids, data.rejected_ids,
                                                    strict=True)]),
    }
    return BatchIterator(dataset, fingerprint, None)
