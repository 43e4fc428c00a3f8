"""Training memory: FSDP placement, compiled step peaks, and an analytic table per mesh.

Three subcommands, each printing a table:

``fsdp``
    Places a ~21M-parameter fp32 Qwen2 and its AdamW state with ``Trainer.create`` (the
    library's placement path) on meshes of fsdp = 1, 2, 4, 8 simulated CPU devices and sums
    the bytes device 0 actually holds (``addressable_shards``). Per-device bytes should be
    total / n (norm scales and, with tensor = 1, the head-shaped biases stay replicated).
``step``
    Compiles the full SFT train step (``hidden_states`` -> ``chunked_log_probs`` -> SFT loss,
    backward, AdamW update, donated params and optimizer state; the step ``Trainer`` runs)
    from shapes only (``jax.eval_shape`` + ``.lower(ShapeDtypeStruct).compile()``) and
    reports XLA's ``memory_analysis()``. Peak estimate = argument + output + temp - alias.
    Bisects over power-of-two micro-batches for the largest that fits ``--budget-gib``.
    Run it on the target accelerator: XLA's CPU compiler drops the optimization barriers
    that ``jax.checkpoint`` inserts (the gradient of a 2-layer ``remat=full`` model has 2
    ``opt-barrier`` before optimisation and 0 after, jax 0.10.2), so on CPU every remat
    policy compiles to about the same memory: not what a GPU or TPU will use.
``lora``
    The same compiled-step measurement for full fine-tuning and LoRA (``config.lora``:
    the adapters trained, their AdamW state only; the frozen base an undonated argument,
    optionally stored in bf16), side by side, from shapes only: the SFT or the GRPO step
    (``--loss``), at the Qwen2.5-Math-1.5B or the Qwen2.5-7B shape (``--model``).
``estimate``
    Analytic state + activation memory for Qwen2.5-Math-1.5B on 1x H100 80GB, TPU v5p-8
    and TPU v4-32 (formulas in ``estimate_table``'s docstring).

    python benchmarks/memory.py fsdp                      # seconds, 8 simulated CPU devices
    python benchmarks/memory.py estimate                  # instant
    python benchmarks/memory.py step --layers 2 --batch 1 --remat none full   # CPU, ~1 min
    python benchmarks/memory.py step --attention cudnn    # on one H100: bisects, 3 remat policies
    python benchmarks/memory.py lora --layers 2 --batch 1 --seq 512   # CPU: full FT vs LoRA
    python benchmarks/memory.py lora --model 1p5b 7b --loss sft grpo  # ~13 min on CPU
"""

from __future__ import annotations

import os

# Must precede the jax import; only the first value in a process takes effect.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh

from jaxalign import losses, sharding
from jaxalign.algorithms import grpo
from jaxalign.models import lora as lora_lib
from jaxalign.models.qwen2 import (
    REMAT_POLICIES,
    Qwen2Config,
    Qwen2ForCausalLM,
    abstract_model,
    count_params,
    init_model,
    qwen2p5_7b,
    qwen2p5_math_1p5b,
)
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.trainer import Trainer

GIB = 1024**3
MIB = 1024**2


def small_config() -> Qwen2Config:
    """~21M parameters, fp32: the shape ``benchmarks/model_forward.py`` calls ``21m``."""
    return Qwen2Config(
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )


def adamw() -> optax.GradientTransformation:
    """The library's optimizer (clipping + AdamW with a decay mask), default settings."""
    tx, _ = make_optimizer(OptimConfig(lr=1e-5, total_steps=1000, weight_decay=0.1))
    return tx


def grpo_loss(chunk_size: int):
    """``loss_fn(model, batch)``: the library's GRPO loss (``grpo.grpo_loss_fn``: clipped
    ratio against old log-probs, per-row advantages, token entropy and sampler drift
    metrics) with chunked log-probs, as the real recipe's train step runs it."""
    g = ml_collections.ConfigDict(dict(
        loss_type="grpo_clip", cliprange=0.2, cliprange_low=0.0, cliprange_high=0.0,
        length_normalization="masked_mean", beta=0.0, tis_cap=2.0))
    return grpo.grpo_loss_fn(g, use_old=True, use_tis=False, normalize_constant=1.0,
                             chunk_size=chunk_size)


