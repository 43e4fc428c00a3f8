"""Config defaults and checks: the blocks every ``configs/*.py`` starts from, and the
checks that run before anything is built.

* ``base_config``: the blocks every algorithm shares (model, mesh, optim, checkpoint, log);
  each field's one default is here. ``demo_task`` and ``qwen2p5_math_1p5b_model`` are the
  blocks the demo and real presets of several config files share.
* ``ConfigError`` / ``check``: a config value that cannot work, with a message that says
  what to change. ``validate_common`` and ``check_micro_batch`` are the checks every
  algorithm shares; ``mesh_sizes`` resolves the mesh's ``-1`` axis (the one place that does).

``ConfigError`` and ``check`` live in ``jaxalign.errors`` (re-exported here), so models and
data can raise them without ml_collections.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxalign.data.prompts import CHAT_SYSTEM
from jaxalign.data.synthetic import DEMO_TEMPLATE

# In the leaf module ``errors`` (the sidecar's environment, without ml_collections, imports
# it too); re-exported here, where the loops and configs look for them.
from jaxalign.errors import ConfigError, check  # noqa: F401
from jaxalign.models.lora import validate_lora

# --- the config blocks every algorithm shares ------------------------------------------


def base_config(name: str, algorithm: str) -> ml_collections.ConfigDict:
    """The blocks every ``configs/*.py`` starts from; each field's one default is here.

    Blocks: ``model`` (checkpoint path or random preset, dtypes, attention, remat),
    ``lora`` (``lora_block``: rank 0, off), ``mesh`` (data x fsdp x tensor; one may be -1),
    ``optim`` (AdamW + schedule), ``checkpoint`` and ``log``. Algorithms add ``data``,
    ``train`` and their own blocks.
    """
    c = ml_collections.ConfigDict()
    c.name = name
    c.algorithm = algorithm
    c.workdir = ""  # default: runs/<name>-<timestamp>
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    # A checkpoint (HF directory or hub id). When set it wins: ``preset`` and ``arch``, which
    # only shape a random model, are ignored, so ``--config.model.path=...`` alone switches
    # any config from its random model to a real one.
    c.model.path = ""
    c.model.preset = "tiny"  # random model with the byte tokenizer: tiny | small
    c.model.arch = ml_collections.ConfigDict()  # preset overrides, e.g. num_hidden_layers
    c.model.seed = 0
    c.model.dtype = "float32"  # compute dtype
    c.model.param_dtype = "float32"  # master weights
    c.model.attention_impl = "xla"  # xla | dot_product | cudnn (GPU) | splash (TPU)
    c.model.remat = "none"  # none | full | save_dots
    # LoRA adapters on the policy (``--config.lora.rank=16``); rank 0: full fine-tuning
    c.lora = lora_block()

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all devices the other axes leave
    c.mesh.tensor = 1

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-5
    c.optim.lr_min = 0.0
    c.optim.warmup_steps = -1  # -1: use warmup_ratio
    c.optim.warmup_ratio = 0.0
    c.optim.schedule = "cosine"  # cosine | constant
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.eps = 1e-8
    c.optim.weight_decay = 0.0
    c.optim.grad_clip = 1.0  # 0 disables
    c.optim.grad_accum_steps = 1

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 100  # optimizer steps; the last step is always saved; 0: only it
    c.checkpoint.max_to_keep = 2
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = True  # write the final policy as a HF directory (run_dir/hf)

    c.log = ml_collections.ConfigDict()
    c.log.wandb_mode = "offline"  # offline | online | disabled
    c.log.wandb_project = "jaxalign"
    c.log.wandb_entity = ""  # '' : wandb's default entity
    c.log.wandb_tags = ()  # e.g. ("grpo", "math")
    c.log.wandb_name = ""  # '' : the run directory's name
    # validation samples per eval written to generations.jsonl (and a wandb table)
    c.log.num_generations = 8
    c.log.progress = True  # tqdm bar (process 0)
    return c


def demo_task(c: ml_collections.ConfigDict) -> None:
    """The CPU demo's policy, task and warm start, shared by ``configs/grpo.py`` and
    ``configs/ei.py`` so both start from the same SFT policy.

    Two-operation problems; the warm start imitates traces whose ``<answer>`` slips in half
    of the rows (``jaxalign/data/synthetic.py``): the SFT policy computes well but copies
    its result into ``<answer>`` unreliably, which only the verifier's reward can fix.
    """
    c.data.synthetic.max_steps = 2
    c.data.num_eval = 512
    c.model.preset = "small"
    c.model.arch = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                        max_position_embeddings=256)
    c.warmstart.sft_steps = 1000
    c.warmstart.batch_size = 32
    c.warmstart.slip_rate = 0.5


def qwen2p5_math_1p5b_model(c: ml_collections.ConfigDict) -> None:
    """Qwen2.5-Math-1.5B for one GPU: bf16 compute, cuDNN attention, per-layer remat,
    chunked vocabulary projection (the real presets of every config share this)."""
    c.model.preset = ""
    c.model.path = "Qwen/Qwen2.5-Math-1.5B"
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn"
    c.model.remat = "full"
    c.train.loss_chunk_size = 512


def on_tpu(c: ml_collections.ConfigDict) -> None:
    """The changes a GPU preset needs on a TPU slice: XLA's attention (cuDNN is NVIDIA's),
    the sharding over every chip (fsdp = all devices), rollout widths on the MXU's 128."""
    c.model.attention_impl = "dot_product"
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    if "width_multiple" in c.train:
        c.train.width_multiple = max(128, c.train.width_multiple // 128 * 128)


def rollout_blocks(c: ml_collections.ConfigDict) -> None:
    """The blocks of the rollout-based loops (GRPO, Expert Iteration), each default once:
    ``data`` (training problems and the held-out set), ``sampling``, ``engine``, ``train``,
    ``eval`` and ``warmstart`` (the demo's SFT warm start)."""
    c.data = dict(
        source="synthetic",  # synthetic | gsm8k | math (MATH500 held out) | JSONL | hf:NAME
        data_dir="../shared/data",
        # data.source='math': JSONL of training problems, MATH- or GSM8K-shaped: a question
        # (problem | question) and an answer (answer, "#### N" read as N, or the last
        # \boxed{} of solution); the fields used are printed at load
        train_file="",
        # a JSONL source (source or train_file) may also be a Hugging Face dataset:
        # hf:NAME[:CONFIG], NAME a Hub id or a local folder; its split:
        split="train",
        # which fields hold the problem: '' reads the MATH or GSM8K shape off the first row;
        # else question=F,answer=F[,solution=F][,id=F][,parse=none|gsm8k|boxed]
        fields="",
        # r1_zero | question_only | text with {question} | chat (the model tokenizer's chat
        # template, with system_prompt; '' for none)
        template=DEMO_TEMPLATE,
        system_prompt=CHAT_SYSTEM,
        # a reward spec: r1_zero | question_only | package.module:function | a weighted sum,
        # e.g. "r1_zero + 0.1*my_rewards:length_penalty" (jaxalign/verify/rewards.py)
        reward="r1_zero",
        num_train=20000,
        num_eval=256,
        seed=0,
        # bad rows and prompts + sampling.max_tokens over the model's context: False stops
        # the run with file:line, True skips them (counted in the log)
        skip_invalid=False,
        # data.source='synthetic': the generated problems (jaxalign/data/synthetic.py)
        synthetic=dict(max_steps=3, max_value=20, max_operand=9),
    )
    c.sampling = dict(
        temperature=1.0, top_p=1.0, max_tokens=48, min_tokens=4, stop=("</answer>",)
    )
    c.engine = dict(
        backend="jax",  # jax (in-process) | sidecar (see launch/sidecar.sh)
        urls="",  # sidecar URLs, comma-separated
        export_dir="",  # weights for the sidecars: '' = /dev/shm here (sidecars on this host
        # only); for sidecars on other hosts, a directory they all read (shared filesystem)
        max_batch_size=128,
        decode_chunk=16,
        # auto | on | off: micro-batches of similar prompt lengths, so that a few long
        # prompts do not pad every row's cache (auto: on when the engine runs on CPU)
        group_by_length="auto",
    )
    c.train = dict(
        loss_chunk_size=0,  # >0: chunked vocabulary projection (152k vocabularies)
        width_multiple=32,  # rollout batches are padded to a multiple of this (few compiles)
        # True: several rollouts per row (segment ids, attention within each; losses per
        # sequence as unpacked); rows of the bucketed width, a power of two of them per
        # micro-batch (jaxalign.algorithms.grpo.build_packed_rollout_batch)
        packing=False,
    )
    c.eval = dict(
        every=10,  # loop steps; the last step is always evaluated
        # more validation sets, each logged as eval/<name>/*: benchmark names, .jsonl files
        # or hf:NAME[:CONFIG], each optionally :N (its first N), e.g. "gsm8k:64,math500:128"
        sets="",
        split="test",  # the split of eval.sets' benchmarks and hf: datasets
        temperature=1.0,  # held-out reward of the policy as it samples
        num_workers=1,  # verifier processes
    )
    c.warmstart = dict(
        sft_steps=0,  # >0: SFT on generated traces first (synthetic data only)
        lr=3e-3,
        warmup_steps=10,
        batch_size=64,
        seq_buckets=(96,),
        slip_rate=0.0,
        save_every=200,  # warm-start checkpoints: a killed warm start resumes from the last
    )


def lora_block() -> ml_collections.ConfigDict:
    """The ``config.lora`` block (``--config.lora.rank=16`` turns LoRA on; checked by
    ``models.lora.validate_lora``).

    Fields: ``rank`` (0 = off: full fine-tuning), ``alpha`` (scale alpha / rank),
    ``dropout`` (on the adapter input, training only), ``target_modules`` (comma-separated
    PEFT names; default all seven projections, ``models.lora.TARGET_MODULES``, as QLoRA
    recommends), ``use_rslora``, ``base_dtype`` ('' keeps ``model.param_dtype``;
    'bfloat16' halves the frozen weights).
    """
    return ml_collections.ConfigDict(dict(
        rank=0,
        alpha=32.0,
        dropout=0.0,
        target_modules="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        use_rslora=False,
        base_dtype="",
    ))


def validate_common(cfg: ml_collections.ConfigDict, known_algorithms) -> None:
    """Checks every algorithm shares, before anything is compiled."""
    check(cfg.algorithm in known_algorithms,
          f"config.algorithm={cfg.algorithm!r}; choose one of {sorted(known_algorithms)}")
    m = cfg.model
    check(bool(m.path) or bool(m.preset),
          "set config.model.path (HF directory or hub id) or config.model.preset (a random "
          "model: 'tiny' or 'small')")
    if m.path and not Path(m.path).exists() and (m.path.startswith((".", "/", "~"))
                                                 or m.path.count("/") != 1):
        raise ConfigError(f"config.model.path={m.path!r}: no such directory (and not a hub id)")
    check(m.preset in ("", "tiny", "small"),
          f"config.model.preset={m.preset!r}; choose 'tiny' or 'small' (or set model.path)")
    for field in ("dtype", "param_dtype"):
        check(getattr(m, field) in ("float32", "bfloat16", "float16"),
              f"config.model.{field}={getattr(m, field)!r}; choose float32, bfloat16 or float16")
    check(m.attention_impl in ("xla", "dot_product", "cudnn", "splash"),
          f"config.model.attention_impl={m.attention_impl!r}; choose xla, dot_product, cudnn "
          f"or splash")
    platform = jax.default_backend()
    # cuDNN's fused attention exists only on NVIDIA GPUs; elsewhere XLA fails deep in
    # compilation with a message that does not name the config field.
    check(m.attention_impl != "cudnn" or platform in ("gpu", "cuda"),
          f"config.model.attention_impl='cudnn' needs an NVIDIA GPU, and this process runs on "
          f"{platform}: set --config.model.attention_impl=dot_product (or xla)")
    # Splash attention is a Pallas TPU kernel; elsewhere only its (very slow) interpreter.
    check(m.attention_impl != "splash" or platform == "tpu",
          f"config.model.attention_impl='splash' needs a TPU, and this process runs on "
          f"{platform}: set --config.model.attention_impl=xla (or cudnn on a GPU)")
    check(m.remat in ("none", "full", "save_dots"),
          f"config.model.remat={m.remat!r}; choose none, full or save_dots")
    validate_lora(cfg.lora)
    sizes = (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    check(sizes.count(-1) <= 1 and all(s == -1 or s >= 1 for s in sizes),
          f"config.mesh sizes {sizes}: each must be >= 1, and at most one may be -1")
    n = jax.device_count()
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        check(n % known == 0,
              f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}): the fixed "
              f"axes ({known} devices) do not divide the {n} available devices")
    else:
        check(known == n,
              f"config.mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs {known} "
              f"devices but {n} are available: change the mesh sizes (one may be -1)")
    check(cfg.optim.lr > 0, f"config.optim.lr={cfg.optim.lr} must be > 0")
    check(cfg.optim.grad_accum_steps >= 1,
          f"config.optim.grad_accum_steps={cfg.optim.grad_accum_steps} must be >= 1")
    check(cfg.log.wandb_mode in ("offline", "online", "disabled"),
          f"config.log.wandb_mode={cfg.log.wandb_mode!r}; choose offline, online or disabled")


def check_micro_batch(cfg: ml_collections.ConfigDict, field: str, batch_size: int) -> None:
    """``config.<field>`` rows per optimizer step, cut into ``optim.grad_accum_steps``
    micro-batches, must split evenly over the processes and over the mesh's data-parallel
    devices (data x fsdp): each device takes whole rows of every micro-batch."""
    accum = cfg.optim.grad_accum_steps
    check(batch_size % accum == 0,
          f"config.{field}={batch_size} is not divisible by config.optim.grad_accum_steps="
          f"{accum}: change one so the micro-batch is whole")
    micro = batch_size // accum
    procs = jax.process_count()
    check(micro % procs == 0,
          f"micro-batch {micro} (config.{field} / optim.grad_accum_steps) is not divisible "
          f"by the {procs} processes")
    if jax.device_count() == 1:
        return  # one device: no split
    sizes = mesh_sizes(cfg.mesh, jax.device_count())
    if sizes is None:
        return  # a malformed mesh is reported by validate_common
    data_parallel = sizes[0] * sizes[1]
    check(micro % data_parallel == 0,
          f"micro-batch {micro} (config.{field} / optim.grad_accum_steps) is not divisible by "
          f"the {data_parallel} data-parallel devices (mesh data x fsdp): change config."
          f"{field}, optim.grad_accum_steps or config.mesh")


def mesh_sizes(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int, int] | None:
    """``(data, fsdp, tensor)`` with the one ``-1`` axis resolved to the devices the others
    leave; None when the block is malformed (``validate_common`` says how)."""
    sizes = [mesh.data, mesh.fsdp, mesh.tensor]
    if sizes.count(-1) > 1 or any(s != -1 and s < 1 for s in sizes):
        return None
    if -1 in sizes:
        known = int(np.prod([s for s in sizes if s != -1]))
        sizes[sizes.index(-1)] = num_devices // max(known, 1)
    return sizes[0], sizes[1], sizes[2]
