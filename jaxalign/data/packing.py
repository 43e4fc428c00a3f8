"""Sequence packing: several (prompt, response) sequences in one fixed-width row.

Padding every row to a bucket wastes the difference between the bucket and each row's
length; on long-tailed lengths (SFT traces, GRPO rollouts) that is most of the step.
Packing fills each row of width ``T`` with whole sequences instead:

    row r:  [seq a (La - 1 positions)][seq b (Lb - 1)] ... [padding]
    segment_ids  1 1 1 1 2 2 2 ... 0 0      positions 0 1 2 3 0 1 2 ... 0 0

A sequence of ``L`` tokens takes ``L - 1`` positions (its inputs ``ids[:-1]`` and labels
``ids[1:]``), so no label ever crosses into the next sequence. The model
(``Qwen2Model.__call__(segment_ids=...)``) lets a token attend only within its segment and
restarts positions per segment, so each sequence computes exactly what it would alone
(tested: losses and gradients equal the unpacked batch's). Unlike CS336's packed SFT
dataset, which concatenates documents into one stream and cuts windows without masking,
sequences are never split across rows nor see each other.

Placement is first-fit in the given (shuffled) order: each sequence goes to the first row
with room, so rows fill up (a few percent padding on real traces) while the data order
stays close to the shuffle.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def plan_rows(lengths: Sequence[int], width: int) -> list[list[int]]:
    """First-fit packing of sequences into rows of ``width`` positions.

    Args:
        lengths: ``[N]`` tokens per sequence (prompt + response); each needs
            ``length - 1 <= width`` positions.
        width: T, positions per row.

    Returns:
        Rows as lists of indices into ``lengths``, in placement order.

    Raises:
        ValueError: a sequence longer than ``width + 1`` tokens, or shorter than 2.
    """
    need = np.asarray(lengths, np.int64) - 1
    if len(need) and (need.max() > width or need.min() < 1):
        bad = int(np.argmax((need > width) | (need < 1)))
        raise ValueError(f"sequence {bad} has {need[bad] + 1} tokens: a packed row of width "
                         f"{width} holds sequences of 2 to {width + 1} tokens")
    room = np.empty(0, np.int64)  # free positions of each open row
    rows: list[list[int]] = []
    for i, n in enumerate(need):
        fits = np.flatnonzero(room >= n)
        if len(fits):
            r = int(fits[0])
        else:
            r = len(rows)
            rows.append([])
            room = np.append(room, width)
        rows[r].append(i)
        room[r] -= n
    return rows


def collate_packed(
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    rows: Sequence[Sequence[int]],
    pad_id: int,
    width: int,
) -> dict[str, np.ndarray]:
    """The arrays of packed rows.

    Args:
        prompt_ids, response_ids: token ids of every sequence.
        rows: ``[R]`` lists of sequence indices (``plan_rows``).
        pad_id: the id written into padding positions.
        width: T.

    Returns:
        ``input_ids``, ``labels`` ``[R, T]`` int32; ``response_mask`` ``[R, T]`` bool (the
        labels that are response tokens); ``segment_ids`` ``[R, T]`` int32 (1, 2, ... per
        sequence in the row, 0 on padding; the model derives positions from them).
    """
    r_count = len(rows)
    input_ids = np.full((r_count, width), pad_id, np.int32)
    labels = np.full((r_count, width), pad_id, np.int32)
    response = np.zeros((r_count, width), bool)
    segments = np.zeros((r_count, width), np.int32)
    for r, row in enumerate(rows):
        at = 0
        for s, i in enumerate(row, start=1):
            ids = list(prompt_ids[i]) + list(response_ids[i])
            n = len(ids) - 1
            if at + n > width:
                raise ValueError(f"row {r} overflows width {width}: replan with plan_rows")
            input_ids[r, at:at + n] = ids[:-1]
            labels[r, at:at + n] = ids[1:]
            # label j is token j + 1: a response token from the prompt's last token on
            response[r, at + max(len(prompt_ids[i]) - 1, 0):at + n] = True
            segments[r, at:at + n] = s
            at += n
    return {"input_ids": input_ids, "labels": labels, "response_mask": response,
            "segment_ids": segments}
