"""Supervised fine-tuning on reasoning traces.

    # tiny random model, GSM8K train traces from ../shared/data, CPU, a few minutes:
    python -m jaxalign.train --config configs/sft.py
    # the real recipe: Qwen2.5-Math-1.5B, bf16, seq 2048, lr 1e-5, warmup 5%, cosine to 0:
    python -m jaxalign.train --config configs/sft.py:qwen2p5_math_1p5b \
        --config.model.path=/models/Qwen2.5-Math-1.5B
    # s1 (Muennighoff et al. 2025, "s1: Simple test-time scaling"): Qwen2.5-32B-Instruct on
    # s1K, chat template with s1's think/answer delimiters, 5 epochs at batch 16 (16 GPUs:
    # one row each), lr 1e-5, 5% warm-up then cosine to 0, AdamW (0.9, 0.95), wd 1e-4:
    python -m jaxalign.train --config configs/sft.py:s1 \
        --config.model.path=/models/Qwen2.5-32B-Instruct --config.data.source=hf:/data/s1K
    # then evaluate with budget forcing (the same delimiters):
    python eval/evaluate.py --model runs/s1-<timestamp> --prompt s1 --benchmarks aime24,math500 \
        --budget-forcing max_thinking=8192,wait=0,1 --max-tokens 1024 --out evals/s1

Expected result (tiny preset; measured 2026-12-02 on the project's 2-core CPU, nothing
else running): 100 steps in 2 min 21 s wall; the train loss falls from 5.59 to 3.17
nats/token (a 0.1M-parameter character-level model learns the byte statistics of the
traces, not arithmetic), held-out answer reward stays 0. The real preset validates on GSM8K
test with the verifier. The s1 preset has no measured run here (it needs 32B-class GPUs);
the paper reports 26 minutes on 16 H100s and, with budget forcing, 50-57% on AIME24.

Chat templates: ``data.template="chat"`` wraps each prompt in the model tokenizer's chat
template (system prompt ``data.system_prompt``; ``''`` for none) and closes each response
with its end-of-turn token (``<|im_end|>``); the random presets' byte tokenizer has no chat
template, so it needs ``model.path``. Length: ``train.steps``, or ``train.epochs`` with
``train.steps=0`` (steps = ceil(epochs * rows / batch_size), counted when the data loads).
"""

from jaxalign.config import base_config, qwen2p5_math_1p5b_model
from jaxalign.data.prompts import CHAT_SYSTEM


def get_config(preset: str = "tiny"):
    c = base_config("sft", "sft")

    c.data = dict(
        # gsm8k | synthetic | a .jsonl of {"prompt": text, "response": text} | hf:NAME[:CONFIG]
        # (a Hugging Face dataset: Hub id or local folder; split data.split)
        source="gsm8k",
        # JSONL / hf: sources with other field names: prompt=F,response=F[,thinking=F]; with
        # thinking (s1K: prompt=question,thinking=thinking_trajectories,response=attempt) the
        # response is s1's turn (jaxalign.data.prompts.s1_response):
        # <|im_start|>think\n{thinking}\n<|im_start|>answer\nAnswer: {response}
        fields="",
        split="train",
        data_dir="../shared/data",
        template="r1_zero",  # prompt template name or text with {question}, or chat
        # data.template='chat': the system message ('' : none, the chat template's default)
        system_prompt=CHAT_SYSTEM,
        # validation reward: r1_zero | question_only | package.module:function | weighted sum
        reward="r1_zero",
        num_train=0,  # 0: all rows
        num_eval=256,
        slip_rate=0.0,  # synthetic only: fraction of traces with an arithmetic slip
        seed=0,
        skip_invalid=False,  # True: skip bad rows (counted in the log) instead of stopping
        # data.source='synthetic': the generated problems (jaxalign/data/synthetic.py)
        synthetic=dict(max_steps=3, max_value=20, max_operand=9),
    )
    c.train = dict(
        steps=100,
        epochs=0.0,  # >0 (with steps=0): steps = ceil(epochs * rows / batch_size)
        batch_size=8,  # rows per optimizer step (all processes)
        # GSM8K traces under the r1_zero prompt are 550-1900 tokens with the byte tokenizer
        # (one token per character, median 835). Attention cost grows with T^2, so the tiny
        # CPU preset stops at 1024 and drops the ~20% longer rows (counted in the log).
        seq_buckets=(640, 768, 1024),
        truncate="drop",  # over-long examples: error | right | drop (logged, never silent)
        # True: pack whole sequences into rows of max(seq_buckets) positions (segment ids:
        # no attention across them); batch_size then counts packed rows (jaxalign.data.packing)
        packing=False,
        loss_chunk_size=0,  # >0: chunked vocabulary projection (large vocabularies)
        normalize_constant=0.0,  # 0: mean NLL per response token; >0: CS336 sum / constant
    )
    c.eval = dict(
        every=100,  # optimizer steps; 0: only at the end
        # more validation sets, each logged as eval/<name>/* (the first num_examples of
        # each): benchmark names, .jsonl files or hf:NAME[:CONFIG], each optionally :N
        sets="",
        split="test",  # the split of eval.sets' benchmarks and hf: datasets
        at_start=False,
        num_examples=32,
        batch_size=32,
        max_tokens=256,
        temperature=0.0,
        num_workers=1,  # verifier processes
    )
    c.model.preset = "tiny"
    c.model.arch = dict(max_position_embeddings=2048)  # room for the longest trace
    c.model.attention_impl = "dot_product"  # XLA's fused attention: ~2x the einsums on CPU
    c.optim.lr = 1e-3
    c.optim.warmup_ratio = 0.05
    c.optim.weight_decay = 1e-4
    c.checkpoint.save_every = 100

    if preset == "tiny":
        pass
    elif preset == "qwen2p5_math_1p5b":
        qwen2p5_math_1p5b_model(c)
        c.train.steps = 1000
        c.train.batch_size = 64
        c.train.seq_buckets = (512, 1024, 2048)
        c.optim.lr = 1e-5
        c.optim.grad_accum_steps = 8
        c.eval.every = 200
        c.eval.num_examples = 256
        c.eval.max_tokens = 1024
        c.eval.num_workers = 8
        c.eval.batch_size = 256
    elif preset == "s1":
        s1_recipe(c)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose tiny, qwen2p5_math_1p5b or s1")
    return c


