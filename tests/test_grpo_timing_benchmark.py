"""benchmarks/grpo_timing.py: the GPU preset is a valid config; the CPU run reports phases."""

import argparse
import importlib.util
import pathlib
import sys

import jax
import pytest

from jaxalign import train
from jaxalign.config import ConfigError

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "grpo_timing.py"
_spec = importlib.util.spec_from_file_location("benchmarks_grpo_timing", _PATH)
grpo_timing = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = grpo_timing
_spec.loader.exec_module(grpo_timing)


def test_the_1p5b_preset_validates_with_the_qwen_shape(tmp_path, monkeypatch):
    args = argparse.Namespace(preset="1p5b", steps=10, max_tokens=0, workdir="")
    cfg = grpo_timing.build_config(args, str(tmp_path))
    with pytest.raises(ConfigError, match="attention_impl='cudnn' needs an NVIDIA GPU"):
        train.validate(cfg)  # on this CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # as on the GPU it targets
    train.validate(cfg)
    assert cfg.model.arch.hidden_size == 1536 and cfg.model.arch.num_hidden_layers == 28
    assert cfg.sampling.max_tokens == 512 and cfg.warmstart.sft_steps == 0
    assert cfg.model.attention_impl == "cudnn" and cfg.train.width_multiple % 64 == 0


def test_a_short_cpu_run_prints_every_phase(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["grpo_timing.py", "--steps", "2", "--max-tokens", "8",
                                      "--workdir", str(tmp_path / "run")])
    grpo_timing.main()
    out = capsys.readouterr().out
    table = out[out.index("phase"):]
    for phase in grpo_timing.PHASES:
        assert f"{phase:>14} " in table
    assert "rollout tokens/s" in table
