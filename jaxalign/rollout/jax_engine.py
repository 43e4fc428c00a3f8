"""The JAX-native rollout engine: shared-prefix prefill + jitted KV-cache decoding.

The embedded default on CPU and TPU (no extra process). Layout of a generate call:

1. Prompts (strings or token ids) are expanded ``n`` times into rows and cut into
   micro-batches of at most ``max_batch_size`` rows, whole prompts at a time (all ``n``
   samples of a prompt together, unless ``n`` alone exceeds the batch). With
   ``group_by_length`` (the default on CPU) prompts of similar lengths go together, and a
   micro-batch is split wherever that reads fewer bytes per decode step (``_group_cost``).
2. ``_prefill`` runs each distinct prompt of a micro-batch through the model once (prefix
   sharing: GRPO's ``n`` samples of a prompt share one prefill) and copies its KV cache and
   last logits to the rows that continue it. Prompts are left-padded to a power-of-two
   length bucket ``P``, and the prompt and row counts to powers of two, so the jitted
   functions see a bounded set of shapes (logged as ``num_compiles``); the rows' cache has
   ``P + max_tokens`` slots.
3. ``_decode`` is a ``lax.while_loop`` that samples a token for every slot (the batch the
   model runs), appends it and stops when every row has finished, when ``end`` is reached,
   or when half the slots or more hold finished rows. Then the host compacts
   (``_compact``): the unfinished rows move into a batch of the next power of two (at
   least ``MIN_DECODE_BATCH``) and decoding goes on, so on long-tailed response lengths
   finished rows stop costing decode work. Outputs are indexed by row, not slot, so they
   never move. With stop strings decoding runs in chunks of ``decode_chunk`` steps;
   between chunks the host decodes the new text of unfinished rows and ends those whose
   text now contains a stop string (a stop string can span several tokens, so it is
   matched on text, not token ids).
4. Slot refill (``refill=True``; off by default, see ``JaxEngine``), for calls with more rows than
   ``max_batch_size``: instead of micro-batches that each decode until their longest row
   ends, all rows of the call go through ``max_batch_size`` fixed slots
   (``_generate_refill``). Once an eighth of the slots (and a whole prompt's ``n`` rows,
   if ``n`` fits twice) are free, the decode loop returns and the host prefills the next
   waiting rows' prompts (each distinct prompt once) into the free slots (``_insert``):
   every row writes its next token at the cache's shared slot ``index``, so a new row's
   prompt cache lands just before it, with its own mask and positions. When the cache is
   full it is shifted left past the slots no live row uses (``_rebase``) or grown. Once
   no row waits, the batch compacts as in 3. Shapes are fixed per call (slots, rows,
   cache size levels, refill sizes in powers of two), so no step recompiles.

Sampled log-probs are those of the raw model distribution (temperature 1, no filtering):
exactly what a teacher-forced forward pass of the same model gives for the same tokens.

Randomness is per row: sample ``j`` of prompt ``i`` draws its ``t``-th token from
``fold_in(fold_in(key(seed), (prompt_offset + i) * n + j), t)``, whatever micro-batch,
slot, padding or compaction it goes through. So the samples do not depend on
``max_batch_size``, and processes that each generate their share of a global prompt batch
(passing the share's offset) draw exactly what one process generating all of it would.
With ``seeds=`` (one per prompt) sample ``j`` of prompt ``i`` draws from
``fold_in(key(seeds[i]), j)`` instead: what prompt ``i`` alone, generated with
``seed=seeds[i]``, would draw, whatever else is in the call
(``jaxalign.evaluation.generate_seeded``).

Multi-process: given a mesh that spans several processes, the engine works on this
process's devices only (``sharding.process_local_mesh``), with a full local copy of the
weights (``update_weights`` gathers them: a collective, so every process calls it). Each
process then samples on its own, with no cross-host traffic while decoding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import distributed
from jaxalign import sharding as sharding_lib
from jaxalign.models import lora
from jaxalign.models.qwen2 import KVCache, Qwen2ForCausalLM, abstract_model
from jaxalign.rollout.sampling import mask_tokens, sample_tokens, token_logprobs
from jaxalign.rollout.types import Completion, Prompt, SamplingParams

# Sampling keeps parameters replicated over fsdp (each step needs whole weights) but may
# shard heads and MLP over tensor.
SAMPLING_RULES = {**sharding_lib.PARAM_RULES, "embed": None}


# Compaction never goes below this many slots: a decode step of 8 rows costs about what one
# of 1 does (it reads all the weights either way), and each smaller batch would compile.
MIN_DECODE_BATCH = 8

# With slot refill, the decode loop hands back to the host (which prefills waiting rows into
# the free slots) once 1 / REFILL_FRACTION of the slots are free: each refill is a host
# round trip and a prefill call, and until then the free slots idle.
REFILL_FRACTION = 8


@flax.struct.dataclass
class _Carry:
    """The decode loop's state. Slots (``B``) are the batch the model runs; rows (``R``,
    fixed per micro-batch) are its completions. Compaction moves rows to other slots;
    outputs are indexed by row, so they never move.
    """

    cache: KVCache  # B slots
    logits: jax.Array  # [B, V] float32, the distribution of each slot's next token
    rng: jax.Array  # [B] keys: the stream of the row in each slot
    slot_row: jax.Array  # [B] int32: the row each slot holds (R, out of range: none)
    call_rows: jax.Array  # [R] int32: each row's index in the generate call (logits_hook)
    tokens: jax.Array  # [R, M] int32
    logprobs: jax.Array  # [R, M] float32
    lengths: jax.Array  # [R] int32, tokens generated so far (EOS included)
    done: jax.Array  # [R] bool (filler rows: True from the start)
    step: jax.Array  # int32, decode steps run (every slot writes cache slot P + step)


def _compact_at(slots: int) -> int:
    """Free slots (finished or filler rows) at which a batch of ``slots`` compacts: half of
    them, never at ``MIN_DECODE_BATCH`` slots or fewer (more than ``slots``: never)."""
    return slots - slots // 2 if slots > MIN_DECODE_BATCH else slots + 1


def _next_pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


def _prompt_bucket(x: int) -> int:
    """The padded length ``P`` for a longest prompt of ``x`` tokens: a power of two up to
    128 (at least 16), then four buckets per doubling (160, 192, 224, 256, 320, ...).

    Finer than powers of two because every decode step attends over every cache slot,
    padding included: at 21M parameters on CPU attention over a 768-slot cache costs more
    than the step's matmuls (benchmarks/rollout_grpo.py's prompts run to 333 tokens).
    """
    if x <= 128:
        return _next_pow2(x, minimum=16)
    quarter = 1 << (x.bit_length() - 3)
    return -(-x // quarter) * quarter


def _cache_room(step: int, max_tokens: int) -> int:
    """Generated tokens the cache holds while step ``step`` is decoded: 32, 64, 128, ... up
    to ``max_tokens``. The cache grows as rows get longer, so early steps (with the most
    rows) do not attend over slots that later tokens will fill."""
    return min(max_tokens, _next_pow2(step + 1, minimum=32))


class JaxEngine:
    """Generates completions with a Qwen2 model in this process.

    Args:
        model: the policy (its current parameters are used until ``update_weights``).
        tokenizer: needed for string prompts, stop strings and ``Completion.text``.
        mesh: optional mesh; parameters are placed by ``SAMPLING_RULES`` and batches are
            split over the data axes. A mesh spanning several processes is cut down to
            this process's devices.
        max_batch_size: rows per micro-batch (prompts x n).
        decode_chunk: decode steps between stop-string checks on the host.
        eos_token_ids: ids that end a completion (default: the tokenizer's EOS).
        pad_token_id: id used for padding (default: the tokenizer's pad, else EOS, else 0).
        logits_hook: for benchmarks and tests that script lengths or tokens: a traceable
            ``hook(logits [B, V], rows [B], n_tokens [B]) -> logits [B, V]`` applied to the
            distribution each token is sampled from (after min_tokens' masking; reported
            log-probs stay the model's). ``rows`` is each slot's row in the generate call
            (prompt ``i``, sample ``j``: ``i * n + j``; meaningless for filler slots),
            ``n_tokens`` how many tokens that row has so far. Arrays it closes over are
            baked in when the decode loop is first traced.
        refill: when a call has more rows than ``max_batch_size``, decode them in one batch
            of ``max_batch_size`` fixed slots whose freed slots take waiting rows (slot
            refill) instead of in micro-batches that each run until their longest row ends.
            Off by default: every slot attends over the shared cache window of the oldest
            live row (about ``P + max_tokens``), so where attention dominates (21M on CPU)
            it lost to micro-batches: 622 vs 990 useful tok/s at 64 slots
            (``benchmarks/rollout_grpo.py --max-batch-size 64 [--no-refill]``, 2026-12).
        group_by_length: sort the prompts by length and split them into micro-batches
            wherever that moves fewer bytes per decode step (``_group_cost``), even when
            all rows would fit one batch. Every row attends over the whole cache, whose
            width is the batch's longest prompt: one long prompt makes every row read
            padding. On CPU a step costs in proportion to its rows and cache slots, so a
            separate small batch for the long prompts pays; on GPU and TPU a step costs
            nearly the same for few rows as for many, so it would not. Default (None):
            on when the engine's weights are on CPU. Outputs do not change (each row's
            random stream is its own).
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer=None,
        mesh: jax.sharding.Mesh | None = None,
        *,
        max_batch_size: int = 64,
        decode_chunk: int = 32,
        eos_token_ids: Sequence[int] | None = None,
        pad_token_id: int | None = None,
        logits_hook: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
        refill: bool = False,
        group_by_length: bool | None = None,
    ):
        if lora.has_lora(model):  # the sampler runs the adapted weights merged
            model = lora.merge_lora(model)
        cfg = model.config
        # Decoding attends one query to the cache: the plain path reads the cache in place
        # (fused kernels want long aligned sequences and a [B, S, K, H] layout).
        decode_cfg = cfg.replace(attention_impl="xla", remat="none")
        self.config = decode_cfg
        self.graphdef = nnx.graphdef(abstract_model(decode_cfg))
        self.tokenizer = tokenizer
        self.mesh = mesh if mesh is None else sharding_lib.process_local_mesh(mesh)
        self.max_batch_size = max_batch_size
        self.decode_chunk = decode_chunk
        self.refill = refill
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = () if eos is None else (eos,)
        self.eos_token_ids = tuple(int(i) for i in eos_token_ids)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
            if pad_token_id is None:
                pad_token_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.pad_token_id = int(pad_token_id)
        self.weights_version = 0
        self.state = self._place(nnx.state(model, nnx.Param))
        if group_by_length is None:  # on where a decode step costs in proportion to its work
            device = next(iter(jax.tree.leaves(self.state)[0].devices()))
            group_by_length = device.platform == "cpu"
        self.group_by_length = bool(group_by_length)
        self._prefill = jax.jit(
            functools.partial(_prefill, self.graphdef),
            static_argnames=("max_tokens", "room", "pad_id"),
        )
        self._decode = jax.jit(
            functools.partial(_decode, self.graphdef, logits_hook=logits_hook),
            static_argnames=("greedy", "use_top_k", "use_top_p"),
            donate_argnums=(1,),
        )
        self._compact = jax.jit(_compact)
        self._grow = jax.jit(_grow, static_argnames=("room",))
        self._prefill_prompts = jax.jit(functools.partial(_prefill_prompts, self.graphdef))
        self._empty = jax.jit(functools.partial(_empty_carry, decode_cfg),
                              static_argnames=("slots", "n_rows", "max_tokens", "size",
                                               "index", "pad_id"))
        self._insert = jax.jit(_insert, donate_argnums=(0,))
        self._rebase = jax.jit(_rebase, donate_argnums=(0,))
        self.shapes_seen: set[tuple] = set()
        # Decode work done so far, in slots x steps (filler and finished rows' slots
        # included): what benchmarks/rollout_grpo.py compares with the useful tokens.
        self.slot_steps = 0

    # --- weights ------------------------------------------------------------------------

    def _place(self, state):
        # Trainer parameters sharded over other hosts: gather a full copy here first.
        local = distributed.local_replica(state)
        if self.mesh is None:
            # Committed to one device, whatever the weights came as: jit keys its cache on
            # committedness, so a model's fresh (uncommitted) arrays and a train step's
            # (committed) outputs would compile the decode loop twice.
            device = jax.local_devices()[0]
            return jax.tree.map(lambda x: jax.device_put(x, device), local)
        return sharding_lib.shard_params(local, self.mesh, SAMPLING_RULES)

    def update_weights(self, weights: Any, version: int | None = None) -> int:
        """Installs new weights: a model (with LoRA adapters: merged here), an ``nnx.State``
        of a plain model's params, or a HF directory.

        Returns:
            The new weights version (``version`` if given, else the old one plus one).
        """
        if isinstance(weights, nnx.Module):
            if lora.has_lora(weights):
                weights = lora.merge_lora(weights)
            state = nnx.state(weights, nnx.Param)
        elif isinstance(weights, nnx.State):
            state = weights
        else:
            from jaxalign.models.hf_io import from_pretrained

            state = nnx.state(
                from_pretrained(
                    weights, dtype=self.config.dtype, param_dtype=self.config.param_dtype
                ),
                nnx.Param,
            )
        old = jax.tree.structure(self.state)
        same_shapes = jax.tree.structure(state) == old and all(
            a.shape == b.shape and a.dtype == b.dtype
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(self.state), strict=True)
        )
        if not same_shapes:
            raise ValueError("update_weights: the new weights do not match the engine's model")
        self.state = self._place(state)
        self.weights_version = self.weights_version + 1 if version is None else int(version)
        return self.weights_version

    # --- generation ---------------------------------------------------------------------

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("string prompts need a tokenizer; pass token ids instead")
            return list(self.tokenizer(prompt)["input_ids"])
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("empty prompt")
        return ids

    def generate(
        self,
        prompts: Sequence[Prompt],
        params: SamplingParams,
        *,
        prompt_offset: int = 0,
        seeds: Sequence[int] | None = None,
    ) -> list[list[Completion]]:
        """Samples ``params.n`` completions for every prompt (outer list per prompt).

        Args:
            prompt_offset: the index of ``prompts[0]`` in a larger batch that several
                calls (processes) share; it only picks the rows' random streams.
            seeds: one seed per prompt, in ``[0, 2**32)``, replacing ``params.seed`` and
                ``prompt_offset``: prompt ``i`` draws what it would alone with
                ``seed=seeds[i]``.
        """
        if seeds is not None:
            if prompt_offset:
                raise ValueError("pass seeds or prompt_offset, not both")
            if len(seeds) != len(prompts):
                raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
            if any(not 0 <= s < 2**32 for s in seeds):
                raise ValueError("seeds must be in [0, 2**32) (jax.random.key keeps 32 bits)")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        encoded = [self._encode(p) for p in prompts]
        # Positions past the context are not an error in the model (RoPE extrapolates): the
        # samples would be quietly wrong, so refuse them here.
        context = self.config.max_position_embeddings
        for i, ids in enumerate(encoded):
            if len(ids) + params.max_tokens > context:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens; with max_tokens={params.max_tokens} "
                    f"that is {len(ids) + params.max_tokens} positions > the model's "
                    f"max_position_embeddings={context}: lower max_tokens or shorten the prompt"
                )
        out: list[list[Completion | None]] = [[None] * params.n for _ in encoded]

        def keys_of(rows):  # each row's random stream, (seed, stream id)
            if seeds is None:  # the low 32 bits, as jax.random.key(params.seed) keeps them
                seed = params.seed & 0xFFFFFFFF
                return [(seed, (prompt_offset + i) * params.n + j) for i, j in rows]
            return [(seeds[i], j) for i, j in rows]

        if self.refill and len(encoded) * params.n > self.max_batch_size:
            rows = [(i, j) for i in range(len(encoded)) for j in range(params.n)]
            batches = [(rows, self._generate_refill)]
        else:
            batches = [(chunk, functools.partial(self._generate_batch,
                                                 call_rows=[i * params.n + j for i, j in chunk]))
                       for chunk in self._micro_batches([len(x) for x in encoded], params)]
        for chunk, generate in batches:
            completions = generate([encoded[i] for i, _ in chunk], params, keys_of(chunk))
            for (i, j), c in zip(chunk, completions, strict=True):
                out[i][j] = c
        return out  # type: ignore[return-value]

    def _micro_batches(self, lengths: list[int], params: SamplingParams
                       ) -> list[list[tuple[int, int]]]:
        """The call's rows ``(prompt i, sample j)`` in micro-batches of at most
        ``max_batch_size`` rows. Whole prompts per micro-batch (their samples share one
        prefill, and the number of distinct prompts stays the same from batch to batch,
        which bounds the compiles); a prompt with more samples than ``max_batch_size`` is
        split, in call order.

        With ``group_by_length`` the prompts are sorted by length and cut where
        ``_group_cost`` says separate micro-batches read less than one: a few long prompts
        no longer pad every row's cache (see ``JaxEngine``). Otherwise they go in call
        order, ``max_batch_size`` rows at a time.

        Args:
            lengths: each prompt's token count.
        """
        n, size = params.n, self.max_batch_size
        if n > size or not self.group_by_length:
            rows = [(i, j) for i in range(len(lengths)) for j in range(n)]
            if n <= size:
                size -= size % n
            return [rows[s : s + size] for s in range(0, len(rows), size)]
        order = sorted(range(len(lengths)), key=lengths.__getitem__)
        cap = size // n  # prompts per micro-batch
        # best[e]: the least cost of the first e prompts of `order`; cut[e]: where its last
        # micro-batch starts. Cuts fall between sorted lengths: long prompts go together,
        # which is where the padding is saved.
        best, cut = [0.0] + [math.inf] * len(order), [0] * (len(order) + 1)
        for e in range(1, len(order) + 1):
            for b in range(max(0, e - cap), e):
                cost = best[b] + self._group_cost((e - b) * n, lengths[order[e - 1]],
                                                  params.max_tokens)
                if cost < best[e]:
                    best[e], cut[e] = cost, b
        groups, e = [], len(order)
        while e:
            groups.append(sorted(order[cut[e] : e]))
            e = cut[e]
        return [[(i, j) for i in g for j in range(n)] for g in reversed(groups)]

    def _group_cost(self, rows: int, longest_prompt: int, max_tokens: int) -> float:
        """Bytes one decode step of a micro-batch moves, roughly (the CPU cost model of
        ``group_by_length``): the weights once, plus per row its matmuls (a FLOP counted
        as 0.1 byte: this CPU does about 10 FLOPs in the time it reads a byte) and its
        cache slots (prompt bucket plus, on average, half of ``max_tokens``). Fitted on
        ``benchmarks/decode_step.py``-style steps: at 0.9M parameters 8, 32 and 128 rows
        over 128 and 384 slots cost 0.3-0.4, 2.1-3.1 and 7.5-13.9 ms; at 21M 14-16,
        19-20 and 53-69 ms (2026-12-03)."""
        cfg = self.config
        itemsize = jnp.dtype(cfg.dtype).itemsize
        n_params = cfg.num_params()
        weights = n_params * jnp.dtype(cfg.param_dtype).itemsize
        slot = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * itemsize
        slots = _prompt_bucket(longest_prompt) + max_tokens / 2
        return weights + _next_pow2(rows) * (0.1 * 2 * n_params + slot * slots)

    def _generate_batch(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        keys: list[tuple[int, int]],
        call_rows: list[int],
    ) -> list[Completion]:
        """One micro-batch: pack the prompts, prefill each distinct one, decode until every
        row is done (compacting as rows finish), unpack the rows into ``Completion``s.

        Args:
            prompts: token ids of each row's prompt (at most ``max_batch_size`` rows).
            keys: each row's random stream, ``(seed, row id)``.
            call_rows: each row's index in the generate call (``logits_hook``'s rows).
        """
        ids, mask, prompt_of_row = self._pack(prompts)
        carry = self._prefill_rows(ids, mask, prompt_of_row, keys, call_rows, params.max_tokens)
        carry, stop_info = self._decode_rows(carry, params, len(prompts))
        return self._unpack(carry, prompts, params, stop_info)

    def _generate_refill(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        keys: list[tuple[int, int]],
    ) -> list[Completion]:
        """All rows of a call (more than ``max_batch_size``) through ``max_batch_size`` fixed
        slots: whenever enough slots are free, waiting rows are prefilled (each distinct
        prompt once) into them and decoding goes on; once no row waits, the batch compacts
        as ``_decode_rows`` does. Shapes stay static: the slots, the rows' outputs [R, M]
        and the cache are fixed-size arrays, and each slot's row keeps its own mask and
        positions in the shared cache (``_insert``), so no step recompiles.

        Args: as ``_generate_batch``, with any number of rows.
        """
        m, n_rows, b = params.max_tokens, len(prompts), self.max_batch_size
        r_pad = _next_pow2(n_rows)
        p = _prompt_bucket(max(map(len, prompts)))
        # Whole prompts per refill where they fit, so that a prompt's rows share one prefill.
        unit = params.n if params.n <= b // 2 else 1
        room = _cache_room(0, m)
        self.shapes_seen.add(("empty", b, r_pad, m, p + room))
        carry = self._empty(n_real=jnp.int32(n_rows), slots=b, n_rows=r_pad, max_tokens=m,
                            size=p + room, index=p, pad_id=self.pad_token_id)
        stop_ids, scalars, flags = self._decode_args(params)
        chunk = self.decode_chunk if params.stop else 2**30
        stop_info: dict[int, tuple[int, str, int]] = {}
        checked = np.zeros(n_rows, np.int32)
        done = np.zeros(r_pad, np.bool_)
        done[n_rows:] = True
        start = np.zeros(b, np.int64)  # the cache slot where each slot's row begins
        waiting = 0  # rows [waiting, n_rows) wait (rows go in in order)
        while True:
            slot_row = np.asarray(carry.slot_row)
            live = (slot_row < r_pad) & ~done[np.minimum(slot_row, r_pad - 1)]
            free = np.flatnonzero(~live)
            k = min(len(free), n_rows - waiting) // unit * unit
            if k:
                index = int(carry.cache.index)
                carry = self._insert_rows(carry, prompts, keys, waiting, free[:k], p, r_pad)
                start[free[:k]] = index - p
                live[free[:k]] = True
                waiting += k
            if not live.any():
                break
            carry, start = self._make_room(carry, start, live, p, m)
            slots = len(slot_row)
            if waiting < n_rows:  # refill once enough slots are free (a unit at least)
                exit_free = min(n_rows - waiting, max(unit, b // REFILL_FRACTION))
            else:
                exit_free = _compact_at(slots)
            step = int(carry.step)
            self.shapes_seen.add(("decode", slots, r_pad, m, carry.cache.mask.shape[1]))
            carry = self._decode(self.state, carry, jnp.int32(step + chunk),
                                 jnp.int32(exit_free), stop_ids, scalars, **flags)
            self.slot_steps += slots * (int(carry.step) - step)
            done = np.array(carry.done)
            if params.stop:
                carry = self._check_stops(carry, done, params, stop_info, checked)
            if waiting == n_rows:
                carry, take = self._compact_if_sparse(carry, done)
                if take is not None:
                    start = start[take]
        return self._unpack(carry, prompts, params, stop_info)

    def _insert_rows(self, carry: _Carry, prompts: list[list[int]], keys: list[tuple[int, int]],
                     first: int, slots: np.ndarray, p: int, r_pad: int) -> _Carry:
        """``carry`` with rows ``first, first + 1, ...`` in the free ``slots``: their distinct
        prompts prefilled once (padded to ``p``), each row given its prompt's cache, last
        logits and its own random stream."""
        rows = list(range(first, first + len(slots)))
        ids, mask, prompt_of_row = self._pack([prompts[r] for r in rows], p)
        bn = len(prompt_of_row)
        (g, _), size = ids.shape, carry.cache.mask.shape[1]
        self.shapes_seen.add(("prefill_prompts", g, p))
        self.shapes_seen.add(("insert", len(carry.slot_row), r_pad, size, g, bn, p))
        fill = bn - len(rows)  # filler rows go to slot B: dropped
        row_keys = [keys[r] for r in rows] + [(0, 0)] * fill
        prompt_cache, logits = self._prefill_prompts(
            self.state, self._shard_batch(ids), self._shard_batch(mask))
        return self._insert(
            carry, prompt_cache, logits,
            self._shard_batch(prompt_of_row),
            self._shard_batch(np.concatenate([slots, np.full(fill, len(carry.slot_row))])
                              .astype(np.int32)),
            self._shard_batch(np.asarray(rows + [r_pad] * fill, np.int32)),
            self._shard_batch(np.asarray([s for s, _ in row_keys], np.uint32)),
            self._shard_batch(np.asarray([r for _, r in row_keys], np.uint32)),
        )

    def _make_room(self, carry: _Carry, start: np.ndarray, live: np.ndarray, p: int,
                   max_tokens: int) -> tuple[_Carry, np.ndarray]:
        """``carry`` with room in its cache for the next token, and the slots' new starts.

        A full cache is shifted left past the slots no live row uses any more (``_rebase``)
        when that frees a quarter of its room or it is at its largest,
        ``P + 1.25 max_tokens`` (then a live row, at most ``max_tokens - 1`` tokens long,
        began a quarter of ``max_tokens`` in at least); else it grows like
        ``_grow_if_full``'s (32, 64, ... up to ``max_tokens`` past the prompt)."""
        index, size = int(carry.cache.index), carry.cache.mask.shape[1]
        if index < size:
            return carry, start
        room, largest = size - p, max_tokens + -(-max_tokens // 4)
        shift = int(start[live].min())
        if room >= largest or 4 * shift >= room:
            self.shapes_seen.add(("rebase", len(start), carry.done.shape[0], size))
            return self._rebase(carry, jnp.int32(shift)), np.maximum(start - shift, 0)
        new_room = min(max_tokens, 2 * room) if room < max_tokens else largest
        self.shapes_seen.add(("grow", len(start), carry.done.shape[0], size, p + new_room))
        return self._grow(carry, room=p + new_room), start

    def _pack(self, prompts: list[list[int]], p: int | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(ids, mask, prompt_of_row)``: the distinct prompts left-padded to ``P``
        (``_prompt_bucket``) in ``G`` rows (a power of two), ``ids`` and ``mask`` both ``[G, P]``,
        and for each of ``B`` rows (``len(prompts)`` up to a power of two) the index of its
        prompt, ``[B]`` int32 (filler rows: prompt 0). Filler prompts hold one dummy token
        so that every row is well-defined. ``p`` overrides ``P``."""
        index: dict[tuple[int, ...], int] = {}
        prompt_of_row = np.zeros(_next_pow2(len(prompts)), np.int32)
        for r, x in enumerate(prompts):
            prompt_of_row[r] = index.setdefault(tuple(x), len(index))
        distinct = list(index)
        g = _next_pow2(len(distinct))
        p = p or _prompt_bucket(max(len(x) for x in distinct))
        ids = np.full((g, p), self.pad_token_id, np.int32)
        mask = np.zeros((g, p), np.bool_)
        for r, x in enumerate(distinct):
            ids[r, p - len(x) :] = x
            mask[r, p - len(x) :] = True
        mask[len(distinct) :, -1] = True
        return ids, mask, prompt_of_row

    def _prefill_rows(self, ids: np.ndarray, mask: np.ndarray, prompt_of_row: np.ndarray,
                      keys: list[tuple[int, int]], call_rows: list[int], max_tokens: int
                      ) -> _Carry:
        """The decode state after the prefill of ``_pack``'s output; rows past
        ``len(keys)`` (filler) are done from the start, so any stream will do for them."""
        (g, p), b, n_rows = ids.shape, len(prompt_of_row), len(keys)
        self.shapes_seen.add(("prefill", g, b, p, max_tokens))
        keys = keys + [(0, r) for r in range(n_rows, b)]
        seeds_of_rows = np.asarray([s for s, _ in keys], np.uint32)
        ids_of_rows = np.asarray([r for _, r in keys], np.uint32)
        done = np.zeros((b,), np.bool_)
        done[n_rows:] = True
        return self._prefill(
            self.state,
            self._shard_batch(ids),
            self._shard_batch(mask),
            self._shard_batch(prompt_of_row),
            self._shard_batch(seeds_of_rows),
            self._shard_batch(ids_of_rows),
            self._shard_batch(done),
            self._shard_batch(np.asarray(call_rows + [0] * (b - n_rows), np.int32)),
            max_tokens=max_tokens,
            room=_cache_room(0, max_tokens),
            pad_id=self.pad_token_id,
        )

    def _decode_args(self, params: SamplingParams) -> tuple[jax.Array, tuple, dict]:
        """``_decode``'s ``(stop_ids, scalars, static flags)`` for ``params``."""
        stop_ids = jnp.asarray(self.eos_token_ids + params.stop_token_ids or (-1,), jnp.int32)
        scalars = (
            jnp.float32(max(params.temperature, 1e-6)),
            jnp.int32(params.top_k if params.top_k > 0 else 0),
            jnp.float32(params.top_p),
            jnp.int32(params.min_tokens),
            jnp.int32(self.pad_token_id),
        )
        flags = dict(
            greedy=params.temperature == 0,
            use_top_k=params.top_k > 0,
            use_top_p=params.top_p < 1.0,
        )
        return stop_ids, scalars, flags

    def _decode_rows(self, carry: _Carry, params: SamplingParams, n_rows: int):
        """Decodes until every row is done or ``max_tokens`` are sampled.

        Without stop strings the jitted loop runs to ``max_tokens`` (rows stop on device
        at EOS / stop token ids); with them, in chunks of ``decode_chunk`` steps, after each
        of which the host looks for completed stop strings (``_check_stops``). The loop
        also returns once half the slots or more hold finished rows; the host then moves
        the unfinished rows into a smaller batch (``_compact_if_sparse``) and goes on.

        Returns:
            ``(carry, stop_info)``: the final state and, per row stopped by a string,
            ``(tokens kept, the stop string, end of its text)``.
        """
        m = params.max_tokens
        stop_ids, scalars, flags = self._decode_args(params)
        chunk = self.decode_chunk if params.stop else m
        stop_info: dict[int, tuple[int, str, int]] = {}
        checked = np.zeros(n_rows, np.int32)  # each row's length at its last stop check
        step = 0
        while step < m:
            self.shapes_seen.add(("decode", carry.slot_row.shape[0], *carry.tokens.shape,
                                  carry.cache.mask.shape[1]))
            end = jnp.int32(min(step + chunk, m))
            slots = carry.slot_row.shape[0]
            carry = self._decode(self.state, carry, end, jnp.int32(_compact_at(slots)),
                                 stop_ids, scalars, **flags)
            self.slot_steps += slots * (int(carry.step) - step)
            step = int(carry.step)
            done = np.array(carry.done)  # a writable copy
            if params.stop:
                carry = self._check_stops(carry, done, params, stop_info, checked)
            if done.all() or step >= m:
                break
            carry, _ = self._compact_if_sparse(carry, done)
            carry = self._grow_if_full(carry, m)
        return carry, stop_info

    def _check_stops(self, carry: _Carry, done: np.ndarray, params: SamplingParams,
                     stop_info: dict, checked: np.ndarray) -> _Carry:
        """Ends the rows whose text now holds a stop string (updating ``done`` [R] and
        ``stop_info`` in place); rows with no new tokens since ``checked`` are skipped."""
        tokens, lengths = np.asarray(carry.tokens), np.asarray(carry.lengths)
        for r in range(len(checked)):
            n_tok = int(lengths[r])
            if r in stop_info or n_tok == checked[r] or n_tok < max(params.min_tokens, 1):
                continue
            checked[r] = n_tok
            hit = self._find_stop(tokens[r, :n_tok], params)
            if hit is not None:
                stop_info[r] = hit
                done[r] = True
        return carry.replace(done=jnp.asarray(done))

    def _compact_if_sparse(self, carry: _Carry, done: np.ndarray
                           ) -> tuple[_Carry, np.ndarray | None]:
        """``carry`` with its unfinished rows in the next power-of-two batch (at least
        ``MIN_DECODE_BATCH``) when half its slots or more hold finished rows; else as is.

        Args:
            done: [R] bool, each row's state (the host's copy, stop strings included).

        Returns:
            ``(carry, take)``: ``take`` [B'] the old slot of each new slot, None if unmoved.
        """
        slot_row = np.asarray(carry.slot_row)
        b, n_rows = len(slot_row), len(done)
        live = [s for s, r in enumerate(slot_row) if r < n_rows and not done[r]]
        if b - len(live) < _compact_at(b):
            return carry, None
        new_b = _next_pow2(len(live), minimum=MIN_DECODE_BATCH)
        filler = new_b - len(live)  # copies of a live slot that hold no row
        take = np.asarray(live + live[:1] * filler, np.int32)
        rows = np.concatenate([slot_row[live], np.full(filler, n_rows, np.int32)])
        self.shapes_seen.add(("compact", b, new_b, n_rows, carry.cache.mask.shape[1]))
        return self._compact(carry, self._shard_batch(take), self._shard_batch(rows)), take

    def _grow_if_full(self, carry: _Carry, max_tokens: int) -> _Carry:
        """``carry`` with room in its cache for the next step's tokens (``_cache_room``)."""
        step, slots = int(carry.step), carry.cache.mask.shape[1]
        prompt = int(carry.cache.index) - step
        if prompt + step < slots:
            return carry
        room = _cache_room(step, max_tokens)
        self.shapes_seen.add(("grow", carry.slot_row.shape[0], carry.done.shape[0], slots,
                              prompt + room))
        return self._grow(carry, room=prompt + room)

    def _unpack(self, carry, prompts: list[list[int]], params: SamplingParams,
                stop_info: dict[int, tuple[int, str, int]]) -> list[Completion]:
        """Each real row of the final state as a ``Completion``: its tokens up to its
        length (or its stop string), why it finished, its text and log-probs."""
        tokens, logprobs = np.asarray(carry.tokens), np.asarray(carry.logprobs)
        lengths = np.asarray(carry.lengths)
        completions = []
        for r, prompt in enumerate(prompts):
            n_tok = int(lengths[r])
            reason, stop_reason, text_end = "length", None, None
            if r in stop_info:
                n_tok, stop_reason, text_end = stop_info[r]
                reason = "stop"
            elif n_tok and int(tokens[r, n_tok - 1]) in (
                *self.eos_token_ids,
                *params.stop_token_ids,
            ):
                reason, stop_reason = "stop", int(tokens[r, n_tok - 1])
            tok = tokens[r, :n_tok].tolist()
            text = None
            if self.tokenizer is not None:
                # a stop token id ends the row but is not part of its text
                text_tokens = tok[:-1] if isinstance(stop_reason, int) else tok
                text = self.tokenizer.decode(text_tokens, skip_special_tokens=False)
                if text_end is not None:
                    text = text[:text_end]
            completions.append(
                Completion(
                    text=text if text is not None else "",
                    token_ids=tok,
                    logprobs=logprobs[r, :n_tok].tolist() if params.logprobs else None,
                    finish_reason=reason,
                    stop_reason=stop_reason,
                    prompt_token_ids=list(prompt),
                    weights_version=self.weights_version,
                )
            )
        return completions

    def _find_stop(self, tokens: np.ndarray, params: SamplingParams):
        """First stop string completed at or after ``min_tokens`` tokens.

        Returns:
            ``(number of tokens to keep, stop string, end of text to keep)`` or None.
        """
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=False)
        text = decode(tokens.tolist())
        best = None
        for s in params.stop:
            begin = text.find(s)
            while begin >= 0:
                end = begin + len(s)
                # Smallest prefix of tokens whose text contains the match (binary search:
                # decoded length grows with the prefix).
                lo, hi = 1, len(tokens)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if len(decode(tokens[:mid].tolist())) >= end:
                        hi = mid
                    else:
                        lo = mid + 1
                if lo >= max(params.min_tokens, 1):
                    keep_text = end if params.include_stop_str_in_output else begin
                    if best is None or lo < best[0] or (lo == best[0] and begin < best[3]):
                        best = (lo, s, keep_text, begin)
                    break
                begin = text.find(s, begin + 1)
        return None if best is None else best[:3]

    def _shard_batch(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        batch_axes = tuple(a for a in ("data", "fsdp") if self.mesh.shape[a] > 1)
        size = int(np.prod([self.mesh.shape[a] for a in batch_axes])) if batch_axes else 1
        spec = [batch_axes if batch_axes and x.shape[0] % size == 0 else None]
        spec += [None] * (x.ndim - 1)
        sh = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))
        return jax.device_put(x, sh)

    @property
    def num_compiles(self) -> int:
        """Distinct shapes the jitted prefill, decode loop and compaction have run at (each
        compiles once per shape; ``shapes_seen`` lists them). Per prompt bucket and
        ``max_tokens``: one prefill per (prompt count, row count) bucket, one decode loop per
        power-of-two slot count from the micro-batch's rows down to ``MIN_DECODE_BATCH``,
        and one compaction per pair of those. Sampling switches (greedy, top-k, top-p) and
        the number of stop ids add variants of the decode loop on top."""
        return len(self.shapes_seen)


def _prefill(graphdef, state, ids, mask, prompt_of_row, row_seeds, row_ids, done, call_rows,
             *, max_tokens, room, pad_id) -> _Carry:
    """Runs the distinct prompts ``ids``, ``mask`` [G, P] through the model once and gives
    each of the B rows a copy of its prompt's cache and last logits -> the decode loop's start.

    Args:
        prompt_of_row: [B] int32, the prompt each row continues.
        row_seeds, row_ids: [B] uint32; row ``r`` draws from
            ``fold_in(key(row_seeds[r]), row_ids[r])``.
        done: [B] bool, the filler rows.
        call_rows: [B] int32, each row's index in the generate call.
        max_tokens: the rows' output length; room: the cache's slots past the prompt.

    Only the last position goes through the LM head (its logits are all decoding needs).
    """
    model = nnx.merge(graphdef, state)
    g, p = ids.shape
    cache = KVCache.init(model.config, g, p)
    hidden, cache = model.model(ids, mask, cache=cache, fresh_cache=True)
    logits = model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32)  # [G, V]

    def to_rows(x, slot_axis):  # [G, ...] -> [B, ...], slots grown from P to P + room
        x = jnp.take(x, prompt_of_row, axis=0)
        pad = [(0, 0)] * x.ndim
        pad[slot_axis] = (0, room)
        return jnp.pad(x, pad)

    b = prompt_of_row.shape[0]
    cache = KVCache(
        k=tuple(to_rows(k, 3) for k in cache.k),  # [B, K, H, S]
        v=tuple(to_rows(v, 2) for v in cache.v),  # [B, K, S, H]
        mask=to_rows(cache.mask, 1),
        index=cache.index,
        next_pos=jnp.take(cache.next_pos, prompt_of_row, axis=0),
    )
    return _Carry(
        cache=cache,
        logits=jnp.take(logits, prompt_of_row, axis=0),
        rng=jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(row_seeds, row_ids),
        slot_row=jnp.arange(b, dtype=jnp.int32),
        call_rows=call_rows,
        tokens=jnp.full((b, max_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_tokens), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=done,
        step=jnp.zeros((), jnp.int32),
    )


def _decode(graphdef, state, carry: _Carry, end, exit_free, stop_ids, scalars, *, greedy,
            use_top_k, use_top_p, logits_hook=None) -> _Carry:
    """Samples a token per slot until step ``end``, until every slot is free (holds no
    unfinished row), until the cache is full, or until ``exit_free`` slots or more are free
    (time to compact or refill; the host picks the threshold).

    Args:
        end: int32, the step to stop at; exit_free: int32;
        stop_ids: [E] int32 (EOS and stop token ids);
        scalars: ``(temperature, top_k, top_p, min_tokens, pad_id)``, traced.
    """
    temperature, top_k, top_p, min_tokens, pad_id = scalars
    model = nnx.merge(graphdef, state)
    b, (n_rows, max_tokens) = carry.slot_row.shape[0], carry.tokens.shape

    def live(c: _Carry):  # [B] bool: the slot holds an unfinished row
        return ~jnp.take(c.done, c.slot_row, mode="fill", fill_value=True)

    def cond(c: _Carry):
        n_live = jnp.sum(live(c))
        full = c.cache.index >= c.cache.mask.shape[1]  # the host makes room (grow, rebase)
        return (c.step < end) & (n_live > 0) & (b - n_live < exit_free) & ~full

    def body(c: _Carry) -> _Carry:
        active = live(c)
        n_tok = jnp.take(c.lengths, c.slot_row, mode="fill", fill_value=0)  # [B]
        logits = mask_tokens(c.logits, stop_ids, n_tok < min_tokens)
        if logits_hook is not None:
            logits = logits_hook(logits, jnp.take(c.call_rows, c.slot_row, mode="clip"), n_tok)
        # A row's t-th token uses fold_in(its key, t), whatever slot or step it is at.
        keys = jax.vmap(jax.random.fold_in)(c.rng, n_tok)  # [B]
        tok, _ = sample_tokens(keys, logits, temperature, top_k, top_p, greedy=greedy,
                               use_top_k=use_top_k, use_top_p=use_top_p)
        # The reported log-prob is the model's own (before min_tokens masks EOS), so it
        # equals a teacher-forced forward pass: GRPO's ratios and drift metrics rely on it.
        logp = token_logprobs(c.logits, tok)
        tok = jnp.where(active, tok, pad_id)
        row = jnp.where(active, c.slot_row, n_rows)  # finished and filler slots: dropped
        finished = jnp.isin(tok, stop_ids) | (n_tok + 1 >= max_tokens)
        next_logits, cache = model(tok[:, None], jnp.ones_like(tok[:, None], jnp.bool_),
                                   cache=c.cache)
        return c.replace(
            cache=cache,
            logits=next_logits[:, -1].astype(jnp.float32),
            tokens=c.tokens.at[row, n_tok].set(tok, mode="drop"),
            logprobs=c.logprobs.at[row, n_tok].set(logp, mode="drop"),
            lengths=c.lengths.at[row].add(1, mode="drop"),
            done=c.done.at[row].set(finished, mode="drop"),
            step=c.step + 1,
        )

    return jax.lax.while_loop(cond, body, carry)


def _compact(carry: _Carry, take, slot_row) -> _Carry:
    """``carry`` on the slots ``take`` [B'] (gathered from its B slots), holding the rows
    ``slot_row`` [B'] (out of range: none). Row outputs and the cache's slot index stay."""

    def gather(x):
        return jnp.take(x, take, axis=0)

    cache = carry.cache.replace(
        k=tuple(map(gather, carry.cache.k)),
        v=tuple(map(gather, carry.cache.v)),
        mask=gather(carry.cache.mask),
        next_pos=gather(carry.cache.next_pos),
    )
    return carry.replace(cache=cache, logits=gather(carry.logits), rng=carry.rng[take],
                         slot_row=slot_row)


def _grow(carry: _Carry, *, room: int) -> _Carry:
    """``carry`` with its cache padded to ``room`` slots (empty, masked out)."""
    cache = carry.cache
    extra = room - cache.mask.shape[1]
    cache = cache.replace(
        k=tuple(jnp.pad(k, ((0, 0), (0, 0), (0, 0), (0, extra))) for k in cache.k),
        v=tuple(jnp.pad(v, ((0, 0), (0, 0), (0, extra), (0, 0))) for v in cache.v),
        mask=jnp.pad(cache.mask, ((0, 0), (0, extra))),
    )
    return carry.replace(cache=cache)


def _prefill_prompts(graphdef, state, ids, mask) -> tuple[KVCache, jax.Array]:
    """``(cache, logits)``: the prompts ``ids``, ``mask`` [G, P] run through the model once
    (a cache of ``P`` slots) and the logits [G, V] float32 of their next tokens."""
    model = nnx.merge(graphdef, state)
    g, p = ids.shape
    hidden, cache = model.model(ids, mask, cache=KVCache.init(model.config, g, p),
                                fresh_cache=True)
    return cache, model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32)


def _empty_carry(cfg, n_real, *, slots, n_rows, max_tokens, size, index, pad_id) -> _Carry:
    """A decode state of ``slots`` free slots, a cache of ``size`` slots writing next at
    ``index`` and ``n_rows`` rows, those from ``n_real`` on filler (done from the start)."""
    return _Carry(
        cache=KVCache.init(cfg, slots, size).replace(index=jnp.int32(index)),
        logits=jnp.zeros((slots, cfg.vocab_size), jnp.float32),
        rng=jax.random.split(jax.random.key(0), slots),
        slot_row=jnp.full((slots,), n_rows, jnp.int32),
        call_rows=jnp.arange(n_rows, dtype=jnp.int32),
        tokens=jnp.full((n_rows, max_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((n_rows, max_tokens), jnp.float32),
        lengths=jnp.zeros((n_rows,), jnp.int32),
        done=jnp.arange(n_rows) >= n_real,
        step=jnp.zeros((), jnp.int32),
    )


def _insert(carry: _Carry, prompts: KVCache, logits, prompt_of_row, slots, rows, row_seeds,
            row_ids) -> _Carry:
    """``carry`` with new rows in some of its slots (the rest untouched).

    Every row writes its next token at the cache's shared ``index``, so a new row's prompt
    cache goes to the ``P`` slots just before it, and the rest of its slot is masked out;
    its positions (``next_pos``) are its own, so the row attends and rotates exactly as
    if it had been prefilled alone.

    Args:
        prompts: the cache [G, ..., P] of ``_prefill_prompts``; logits: [G, V].
        prompt_of_row: [Bn] int32, each new row's prompt; slots: [Bn] int32, its slot
            (B, out of range: a filler row, dropped); rows: [Bn] int32, its row;
        row_seeds, row_ids: [Bn] uint32, its stream ``fold_in(key(seed), id)``.
    """
    cache = carry.cache
    p, size = prompts.mask.shape[1], cache.mask.shape[1]

    def put(old, new, axis):  # new: [G, ..., P, ...] -> old [B, ..., S, ...] at `slots`
        new = jnp.take(new, prompt_of_row, axis=0)
        shape = list(new.shape)
        shape[axis] = size
        begin = [0] * new.ndim
        begin[axis] = cache.index - p
        full = jax.lax.dynamic_update_slice(jnp.zeros(shape, new.dtype), new, begin)
        return old.at[slots].set(full, mode="drop")

    def put_rows(old, new):  # new: [Bn, ...]
        return old.at[slots].set(new, mode="drop")

    keys = jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(row_seeds, row_ids)
    rng = jax.random.wrap_key_data(
        put_rows(jax.random.key_data(carry.rng), jax.random.key_data(keys)))
    cache = cache.replace(
        k=tuple(put(old, new, 3) for old, new in zip(cache.k, prompts.k, strict=True)),
        v=tuple(put(old, new, 2) for old, new in zip(cache.v, prompts.v, strict=True)),
        mask=put(cache.mask, prompts.mask, 1),
        next_pos=put_rows(cache.next_pos, jnp.take(prompts.next_pos, prompt_of_row)),
    )
    return carry.replace(cache=cache, logits=put_rows(carry.logits, jnp.take(logits,
                                                                             prompt_of_row, 0)),
                         rng=rng, slot_row=put_rows(carry.slot_row, rows))


def _rebase(carry: _Carry, shift) -> _Carry:
    """``carry`` with its cache shifted ``shift`` slots left (int32, traced; the slots it
    drops are unused by every live row) and its write index with it: the cache stays
    ``P + max_tokens``-ish however many rows pass through the slots."""
    cache = carry.cache
    size = cache.mask.shape[1]

    def left(x, axis):
        return jnp.roll(x, -shift, axis=axis)

    mask = left(cache.mask, 1) & (jnp.arange(size) < size - shift)[None, :]
    cache = cache.replace(k=tuple(left(k, 3) for k in cache.k),
                          v=tuple(left(v, 2) for v in cache.v),
                          mask=mask, index=cache.index - shift)
    return carry.replace(cache=cache)
