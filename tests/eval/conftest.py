"""Fixtures of the evaluation tests: the script as a module and a tiny local model."""

import importlib.util
import pathlib
import sys

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def _jax_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax-cache")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(_jax_cache_dir):
    """Every ``run`` builds its own engine; a persistent compilation cache lets them share
    compiled programs. On for these modules only: the cache decides once per process whether
    it is used, so it is reset on the way in and out."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], str(_jax_cache_dir))
    jax.config.update(keys[1], 0.0)
    cc.reset_cache()
    yield
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()


@pytest.fixture(scope="session")
def ev():
    """``eval/evaluate.py``, imported as the module ``jaxalign_eval_script``."""
    name = "jaxalign_eval_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "eval" / "evaluate.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up here
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random tiny Qwen2 (seed 0) with the byte tokenizer, saved as a HF directory."""
    from jaxalign.data.tokenizer import byte_tokenizer
    from jaxalign.models import init_model, save_pretrained, tiny

    tok = byte_tokenizer()
    path = tmp_path_factory.mktemp("models") / "tiny"
    # 2048 positions: r1_zero prompts with GSM8K/AMC questions are ~660 byte tokens
    model = init_model(tiny(vocab_size=len(tok), max_position_embeddings=2048), seed=0)
    save_pretrained(model, path, tokenizer=tok)
    return path
