"""Every config file loads, every preset validates (or fails with the fix in the message)."""

import json
import subprocess
import sys

import jax
import pytest
from cfg_helpers import REPO_ROOT, load_config

from jaxalign import train
from jaxalign.config import ConfigError

CONFIGS = sorted(p.stem for p in (REPO_ROOT / "configs").glob("*.py"))
PRESETS = {
    "sft": ["tiny", "qwen2p5_math_1p5b", "s1"],
    "dpo": ["demo"],
    "ei": ["demo", "qwen2p5_math_1p5b"],
    "grpo": ["demo", "qwen2p5_math_1p5b", "qwen2p5_math_1p5b_question_only", "dr_grpo", "dapo",
             "qwen2p5_math_1p5b_dr_grpo", "qwen2p5_math_1p5b_dapo", "qwen2p5_math_1p5b_tpu"],
}


def test_every_config_file_is_covered():
    assert CONFIGS == sorted(PRESETS)


@pytest.mark.parametrize("name, preset", [(n, p) for n in PRESETS for p in PRESETS[n]])
def test_presets_load_and_validate(name, preset, shared_data, monkeypatch, tmp_path):
    cfg = load_config(name, preset)
    if preset.endswith("_tpu"):  # validated as on a v4-32 slice: 16 chips
        monkeypatch.setattr(jax, "device_count", lambda: 16)
        monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    elif preset.startswith("qwen2p5"):
        # The real presets target one GPU (CS336's micro-batch of 2 does not split over the
        # 8 simulated devices of this test process): validate them as on one GPU.
        monkeypatch.setattr(jax, "device_count", lambda: 1)
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert cfg.algorithm in train.ALGORITHMS
    if preset == "s1":  # s1K is on the Hub: an s1K-shaped row in a local save_to_disk folder
        import datasets as hf_datasets

        monkeypatch.setattr(jax, "device_count", lambda: 1)
        monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
        hf_datasets.Dataset.from_list([{"question": "1+1?", "thinking_trajectories": ["1+1=2"],
                                        "attempt": "2"}]).save_to_disk(str(tmp_path / "s1k"))
        cfg.data.source = f"hf:{tmp_path / 's1k'}"
    if "data" in cfg and "data_dir" in cfg.data:
        cfg.data.data_dir = str(shared_data)
    if cfg.data.source == "math":  # needs the user's MATH train file: the error says so
        with pytest.raises(ConfigError, match="train_file"):
            train.validate(cfg)
        return
    train.validate(cfg)


def test_cudnn_attention_off_a_gpu_is_refused_with_the_fix(monkeypatch, shared_data):
    """The 1.5B presets set attention_impl=cudnn; on a CPU or TPU that must fail at config
    time, naming the field and the value that works, not deep inside XLA."""
    cfg = load_config("sft", "qwen2p5_math_1p5b")
    cfg.data.data_dir = str(shared_data)
    monkeypatch.setattr(jax, "device_count", lambda: 1)
    for platform in ("cpu", "tpu"):
        monkeypatch.setattr(jax, "default_backend", lambda p=platform: p)
        with pytest.raises(ConfigError, match=f"runs on {platform}: set --config.model."
                                              "attention_impl=dot_product"):
            train.validate(cfg)
    cfg.model.attention_impl = "dot_product"
    train.validate(cfg)


