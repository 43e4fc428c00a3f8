"""Grain input pipelines: shuffled by seed, sharded across processes, bucketed, resumable.

    it = make_sft_iterator(pairs, tokenizer, batch_size=8, seq_buckets=(256, 512), seed=0)
    batch = next(it)      # {"input_ids", "labels", "response_mask"}: [8, 256] or [8, 512]
    state = it.get_state()            # JSON-able; store it with the checkpoint
    it = make_sft_iterator(pairs, tokenizer, batch_size=8, seq_buckets=(256, 512), seed=0)
    it.set_state(state)               # continues with exactly the batches that came next

How the batches are made (all of it a ``grain.MapDataset``, so the iterator state is one
index and resuming is exact):

1. Every example is tokenized once, up front, and fitted to the largest bucket by the
   ``truncate`` policy (``jaxalign.data.tokenize.fit_to_length``): an error naming the
   example, or logged truncation or dropping, never silent.
2. Example indices are shuffled by ``seed`` (a fresh permutation each epoch, epochs not
   mixed) and cut into *global* batches of ``batch_size * shard_count`` indices; the
   remainder of the last epoch is dropped, so every batch is full.
3. Process ``shard_index`` takes the ``shard_index``-th block of ``batch_size`` rows of each
   global batch: the shards are disjoint and cover the data, and the processes' batches
   concatenated in process order (the usual layout of a batch-sharded global array, e.g.
   from ``jax.make_array_from_process_local_data``) are row for row the single-process
   batch, whatever the number of processes.
4. Rows are padded to the smallest bucket that holds the *global* batch's longest row.
   Every process knows all lengths, so all of them pick the same width, as a multi-host
   jitted step requires (each process's batch is one slice of one global array).

Shapes: every batch is ``[batch_size, T]`` with ``T`` in ``seq_buckets``, so a jitted step
compiles at most ``len(seq_buckets)`` times. A row of ``L`` tokens fits width ``T`` when
``L <= T + 1`` (see ``jaxalign.data.tokenize``).

Resuming: the state counts global batches and is the same on every process, so process 0
can save it for all, and it resumes on a different number of processes as long as the
global batch size is unchanged (or with more epochs: earlier epochs keep their order). It
records the seed, global batch size, buckets and a checksum of the tokenized data;
``set_state`` refuses a state from a different pipeline instead of silently continuing
with other data.
"""

from __future__ import annotations

import collections
import logging
import sys
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Generic, TypeVar

import grain
import jax
import numpy as np

