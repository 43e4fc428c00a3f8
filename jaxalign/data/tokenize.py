"""Prompt + response -> ``input_ids``, ``labels``, ``response_mask`` arrays for causal-LM losses.

The layout of CS336 assignment 5 (``tokenize_prompt_and_output``): prompt and response are
tokenized separately and concatenated, so the response mask is exact even where a joint
tokenization would merge tokens across the boundary. Each row of ``L`` tokens becomes

    full      = prompt_ids + response_ids + [pad] * (T + 1 - L)   # [T + 1]
    input_ids = full[:-1]                                         # [T]
    labels    = full[1:]                                          # [T], the next token
    response_mask[j] = labels[j] is a response token              # [T]

Padding is on the right, so with causal attention the pad positions never influence the
real ones and no attention mask is needed; the loss ignores them through ``response_mask``.

Shapes. Without ``pad_to``, ``T = max(L) - 1`` over the batch, as in CS336: every batch
can have a new width and a jitted step recompiles for each. ``pad_to=T`` fixes the width;
``pad_to=(T1, T2, ...)`` pads to the smallest bucket that fits the batch's longest row, so a
jitted step sees at most ``len(buckets)`` widths. A row fits width ``T`` when ``L <= T + 1``.

Rows that do not fit the largest allowed width follow ``truncate``, never silently:

- ``"error"`` (default): ``ValueError`` naming the rows and lengths.
- ``"right"``: keep the first ``T + 1`` tokens (the prompt first, then as much response as
  fits); logged as a warning. A row whose prompt alone fills the width keeps no response
  token and so has an all-zero mask.
- ``"drop"``: remove the rows (logged); the result has ``B' <= B`` rows and an extra key
  ``row_index`` (``[B']`` int32) giving each kept row's index in the input.

Two entry points: ``tokenize_prompt_and_output`` for strings, and
``collate_prompt_and_output`` for token ids, for rollouts whose sampled ids must not be
re-tokenized (decode-then-encode does not round-trip for BPE).

``fit_to_context`` holds prompts that generation will continue to the model's own limit,
``max_position_embeddings`` (RoPE past it gives quietly wrong numbers).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

logger = logging.getLogger(__name__)

Truncate = Literal["error", "right", "drop"]
TRUNCATE_POLICIES = ("error", "right", "drop")
PadTo = int | Sequence[int] | None


def pick_bucket(length: int, buckets: Sequence[int]) -> int | None:
    """The smallest width ``T`` in ``buckets`` that holds a row of ``length`` tokens.

    A row of ``L`` tokens fits width ``T`` when ``L <= T + 1``. Returns None when the row is
    longer than every bucket.
    """
    fitting = [t for t in buckets if length <= t + 1]
    return min(fitting) if fitting else None


def check_buckets(pad_to: PadTo) -> tuple[int, ...] | None:
    """``pad_to`` as a sorted tuple of widths (None stays None); errors on bad widths."""
    if pad_to is None:
        return None
    buckets = (pad_to,) if isinstance(pad_to, int | np.integer) else tuple(pad_to)
    if not buckets or any(not isinstance(t, int | np.integer) or t < 1 for t in buckets):
        raise ValueError(f"pad_to must be a positive int or a non-empty list of them: {pad_to!r}")
    return tuple(sorted({int(t) for t in buckets}))


def check_truncate(truncate: str) -> None:
    if truncate not in TRUNCATE_POLICIES:
        raise ValueError(f"truncate must be one of {TRUNCATE_POLICIES}, got {truncate!r}")


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id; an error, not a silent fallback, when it has none."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError(
            "the tokenizer has no pad token; set one first, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token (padding is masked out of the loss)"
        )
    return int(pad_id)


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str],
    output_strs: Sequence[str],
    tokenizer: Any,
    *,
    pad_to: PadTo = None,
    truncate: Truncate = "error",
) -> dict[str, np.ndarray]:
    """Tokenizes prompts and responses separately and lays them out for a causal-LM loss.

    With the defaults this is CS336 assignment 5's function, with NumPy arrays.

    Args:
        prompt_strs: B prompt strings.
        output_strs: B response strings, each continuing its prompt.
        tokenizer: a ``transformers`` tokenizer with a pad token. Prompts get the tokenizer's
            special tokens (a BOS, for tokenizers that add one; Qwen2's adds none), responses
            none: a BOS in the middle of a sequence would be wrong.
        pad_to: None (width = longest row - 1), a fixed width ``T``, or a sequence of
            bucket widths (the smallest that fits the longest row).
        truncate: ``"error"``, ``"right"`` or ``"drop"``, for rows longer than the largest
            allowed width (see the module docstring). Unused when ``pad_to`` is None.

    Returns:
        ``input_ids`` ``[B, T]`` int32, ``labels`` ``[B, T]`` int32 (``input_ids`` shifted
        left by one), ``response_mask`` ``[B, T]`` bool (True exactly where ``labels`` is a
        response token); with ``truncate="drop"`` also ``row_index`` ``[B']`` int32.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    if len(prompt_strs) == 0:
        prompt_ids, output_ids = [], []
    else:
        prompt_ids = tokenizer(list(prompt_strs))["input_ids"]
        output_ids = tokenizer(list(output_strs), add_special_tokens=False)["input_ids"]
    return collate_prompt_and_output(
        prompt_ids, output_ids, pad_token_id(tokenizer), pad_to=pad_to, truncate=truncate
    )


def fit_to_length(
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    max_tokens: int,
    truncate: Truncate,
    *,
    names: Sequence[str] | None = None,
) -> tuple[list[list[int]], list[list[int]], list[int]]:
    """Applies the ``truncate`` policy to rows of more than ``max_tokens`` prompt+response tokens.

    Args:
        prompt_ids: B lists of prompt token ids.
        output_ids: B lists of response token ids.
        max_tokens: the most tokens a row may have (a width ``T`` holds ``T + 1``).
        truncate: ``"error"`` raises, ``"right"`` cuts the end of the row (response first,
            then prompt), ``"drop"`` removes the row; the latter two log a warning.
        names: how messages name each row (``"gsm8k/train.jsonl:18"``); default ``"row i"``.

    Returns:
        ``(prompt_ids, output_ids, kept)``: the rows kept, as lists, and their input indices.

    Raises:
        ValueError: with ``truncate="error"``, naming the first over-long rows.
    """
    check_truncate(truncate)
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(output_ids)} outputs")
    lengths = [len(p) + len(o) for p, o in zip(prompt_ids, output_ids, strict=True)]
    over = [i for i, n in enumerate(lengths) if n > max_tokens]
    prompts, outputs = [list(p) for p in prompt_ids], [list(o) for o in output_ids]
    kept = list(range(len(lengths)))
    if not over:
        return prompts, outputs, kept

    def name(i: int) -> str:
        return f"row {i}" if names is None else str(names[i])

    detail = ", ".join(f"{name(i)}: {lengths[i]} tokens" for i in over[:5])
    more = f" and {len(over) - 5} more" if len(over) > 5 else ""
    summary = f"{len(over)} of {len(lengths)} rows longer than {max_tokens} tokens ({detail}{more})"
    if truncate == "error":
        raise ValueError(f"{summary}; raise the length limit or pass truncate='right' or 'drop'")
    if truncate == "drop":
        over_set = set(over)
        kept = [i for i in kept if i not in over_set]
        logger.warning("dropped %s", summary)
        return [prompts[i] for i in kept], [outputs[i] for i in kept], kept
    empty = 0
    for i in over:
        prompts[i] = prompts[i][:max_tokens]
        outputs[i] = outputs[i][: max_tokens - len(prompts[i])]
        empty += not outputs[i]
    note = f"; {empty} of them keep no response token (all-zero mask)" if empty else ""
    logger.warning("truncated %s%s", summary, note)
    return prompts, outputs, kept


def fit_to_context(
    prompt_lengths: Sequence[int],
    new_tokens: int,
    context: int,
    *,
    skip: bool,
    names: Sequence[str] | None = None,
    what: str = "prompts",
    fix: str = "",
) -> list[int]:
    """The prompts that leave room for ``new_tokens`` within the model's ``context`` positions.

    Past ``max_position_embeddings`` nothing fails: the rotary embedding extrapolates and the
    logits are quietly wrong. So a prompt of ``L`` tokens whose generation would reach
    ``L + new_tokens > context`` positions is an error here, or, with ``skip``, dropped and
    counted in a warning.

    Args:
        prompt_lengths: tokens of each prompt.
        new_tokens: tokens to be generated after each prompt (``max_tokens``).
        context: the model's ``max_position_embeddings``.
        skip: drop over-long prompts (logged) instead of raising.
        names: how messages name each prompt (``"math.jsonl:18"``); default ``"row i"``.
        what: what the prompts are, for messages (``"training questions"``).
        fix: appended to the error: what to change.

    Returns:
        The indices of the prompts kept, in order.

    Raises:
        ValueError: some prompts do not fit and not ``skip``; the message gives how many,
            the longest, the limit and ``fix``.
    """
    over = [i for i, n in enumerate(prompt_lengths) if n + new_tokens > context]
    if not over:
        return list(range(len(prompt_lengths)))
    longest = max(over, key=lambda i: prompt_lengths[i])
    name = f"row {longest}" if names is None else str(names[longest])
    room = context - prompt_lengths[longest]
    fits = f"at most {room} new tokens fit it" if room > 0 else "its prompt alone fills the context"
    summary = (
        f"{len(over)} of {len(prompt_lengths)} {what} do not fit the model's context: prompt "
        f"tokens + {new_tokens} new tokens > max_position_embeddings={context} (the longest, "
        f"{name}, has {prompt_lengths[longest]} prompt tokens: {fits})"
    )
    if not skip:
        raise ValueError(f"{summary}; {fix}" if fix else summary)
    logger.warning("skipped %s", summary)
    dropped = set(over)
    return [i for i in range(len(prompt_lengths)) if i not in dropped]


def collate_prompt_and_output(
    prompt_ids: Sequence[Sequence[int]],
    output_ids: Sequence[Sequence[int]],
    pad_id: int,
    *,
    pad_to: PadTo = None,
    truncate: Truncate = "error",
) -> dict[str, np.ndarray]:
    """``tokenize_prompt_and_output`` for token ids: no tokenizer, nothing re-tokenized.

    Args:
        prompt_ids: B lists of prompt token ids.
        output_ids: B lists of response token ids (as sampled, EOS included if it was).
        pad_id: the id written into padding positions.
        pad_to: None, a width ``T`` or bucket widths, as in ``tokenize_prompt_and_output``.
        truncate: ``"error"``, ``"right"`` or ``"drop"`` for rows that do not fit.

    Returns:
        ``input_ids``, ``labels`` (``[B, T]`` int32) and ``response_mask`` (``[B, T]`` bool);
        with ``truncate="drop"`` also ``row_index`` (``[B']`` int32).
    """
    if len(prompt_ids) != len(output_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(output_ids)} outputs")
    check_truncate(truncate)
    buckets = check_buckets(pad_to)
    if buckets is None:
        prompts, outputs = [list(p) for p in prompt_ids], [list(o) for o in output_ids]
        kept = list(range(len(prompts)))
        if not prompts:
            raise ValueError("an empty batch has no width; pass pad_to to get a [0, T] batch")
        width = max(len(p) + len(o) for p, o in zip(prompts, outputs, strict=True)) - 1
        if width < 0:
            raise ValueError("every row is empty (no prompt and no response tokens)")
    else:
        prompts, outputs, kept = fit_to_length(prompt_ids, output_ids, buckets[-1] + 1, truncate)
        longest = max((len(p) + len(o) for p, o in zip(prompts, outputs, strict=True)), default=0)
        width = pick_bucket(longest, buckets)

    full = np.full((len(prompts), width + 1), pad_id, dtype=np.int32)  # [B, T + 1]
    is_response = np.zeros((len(prompts), width + 1), dtype=bool)
    for r, (p, o) in enumerate(zip(prompts, outputs, strict=True)):
        full[r, : len(p) + len(o)] = p + o
        is_response[r, len(p) : len(p) + len(o)] = True
    batch = {  # copies, not overlapping views of one buffer
        "input_ids": np.ascontiguousarray(full[:, :-1]),
        "labels": np.ascontiguousarray(full[:, 1:]),
        "response_mask": np.ascontiguousarray(is_response[:, 1:]),
    }
    if truncate == "drop":  # the keys depend on the arguments only, not on the data
        batch["row_index"] = np.asarray(kept, dtype=np.int32)
    return batch