LOSSES = {"sft": lambda c: sft_loss(c), "grpo": lambda c: grpo_loss(c)}
MODELS = {"1p5b": ("Qwen2.5-Math-1.5B", qwen2p5_math_1p5b), "7b": ("Qwen2.5-7B", qwen2p5_7b)}


def sft_loss(chunk_size: int):
    """``loss_fn(model, batch)``: SFT NLL of the response tokens with chunked log-probs.

    The vocabulary projection goes through ``model.logits`` chunk by chunk, so no
    ``[B, T, V]`` logits are ever materialised (forward or backward).
    """

    def loss_fn(model, batch):
        hidden = model.hidden_states(batch["input_ids"], batch["attention_mask"])  # [B, T, D]
        log_probs = losses.chunked_log_probs(
            hidden, model.logits, batch["labels"], chunk_size=chunk_size
        )["log_probs"]  # [B, T]
        return losses.sft_microbatch_loss(log_probs, batch["response_mask"], 1)

    return loss_fn


# --- fsdp: bytes actually placed on device 0 --------------------------------------------


def device_bytes(tree, device) -> int:
    """Bytes of ``tree``'s array shards that live on ``device``."""
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array)
        for s in x.addressable_shards
        if s.device == device
    )


def global_bytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree) if isinstance(x, jax.Array))


def fsdp_rows(cfg: Qwen2Config, sizes=(1, 2, 4, 8)) -> list[dict]:
    """Per-device params + optimizer bytes on device 0 for each fsdp size.

    Each mesh is ``(data=1, fsdp=n, tensor=1)`` over the first n devices, built and placed
    exactly as training does (``Trainer.create``: params by ``PARAM_RULES``, optimizer
    moments sharded like their parameters).
    """
    model = init_model(cfg, seed=0)
    tx = adamw()
    rows = []
    for n in sizes:
        devices = jax.devices()[:n]
        if len(devices) < n:
            raise ValueError(
                f"fsdp={n} needs {n} devices, have {len(devices)}; set "
                "XLA_FLAGS=--xla_force_host_platform_device_count=8 before jax is imported"
            )
        mesh = sharding.make_mesh(data=1, fsdp=n, tensor=1, devices=devices)
        trainer = Trainer.create(model, tx, sft_loss(128), mesh)
        dev0 = devices[0]
        params_total, opt_total = global_bytes(trainer.params), global_bytes(trainer.opt_state)
        params_dev, opt_dev = (
            device_bytes(trainer.params, dev0),
            device_bytes(trainer.opt_state, dev0),
        )
        ideal = (params_total + opt_total) / n
        rows.append(
            dict(
                fsdp=n,
                params_total=params_total,
                opt_total=opt_total,
                params_dev=params_dev,
                opt_dev=opt_dev,
                dev_total=params_dev + opt_dev,
                ideal=ideal,
                ratio=(params_dev + opt_dev) / ideal,
            )
        )
        del trainer
    return rows


def print_fsdp(cfg: Qwen2Config, rows: list[dict]) -> None:
    print(
        f"fp32 Qwen2, {cfg.num_params() / 1e6:.1f}M params (hidden {cfg.hidden_size}, "
        f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}), AdamW; "
        f"bytes on device 0 of mesh (data=1, fsdp=n, tensor=1); jax {jax.__version__}, "
        f"{jax.devices()[0].platform}"
    )
    print(
        f"{'fsdp':>4} {'params MiB':>10} {'opt MiB':>8} {'dev0 params':>11} {'dev0 opt':>9} "
        f"{'dev0 total':>10} {'total/n':>8} {'ratio':>6}"
    )
    for r in rows:
        print(
            f"{r['fsdp']:>4} {r['params_total'] / MIB:10.2f} {r['opt_total'] / MIB:8.2f} "
            f"{r['params_dev'] / MIB:11.2f} {r['opt_dev'] / MIB:9.2f} {r['dev_total'] / MIB:10.2f} "
            f"{r['ideal'] / MIB:8.2f} {r['ratio']:6.3f}"
        )
    print("(MiB; ratio = dev0 total / (total / n), 1.000 is a perfect split)")


# --- step: compiled memory of the whole train step, from shapes ------------------------


