"""benchmarks/gpu_smoke.py: its full-size configs are valid on one GPU (so the GPU run does not
stop on a typo), and ``--tiny`` runs every phase on CPU with the real tokenizer and data."""

import importlib.util
import json
import pathlib
import re
import sys

import jax
import pytest
import real_qwen

from jaxalign import train
from jaxalign.config import ConfigError

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_smoke.py"
_spec = importlib.util.spec_from_file_location("benchmarks_gpu_smoke", _PATH)
gpu_smoke = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = gpu_smoke
_spec.loader.exec_module(gpu_smoke)

ROWS = ["SFT step", *[f"GRPO {p.replace('_', ' ')}" for p in gpu_smoke.grpo_timing.PHASES],
        "GRPO step", "eval generate (MATH500 batch)"]


def test_the_full_configs_are_valid_on_one_gpu(tmp_path, monkeypatch, shared_data):
    args = gpu_smoke.parse_args(["--data", str(shared_data)])
    shape = gpu_smoke.model_shape(tiny=False)
    want = dict(real_qwen.QWEN2P5_MATH_1P5B, num_hidden_layers=28)
    assert {k: v for k, v in shape.to_hf_dict().items() if k in want} == want
    # What the model phase writes, without the weights (validation reads none).
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(shape.to_hf_dict()))
    (model_dir / "model.safetensors").touch()
    sft = gpu_smoke.sft_config(args, model_dir, tmp_path / "sft")
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
        train.validate(sft)  # on this CPU
    # As on the one GPU it targets.
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    sft = gpu_smoke.sft_config(args, model_dir, tmp_path / "sft")
    grpo = gpu_smoke.grpo_config(args, model_dir, tmp_path / "grpo")
    for cfg in (sft, grpo):
        train.validate(cfg)
        assert (cfg.model.dtype, cfg.model.attention_impl, cfg.model.remat) == (
            "bfloat16", "cudnn", "full")
        assert cfg.model.path == str(model_dir) and cfg.data.num_eval == 0
    assert sft.train.steps == 5 and sft.train.batch_size == 64
    g = grpo.grpo
    assert (g.n_grpo_steps, g.rollout_batch_size, g.group_size, g.train_batch_size) == (
        3, 64, 8, 64)
    # CS336's settings: micro-batches of 2 rows, lr 1e-5, 1024 new tokens at temperature 1
    assert g.train_batch_size // grpo.optim.grad_accum_steps == 2
    assert (grpo.optim.lr, grpo.sampling.max_tokens, grpo.sampling.temperature) == (1e-5, 1024, 1)
    assert g.loss_type == "reinforce_with_baseline" and grpo.train.width_multiple % 64 == 0
    plan = gpu_smoke.evaluate.plan(gpu_smoke.evaluate.parse_args(
        gpu_smoke.eval_argv(args, model_dir, tmp_path / "eval")))
    assert [len(v) for v in plan.benchmarks.values()] == [64]
    assert plan.sampling.max_tokens == 1024 and plan.sampling.temperature == 1.0


@pytest.mark.slow
def test_a_tiny_cpu_run_prints_every_phase_row(tmp_path, monkeypatch, capsys, shared_data,
                                               qwen2p5_math_tokenizer_dir):
    # The phases run in child processes: give them one CPU device, not the 8 simulated ones.
    monkeypatch.setenv("XLA_FLAGS", "")
    out_file = tmp_path / "smoke.json"
    gpu_smoke.main(["--tiny", "--tokenizer", str(qwen2p5_math_tokenizer_dir), "--data",
                    str(shared_data), "--workdir", str(tmp_path / "work"), "--out",
                    str(out_file)])
    out = capsys.readouterr().out
    table = out[out.index("| phase |"):]
    number = r"\d[\d,.]*"
    for name in ROWS:
        # steps | first s | later mean s | last s | tokens/s | peak memory | MFU
        row = re.search(rf"^\| {re.escape(name)} \| (\d+) \| ({number}) \| ({number}) \| "
                        rf"({number}) \| ([^|]*) \| ([^|]*) \| ([^|]*) \|$", table, re.M)
        assert row, (name, table)
        assert int(row[1]) >= 2  # a first step and a later one
        if name in ("SFT step", "GRPO generate", "GRPO train", "eval generate (MATH500 batch)"):
            assert re.fullmatch(number, row[5].strip()), (name, row[5])  # tokens/s
        assert row[6].strip() in ("", "-")  # no memory statistics on CPU
        assert row[7].strip() == "-"  # no MFU on CPU
    assert "Phase wall times" in table
    report = json.loads(out_file.read_text())
    assert report["markdown"] in out and [r["phase"] for r in report["rows"]] == ROWS
    assert report["phases"]["sft"]["model"]["layers"] == 2
