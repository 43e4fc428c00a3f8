"""The JAX-native rollout engine: batched prefill + jitted KV-cache decoding.

The embedded default on CPU and TPU (no extra process). Layout of a generate call:

1. Prompts (strings or token ids) are expanded ``n`` times and cut into micro-batches of
   at most ``max_batch_size`` rows; each micro-batch is left-padded to a power-of-two
   length bucket and its row count to a power of two, so the jitted functions see a
   bounded set of shapes (logged as ``num_compiles``).
2. ``_prefill`` runs the prompt through the model, filling a KV cache of
   ``prompt bucket + max_tokens`` slots (allocated inside the jitted call).
3. ``_decode`` is a ``lax.while_loop`` that samples a token, appends it and stops early when
   every row has finished. With stop strings it runs in chunks of ``decode_chunk`` steps;
   between chunks the host decodes the new text of unfinished rows and ends those whose
   text now contains a stop string (a stop string can span several tokens, so it is
   matched on text, not token ids).

Sampled log-probs are those of the raw model distribution (temperature 1, no filtering):
exactly what a teacher-forced forward pass of the same model gives for the same tokens.

Randomness is per row: sample ``j`` of prompt ``i`` draws from
``fold_in(key(seed), (prompt_offset + i) * n + j)``, whatever micro-batch or padding it
lands in. So the samples do not depend on ``max_batch_size``, and processes that each
generate their share of a global prompt batch (passing the share's offset) draw exactly
what one process generating all of it would. With ``seeds=`` (one per prompt) sample
``j`` of prompt ``i`` draws from ``fold_in(key(seeds[i]), j)`` instead: what prompt ``i``
alone, generated with ``seed=seeds[i]``, would draw, whatever else is in the call
(``jaxalign.evaluation.generate_seeded``).

Multi-process: given a mesh that spans several processes, the engine works on this
process's devices only (``sharding.process_local_mesh``), with a full local copy of the
weights (``update_weights`` gathers them: a collective, so every process calls it). Each
process then samples on its own, with no cross-host traffic while decoding.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign import distributed
from jaxalign import sharding as sharding_lib
from jaxalign.models.qwen2 import KVCache, Qwen2ForCausalLM, abstract_model
from jaxalign.rollout.sampling import mask_tokens, sample_tokens, token_logprobs
from jaxalign.rollout.types import Completion, Prompt, SamplingParams

# Sampling keeps parameters replicated over fsdp (each step needs whole weights) but may
# shard heads and MLP over tensor.
SAMPLING_RULES = {**sharding_lib.PARAM_RULES, "embed": None}


@flax.struct.dataclass
class _Carry:
    cache: KVCache
    logits: jax.Array  # [B, V] float32, the distribution of the next token
    tokens: jax.Array  # [B, M] int32
    logprobs: jax.Array  # [B, M] float32
    lengths: jax.Array  # [B] int32, tokens generated so far (EOS included)
    done: jax.Array  # [B] bool
    step: jax.Array  # int32
    rng: jax.Array  # [B] keys, one stream per row


def _next_pow2(x: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, math.ceil(math.log2(max(x, 1)))))


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
    ):
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
        self._prefill = jax.jit(
            functools.partial(_prefill, self.graphdef), static_argnames=("max_tokens", "pad_id")
        )
        self._decode = jax.jit(
            functools.partial(_decode, self.graphdef),
            static_argnames=("greedy", "use_top_k", "use_top_p"),
            donate_argnums=(1,),
        )
        self.shapes_seen: set[tuple] = set()

    # --- weights ------------------------------------------------------------------------

    def _place(self, state):
        # Trainer parameters sharded over other hosts: gather a full copy here first.
        local = distributed.local_replica(state)
        return sharding_lib.shard_params(local, self.mesh, SAMPLING_RULES)

    def update_weights(self, weights: Any, version: int | None = None) -> int:
        """Installs new weights: a model, an ``nnx.State`` of its params, or a HF directory.

        Returns:
            The new weights version (``version`` if given, else the old one plus one).
        """
        if isinstance(weights, nnx.Module):
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
        rows = [(i, j) for i in range(len(encoded)) for j in range(params.n)]
        out: list[list[Completion | None]] = [[None] * params.n for _ in encoded]
        for start in range(0, len(rows), self.max_batch_size):
            chunk = rows[start : start + self.max_batch_size]
            if seeds is None:  # the low 32 bits, as jax.random.key(params.seed) keeps them
                seed = params.seed & 0xFFFFFFFF
                keys = [(seed, (prompt_offset + i) * params.n + j) for i, j in chunk]
            else:
                keys = [(seeds[i], j) for i, j in chunk]
            completions = self._generate_batch([encoded[i] for i, _ in chunk], params, keys)
            for (i, j), c in zip(chunk, completions, strict=True):
                out[i][j] = c
        return out  # type: ignore[return-value]

    def _generate_batch(
        self, prompts: list[list[int]], params: SamplingParams, keys: list[tuple[int, int]]
    ) -> list[Completion]:
        """One static-shape batch: pack the prompts, prefill, decode until every row is
        done, unpack the rows into ``Completion``s.

        Args:
            prompts: token ids of each row's prompt (at most ``max_batch_size`` rows).
            keys: each row's random stream, ``(seed, row id)``.
        """
        ids, mask = self._pack(prompts)
        carry = self._prefill_rows(ids, mask, keys, len(prompts), params.max_tokens)
        carry, stop_info = self._decode_rows(carry, params, len(prompts))
        return self._unpack(carry, prompts, params, stop_info)

    def _pack(self, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, mask)``, both ``[B, P]``: the prompts left-padded to ``P`` (a power of
        two, >= 16) in ``B`` rows (a power of two); filler rows hold one dummy token so
        that every row is well-defined."""
        b = _next_pow2(len(prompts))
        p = _next_pow2(max(len(x) for x in prompts), minimum=16)
        ids = np.full((b, p), self.pad_token_id, np.int32)
        mask = np.zeros((b, p), np.bool_)
        for r, x in enumerate(prompts):
            ids[r, p - len(x) :] = x
            mask[r, p - len(x) :] = True
        mask[len(prompts) :, -1] = True
        return ids, mask

    def _prefill_rows(self, ids: np.ndarray, mask: np.ndarray, keys: list[tuple[int, int]],
                      n_rows: int, max_tokens: int):
        """The prefill's decode state for a packed batch; rows past ``n_rows`` (filler)
        are done from the start, so any stream will do for them."""
        b, p = ids.shape
        self.shapes_seen.add((b, p, max_tokens))
        keys = keys + [(0, r) for r in range(n_rows, b)]
        seeds_of_rows = np.asarray([s for s, _ in keys], np.uint32)
        ids_of_rows = np.asarray([r for _, r in keys], np.uint32)
        done = np.zeros((b,), np.bool_)
        done[n_rows:] = True
        return self._prefill(
            self.state,
            self._shard_batch(ids),
            self._shard_batch(mask),
            self._shard_batch(seeds_of_rows),
            self._shard_batch(ids_of_rows),
            self._shard_batch(done),
            max_tokens=max_tokens,
            pad_id=self.pad_token_id,
        )

    def _decode_rows(self, carry, params: SamplingParams, n_rows: int):
        """Decodes until every row is done or ``max_tokens`` are sampled.

        Without stop strings: one jitted call for all of ``max_tokens`` (rows stop on
        device at EOS / stop token ids). With them: chunks of ``decode_chunk`` steps, after
        each of which the host looks for a completed stop string (``_find_stop``) and marks
        those rows done.

        Returns:
            ``(carry, stop_info)``: the final state and, per row stopped by a string,
            ``(tokens kept, the stop string, end of its text)``.
        """
        m = params.max_tokens
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
        chunk = self.decode_chunk if params.stop else m
        stop_info: dict[int, tuple[int, str, int]] = {}
        step = 0
        while step < m:
            end = min(step + chunk, m)
            carry = self._decode(self.state, carry, jnp.int32(end), stop_ids, scalars, **flags)
            step = int(carry.step)
            done = np.array(carry.done)  # a writable copy
            if params.stop:
                tokens, lengths = np.asarray(carry.tokens), np.asarray(carry.lengths)
                for r in range(n_rows):
                    if r in stop_info or lengths[r] < max(params.min_tokens, 1):
                        continue
                    hit = self._find_stop(tokens[r, : lengths[r]], params)
                    if hit is not None:
                        stop_info[r] = hit
                        done[r] = True
                carry = carry.replace(done=jnp.asarray(done))
            if done.all():
                break
        return carry, stop_info

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
        """Distinct (batch, prompt bucket, max_tokens) shapes compiled so far."""
        return len(self.shapes_seen)