def abstract_trainer(cfg: Qwen2Config, chunk_size: int, loss: str = "sft") -> Trainer:
    """A single-device ``Trainer`` whose params and optimizer state are ShapeDtypeStructs.

    Built without allocating anything, so a 1.5B model's step can be compiled anywhere.
    Its ``_train_step`` is the library's step (value_and_grad, optax update, donated
    params and optimizer state), not a copy of it.
    """
    graphdef, params = nnx.split(abstract_model(cfg), nnx.Param)
    tx = adamw()
    opt_state = jax.eval_shape(tx.init, params)
    trainer = Trainer(graphdef, params, opt_state, tx, LOSSES[loss](chunk_size), mesh=None)
    trainer._compile()
    return trainer


def abstract_lora_trainer(cfg: Qwen2Config, chunk_size: int,
                          lora_cfg: lora_lib.LoraConfig, loss: str = "sft") -> Trainer:
    """``abstract_trainer`` with adapters (``lora.apply_lora`` under ``nnx.eval_shape``):
    the library's LoRA step, ``(adapters, opt_state, batch, frozen, step)``, with
    AdamW state for the adapters only."""
    model = nnx.eval_shape(lambda: lora_lib.apply_lora(
        Qwen2ForCausalLM(cfg, rngs=nnx.Rngs(0)), lora_cfg))
    graphdef, params, base, other = nnx.split(model, lora_lib.lora_filter,
                                              lora_lib.frozen_filter, ...)
    tx = adamw()
    opt_state = jax.eval_shape(tx.init, params)
    trainer = Trainer(graphdef, params, opt_state, tx, LOSSES[loss](chunk_size), mesh=None,
                      frozen=(base, other))
    trainer._compile()
    return trainer


def lora_step_memory(cfg: Qwen2Config, batch: int, seq: int, chunk_size: int,
                     lora_cfg: lora_lib.LoraConfig | None, loss: str = "sft") -> StepMemory:
    """``step_memory`` for full fine-tuning (``lora_cfg`` None) or a LoRA step."""
    if lora_cfg is None:
        return step_memory(cfg, batch, seq, chunk_size, loss)
    trainer = abstract_lora_trainer(cfg, chunk_size, lora_cfg, loss)
    step = jax.ShapeDtypeStruct((), jnp.int32)
    t0 = time.perf_counter()
    compiled = trainer._train_step.lower(
        trainer.params, trainer.opt_state, batch_shapes(batch, seq, loss), trainer.frozen, step
    ).compile()
    return _memory(cfg, batch, compiled, time.perf_counter() - t0, trainer.params)


def lora_variants(rank: int, base_dtypes=(None, "bfloat16")):
    """``[(name, LoraConfig | None)]``: full fine-tuning, then LoRA of ``rank`` on all seven
    projections (alpha = 2 rank) with the base in the param dtype and in each of
    ``base_dtypes``."""
    return [("full fine-tuning", None)] + [
        (f"LoRA r={rank}" + (f", base {bd}" if bd else ""),
         lora_lib.LoraConfig(rank=rank, alpha=2.0 * rank, base_dtype=bd)) for bd in base_dtypes]