from jaxalign.data import packing
from jaxalign.data.tokenize import (
    Truncate,
    check_buckets,
    collate_prompt_and_output,
    fit_to_length,
    pad_token_id,
    pick_bucket,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The batch function runs in a background thread while the step runs; it is light (a
# gather and a pad), so one thread and a short buffer suffice and bound host memory.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


class BatchIterator(Generic[T]):
    """A resumable iterator of batches: grain's iterator plus a check on restored states.

    Attributes:
        num_batches: how many batches it yields in all (``sys.maxsize``-ish when endless).
        fingerprint: what a state must match to be restored here (JSON-able).
        stats: what the data looked like before fitting (SFT: ``rows``, ``longest`` in
            tokens and ``rows_cut_per_width``, see ``rows_cut_per_width``); ``{}`` if none.
    """

    def __init__(self, dataset: grain.MapDataset, fingerprint: dict[str, Any], read_options):
        self.num_batches = len(dataset)
        self.fingerprint = fingerprint
        self.stats: dict[str, Any] = {}
        self._iterator = iter(dataset.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return next(self._iterator)

    def get_state(self) -> dict[str, Any]:
        """The position (the number of global batches consumed) and the fingerprint."""
        return {"grain": self._iterator.get_state(), "pipeline": dict(self.fingerprint)}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continues from ``state``; ``ValueError`` if it is another pipeline's state."""
        theirs = state.get("pipeline")
        if theirs != self.fingerprint:
            differ = sorted(
                k
                for k in set(self.fingerprint) | set(theirs or {})
                if (theirs or {}).get(k) != self.fingerprint.get(k)
            )
            raise ValueError(
                f"iterator state is from a different pipeline (differs in {differ}: saved "
                f"{ {k: (theirs or {}).get(k) for k in differ} }, here "
                f"{ {k: self.fingerprint.get(k) for k in differ} })"
            )
        self._iterator.set_state(state["grain"])


def _shard(shard_index: int | None, shard_count: int | None, batch_size: int) -> tuple[int, int]:
    """``(index, count)``, by default this JAX process's; checks them and ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    index = jax.process_index() if shard_index is None else shard_index
    count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= index < count:
        raise ValueError(f"shard_index {index} is not in [0, shard_count={count})")
    return index, count


def _global_batches(
    num_examples: int, global_batch: int, seed: int, num_epochs: int | None
) -> grain.MapDataset:
    """Batches of example indices: ``[global_batch]`` int arrays, shuffled per epoch by seed."""
    if num_epochs is not None and num_epochs < 1:
        raise ValueError(f"num_epochs must be >= 1 or None (endless), got {num_epochs}")
    # shuffle before repeat: grain reseeds each epoch and keeps epochs apart.
    ds = grain.MapDataset.range(num_examples).shuffle(seed=seed).repeat(num_epochs)
    ds = ds.batch(global_batch, drop_remainder=True)
    if len(ds) == 0:
        raise ValueError(
            f"{num_examples} examples x {num_epochs} epochs do not fill one global batch of "
            f"{global_batch}"
        )
    return ds


def make_sft_iterator(
    examples: Sequence[tuple[str, str]],
    tokenizer: Any,
    *,
    batch_size: int,
    seq_buckets: Sequence[int],
    seed: int,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    truncate: Truncate = "error",
    append_eos: bool = True,
    sources: Sequence[str] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> BatchIterator[dict[str, np.ndarray]]:
    """Batches of SFT ``(prompt, response)`` pairs, for a jitted step with bounded shapes.

    Args:
        examples: ``(prompt, response)`` strings (e.g. from ``gsm8k_sft_trace``).
        tokenizer: a ``transformers`` tokenizer with a pad token.
        batch_size: rows per batch on this process; the global batch is
            ``batch_size * shard_count``.
        seq_buckets: the allowed widths ``T``; each batch takes the smallest that holds the
            global batch's longest row. At most ``len(seq_buckets)`` shapes occur.
        seed: the shuffling seed (0 <= seed < 2**32).
        num_epochs: passes over the data; None repeats forever.
        shard_index, shard_count: this process's shard; default ``jax.process_index()`` and
            ``jax.process_count()``.
        truncate: for examples longer than the largest bucket: ``"error"`` (naming them),
            ``"right"`` (cut the response's end) or ``"drop"``; the latter two are logged.
        append_eos: end each response with the EOS token, so the model learns to stop
            (unless it already ends with it: a chat turn closed by an EOS end-of-turn).
        sources: names for the examples in messages (e.g. ``[e.source for e in train]``).
        read_options: grain's threading and prefetch settings.

    Returns:
        A ``BatchIterator`` of ``{"input_ids", "labels"}`` (``[batch_size, T]`` int32) and
        ``"response_mask"`` (``[batch_size, T]`` bool), with ``get_state``/``set_state``.
    """
    shard_index, shard_count = _shard(shard_index, shard_count, batch_size)
    buckets = check_buckets(seq_buckets)
    pad_id = pad_token_id(tokenizer)
    prompt_ids, response_ids, stats = _tokenize_pairs(examples, tokenizer, buckets, truncate,
                                                      append_eos, sources)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)])
    _log_buckets(lengths, buckets)

    global_batch = batch_size * shard_count
    lo, hi = shard_index * batch_size, (shard_index + 1) * batch_size  # this process's rows

    def local_batch(indices: np.ndarray) -> dict[str, np.ndarray]:  # indices: [global batch]
        width = pick_bucket(int(lengths[indices].max()), buckets)
        mine = indices[lo:hi]
        return collate_prompt_and_output(
            [prompt_ids[i] for i in mine], [response_ids[i] for i in mine], pad_id, pad_to=width
        )

    dataset = _global_batches(len(lengths), global_batch, seed, num_epochs).map(local_batch)
    fingerprint = {
        "kind": "sft",
        "seed": seed,
        "global_batch_size": global_batch,
        "seq_buckets": list(buckets),
        "num_examples": len(lengths),
        "checksum": _checksum(prompt_ids, response_ids),
    }
    iterator = BatchIterator(dataset, fingerprint, read_options)
    iterator.stats = stats
    return iterator


def _tokenize_pairs(examples, tokenizer, buckets: tuple[int, ...], truncate: Truncate,
                    append_eos: bool, sources) -> tuple[list[list[int]], list[list[int]], dict]:
    """Tokenized ``(prompt, response)`` pairs fitted to the widest bucket (``T + 1``
    tokens) by the ``truncate`` policy, and the length statistics before fitting."""
    longest = buckets[-1]
    if not examples:
        raise ValueError("no examples")
    prompt_ids = tokenizer([p for p, _ in examples])["input_ids"]
    response_ids = tokenizer([r for _, r in examples], add_special_tokens=False)["input_ids"]
    if append_eos:
        if tokenizer.eos_token_id is None:
            raise ValueError("append_eos=True but the tokenizer has no EOS token")
        eos = tokenizer.eos_token_id
        # A chat-template response already ends with the end-of-turn token, which is the EOS
        # of many chat tokenizers (Qwen2.5-Instruct's <|im_end|>): not twice.
        response_ids = [r if r and r[-1] == eos else r + [eos] for r in response_ids]
    stats = _row_stats([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)],
                       buckets, truncate)
    try:
        prompt_ids, response_ids, _ = fit_to_length(
            prompt_ids, response_ids, longest + 1, truncate, names=_names(sources, len(examples)))
    except ValueError as e:  # truncate="error": say which widths would hold every row
        raise ValueError(f"{e}; {describe_cuts(stats)}") from None
    if not prompt_ids:
        raise ValueError(f"all {len(examples)} examples were dropped as longer than {longest}")
    return prompt_ids, response_ids, stats


class _PackedBatches:
    """Global batches of packed rows, epoch by epoch: ``[k]`` is the k-th batch's rows (lists
    of sequence indices). Each epoch shuffles the sequences by ``(seed, epoch)`` and packs
    them first-fit (``packing.plan_rows``); its last, partial batch is dropped. Epochs are
    planned when first reached, so an endless iterator costs one epoch of planning at a
    time, and the k-th batch is the same in every process and after every resume."""

    def __init__(self, lengths: np.ndarray, width: int, global_rows: int, seed: int,
                 num_epochs: int | None):
        self.lengths, self.width, self.global_rows = lengths, width, global_rows
        self.seed, self.num_epochs = seed, num_epochs
        self._epochs: list[list[list[list[int]]]] = []  # epoch -> batch -> row -> indices
        if not self._epoch(0):
            raise ValueError(f"{len(lengths)} examples pack into fewer rows than one global "
                             f"batch of {global_rows} rows of width {width}")

    def _epoch(self, e: int) -> list[list[list[int]]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            order = np.random.default_rng([self.seed, k]).permutation(len(self.lengths))
            rows = [[int(order[i]) for i in row]
                    for row in packing.plan_rows(self.lengths[order], self.width)]
            if k == 0:  # real positions over all of epoch 0's rows
                self.fill = float(np.sum(self.lengths - 1)) / (len(rows) * self.width)
            n = len(rows) // self.global_rows
            self._epochs.append([rows[b * self.global_rows:(b + 1) * self.global_rows]
                                 for b in range(n)])
        return self._epochs[e]

    def rows_per_epoch(self) -> int:
        """Packed rows in the first epoch's full batches (an epoch's length in rows)."""
        return len(self._epoch(0)) * self.global_rows

    def __len__(self) -> int:
        if self.num_epochs is None:
            return sys.maxsize
        return sum(len(self._epoch(e)) for e in range(self.num_epochs))

    def __getitem__(self, k: int) -> list[list[int]]:
        e = 0
        while k >= len(self._epoch(e)):
            k -= len(self._epoch(e))
            e += 1
        return self._epoch(e)[k]


def make_packed_sft_iterator(
    examples: Sequence[tuple[str, str]],
    tokenizer: Any,
    *,
    batch_size: int,
    width: int,
    seed: int,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    truncate: Truncate = "error",
    append_eos: bool = True,
    sources: Sequence[str] | None = None,
    read_options: grain.ReadOptions | None = None,
) -> BatchIterator[dict[str, np.ndarray]]:
    """Batches of packed SFT rows (``jaxalign.data.packing``): ``batch_size`` rows of
    ``width`` positions per process, each holding whole ``(prompt, response)`` sequences.

    Tokenization, fitting (``truncate`` against ``width``), EOS, sharding and resuming are
    ``make_sft_iterator``'s; one shape ``[batch_size, width]`` only. A batch holds as many
    sequences as fit, so an epoch is fewer steps than unpacked (``rows_per_epoch``).

    Returns:
        A ``BatchIterator`` of ``input_ids``, ``labels``, ``segment_ids`` (``[batch_size,
        width]`` int32) and ``response_mask`` (bool); ``it.rows_per_epoch`` is the number
        of packed rows in an epoch (all processes together).
    """
    shard_index, shard_count = _shard(shard_index, shard_count, batch_size)
    pad_id = pad_token_id(tokenizer)
    prompt_ids, response_ids, stats = _tokenize_pairs(examples, tokenizer, (width,), truncate,
                                                      append_eos, sources)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)])
    batches = _PackedBatches(lengths, width, batch_size * shard_count, seed, num_epochs)
    lo, hi = shard_index * batch_size, (shard_index + 1) * batch_size  # this process's rows

    def local_batch(rows: list[list[int]]) -> dict[str, np.ndarray]:
        return packing.collate_packed(prompt_ids, response_ids, rows[lo:hi], pad_id, width)

    dataset = grain.MapDataset.source(batches).map(local_batch)
    fingerprint = {
        "kind": "sft_packed",
        "seed": seed,
        "global_batch_size": batch_size * shard_count,
        "width": width,
        "num_examples": len(lengths),
        "checksum": _checksum(prompt_ids, response_ids),
    }
    iterator = BatchIterator(dataset, fingerprint, read_options)
    iterator.stats = stats
    iterator.rows_per_epoch = batches.rows_per_epoch()
    iterator.stats["packed_fill"] = batches.fill
    return iterator


def make_example_iterator(
    examples: Sequence[T],
    *,
    batch_size: int,
    seed: int,
    num_epochs: int | None = 1,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> BatchIterator[list[T]]:
    """Batches of examples as they are (e.g. ``MathExample`` questions for rollouts).

    The same shuffling, sharding and resumable state as ``make_sft_iterator``, without
    tokenization: GRPO and Expert Iteration draw question batches from it.

    Returns:
        A ``BatchIterator`` of lists of ``batch_size`` examples.
    """
    shard_index, shard_count = _shard(shard_index, shard_count, batch_size)
    items = list(examples)
    global_batch = batch_size * shard_count
    lo, hi = shard_index * batch_size, (shard_index + 1) * batch_size  # this process's rows

    def local_batch(indices: np.ndarray) -> list[T]:
        return [items[i] for i in indices[lo:hi]]

    dataset = _global_batches(len(items), global_batch, seed, num_epochs).map(local_batch)
    fingerprint = {
        "kind": "examples",
        "seed": seed,
        "global_batch_size": global_batch,
        "num_examples": len(items),
    }
    return BatchIterator(dataset, fingerprint, read_options)


def _checksum(prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]]) -> int:
    """CRC32 of the tokenized examples: a state from other data or another tokenizer differs."""
    crc = 0
    for p, r in zip(prompt_ids, response_ids, strict=True):
        crc = zlib.crc32(np.asarray([len(p), len(r), *p, *r], dtype=np.int64).tobytes(), crc)
    return crc


def _names(sources: Sequence[str] | None, n: int) -> list[str]:
    if sources is None:
        return [f"example {i}" for i in range(n)]
    if len(sources) != n:
        raise ValueError(f"{len(sources)} sources for {n} examples")
    return [f"example {i} ({s})" for i, s in enumerate(sources)]


def rows_cut_per_width(lengths: Sequence[int], buckets: Sequence[int]) -> dict[int, int]:
    """How many rows of ``lengths`` tokens (prompt + response + EOS) would not fit each
    width ``T`` were it the largest bucket (a row of ``L`` tokens fits when ``L <= T + 1``)."""
    lengths = np.asarray(lengths)
    return {int(t): int(np.sum(lengths > t + 1)) for t in buckets}


def _row_stats(lengths: Sequence[int], buckets: tuple[int, ...], truncate: str) -> dict:
    """Before the ``truncate`` policy applies: how many rows each width would cut (logged),
    so a recipe that must cut no row (``truncate="error"``, s1) can pick its widths."""
    stats = {"rows": len(lengths), "longest": int(max(lengths)),
             "rows_cut_per_width": rows_cut_per_width(lengths, buckets)}
    logger.info("SFT data (truncate=%r): %s", truncate, describe_cuts(stats))
    return stats


def describe_cuts(stats: dict) -> str:
    """``"120 rows, longest 9000 tokens (fits width 8999 and up); rows longer than each
    width: {4096: 30, 8192: 2}"``."""
    return (f"{stats['rows']} rows, longest {stats['longest']} tokens (fits width "
            f"{stats['longest'] - 1} and up); rows longer than each width: "
            f"{stats['rows_cut_per_width']}")


def _log_buckets(lengths: np.ndarray, buckets: tuple[int, ...]) -> None:
    """Logs how many examples each bucket would hold alone (the shapes the step will see)."""
    counts = collections.Counter(pick_bucket(int(n), buckets) for n in lengths)
    logger.info(
        "SFT data: %d examples, %d to %d tokens; buckets %s (at most %d shapes), "
        "examples per smallest fitting bucket %s",
        len(lengths), lengths.min(), lengths.max(), buckets, len(buckets),
        {t: counts.get(t, 0) for t in buckets},
    )  # fmt: skip