def test_print_config_shows_every_field_and_runs_the_checks(tmp_path, shared_data):
    """``--print_config``: the resolved config with the overrides, every check, no run."""
    base = [sys.executable, "-m", "jaxalign.train", "--config", str(REPO_ROOT / "configs/sft.py"),
            "--print_config", f"--config.data.data_dir={shared_data}"]
    out = subprocess.run(base + ["--config.optim.lr=0.25"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    shown = json.loads(out.stdout)
    assert shown["optim"]["lr"] == 0.25 and shown["algorithm"] == "sft"
    assert set(shown) >= {"model", "mesh", "optim", "checkpoint", "log", "data", "train"}
    assert "config OK: sft" in out.stderr
    out = subprocess.run(base + ["--config.optim.grad_accum_steps=3"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "config error: config.train.batch_size=8 is not divisible" in out.stderr
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_dr_grpo_and_dapo_presets_hold_the_published_settings():
    """Each variant changes only the loss settings of its base (demo or the real recipe)."""
    for base in ("demo", "qwen2p5_math_1p5b"):
        plain = load_config("grpo", base)
        name = "" if base == "demo" else base + "_"
        dr, da = load_config("grpo", name + "dr_grpo"), load_config("grpo", name + "dapo")
        assert (dr.grpo.use_std_normalization, dr.grpo.length_normalization,
                dr.grpo.normalize_constant, dr.grpo.loss_type) == (
            False, "masked_normalize", 0, "grpo_clip")
        assert (da.grpo.cliprange_low, da.grpo.cliprange_high, da.grpo.length_normalization,
                da.grpo.filter_zero_std_groups, da.grpo.beta) == (0.2, 0.28, "token_mean", True, 0)
        assert da.grpo.overlong_buffer == plain.sampling.max_tokens // 5
        assert da.grpo.max_resample_rounds == 10 and plain.grpo.max_resample_rounds == 0
        for variant in (dr, da):  # nothing outside the grpo block moved
            for block in ("model", "optim", "data", "sampling"):
                assert variant[block].to_dict() == plain[block].to_dict(), block
    with pytest.raises(ValueError, match="optionally followed by _dr_grpo or _dapo"):
        load_config("grpo", "gsm8k_dapo")


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="choose one of demo"):
        load_config("grpo", "nope")


def test_cli_rejects_unknown_fields_and_reports_config_errors(tmp_path):
    base = [sys.executable, "-m", "jaxalign.train", "--config", str(REPO_ROOT / "configs/sft.py")]
    out = subprocess.run(base + ["--config.optim.lrr=1"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode != 0 and "lrr" in out.stderr
    out = subprocess.run(base + ["--config.optim.grad_accum_steps=3"], capture_output=True,
                         text=True, cwd=tmp_path)
    assert out.returncode == 2
    assert "config error: config.train.batch_size=8 is not divisible" in out.stderr
    assert not (tmp_path / "runs").exists()  # nothing is written for a bad config


def test_model_path_wins_over_the_random_preset(tmp_path):
    """``--config.model.path=DIR`` alone switches a demo config to the checkpoint: the
    preset and its ``arch`` overrides only shape random models."""
    from jaxalign.data.tokenizer import byte_tokenizer
    from jaxalign.models import build, init_model, save_pretrained, tiny

    tok = byte_tokenizer()
    save_pretrained(init_model(tiny(vocab_size=len(tok)), seed=3), tmp_path / "ckpt", tokenizer=tok)
    cfg = load_config("grpo")  # the demo: preset "small" with arch overrides
    cfg.model.path = str(tmp_path / "ckpt")
    train.validate(cfg)
    model, _ = build.build_model_and_tokenizer(cfg.model)
    assert model.config.num_hidden_layers == tiny().num_hidden_layers
    assert model.config.hidden_size == tiny().hidden_size


def test_sidecars_on_other_hosts_need_a_shared_export_dir(tmp_path):
    """The weights go to this machine's /dev/shm unless ``engine.export_dir`` says where."""
    cfg = load_config("grpo")
    cfg.workdir = str(tmp_path / "run")
    cfg.engine.backend = "sidecar"
    cfg.engine.urls = "http://127.0.0.1:8000, http://localhost:8001"
    train.validate(cfg)  # this host: /dev/shm is fine
    cfg.engine.urls = "http://127.0.0.1:8000,http://gpu-node-7.invalid:8000"
    with pytest.raises(ConfigError, match=r"other hosts \(http://gpu-node-7.invalid:8000\).*"
                                          r"set config.engine.export_dir"):
        train.validate(cfg)
    cfg.engine.export_dir = "/shared/exports"
    train.validate(cfg)


@pytest.mark.parametrize("name, field", [
    ("sft", "train.batch_size"), ("grpo", "grpo.train_batch_size"), ("ei", "ei.batch_size"),
    ("grpo", "warmstart.batch_size"),
])
def test_micro_batches_must_split_over_the_data_parallel_devices(name, field):
    """Checked up front for every algorithm, not at the first step after the model loaded;
    ``tensor`` devices share rows, so they do not count (here 8 devices = 4 fsdp x 2)."""
    assert jax.device_count() == 8
    cfg = load_config(name)
    cfg.data.source = "synthetic"  # no ../shared/data needed
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 1, -1, 2
    cfg.optim.grad_accum_steps = 2
    block, key = field.split(".")
    cfg[block][key] = 12  # micro-batch 6
    if block == "grpo":
        cfg.grpo.rollout_batch_size, cfg.grpo.group_size = 48, 4
    with pytest.raises(ConfigError, match=f"micro-batch 6 \\(config.{field} / optim.grad_accum_"
                                          "steps\\) is not divisible by the 4 data-parallel"):
        train.validate(cfg)
    cfg[block][key] = 16
    train.validate(cfg)


def test_engine_group_by_length_takes_auto_on_or_off():
    cfg = load_config("grpo")
    for value in ("auto", "on", "off"):
        cfg.engine.group_by_length = value
        train.validate(cfg)
    cfg.engine.group_by_length = "yes"
    with pytest.raises(ConfigError, match=r"config.engine.group_by_length='yes'; choose one of "
                                          r"auto, on, off"):
        train.validate(cfg)


def test_splash_attention_off_a_tpu_is_refused_with_the_fix(monkeypatch):
    cfg = load_config("grpo")
    cfg.model.attention_impl = "splash"
    with pytest.raises(ConfigError, match=r"'splash' needs a TPU, and this process runs on cpu: "
                                          r"set --config.model.attention_impl=xla"):
        train.validate(cfg)
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    train.validate(cfg)