def print_lora_rows(cfg: Qwen2Config, batch: int, seq: int, chunk_size: int, rank: int,
                    loss: str = "sft", name: str = "Qwen2.5-Math-1.5B",
                    base_dtypes=(None, "bfloat16")) -> list[tuple[str, StepMemory]]:
    """Full fine-tuning vs LoRA: the compiled ``loss`` step's memory in GiB, one row each."""
    print(f"{name} shape, {cfg.num_params() / 1e9:.2f}B params, {cfg.num_hidden_layers} "
          f"layers, {loss.upper()} step, batch {batch} x {seq}, "
          f"{jnp.dtype(cfg.dtype).name} compute, {jnp.dtype(cfg.param_dtype).name} params, "
          f"remat {cfg.remat} (GiB; peak = argument + output + temp - alias)")
    print(f"{'variant':>26} {'trained':>9} {'argument':>8} {'output':>8} {'temp':>8} "
          f"{'alias':>8} {'peak':>8} {'compile s':>9}")
    rows = []
    for label, lcfg in lora_variants(rank, base_dtypes):
        m = lora_step_memory(cfg, batch, seq, chunk_size, lcfg, loss)
        print(f"{label:>26} {_count(m.trained):>9} {m.argument / GIB:8.3f} {m.output / GIB:8.3f} "
              f"{m.temp / GIB:8.3f} {m.alias / GIB:8.3f} {m.peak / GIB:8.3f} "
              f"{m.compile_s:9.1f}", flush=True)
        rows.append((label, m))
    return rows


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def batch_shapes(batch: int, seq: int, loss: str = "sft") -> dict[str, jax.ShapeDtypeStruct]:
    """The arrays the ``loss`` step takes (SFT: ``sft.py``'s batch; GRPO:
    ``grpo.build_rollout_batch``'s plus the old log-probs)."""
    tok = jax.ShapeDtypeStruct((batch, seq), jnp.int32)
    per_token = jax.ShapeDtypeStruct((batch, seq), jnp.float32)
    if loss == "grpo":
        per_row = jax.ShapeDtypeStruct((batch, 1), jnp.float32)
        return {"input_ids": tok, "labels": tok,
                "response_mask": jax.ShapeDtypeStruct((batch, seq), jnp.bool_),
                "sampler_log_probs": per_token, "old_log_probs": per_token,
                "advantages": per_row, "raw_rewards": per_row}
    return {"input_ids": tok, "attention_mask": tok, "labels": tok, "response_mask": per_token}


@dataclasses.dataclass
class StepMemory:
    remat: str
    batch: int
    temp: int
    argument: int
    output: int
    alias: int
    compile_s: float
    trained: int = 0  # parameters that get gradients and AdamW state

    @property
    def peak(self) -> int:
        """Arguments and outputs live together, minus the donated (aliased) buffers."""
        return self.argument + self.output + self.temp - self.alias


def step_memory(cfg: Qwen2Config, batch: int, seq: int, chunk_size: int,
                loss: str = "sft") -> StepMemory:
    """Compiles the ``loss`` train step for ``cfg`` at ``[batch, seq]`` and reads its memory."""
    trainer = abstract_trainer(cfg, chunk_size, loss)
    t0 = time.perf_counter()
    compiled = trainer._train_step.lower(
        trainer.params, trainer.opt_state, batch_shapes(batch, seq, loss)
    ).compile()
    return _memory(cfg, batch, compiled, time.perf_counter() - t0, trainer.params)


def _memory(cfg: Qwen2Config, batch: int, compiled, seconds: float, params) -> StepMemory:
    m = compiled.memory_analysis()
    return StepMemory(
        remat=cfg.remat,
        batch=batch,
        temp=int(m.temp_size_in_bytes),
        argument=int(m.argument_size_in_bytes),
        output=int(m.output_size_in_bytes),
        alias=int(m.alias_size_in_bytes),
        compile_s=seconds,
        trained=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)),
    )


def largest_fitting_batch(measure, budget: int, max_batch: int) -> tuple[int, list[StepMemory]]:
    """Bisection over micro-batches 1, 2, 4, ..., ``max_batch`` (peak grows with batch).

    Args:
        measure: ``batch -> StepMemory``.
        budget: bytes.
        max_batch: a power of two, the largest candidate.

    Returns:
        (the largest power of two whose peak fits, 0 if even 1 does not; every measurement).
    """
    lo, hi = -1, int(np.log2(max_batch)) + 1  # 2**lo fits (or lo = -1), 2**hi does not
    seen = []
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = measure(2**mid)
        seen.append(m)
        if m.peak <= budget:
            lo = mid
        else:
            hi = mid
    return (2**lo if lo >= 0 else 0), sorted(seen, key=lambda m: m.batch)


def print_step_header(cfg: Qwen2Config, args) -> None:
    dev = jax.devices()[0]
    print(
        f"SFT train step, {cfg.num_params() / 1e9:.3f}B params ({cfg.num_hidden_layers} layers), "
        f"seq {args.seq}, params {jnp.dtype(cfg.param_dtype).name}, compute "
        f"{jnp.dtype(cfg.dtype).name}, attention {cfg.attention_impl}, chunk {args.chunk_size}, "
        f"AdamW; jax {jax.__version__} on {dev.platform} ({dev.device_kind})"
    )
    print(
        f"{'remat':>9} {'batch':>5} {'temp':>9} {'argument':>9} {'output':>9} {'alias':>9} "
        f"{'peak':>9} {'fits':>4} {'compile s':>9}"
    )


