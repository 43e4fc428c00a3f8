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
