"""benchmarks/memory.py on tiny configs: FSDP placement, step memory from shapes, the estimate."""

import importlib.util
import pathlib
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxalign.models import qwen2p5_math_1p5b, tiny

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
_spec = importlib.util.spec_from_file_location("benchmarks_memory", _PATH)
memory = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = memory  # dataclasses look their module up while it executes
_spec.loader.exec_module(memory)

# hidden 128 splits 8 ways; norms and head-shaped biases (replicated) are ~1% of the params.
CFG = tiny(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)


def test_fsdp_per_device_bytes_are_total_over_n():
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    rows = memory.fsdp_rows(CFG, sizes=(1, 8))
    one, eight = rows
    assert one["params_dev"] == one["params_total"] == 4 * CFG.num_params()
    # AdamW: two moments the size of the params, plus a few scalar counters.
    assert 2 * one["params_total"] <= one["opt_total"] < 2 * one["params_total"] + 1024
    assert eight["ratio"] == pytest.approx(1.0, rel=0.05)
    assert eight["opt_dev"] == pytest.approx(one["opt_total"] / 8, rel=0.05)


def test_step_memory_donates_params_and_optimizer_state():
    cfg = CFG.replace(dtype=jnp.float32)
    m = memory.step_memory(cfg, batch=2, seq=32, chunk_size=16)
    state = 3 * 4 * cfg.num_params()  # params + two AdamW moments, fp32
    assert m.argument >= state
    # Donation: every params / optimizer buffer is reused for the output.
    assert m.alias >= state
    assert m.peak == m.argument + m.output + m.temp - m.alias
    assert m.temp > 0


def test_params_per_device_by_param_rules():
    # One device holds 1/n of the parameters (norms and biases replicated).
    assert memory.params_per_device(CFG, 1) == CFG.num_params()
    assert 8 * memory.params_per_device(CFG, 8) == pytest.approx(CFG.num_params(), rel=0.05)


def test_largest_fitting_batch_bisects_powers_of_two():
    calls = []

    def measure(b):
        calls.append(b)
        return memory.StepMemory(
            "none", b, temp=100 * b, argument=0, output=0, alias=0, compile_s=0.0
        )

    best, seen = memory.largest_fitting_batch(measure, budget=1000, max_batch=64)
    assert best == 8  # 800 fits, 1600 does not
    assert len(calls) <= 3 and sorted(calls) == [m.batch for m in seen]
    assert memory.largest_fitting_batch(measure, budget=50, max_batch=64)[0] == 0
    assert memory.largest_fitting_batch(measure, budget=10**9, max_batch=64)[0] == 64


@pytest.mark.parametrize("cfg", [CFG, qwen2p5_math_1p5b()], ids=["tiny", "1p5b"])
def test_estimate_state_bytes(cfg):
    est = memory.estimate_table(cfg, seq=128, chunk_size=64)
    p = cfg.num_params()
    assert est["num_params"] == p
    assert est["state"]["fp32"]["params"] == 4 * p
    assert sum(est["state"]["fp32"].values()) == 16 * p
    assert sum(est["state"]["bf16"].values()) == 8 * p
    # Per layer, remat saves activations, never costs them.
    for flash in (False, True):
        none, dots, full = (
            memory.activation_bytes_per_token_layer(cfg, 128, r, flash)
            for r in ("none", "save_dots", "full")
        )
        assert full < dots <= none


# --- lora: full fine-tuning vs LoRA, compiled from shapes -------------------------------


def _adapter_params(cfg, rank: int) -> int:
    """Rank x (fan-in + fan-out) per projection: q, k, v, o, gate, up, down, every layer."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * cfg.head_dim
    fans = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return cfg.num_hidden_layers * sum(rank * (i + o) for i, o in fans)


@pytest.mark.parametrize("loss", ["sft", "grpo"])
def test_lora_step_holds_adapter_state_only_and_a_bf16_base_halves_the_base(loss):
    cfg = CFG.replace(dtype=jnp.float32)
    p = cfg.num_params()
    (_, full), (_, lora), (_, half) = [
        (name, memory.lora_step_memory(cfg, 2, 32, 16, lcfg, loss))
        for name, lcfg in memory.lora_variants(4)]
    trained = _adapter_params(cfg, 4)
    assert full.trained == p and lora.trained == half.trained == trained
    # Full FT donates params + both AdamW moments; LoRA donates the adapters' only (the
    # frozen base is an argument that is not donated).
    assert full.alias >= 3 * 4 * p
    assert 3 * 4 * trained <= lora.alias < 3 * 4 * trained + 1024
    assert lora.argument >= 4 * p + 3 * 4 * trained
    assert lora.argument < full.argument and lora.peak < full.peak
    # base_dtype=bfloat16 stores every frozen parameter in 2 bytes instead of 4
    assert lora.argument - half.argument == 2 * p


def test_lora_subcommand_prints_one_row_per_variant(monkeypatch, capsys):
    monkeypatch.setitem(memory.MODELS, "1p5b", ("tiny", lambda **kw: CFG.replace(**kw)))
    memory.main(["lora", "--loss", "grpo", "--seq", "32", "--chunk-size", "16", "--rank", "4",
                 "--dtype", "float32", "--remat", "none"])
    out = capsys.readouterr().out
    assert "tiny shape" in out and "GRPO step, batch 1 x 32" in out
    rows = [line for line in out.splitlines() if "fine-tuning" in line or "LoRA r=4" in line]
    assert len(rows) == 3 and "base bfloat16" in rows[2]