def print_step_row(m: StepMemory, budget: int) -> None:
    def g(x: int) -> str:
        return f"{x / GIB:9.2f}"

    print(
        f"{m.remat:>9} {m.batch:>5} {g(m.temp)} {g(m.argument)} {g(m.output)} {g(m.alias)} "
        f"{g(m.peak)} {'yes' if m.peak <= budget else 'no':>4} {m.compile_s:9.1f}",
        flush=True,
    )


# --- estimate: the analytic table ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    chips: int
    gib_per_chip: float
    fsdp: int


ACCELERATORS = (
    Accelerator("1x H100 80GB", 1, 80.0, 1),
    Accelerator("TPU v5p-8", 4, 95.0, 4),
    Accelerator("TPU v4-32", 16, 32.0, 16),
)


def params_per_device(cfg: Qwen2Config, fsdp: int) -> int:
    """Parameters one device holds on a (data=1, fsdp, tensor=1) mesh, by ``PARAM_RULES``.

    Exact, from the logical axes of the abstract model and an ``AbstractMesh`` (no devices):
    what ``shard_params`` would place, including the replicated norms and biases.
    """
    mesh = AbstractMesh((1, fsdp, 1), sharding.MESH_AXES)
    model = abstract_model(cfg)
    total = 0
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            spec = sharding.logical_to_spec(
                var.get_metadata()["logical_axes"], sharding.PARAM_RULES, mesh, var.shape
            )
            n = int(np.prod(var.shape))
            for axes in spec:
                for a in (axes,) if isinstance(axes, str) else axes or ():
                    n //= mesh.shape[a]
            total += n
    return total


def state_bytes(num_params: int, param_bytes: int) -> dict[str, int]:
    """Params, grads and both AdamW moments, all in the parameter dtype.

    optax's AdamW keeps ``mu`` and ``nu`` in the parameters' dtype (``make_optimizer`` sets
    no ``mu_dtype``), and gradients come out in it too.
    """
    p = num_params * param_bytes
    return {"params": p, "grads": p, "adam_mu": p, "adam_nu": p}


def activation_bytes_per_token_layer(cfg: Qwen2Config, seq: int, remat: str, flash: bool) -> int:
    """Activations saved for the backward pass, per token per decoder layer (see estimate_table)."""
    s = jnp.dtype(cfg.dtype).itemsize
    d, f = cfg.hidden_size, cfg.intermediate_size
    kh = cfg.num_key_value_heads * cfg.head_dim
    n = cfg.num_attention_heads
    if remat == "full":
        return d * s  # the layer input only
    # Attention probabilities: fp32 softmax output + its bf16 copy, [N, S] per query.
    scores = n * 4 if flash else n * seq * (4 + s)  # flash: one fp32 logsumexp per head
    if remat == "save_dots":
        # Layer input + outputs of the weight matmuls (q, k, v, o, gate, up, down).
        return (d + (d + 2 * kh) + d + 2 * f + d) * s
    # none: inputs of both norms, of q/k/v, of o_proj, of the MLP, q, k, v after RoPE,
    # gate, up and silu(gate) * up.
    return (6 * d + 2 * kh + 3 * f) * s + scores