def _prefill(graphdef, state, ids, mask, row_seeds, row_ids, done, *, max_tokens, pad_id):
    """Runs the prompts ids, mask [B, P] into a fresh cache -> the decode loop's start.

    Row ``r`` draws from ``fold_in(key(row_seeds[r]), row_ids[r])``; ``done`` [B] marks
    filler rows.
    Only the last position goes through the LM head (its logits are all decoding needs).
    """
    model = nnx.merge(graphdef, state)
    b, p = ids.shape
    cache = KVCache.init(model.config, b, p + max_tokens)
    hidden, cache = model.model(ids, mask, cache=cache, fresh_cache=True)
    logits = model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32)
    return _Carry(
        cache=cache,
        logits=logits,
        tokens=jnp.full((b, max_tokens), pad_id, jnp.int32),
        logprobs=jnp.zeros((b, max_tokens), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        done=done,
        step=jnp.zeros((), jnp.int32),
        rng=jax.vmap(lambda s, r: jax.random.fold_in(jax.random.key(s), r))(row_seeds, row_ids),
    )


def _decode(
    graphdef, state, carry: _Carry, end, stop_ids, scalars, *, greedy, use_top_k, use_top_p
) -> _Carry:
    """Samples tokens until step ``end`` or until every row is done."""
    temperature, top_k, top_p, min_tokens, pad_id = scalars
    model = nnx.merge(graphdef, state)

    def cond(c: _Carry):
        return (c.step < end) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        logits = mask_tokens(
            c.logits, stop_ids, jnp.broadcast_to(c.step < min_tokens, c.done.shape)
        )
        keys = jax.vmap(jax.random.fold_in, (0, None))(c.rng, c.step)  # [B]
        tok, _ = sample_tokens(
            keys,
            logits,
            temperature,
            top_k,
            top_p,
            greedy=greedy,
            use_top_k=use_top_k,
            use_top_p=use_top_p,
        )
        # The reported log-prob is the model's own (before min_tokens masks EOS), so it
        # equals a teacher-forced forward pass: GRPO's ratios and drift metrics rely on it.
        logp = token_logprobs(c.logits, tok)
        active = ~c.done
        tok = jnp.where(active, tok, pad_id)
        tokens = jax.lax.dynamic_update_slice(c.tokens, tok[:, None], (0, c.step))
        logprobs = jax.lax.dynamic_update_slice(
            c.logprobs, jnp.where(active, logp, 0.0)[:, None], (0, c.step)
        )
        lengths = c.lengths + active.astype(jnp.int32)
        done = c.done | (active & jnp.isin(tok, stop_ids))
        next_logits, cache = model(
            tok[:, None], jnp.ones_like(tok[:, None], jnp.bool_), cache=c.cache
        )
        return c.replace(
            cache=cache,
            logits=next_logits[:, -1].astype(jnp.float32),
            tokens=tokens,
            logprobs=logprobs,
            lengths=lengths,
            done=done,
            step=c.step + 1,
        )

    return jax.lax.while_loop(cond, body, carry)
