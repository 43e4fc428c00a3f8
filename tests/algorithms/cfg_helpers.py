"""Helpers for the training-loop tests: the real config files, shrunk to seconds."""

import importlib.util
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


def load_config(name: str, *args):
    """``configs/<name>.py``'s ``get_config(*args)``, loaded as the CLI loads it."""
    path = REPO_ROOT / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def shrink(cfg, tmp_path, **mesh):
    """Tiny model, tiny batches, no wandb, no progress bars; workdir in ``tmp_path``."""
    cfg.workdir = str(tmp_path / "run")
    cfg.model.preset = "tiny"
    cfg.model.arch = {}
    cfg.log.wandb_mode = "disabled"
    cfg.log.progress = False
    cfg.checkpoint.async_save = False
    cfg.checkpoint.export_hf = False
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = (
        mesh.get("data", 1), mesh.get("fsdp", -1), mesh.get("tensor", 1))
    if "sampling" in cfg:
        cfg.sampling.max_tokens = 16
        cfg.eval.num_workers = 0
        cfg.data.num_eval = 4
        cfg.data.num_train = 200
        cfg.warmstart.sft_steps = 0
        cfg.engine.max_batch_size = 64
    return cfg


def synthetic_sft(tmp_path, steps: int):
    """``configs/sft.py`` shrunk, on 200 synthetic problems in the demo's template, batches
    of 8 rows of 96 tokens, no validation during training."""
    from jaxalign.data.synthetic import DEMO_TEMPLATE

    cfg = shrink(load_config("sft"), tmp_path)
    cfg.data.source, cfg.data.template = "synthetic", DEMO_TEMPLATE
    cfg.data.num_train, cfg.data.num_eval = 200, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_buckets = steps, 8, (96,)
    cfg.eval.every, cfg.eval.num_examples, cfg.eval.max_tokens = 0, 2, 8
    cfg.eval.num_workers = 0
    return cfg