def estimate_table(cfg: Qwen2Config, seq: int, chunk_size: int) -> dict:
    """Analytic training memory for ``cfg`` (one micro-batch of ``seq`` tokens per row).

    State (sharded 1/fsdp by ``PARAM_RULES``; norms and head-shaped biases are <0.1%):
        fp32 params:  params 4P + grads 4P + AdamW mu 4P + nu 4P = 16P bytes.
        bf16 params:  2P + 2P + 2P + 2P = 8P bytes (optax keeps moments in the param dtype).

    Activations saved for backward, per token per layer, s = bytes of the compute dtype
    (2 for bf16), D hidden, F MLP, KH = kv heads x head dim, N heads, T sequence length:
        remat none:      s * (6D + 2KH + 3F) + attention probabilities, which with the
                         plain XLA attention are N * T * (4 + s) (fp32 softmax + bf16 copy)
                         and with a flash kernel (cudnn) N * 4 (a logsumexp per head).
        remat save_dots: s * (4D + 2KH + 2F): the layer input plus q, k, v, o, gate, up and
                         down outputs; attention is recomputed.
        remat full:      s * D: only each layer's input; one layer's "none" activations
                         are alive again while it is recomputed (added once, not per layer).
    Per sequence: T * (L * per_token_layer + 2D * 4 (embeddings, fp32 final hidden))
    + the chunked LM head, about 3 * chunk * V * 4 bytes (fp32 logits, softmax, gradient)
    per row. This ignores XLA's temporaries and fragmentation: measure with ``step``.

    Returns:
        ``{"num_params", "state": {variant: bytes}, "per_seq": {(remat, attn): bytes}}``.
    """
    p = cfg.num_params()
    states = {"fp32": state_bytes(p, 4), "bf16": state_bytes(p, 2)}
    d, v, L = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers
    per_seq = {}
    for remat in ("none", "save_dots", "full"):
        for attn, flash in (("xla", False), ("flash", True)):
            per_layer = activation_bytes_per_token_layer(cfg, seq, remat, flash)
            total = seq * (L * per_layer + 2 * d * 4) + 3 * chunk_size * v * 4
            if remat == "full":
                total += seq * activation_bytes_per_token_layer(cfg, seq, "none", flash)
            per_seq[(remat, attn)] = total
    return {"num_params": p, "state": states, "per_seq": per_seq}