def s1_recipe(c) -> None:
    """s1 (Muennighoff et al. 2025, "s1: Simple test-time scaling"), Section 3 and App. D.

    Qwen2.5-32B-Instruct (override ``model.path``; any Qwen2 chat model fits the format) on
    s1K's 1,000 rows, each ``question``, ``thinking_trajectories`` (a list of one trace) and
    ``attempt``, formatted as s1 formats them: the chat template with no system message
    (Qwen2.5's default "You are Qwen, ..." then applies), and the assistant turn
    ``<|im_start|>think\\n{thinking}\\n<|im_start|>answer\\nAnswer: {attempt}<|im_end|>``.
    The loss covers that turn only (the prompt is masked). For s1K-1.1 (DeepSeek-R1 traces)
    set ``data.source=hf:simplescaling/s1K-1.1`` and ``data.fields=prompt=question,
    thinking=deepseek_thinking_trajectory,response=deepseek_attempt``. Offline: a local
    folder (``hf:/data/s1K``, saved by ``Dataset.save_to_disk``) or a JSONL file.

    Optimizer: lr 1e-5, linear warm-up over 5% of the steps then cosine to 0, AdamW
    (0.9, 0.95), weight decay 1e-4, 5 epochs at batch 16 (the paper: 16 H100s, one row each;
    here ``optim.grad_accum_steps`` times a micro-batch the data x fsdp devices divide).
    No row is cut: ``truncate='error'`` and widths up to the model's 32,768-token context;
    the load reports how many rows each width would cut, to pick narrower ones.
    """
    c.name = "s1"
    c.model.preset = ""
    c.model.path = "Qwen/Qwen2.5-32B-Instruct"
    c.model.arch = {}
    c.model.dtype = "bfloat16"
    c.model.attention_impl = "cudnn"
    c.model.remat = "full"
    c.data.source = "hf:simplescaling/s1K"
    c.data.fields = "prompt=question,thinking=thinking_trajectories,response=attempt"
    c.data.template = "chat"
    c.data.system_prompt = ""  # as s1: no system message
    c.data.reward = "s1"  # the answer after <|im_start|>answer (no held-out set by default)
    c.train.steps = 0
    c.train.epochs = 5.0
    c.train.batch_size = 16
    c.train.seq_buckets = (4096, 8192, 16384, 32768)
    c.train.truncate = "error"
    c.train.loss_chunk_size = 512
    c.optim.lr = 1e-5
    c.optim.lr_min = 0.0
    c.optim.warmup_ratio = 0.05
    c.optim.schedule = "cosine"
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = 1e-4
    c.eval.every = 0
    c.eval.num_examples = 0