def print_estimate(cfg: Qwen2Config, seq: int, chunk_size: int) -> dict:
    est = estimate_table(cfg, seq, chunk_size)
    p = est["num_params"]
    counted = count_params(abstract_model(cfg))
    print(
        f"Qwen2.5-Math-1.5B: Qwen2Config.num_params() = {p:,}; counted from "
        f"abstract_model = {counted:,} ({'match' if p == counted else 'MISMATCH'})"
    )
    print("\nTraining state (whole model, GiB):")
    print(f"{'variant':>8} {'params':>7} {'grads':>7} {'adam mu':>7} {'adam nu':>7} {'total':>7}")
    for name, st in est["state"].items():
        vals = [st[k] / GIB for k in ("params", "grads", "adam_mu", "adam_nu")]
        print(f"{name:>8} " + " ".join(f"{x:7.2f}" for x in vals) + f" {sum(vals):7.2f}")

    print(f"\nActivations per token per layer ({jnp.dtype(cfg.dtype).name} compute, T={seq}), KiB:")
    for remat in ("none", "save_dots", "full"):
        xla = activation_bytes_per_token_layer(cfg, seq, remat, flash=False) / 1024
        fl = activation_bytes_per_token_layer(cfg, seq, remat, flash=True) / 1024
        print(f"{remat:>10}: xla attention {xla:8.1f}   flash attention {fl:8.1f}")

    print(
        f"\nPer device: state + micro-batch rows x activations per {seq}-token row; "
        f"'max rows' = floor((HBM - state) / per-row), chunk {chunk_size}.\n"
        "params/dev: exact count one device holds by PARAM_RULES on (data=1, fsdp, tensor=1), "
        "vs P / fsdp:"
    )
    combos = [(r, a) for r in ("none", "save_dots", "full") for a in ("xla", "flash")]
    print(
        f"{'mesh':>13} {'HBM GiB':>7} {'fsdp':>4} {'params/dev':>13} {'vs P/n':>6} {'state':>5} "
        f"{'GiB':>6} " + " ".join(f"{f'{r}/{a}':>15}" for r, a in combos)
    )
    for acc in ACCELERATORS:
        per_dev = params_per_device(cfg, acc.fsdp)
        for name, st in est["state"].items():
            state_dev = sum(st.values()) * per_dev / p
            cells = []
            for r, a in combos:
                per_row = est["per_seq"][(r, a)]
                rows = int(max(acc.gib_per_chip * GIB - state_dev, 0) // per_row)
                cells.append(f"{per_row / GIB:6.2f}G->{rows:>4}")
            print(
                f"{acc.name:>13} {acc.gib_per_chip:7.0f} {acc.fsdp:>4} {per_dev:13,} "
                f"{per_dev * acc.fsdp / p:6.4f} {name:>5} {state_dev / GIB:6.2f} "
                + " ".join(f"{c:>15}" for c in cells)
            )
    print(
        "(state: params + grads + AdamW moments per device, in the param dtype; cell: GiB per\n"
        " row -> max rows per device. All HBM is budgeted: leave headroom for XLA temporaries\n"
        " and the allocator; `step` measures the compiled peak)"
    )
    return est


# --- CLI ------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fsdp", help="per-device params + AdamW bytes on fsdp = 1, 2, 4, 8 devices")
    st = sub.add_parser("step", help="compiled memory of the SFT train step (shapes only)")
    st.add_argument("--seq", type=int, default=2048)
    st.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    st.add_argument("--remat", nargs="+", default=list(REMAT_POLICIES), choices=REMAT_POLICIES)
    st.add_argument(
        "--batch", type=int, nargs="+", default=None, help="measure these (default: bisect)"
    )
    st.add_argument("--max-batch", type=int, default=64, help="bisection's largest candidate")
    st.add_argument("--budget-gib", type=float, default=80.0)
    st.add_argument("--chunk-size", type=int, default=512, help="chunked_log_probs positions")
    st.add_argument("--dtype", default="bfloat16", help="compute dtype")
    st.add_argument("--param-dtype", default="float32")
    st.add_argument("--attention", default="xla", help="attention_impl (cudnn on GPU)")
    lo = sub.add_parser("lora", help="compiled step memory: full fine-tuning vs LoRA")
    lo.add_argument("--model", nargs="+", default=["1p5b"], choices=sorted(MODELS))
    lo.add_argument("--loss", nargs="+", default=["sft"], choices=sorted(LOSSES))
    lo.add_argument("--seq", type=int, default=2048)
    lo.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    lo.add_argument("--batch", type=int, default=1)
    lo.add_argument("--rank", type=int, default=16)
    lo.add_argument("--remat", default="full", choices=REMAT_POLICIES)
    lo.add_argument("--chunk-size", type=int, default=512)
    lo.add_argument("--dtype", default="bfloat16", help="compute dtype")
    lo.add_argument("--param-dtype", default="float32")
    lo.add_argument("--attention", default="xla", help="attention_impl (cudnn on GPU)")
    es = sub.add_parser("estimate", help="analytic memory table for Qwen2.5-Math-1.5B")
    es.add_argument("--seq", type=int, default=2048)
    es.add_argument("--chunk-size", type=int, default=512)
    args = ap.parse_args(argv)

    if args.cmd == "fsdp":
        cfg = small_config()
        print_fsdp(cfg, fsdp_rows(cfg))
    elif args.cmd == "estimate":
        print_estimate(qwen2p5_math_1p5b(), args.seq, args.chunk_size)
    elif args.cmd == "lora":
        for key in args.model:
            name, preset = MODELS[key]
            cfg = preset(dtype=jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype),
                         attention_impl=args.attention, remat=args.remat)
            if args.layers is not None:
                cfg = cfg.replace(num_hidden_layers=args.layers)
            for loss in args.loss:
                print_lora_rows(cfg, args.batch, args.seq, args.chunk_size, args.rank, loss,
                                name)
                print()
    else:
        if args.max_batch & (args.max_batch - 1):
            ap.error(f"--max-batch={args.max_batch} must be a power of two")
        base = qwen2p5_math_1p5b(
            dtype=jnp.dtype(args.dtype),
            param_dtype=jnp.dtype(args.param_dtype),
            attention_impl=args.attention,
        )
        if args.layers is not None:
            base = base.replace(num_hidden_layers=args.layers)
        budget = int(args.budget_gib * GIB)
        print_step_header(base, args)
        best = {}
        for remat in args.remat:
            cfg = base.replace(remat=remat)

            def measure(b, cfg=cfg):
                m = step_memory(cfg, b, args.seq, args.chunk_size)
                print_step_row(m, budget)
                return m

            if args.batch:
                for b in args.batch:
                    measure(b)
            else:
                best[remat], _ = largest_fitting_batch(measure, budget, args.max_batch)
        for remat, b in best.items():
            print(
                f"remat {remat}: largest power-of-two micro-batch within {args.budget_gib:g} GiB "
                f"(<= {args.max_batch}): {b or 'none'}"
            )


if __name__ == "__main__":
    main()
